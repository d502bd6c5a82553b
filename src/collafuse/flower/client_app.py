"""The Flower ClientApp: a thin adapter that hands every CollaFuse message to this node's ``Client`` role.

The role is restored from the node's own state directory for each message and written back after it (Flower may
run each message in a fresh process, and simulated nodes share processes, so nothing lives in Python globals).
A malformed message or a failure inside the role comes back as a protocol ``error`` reply, not a crash.
"""

from __future__ import annotations

import os

# Flower starts this module in processes of its own: diffusers must never reach for a model hub there either.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from .task import ClientNode, config_from_run_config, encode_reply  # noqa: E402

app = ClientApp()


@app.query("collafuse")
def collafuse(msg: Message, context: Context) -> Message:
    node = ClientNode(config_from_run_config(context.run_config), context.node_config,
                      str(context.run_config.get("out", "runs/flower")))
    return Message(encode_reply(node.handle(msg.content)), reply_to=msg)
