"""diffusion-pl: ADM / Improved DDPM diffusion models on PyTorch Lightning."""

__version__ = "0.1.0"
