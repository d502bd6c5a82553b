"""One experiment end to end: train a federation into a run directory (resuming if asked), sample every client,
and write the outputs and the report. ``collafuse run`` and ``collafuse sweep`` both call ``run_experiment``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..config import Config, ConfigError
from ..split.checkpoint import latest_checkpoint, write_text_atomic
from ..split.runner import Federation
from ..split.seeding import ClientSecret
from ..split.transport import MessageLog
from .report import plot_losses, write_client_images, write_metrics, write_report
from .telemetry import TrainingTelemetry


def run_experiment(cfg: Config, out: Path, resume: bool = False, progress: bool = True, command: str = "",
                   secrets: dict[int, ClientSecret] | None = None) -> Path:
    """Train, sample and report into ``out``; returns the report path.

    Args:
        cfg (`Config`): the run configuration.
        out (`Path`): the run directory. One that already holds a checkpoint needs ``resume=True``.
        resume (`bool`, defaults to `False`): continue from the last checkpoint in ``out`` (verified first).
        progress (`bool`, defaults to `True`): progress bars for rounds and sampling steps.
        command (`str`): the command line, quoted in the report.
        secrets (`dict[int, ClientSecret]`, *optional*): explicit client secrets (reproducible runs); by default each
            client draws its own from OS entropy. Kept in the clients' checkpoint files only.

    Raises ``ConfigError``/``CheckpointError``/``DataError`` before anything in ``out`` is written, and lets
    ``KeyboardInterrupt`` through after the last completed checkpoint.
    """
    ckpt_dir = out / "checkpoints"
    existing = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    if existing is not None and not resume:
        raise ConfigError(f"--out {out} already holds a run ({existing.name}); pass --resume to continue it "
                          f"or choose another --out")
    fed = Federation(cfg, log=MessageLog(out / "message_log.jsonl"), secrets=secrets, server_dir=out / "server")
    if resume and fed.restore(ckpt_dir):  # verified before anything in out is written
        print(f"resuming {out} after round {fed.history.rounds_done}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    fed.resume_records()  # what a killed attempt logged past its checkpoint is marked replayed, not counted twice
    write_text_atomic(out / "config.toml", cfg.to_toml())
    fed.set_progress(progress)
    telemetry = TrainingTelemetry(fed, out, cfg.eval.grid_every, min(16, cfg.sample.n_per_client)) \
        if cfg.train.tensorboard else None
    try:
        fed.train(ckpt_dir, progress=progress, on_round=telemetry)
    finally:
        if telemetry is not None:
            telemetry.close()
    sample_seconds = {}
    for c in fed.clients:
        t0 = time.perf_counter()
        write_client_images(fed, c.index, cfg.sample.n_per_client, out)
        sample_seconds[c.node_id] = time.perf_counter() - t0
    metrics = write_metrics(fed, out, sample_seconds)
    plot_losses(metrics, out / "losses.png")
    return write_report(fed, out, metrics, command)
