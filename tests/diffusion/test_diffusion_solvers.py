"""The fast samplers: convergence order on Gaussian data (closed-form probability-flow ODE) and agreement with
k-diffusion (the published implementation of DPM-Solver++(2M), its SDE variant and EDM's Heun sampler) on the same
model, noise and noise levels."""

import math

import pytest
import torch
from kdiffusion_oracle import load_kdiffusion

from diffusion_pl.diffusion import (
    DiscreteTimeDenoiser,
    create_diffusion,
    dpm_solver_pp_2m,
    dpm_solver_pp_2m_sde,
    edm_heun,
    get_sampler,
    karras_sigmas,
    logsnr_sigmas,
    sample_loop,
    schedule_sigmas,
)

MU, S = 0.3, 0.5  # Gaussian data x_0 ~ N(MU, S^2) in every pixel


def gaussian_setup(T=1000):
    """A process, the exact eps predictor of Gaussian data at any (fractional) t, and the start noise."""
    process = create_diffusion(T, "cosine", var_type="fixed_small", loss_type="simple")
    view = DiscreteTimeDenoiser(process, None)

    def optimal_eps(x_t, t):
        # E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) MU) / (ab S^2 + 1 - ab), ab at the (fractional) step t.
        sigma = view.index_to_sigma(t.cpu()).to(x_t).view(-1, 1, 1, 1)
        ab = 1.0 / (1.0 + sigma**2)
        return (1.0 - ab).sqrt() / (ab * S * S + 1.0 - ab) * (x_t - ab.sqrt() * MU)

    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return process, view, optimal_eps, z


def exact_x0(view, z, s_max):
    """The PF-ODE dx/dsigma = (x - D)/sigma has (x - MU)/sqrt(S^2 + sigma^2) constant: solve it from the first level
    s_max to sigma_min, then take the final denoising step every sampler ends with, D(x; sigma_min)."""
    s_min = view.sigma_min
    x = z * math.sqrt(1.0 + s_max**2)
    x_min = MU + (x - MU) * math.sqrt(S * S + s_min**2) / math.sqrt(S * S + s_max**2)
    return MU + (x_min - MU) * S * S / (S * S + s_min**2)


@pytest.mark.parametrize(
    "method, schedule, counts, low, high",
    [
        ("ddim", "{}", (10, 20, 40), 1.8, 2.3),  # 1st order: the error halves per doubling of steps
        ("dpmpp_2m", "logsnr{}", (40, 80, 160), 3.5, 4.6),  # 2nd order: ~4x per doubling
        ("dpmpp_2m", "karras{}", (40, 80, 160), 3.5, 4.6),
        ("dpmpp_2m_sde", "logsnr{}", (40, 80, 160), 3.5, 4.6),  # eta = 0: the ODE solver
        ("heun", "karras{}", (40, 80, 160), 3.5, 4.6),
        ("heun", "logsnr{}", (40, 80, 160), 3.5, 4.6),
    ],
)
def test_convergence_order_on_gaussian_data(method, schedule, counts, low, high):
    process, view, model, z = gaussian_setup()
    errors = []
    for n in counts:
        target = exact_x0(view, z, float(schedule_sigmas(view, schedule.format(n))[0]))
        eta = 0.0 if get_sampler(method).eta is not None else None  # the deterministic form of a method with eta
        out = sample_loop(process, model, noise=z.clone(), method=method, eta=eta, steps=schedule.format(n),
                          clip_denoised=False)  # fmt: skip
        errors.append((out - target).pow(2).mean().sqrt().item())
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(low < r < high for r in ratios), (errors, ratios)
    assert errors[-1] < 2e-2


def test_heun_crosses_the_top_stretch_in_one_euler_step():
    """From sigma_{T-1} ~ 2e4 (above EDM's sigma_max = 80) the registry's heun takes the Euler step, which is the DDIM
    step x_1 = D + (sigma_1 / sigma_0) (x - D), and EDM's Alg. 1 from there; without that rule the trapezoidal
    correction over the first step multiplies a difference of denoiser outputs by (sigma_1 - sigma_0) / (2 sigma_1)."""
    process, _, _, z = gaussian_setup()
    model = TanhEps(channels=1, out_channels=1)
    view = DiscreteTimeDenoiser(process, model)
    sigmas = schedule_sigmas(view, "karras10")
    assert sigmas[0] > 1e4 and sigmas[1] == 80.0
    out = sample_loop(process, model, noise=z.clone(), method="heun", steps="karras10", clip_denoised=False)
    x = z * float((1 + sigmas[0] ** 2).sqrt())
    denoised = view(x, sigmas[0])
    x1 = denoised + float(sigmas[1] / sigmas[0]) * (x - denoised)
    assert torch.allclose(out, edm_heun(view, x1, sigmas[1:]), rtol=0, atol=1e-9)  # x ~ 2e4: float64 rounding
    assert not torch.allclose(out, edm_heun(view, x, sigmas), rtol=0, atol=1e-3)  # Alg. 1 over the top stretch


# ---------------------------------------------------------------------------------------------------- oracle


class TanhEps:
    """A nonlinear eps model: eps = tanh(W x) + sin(t / 7) b (float64), recording the timesteps it gets."""

    def __init__(self, channels=2, out_channels=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(out_channels, channels, generator=g, dtype=torch.float64)
        self.bias = torch.randn(out_channels, generator=g, dtype=torch.float64)
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append(t.detach().clone())
        h = torch.tanh(torch.einsum("oc,nchw->nohw", self.weight.to(x), x))
        h = h + torch.sin(t.to(x.dtype) / 7.0)[:, None, None, None] * self.bias.to(x)[:, None, None]
        return h if y is None else h + 0.1 * y.to(x.dtype)[:, None, None, None]


def _setup(T=100, quantize=False):
    sampling, external = load_kdiffusion()
    process = create_diffusion(T, "cosine", var_type="fixed_small", loss_type="simple")
    model = TanhEps()
    ours = DiscreteTimeDenoiser(process, model, timestep_mode="nearest" if quantize else "interpolate")
    theirs = external.DiscreteEpsDDPMDenoiser(model, process.alphas_cumprod.clone(), quantize=quantize)
    return sampling, ours, theirs


@pytest.mark.parametrize("quantize", [False, True])
def test_denoiser_matches_kdiffusion_discrete_eps_ddpm_denoiser(quantize):
    _, ours, theirs = _setup(quantize=quantize)
    x = torch.randn(7, 2, 3, 3, dtype=torch.float64)
    # Trained levels, levels between them, and levels outside [sigma_min, sigma_max] (clamped to the end steps).
    sigma = torch.cat([ours.sigmas[[0, 7, 99]], torch.tensor([0.05, 3.3, 0.01, 2 * ours.sigma_max])])
    assert sigma[-2] < ours.sigma_min
    assert torch.allclose(ours(x, sigma), theirs(x, sigma), rtol=0, atol=1e-12)
    assert torch.allclose(ours.model_timestep(sigma).double(), theirs.sigma_to_t(sigma).double(), atol=1e-12)
    steps = torch.tensor([0.0, 12.5, 99.0], dtype=torch.float64)
    assert torch.allclose(ours.index_to_sigma(steps), theirs.t_to_sigma(steps).double(), rtol=1e-6)


def test_schedules_match_kdiffusion():
    sampling, ours, theirs = _setup()
    s_min, s_max = ours.sigma_min, 80.0  # below the top crossing, the level schedules start at 80
    assert ours.sigma_max > 80
    # the top crossing: max(1, N // 20) levels from sigma_{T-1}; then k-diffusion's schedule from 80
    top = torch.tensor([ours.sigma_max], dtype=torch.float64)
    top2 = torch.tensor([ours.sigma_max, (ours.sigma_max * 80.0) ** 0.5], dtype=torch.float64)  # log-evenly spaced
    for spec, crossing, theirs_below in (
        ("karras12", top, sampling.get_sigmas_karras(11, s_min, s_max)),
        ("logsnr12", top, sampling.get_sigmas_exponential(11, s_min, s_max)),
        ("karras45", top2, sampling.get_sigmas_karras(43, s_min, s_max)),
    ):
        assert torch.allclose(schedule_sigmas(ours, spec), torch.cat([crossing, theirs_below.double()]), rtol=1e-5)
    assert torch.allclose(schedule_sigmas(ours, "uniform12"), theirs.get_sigmas(12).double(), rtol=1e-5)
    assert torch.allclose(schedule_sigmas(ours, ""), theirs.get_sigmas().double(), rtol=1e-5)
    assert torch.allclose(
        karras_sigmas(5, 0.1, 10.0), sampling.get_sigmas_karras(5, 0.1, 10.0)[:-1].double(), rtol=1e-5
    )
    assert torch.allclose(
        logsnr_sigmas(5, 0.1, 10.0), sampling.get_sigmas_exponential(5, 0.1, 10.0)[:-1].double(), rtol=1e-5
    )


@pytest.mark.parametrize("schedule", ["karras8", "logsnr5", "uniform10", "ddim4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solvers_match_kdiffusion(schedule, dtype):
    sampling, ours, theirs = _setup()
    sigmas = schedule_sigmas(ours, schedule)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    x = x * float(sigmas[0])
    noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i), dtype=dtype) for i in range(20)]
    tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    k_sigmas = sigmas.to(dtype)

    def kd_noise():
        queue = list(noises)
        return lambda sigma, sigma_next: queue.pop(0)

    def our_noise():
        queue = list(noises)
        return lambda like: queue.pop(0)

    pairs = [
        (dpm_solver_pp_2m(ours, x, k_sigmas), sampling.sample_dpmpp_2m(theirs, x, k_sigmas, disable=True)),
        (edm_heun(ours, x, k_sigmas), sampling.sample_heun(theirs, x, k_sigmas, disable=True)),
        (dpm_solver_pp_2m_sde(ours, x, k_sigmas, eta=1.0, noise=our_noise()),
         sampling.sample_dpmpp_2m_sde(theirs, x, k_sigmas, eta=1.0, noise_sampler=kd_noise(), disable=True)),
        (dpm_solver_pp_2m_sde(ours, x, k_sigmas, eta=0.4, noise=our_noise()),
         sampling.sample_dpmpp_2m_sde(theirs, x, k_sigmas, eta=0.4, noise_sampler=kd_noise(), disable=True)),
    ]  # fmt: skip
    for a, b in pairs:
        assert a.dtype == dtype
        assert torch.allclose(a, b.to(dtype), **tol), (a - b).abs().max()
