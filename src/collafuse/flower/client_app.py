"""The Flower ClientApp: a thin adapter that hands every CollaFuse message to this node's ``Client`` role.

Flower starts a fresh process for every message. On a deployed node (``site-process``, on by default there) this
module forwards the message to the node's long-lived site process (``site``), which keeps the ``ClientNode`` in
memory; it imports neither torch nor the model code, so a message costs Flower's own start-up and a loopback
exchange. Otherwise (simulation, or ``site-process=false``) the role is restored from the node's state directory for
this message and written back after it (simulated nodes share processes, so nothing lives in Python globals).
Either way a malformed message or a failure inside the role comes back as a protocol ``error`` reply, not a crash,
and the state on disk after each message is the same.
"""

from __future__ import annotations

import os

# Flower starts this module in processes of its own: diffusers must never reach for a model hub there either.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from .site import forward, uses_site_process  # noqa: E402  (torch-free)

app = ClientApp()


def handle_content(content, run_config, node_config, watch_pid: int):
    """One message's content -> its reply's content, through the site process or in this process."""
    if uses_site_process(node_config):
        return forward(content, run_config, node_config, watch_pid)
    from .task import ClientNode, config_from_run_config, encode_reply

    node = ClientNode(config_from_run_config(run_config), node_config, str(run_config.get("out", "runs/flower")))
    return encode_reply(node.handle(content))


@app.query("collafuse")
def collafuse(msg: Message, context: Context) -> Message:
    # The site watches our parent, flower-superexec, which Flower stops with the SuperNode.
    return Message(handle_content(msg.content, context.run_config, context.node_config, os.getppid()), reply_to=msg)
