"""The diffusion maths on tensors: schedules, the Gaussian process, losses, timestep samplers, respacing, samplers
and guidance. No Lightning and no network classes: a model is any callable ``model(x, t, **model_kwargs)``."""

from .continuous import TIMESTEP_MODES, DiscreteTimeDenoiser
from .gaussian import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .guidance import classifier_cond_fn, classifier_free_model
from .process import LOSS_TYPES, MEAN_TYPES, VAR_TYPES, GaussianDiffusion, create_diffusion
from .registry import (
    DEFAULT_METHOD,
    SAMPLERS,
    SamplerSpec,
    auto_method,
    check_method_options,
    check_schedule,
    check_steps,
    get_sampler,
    methods_help,
    resolve_eta,
)
from .respace import space_timesteps
from .samplers import (
    SAMPLING_METHODS,
    check_eta,
    ddim_step,
    discrete_loop,
    p_sample,
    sample_loop,
    schedule_process,
    solve,
)
from .schedules import BETA_SCHEDULES, betas_for_alpha_bar, cosine_alpha_bar, get_named_beta_schedule
from .solvers import dpm_solver_pp_2m, dpm_solver_pp_2m_sde, edm_heun
from .step_schedules import LEVEL_SCHEDULES, count_steps, discrete_steps, karras_sigmas, logsnr_sigmas, schedule_sigmas
from .timestep_samplers import (
    TIMESTEP_SAMPLERS,
    LossSecondMomentSampler,
    TimestepSampler,
    UniformSampler,
    create_timestep_sampler,
)

__all__ = [
    "DEFAULT_METHOD",
    "LEVEL_SCHEDULES",
    "SAMPLERS",
    "TIMESTEP_MODES",
    "DiscreteTimeDenoiser",
    "SamplerSpec",
    "auto_method",
    "check_method_options",
    "check_schedule",
    "check_steps",
    "count_steps",
    "discrete_steps",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_2m_sde",
    "edm_heun",
    "get_sampler",
    "karras_sigmas",
    "logsnr_sigmas",
    "methods_help",
    "resolve_eta",
    "schedule_process",
    "schedule_sigmas",
    "solve",
    "BETA_SCHEDULES",
    "LOSS_TYPES",
    "MEAN_TYPES",
    "SAMPLING_METHODS",
    "TIMESTEP_SAMPLERS",
    "VAR_TYPES",
    "GaussianDiffusion",
    "LossSecondMomentSampler",
    "TimestepSampler",
    "UniformSampler",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "classifier_cond_fn",
    "classifier_free_model",
    "cosine_alpha_bar",
    "create_diffusion",
    "create_timestep_sampler",
    "ddim_step",
    "discrete_loop",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "p_sample",
    "check_eta",
    "sample_loop",
    "space_timesteps",
]
