"""Sampling entry point: :func:`sample_loop` runs any method of the registry (registry.py) from noise to x_0.

The step functions live in discrete.py (ancestral, DDIM) and solvers.py (DPM-Solver++, EDM Heun); this module
re-exports them with the registry, so ``from diffusion_pl.diffusion.samplers import ...`` keeps working.

Randomness: x_T is ``noise`` if given, else ``torch.randn(shape, generator=generator)``; every stochastic step draws
``torch.randn(x.shape, generator=generator)`` (or calls ``noise_fn(x)``), so a given generator state always produces
the same trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .continuous import DiscreteTimeDenoiser
from .discrete import ddim_step, p_sample
from .process import GaussianDiffusion
from .registry import SAMPLERS, SAMPLING_METHODS, SamplerSpec, check_eta, check_steps, get_sampler, resolve_eta
from .step_schedules import discrete_steps, schedule_sigmas, step_spec, trained_sigmas

__all__ = ["SAMPLERS", "SAMPLING_METHODS", "SamplerSpec", "check_eta", "check_steps", "ddim_step", "discrete_loop",
           "get_sampler", "p_sample", "resolve_eta", "sample_loop", "schedule_process", "solve"]  # fmt: skip


def schedule_process(process: GaussianDiffusion, steps: str | int | None) -> GaussianDiffusion:
    """The process a discrete method (ddpm, ddim) runs for ``steps`` (step_schedules.py): ``process`` itself for
    None / "" / all steps, else ``process`` respaced at the schedule's trained steps."""
    if not step_spec(steps):
        return process
    kept = discrete_steps(trained_sigmas(process), steps)
    return process if len(kept) == process.num_timesteps else process.respaced_at(kept)


def solve(
    spec: SamplerSpec,
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_start: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float = 0.0,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the continuous method ``spec`` from ``x_start`` ~ N(0, I) (the noisy image at the first level in the
    model's own scaling, x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps) through ``sigmas`` to x_0.

    The solvers' variable is x = x_t / sqrt(alpha_bar) = x_start * sqrt(1 + sigma_0^2) (continuous.py); so the same
    x_start gives the same start point as the discrete samplers' x_T at that level.
    """
    x = x_start * float((1.0 + sigmas[0] ** 2).sqrt())
    extra = {"eta": eta, "noise": noise_fn} if spec.eta is not None else {}
    if spec.euler_above is not None:
        extra["euler_above"] = spec.euler_above
    return spec.function(denoiser, x, sigmas, callback=callback, **extra)


def sample_loop(
    process: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    shape: Sequence[int] | None = None,
    noise: torch.Tensor | None = None,
    method: str = "ddpm",
    eta: float | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    cond_fn: Callable[..., torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    return_intermediates: bool = False,
    device: torch.device | str | None = None,
    steps: str | int | None = None,
    timestep_mode: str = "interpolate",
):
    """Sample x_0 with ``method`` (any name of the registry) over the step schedule ``steps`` of ``process``.

    ``steps`` (step_schedules.py: "250", "10,10,20", "ddim50", "uniform20", "logsnr20", "karras20"; None = every
    step of ``process``, which may already be respaced). ``eta``: None = the method's default. The start x_T is
    ``noise`` if given, else torch.randn(shape, generator=generator) on ``device`` (default: the generator's device,
    else the device of the model's first parameter, else CPU). Runs under ``torch.no_grad()`` (a cond_fn may enable
    grad locally). Returns the sample, or (sample, steps) with ``return_intermediates``: the per-step dicts (sample,
    pred_xstart) of a discrete method, dicts (pred_xstart) of a solver, first step first.
    """
    spec = get_sampler(method)
    eta = resolve_eta(method, eta)
    check_steps(method, process.num_timesteps, steps, "steps")
    x = _initial_noise(model, shape, noise, generator, device)
    record: list[dict] = []
    bar = tqdm(disable=not progress, desc=f"{method} sampling")

    def step_done(out: dict) -> None:
        bar.update(1)
        if return_intermediates:
            record.append(out)

    def noise_fn(like: torch.Tensor, last: bool = False) -> torch.Tensor:  # ddpm / ddim: at every step, the last too
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)  # (as the reference)

    with torch.no_grad():
        if spec.kind == "discrete":
            respaced = schedule_process(process, steps)
            bar.total = respaced.num_timesteps
            x = discrete_loop(spec, respaced, model, x, eta, clip_denoised, model_kwargs, cond_fn, noise_fn, step_done)
        else:
            denoiser = DiscreteTimeDenoiser(process, model, model_kwargs, cond_fn, clip_denoised, timestep_mode)
            sigmas = schedule_sigmas(denoiser, steps)
            bar.total = len(sigmas) - 1
            x = solve(spec, denoiser, x, sigmas, eta, noise_fn, lambda i, x_0: step_done({"pred_xstart": x_0}))
    bar.close()
    return (x, record) if return_intermediates else x


def _initial_noise(model, shape, noise, generator, device) -> torch.Tensor:
    if noise is not None:
        if shape is not None and tuple(shape) != tuple(noise.shape):
            raise ValueError(f"shape {tuple(shape)} does not match the initial noise {tuple(noise.shape)}")
        return noise
    if shape is None:
        raise ValueError("sample_loop needs either shape or an initial noise tensor")
    if device is None:
        if generator is not None:
            device = generator.device
        else:
            params = getattr(model, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            device = first.device if first is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=device)


def discrete_loop(
    spec: SamplerSpec,
    process: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    eta: float,
    clip_denoised: bool,
    model_kwargs: dict | None,
    cond_fn: Callable[..., torch.Tensor] | None,
    noise_fn: Callable[[torch.Tensor, bool], torch.Tensor],
    step_done: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Steps T-1 .. 0 of ``process`` with the ddpm / ddim step function of ``spec``. ``noise_fn(x, last)`` gives each
    step's noise (the last step adds none, whatever it returns); ``step_done`` receives each step's dict."""
    extra = {"eta": eta} if spec.eta is not None else {}
    timesteps = torch.arange(process.num_timesteps - 1, -1, -1, device=x.device)
    for k, step in enumerate(timesteps):
        noise = noise_fn(x, k == len(timesteps) - 1)  # from the index, not the tensor: no device sync per step
        out = spec.function(process, model, x, step.expand(x.shape[0]), clip_denoised=clip_denoised,
                            model_kwargs=model_kwargs, cond_fn=cond_fn, noise=noise, **extra)  # fmt: skip
        x = out["sample"]
        if step_done is not None:
            step_done(out)
    return x
