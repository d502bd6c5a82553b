"""Live training telemetry: TensorBoard event files under the run directory (``train.tensorboard = true``).

Written with torch's ``SummaryWriter`` (the ``tensorboard`` package's event format); read with ``tensorboard
--logdir RUN/tensorboard``. One step per round:

- ``loss/<node>``: the round's mean training loss of the server and of each client (absent where a node sat out);
- ``lr/<node>``: each in-process node's learning rate after the round;
- ``round/seconds``: the round's wall time, its checkpoint and (when drawn) its sample grids included;
- ``round/bytes``: the bytes of every message logged during the round (``message_log.jsonl``'s ``bytes``);
- ``samples/client<i>``: a grid of samples per client every ``eval.grid_every`` rounds (0: never), through the split
  with the round number as the seed (``Federation.sample(..., seed=round)``): neither the server's nor a client's own
  streams move, so a run with grids trains and samples the same bits as one without.

A resumed run opens the writer with ``purge_step`` = the first round it trains: whatever a killed attempt logged past
its checkpoint is dropped by TensorBoard's reader, so each curve holds every round once.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..data.images import grid

TENSORBOARD_DIR = "tensorboard"


class TrainingTelemetry:
    """A ``Federation.train(on_round=...)`` callback that writes TensorBoard events.

    Args:
        fed (`Federation`): the run being trained (its history, roles and message log are read, never changed).
        out (`Path`): the run directory; events go to ``out / "tensorboard"``.
        grid_every (`int`, defaults to 0): rounds between sample grids; 0: none.
        grid_n (`int`, defaults to 16): images per client grid.
    """

    def __init__(self, fed, out: Path, grid_every: int = 0, grid_n: int = 16):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package; only when asked for

        self.fed, self.grid_every, self.grid_n = fed, grid_every, grid_n
        first = fed.history.rounds_done + 1
        self.writer = SummaryWriter(log_dir=str(Path(out) / TENSORBOARD_DIR), purge_step=first)
        self._log_len = len(fed.transport.log.records)
        self._t = time.perf_counter()
        self.seconds = 0.0  # time spent in this callback, the grids excluded (what telemetry itself costs)

    def _roles(self):
        return self.fed.local_roles  # the nodes whose learners live in this process

    def __call__(self, round_: int) -> None:
        t0 = time.perf_counter()
        w, h = self.writer, self.fed.history
        for node, losses in h.losses.items():
            if len(losses) >= round_ and losses[round_ - 1] is not None and not math.isnan(losses[round_ - 1]):
                w.add_scalar(f"loss/{node}", losses[round_ - 1], round_)
        for role in self._roles():
            opt = role.learner.optimizer
            w.add_scalar(f"lr/{role.node_id}", opt.param_groups[0]["lr"], round_)
        records = self.fed.transport.log.records
        w.add_scalar("round/bytes", sum(r.get("bytes", 0) for r in records[self._log_len:]), round_)
        self._log_len = len(records)
        spent = time.perf_counter() - t0
        if self.grid_every and round_ % self.grid_every == 0:
            for c in self.fed.clients:
                x0 = self.fed.sample(c.index, self.grid_n, seed=round_)["x0"]
                img = np.asarray(grid(x0, max(1, round(self.grid_n ** 0.5))).convert("RGB"))
                w.add_image(f"samples/{c.node_id}", img, round_, dataformats="HWC")
        t1 = time.perf_counter()
        w.add_scalar("round/seconds", t1 - self._t, round_)  # from the end of the last round's telemetry
        w.flush()
        self._t = time.perf_counter()
        self.seconds += spent + (self._t - t1)

    def close(self) -> None:
        self.writer.close()
