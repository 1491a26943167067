"""diffusion-pl: ADM / Improved DDPM diffusion models on PyTorch Lightning.

From Python (a notebook): ``diffusion_pl.load(checkpoint, preset=None) -> Sampler`` and ``diffusion_pl.grid(images)``
(diffusion_pl/api.py, docs/NOTEBOOK.md); imported on first use, so ``import diffusion_pl`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["load", "grid", "Sampler"]


def __getattr__(name: str):
    if name in __all__:
        from diffusion_pl import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffusion_pl' has no attribute {name!r}")
