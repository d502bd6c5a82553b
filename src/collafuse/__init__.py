"""CollaFuse: collaborative diffusion models with an exact server/client split of the denoising chain."""

__version__ = "0.1.0"
