"""Seeds derived from integers: one mixing function for every per-sample, per-step and per-epoch random stream."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (each taken mod 2^32; numpy SeedSequence), identical in every process."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)
