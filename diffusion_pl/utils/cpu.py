"""CPU floating-point mode for the networks."""

from __future__ import annotations

import torch


def flush_denormals(device: torch.device | str | None = None) -> bool:
    """Flush denormal floats to zero (FTZ/DAZ) for CPU computation; returns whether the CPU supports it.

    Values below ~1.2e-38 become 0, far below any tolerance of the maths, but arithmetic on denormals is orders of
    magnitude slower on x86. Data with exactly constant regions (MNIST's black background) produce them in the U-Net:
    a quickstart training step took 19 s instead of 0.6 s without this. No effect for other devices.
    """
    if device is not None and torch.device(device).type != "cpu":
        return False
    return bool(torch.set_flush_denormal(True))
