"""The Flower ServerApp: the same ``Orchestrator`` round loop as in process, over ``FlowerTransport``.

It keeps only the server's state (checkpointed per round in ``<out>/checkpoints``; a restart resumes from the last
one, losing at most the round in progress), waits for the configured clients to join, trains, orders
``sample.n_per_client`` samples from every client (the images stay on the clients) and writes
``<out>/metrics.json`` and the message log.
"""

from __future__ import annotations

import os

# Flower starts this module in processes of its own: diffusers must never reach for a model hub there either.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from .task import run_server  # noqa: E402

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)
