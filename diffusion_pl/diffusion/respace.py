"""Choosing which steps of a trained T-step process to keep when sampling or evaluating with fewer steps.

The respaced process itself is built by :meth:`GaussianDiffusion.respaced`.
"""

from __future__ import annotations

from collections.abc import Sequence


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Sorted list of the original step indices (0..T-1) to keep.

    ``section_counts`` is
      * ``"ddimN"``: the DDIM paper's fixed striding: the smallest integer stride k with len(range(0, T, k)) == N,
        keeping range(0, T, k) (it starts at 0 and generally does not contain T - 1);
      * ``"c1,c2,..."`` (or a list of ints): T is cut into len(counts) equal sections (the remainder T % len goes one
        step each to the first sections); a section of S steps with count c keeps the steps round(i * (S - 1)/(c - 1)),
        i = 0..c-1 (Python rounding) from its start, so the first and last step of each section are kept.
        ``"250"`` at T = 1000 gives 0, 4, 8, ..., 995, 999.
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            return _ddim_steps(num_timesteps, spec)
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad timestep respacing {section_counts!r}: expected 'ddimN' or comma-separated step counts such "
                f"as '250' or '10,10,20'"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("timestep respacing needs at least one section count")
    if any(c < 1 for c in counts):
        raise ValueError(f"every section count must be >= 1, got {counts}")
    if len(counts) > num_timesteps:
        raise ValueError(f"cannot cut {num_timesteps} steps into {len(counts)} sections")

    base_size, remainder = divmod(num_timesteps, len(counts))
    steps: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base_size + (1 if i < remainder else 0)
        if count > size:
            raise ValueError(
                f"section {i} of the respacing {section_counts!r} has {size} steps of the {num_timesteps}-step "
                f"process but asks for {count}"
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        # Accumulate the fractional index exactly as the reference does (repeated addition, then Python round).
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def _ddim_steps(num_timesteps: int, spec: str) -> list[int]:
    try:
        desired = int(spec[len("ddim") :])
    except ValueError:
        raise ValueError(f"bad DDIM respacing {spec!r}: expected 'ddimN' with an integer N, e.g. 'ddim25'") from None
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired:
            return list(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot take exactly {desired} steps from {num_timesteps} with an integer stride ({spec!r}); "
        f"use a section count such as '{desired}' instead"
    )
