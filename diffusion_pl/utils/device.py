"""Per-device preparation of computation: denormal flushing on the CPU, and a clear refusal of unsupported devices."""

from __future__ import annotations

import torch

from diffusion_pl.errors import UserInputError


def flush_denormals(device: torch.device | str | None = None) -> bool:
    """Flush denormal floats to zero (FTZ/DAZ) for CPU computation; returns whether the CPU supports it.

    Values below ~1.2e-38 become 0, far below any tolerance of the maths, but arithmetic on denormals is orders of
    magnitude slower on x86. Data with exactly constant regions (MNIST's black background) produce them in the U-Net:
    a quickstart training step took 19 s instead of 0.6 s without this. No effect for other devices.
    """
    if device is not None and torch.device(device).type != "cpu":
        return False
    return bool(torch.set_flush_denormal(True))


def check_device_supported(device: torch.device | str) -> None:
    """Refuse devices the diffusion maths cannot run on: the schedule and its coefficients are float64 tensors
    (as in the reference), and Apple's MPS backend has no float64."""
    if torch.device(device).type == "mps":
        raise UserInputError(
            "Apple MPS devices are not supported: diffusion-pl keeps the noise schedule in float64, which MPS does not "
            "have. Run on the CPU: --trainer.accelerator=cpu (fit / validate / test) or --accelerator cpu (sample, "
            "evaluate, sweep, demo)."
        )


def prepare_device(device: torch.device | str) -> None:
    """:func:`check_device_supported`, then :func:`flush_denormals` (CPU only)."""
    check_device_supported(device)
    flush_denormals(device)
