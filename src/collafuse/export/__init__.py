"""Trained federations for the field's tools: ``collafuse export`` writes a diffusers folder (`writer`), and
``CollaFusePipeline`` (`pipeline`), a ``DiffusionPipeline``, samples it exactly as the project's sampler does."""

from .pipeline import CollaFuseOutput, CollaFusePipeline
from .writer import export_run

__all__ = ["CollaFuseOutput", "CollaFusePipeline", "export_run"]
