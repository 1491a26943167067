"""The one registry of sampling methods: name -> :class:`SamplerSpec`. Choices, defaults and help text of every
``--method`` option, SampleEngine, sample_loop and the callbacks come from here; adding a sampler is one function and
one entry in :data:`SAMPLERS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffusion_pl.errors import UserInputError

from .continuous import DiscreteTimeDenoiser
from .discrete import ddim_step, p_sample
from .respace import space_timesteps
from .solvers import dpm_solver_pp_2m, dpm_solver_pp_2m_sde, edm_heun
from .step_schedules import (
    SIGMA_MAX,
    count_steps,
    discrete_steps,
    parse_level_schedule,
    schedule_sigmas,
    step_spec,
    trained_sigmas,
)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampling method.

    ``kind`` is "discrete" (``function`` is one step of a respaced GaussianDiffusion: ddpm, ddim) or "continuous"
    (``function(denoiser, x, sigmas, ...)`` solves from the first noise level to 0). ``order``: convergence order of
    the deterministic method. ``eta``: the allowed range (low, high) of the stochasticity eta, or None when the method
    has none (``eta_help`` says what its ends mean); ``default_eta`` is used when none is given. ``stochastic``:
    always draws noise (ddpm), else only when eta > 0. ``evals_per_step`` / ``min_steps``: see :meth:`nfe` and the
    registry entries. ``euler_above``: passed to a 2-evaluation solver, which takes a one-evaluation (Euler) step from a
    level above it (the top crossing of step_schedules.py; None: never).
    """

    name: str
    function: Callable
    kind: str
    order: int
    help: str
    eta: tuple[float, float] | None = None
    eta_help: str = ""
    default_eta: float = 0.0
    stochastic: bool = False
    evals_per_step: int = 1
    min_steps: int = 1
    euler_above: float | None = None

    def draws_noise(self, eta: float) -> bool:
        return self.stochastic or eta > 0.0

    def nfe(self, steps: int, euler_steps: int = 0) -> int:
        """Network evaluations for ``steps`` noise levels: ``evals_per_step`` per step, but one for the final step to 0
        and for each of ``euler_steps`` steps from above ``euler_above``."""
        return self.evals_per_step * steps - (self.evals_per_step - 1) * (1 + euler_steps)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddpm", p_sample, "discrete", 1, stochastic=True,
                    help="ancestral sampling (DDPM; the reference's default, 250 steps for ADM)"),
        SamplerSpec("ddim", ddim_step, "discrete", 1, eta=(0.0, float("inf")), default_eta=0.0,
                    eta_help="0: deterministic DDIM, 1: DDPM-like noise",
                    help="DDIM (Song et al. 2021); eta 0 deterministic, 1 DDPM-like noise"),
        SamplerSpec("dpmpp_2m", dpm_solver_pp_2m, "continuous", 2, min_steps=3,
                    help="DPM-Solver++(2M) (Lu et al. 2022), 2nd-order multistep ODE solver; 10-25 steps"),
        SamplerSpec("dpmpp_2m_sde", dpm_solver_pp_2m_sde, "continuous", 2, eta=(0.0, 1.0), default_eta=1.0,
                    eta_help="0: the deterministic dpmpp_2m, 1: the full SDE",
                    min_steps=3, help="DPM-Solver++(2M) SDE, stochastic (eta in [0, 1], default 1; 0 = dpmpp_2m)"),
        SamplerSpec("heun", edm_heun, "continuous", 2, evals_per_step=2, min_steps=3, euler_above=SIGMA_MAX,
                    help="EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1); 2 evaluations per step"),
    )
}  # fmt: skip

#: Method names, for existing callers (choices of ``--method``).
SAMPLING_METHODS = tuple(SAMPLERS)
DEFAULT_METHOD = "ddpm"


def auto_method(steps: str | int | None) -> str:
    """The "auto" method of a step schedule: ddim for "ddimN" (the DDIM paper's striding), dpmpp_2m for a noise-level
    schedule ("uniformN", "logsnrN", "karrasN"), else ancestral ddpm."""
    spec = "" if steps is None else str(steps).strip()
    if spec.startswith("ddim"):
        return "ddim"
    return "dpmpp_2m" if parse_level_schedule(spec) is not None else DEFAULT_METHOD


def methods_help() -> str:
    """One line per method: ``name: help``."""
    return "; ".join(f"{spec.name}: {spec.help}" for spec in SAMPLERS.values())


def get_sampler(method: str, option: str = "method") -> SamplerSpec:
    """The registry entry of ``method``; UserInputError naming the registry's methods otherwise."""
    spec = SAMPLERS.get(method)
    if spec is None:
        raise UserInputError(f"unknown {option} {method!r}; choose from {', '.join(SAMPLERS)} ({methods_help()})")
    return spec


def resolve_eta(method: str, eta: float | None, option: str = "eta") -> float:
    """``eta`` checked against the method's range (UserInputError naming ``option``), or its default when None."""
    spec = get_sampler(method)
    if eta is None:
        return spec.default_eta
    if spec.eta is None:
        if eta != 0.0:
            with_eta = " or ".join(s.name for s in SAMPLERS.values() if s.eta is not None)
            raise UserInputError(f"{option} {eta} only applies to method {with_eta}; {method} sampling has no eta")
        return 0.0
    low, high = spec.eta
    if not low <= eta <= high:
        bounds = f"in [{low:g}, {high:g}]" if high != float("inf") else f">= {low:g}"
        raise UserInputError(f"{option} must be {bounds} ({spec.eta_help}), got {eta}")
    return float(eta)


def check_eta(method: str, eta: float | None, option: str = "eta") -> None:
    """Raise UserInputError (a ValueError) naming ``option`` unless ``eta`` fits ``method`` (:func:`resolve_eta`)."""
    resolve_eta(method, eta, option)


def check_steps(method: str, num_timesteps: int, steps: str | int | None, option: str = "--steps") -> int:
    """The number of noise levels ``steps`` gives on a T-step process; UserInputError naming ``option`` if the
    schedule does not parse or is too short for ``method`` (with the smallest valid value)."""
    spec = get_sampler(method)
    try:
        n = count_steps(num_timesteps, steps)
    except ValueError as e:
        raise UserInputError(f"{option} {steps!r}: {e}") from e
    _require_steps(spec, steps, n, option)
    return n


def _require_steps(spec: SamplerSpec, steps: str | int | None, n: int, option: str) -> None:
    """UserInputError unless ``n`` (the steps of ``steps``) is at least the method's fewest, naming the smallest."""
    if n < spec.min_steps:
        text = str(steps).strip()
        named = text.rstrip("0123456789") if text[-1:].isdigit() and "," not in text else ""
        named = "" if named == "ddim" else named  # ddimN exists only for some N: suggest the plain count
        raise UserInputError(
            f"{option} {steps!r} gives {n} step(s), but method {spec.name} needs at least {spec.min_steps} (with "
            f"fewer it takes no order-{spec.order} step); use e.g. {option} {named}{spec.min_steps}"
        )


def schedule_nfe(process, method: str, steps: str | int | None) -> int:
    """Network evaluations per sample of ``method`` over the step schedule ``steps`` of the T-step ``process``; the
    levels the solver visits (:func:`schedule_sigmas`) say how many steps start above the method's ``euler_above``."""
    spec = get_sampler(method)
    n = count_steps(process.num_timesteps, steps)
    if spec.euler_above is None:
        return spec.nfe(n)
    levels = schedule_sigmas(DiscreteTimeDenoiser(process, None), steps)
    return spec.nfe(n, int((levels[:-2] > spec.euler_above).sum()))  # the last step, to 0, is single already


def check_method_options(method: str, eta: float | None, steps: str | int | None, method_option: str = "--method",
                         eta_option: str = "--eta", steps_option: str = "--steps") -> None:  # fmt: skip
    """What can be checked without the model: ``method`` exists, ``eta`` fits it, and ``steps`` gives at least its
    fewest steps when its count does not depend on T ("N", "c1,c2", "ddimN", "karrasN", ...; "" = all T steps).
    Errors name the options as ``*_option``."""
    spec = get_sampler(method, method_option)
    resolve_eta(method, eta, eta_option)
    text = step_spec(steps)
    level = parse_level_schedule(text)
    try:
        count = level[1] if level else sum(int(c) for c in text.removeprefix("ddim").split(",")) if text else None
    except ValueError:
        return  # malformed: reported with T by check_schedule
    if count is not None:
        _require_steps(spec, text, count, steps_option)


def check_schedule(process, steps: str | int | None, method: str = "ddpm", option: str = "--steps") -> None:
    """UserInputError naming ``option`` unless ``method`` can sample the T-step ``process`` with the step schedule
    ``steps`` (a respacing or a noise-level schedule, step_schedules.py): it parses and fits T, it has at least the
    method's fewest steps, and a discrete method gets distinct trained steps."""
    T = process.num_timesteps
    spec = step_spec(steps)
    try:
        level = parse_level_schedule(spec)
        if level is None and spec:
            space_timesteps(T, spec)
    except ValueError as e:
        ddim = sorted({len(range(0, T, k)) for k in range(1, T + 1)}, reverse=True)
        ddim_text = ", ".join(f"ddim{n}" for n in ddim[:8]) + (", ..." if len(ddim) > 8 else "")
        raise UserInputError(
            f"{option} {spec!r} does not fit the model's T = {T} training steps ({e}). Use a step count 1..{T}, "
            f"comma-separated counts for equal sections of the T steps (each at most its section's length), "
            f"ddimN with N one of {ddim_text}, uniformN / logsnrN / karrasN with N in 1..{T}, or \"\" for all {T} "
            "steps"
        ) from e
    check_steps(method, T, spec, option)
    if level is not None and get_sampler(method).kind == "discrete":
        try:
            discrete_steps(trained_sigmas(process), spec)
        except ValueError as e:
            raise UserInputError(f"{option} {spec!r} with method {method}: {e}") from e
