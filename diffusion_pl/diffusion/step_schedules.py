"""Step schedules: which noise levels a sampler visits, all named in one ``--steps`` string.

Respacings of the trained T-step process (the reference's; :func:`space_timesteps`):
    ""            all T trained steps
    "250"         250 steps, evenly strided over the T steps (includes the first and the last)
    "10,10,20"    per-section counts over equal sections of the T steps
    "ddim50"      range(0, T, k) with the integer stride k giving 50 steps (DDIM paper)
Noise-level schedules for the ODE / SDE solvers (N noise levels; see continuous.py for sigma_t):
    "uniformN"    time-uniform: N step indices evenly spaced from T - 1 to 0, sigma interpolated in log sigma between
                  trained steps (k-diffusion's DiscreteSchedule.get_sigmas)
    "logsnrN"     logSNR-uniform: log sigma evenly spaced (logSNR = -2 log sigma; DPM-Solver's "logSNR" steps)
    "karrasN"     Karras et al. 2022, eq. 5 with rho = 7: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) -
                  s_max^(1/rho)))^rho
The noise-level schedules start at the top trained level sigma_{T-1}, where ancestral sampling and DDIM draw x_T
(as the respacings "N" and "" do), so every method integrates from the same x_T. "logsnrN" / "karrasN" run from
s_max = sigma_{T-1} to s_min = sigma_0 when sigma_{T-1} <= 80 (EDM's sigma_max). Above it, the top crossing takes
k = max(1, N // 20) levels evenly spaced in log sigma from sigma_{T-1} down to 80, and the other N - k levels run from
s_max = 80: with fewer than 40 levels the top stretch is crossed in one first-order step, and k grows with N so that
the schedule still converges at the solver's order. That stretch is long on the cosine schedule: its last beta is
clipped to 0.999, so sigma_{T-1} (2e4 at T = 1000) is ~30x sigma_{T-2}; an uncapped Karras schedule would put ~60 %
of its levels above 80, where D(x; sigma) is nearly constant.
The solvers step through the N levels and then to sigma = 0 (the final denoising step). The discrete samplers (ddpm,
ddim) step through trained steps only: a noise-level schedule is mapped to the nearest trained steps (each level to
its own step; a schedule that would visit a step twice is refused).
"""

from __future__ import annotations

import math
import re

import torch

from .respace import space_timesteps

LEVEL_SCHEDULES = ("uniform", "logsnr", "karras")
KARRAS_RHO = 7.0
SIGMA_MAX = 80.0  # EDM's sigma_max: where "logsnrN" / "karrasN" spacing starts below the top crossing
TOP_SHARE = 20  # one level of the top crossing per 20 levels of the schedule
_LEVEL_PATTERN = re.compile(r"^(uniform|logsnr|karras)(\d+)$")


def trained_sigmas(process) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of every step of a GaussianDiffusion (float64, increasing)."""
    return ((1.0 - process.alphas_cumprod) / process.alphas_cumprod).sqrt()


def parse_level_schedule(spec: str) -> tuple[str, int] | None:
    """("karras", 20) for "karras20", ...; None when ``spec`` is not a noise-level schedule (it is a respacing)."""
    match = _LEVEL_PATTERN.match(str(spec).strip())
    if match is None:
        if any(str(spec).strip().startswith(name) for name in LEVEL_SCHEDULES):
            raise ValueError(f"bad step schedule {spec!r}: write the count right after the name, e.g. 'karras20'")
        return None
    return match.group(1), int(match.group(2))


def step_spec(spec: str | int | None) -> str:
    """``spec`` as text; "" (all T trained steps) for None, "", 0 and "0"."""
    text = "" if spec is None else str(spec).strip()
    return "" if text == "0" else text


def count_steps(num_timesteps: int, spec: str | int | None) -> int:
    """How many noise levels (steps) ``spec`` visits on a T-step process; raises ValueError if it does not fit."""
    spec = step_spec(spec)
    if not spec:
        return num_timesteps
    level = parse_level_schedule(spec)
    if level is None:
        return len(space_timesteps(num_timesteps, spec))
    name, n = level
    if not 1 <= n <= num_timesteps:
        raise ValueError(
            f"{name}{n} asks for {n} noise levels; the T = {num_timesteps} process allows 1..{num_timesteps}"
        )
    return n


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """EDM eq. 5: n levels from sigma_max to sigma_min, evenly spaced in sigma^(1/rho) (float64)."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (high + ramp * (low - high)) ** rho


def logsnr_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n levels from sigma_max to sigma_min, evenly spaced in log sigma (= -logSNR / 2) (float64)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def _level_sigmas(name: str, n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The "logsnrN" / "karrasN" levels of a process with trained levels sigma_min .. sigma_max: n levels from
    sigma_max when it is at most SIGMA_MAX, else k = max(1, n // TOP_SHARE) levels evenly spaced in log sigma from
    sigma_max down to SIGMA_MAX (excluded), then n - k levels from SIGMA_MAX (module doc)."""
    spaced = logsnr_sigmas if name == "logsnr" else karras_sigmas
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    if sigma_max <= SIGMA_MAX:
        return spaced(n, sigma_min, sigma_max)
    top = max(1, n // TOP_SHARE)
    return torch.cat([logsnr_sigmas(top + 1, SIGMA_MAX, sigma_max)[:-1], spaced(n - top, sigma_min, SIGMA_MAX)])


def schedule_sigmas(denoiser, spec: str | int | None) -> torch.Tensor:
    """The noise levels a solver visits, descending, followed by 0 (float64, length N + 1).

    ``denoiser`` is a :class:`~diffusion_pl.diffusion.continuous.DiscreteTimeDenoiser` (its trained levels); a respacing
    visits the levels of its kept steps, a noise-level schedule those of the module doc.
    """
    T = denoiser.sigmas.numel()
    count_steps(T, spec)  # validates
    spec = step_spec(spec)
    level = parse_level_schedule(spec)
    if level is None:
        kept = space_timesteps(T, spec) if spec else list(range(T))
        sigmas = denoiser.sigmas[torch.tensor(kept[::-1])]
    else:
        name, n = level
        if name == "uniform":
            sigmas = denoiser.index_to_sigma(torch.linspace(T - 1, 0, n, dtype=torch.float64))
        else:
            sigmas = _level_sigmas(name, n, denoiser.sigma_min, denoiser.sigma_max)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def discrete_steps(sigmas: torch.Tensor, spec: str | int | None) -> list[int]:
    """The trained step indices (ascending) a discrete sampler visits for ``spec`` on a process with trained levels
    ``sigmas`` (increasing): a respacing's kept steps, else each level of the noise-level schedule mapped to its
    nearest trained step in log sigma ("uniformN": the rounded indices). Raises ValueError if two levels share a step.
    """
    T = sigmas.numel()
    count_steps(T, spec)
    spec = step_spec(spec)
    level = parse_level_schedule(spec)
    if level is None:
        return space_timesteps(T, spec) if spec else list(range(T))
    name, n = level
    if name == "uniform":
        steps = torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long().tolist()
    else:
        levels = _level_sigmas(name, n, float(sigmas[0]), float(sigmas[-1]))
        steps = (levels.log()[:, None] - sigmas.log()[None]).abs().argmin(dim=1).tolist()
    if len(set(steps)) != len(steps):
        raise ValueError(
            f"{spec} puts two of its {n} noise levels on the same trained step of the T = {T} process; "
            f"methods ddpm / ddim need distinct trained steps: use fewer steps or a respacing such as '{n}'"
        )
    return sorted(steps)
