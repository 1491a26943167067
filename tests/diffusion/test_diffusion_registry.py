"""The sampler registry, step schedules, the continuous view's guidance and bad input."""

import pytest
import torch
from test_diffusion_solvers import TanhEps

from diffusion_pl.diffusion import (
    SAMPLERS,
    SAMPLING_METHODS,
    DiscreteTimeDenoiser,
    check_eta,
    check_method_options,
    check_schedule,
    check_steps,
    classifier_free_model,
    create_diffusion,
    discrete_steps,
    get_sampler,
    resolve_eta,
    sample_loop,
    schedule_process,
    schedule_sigmas,
)
from diffusion_pl.diffusion.registry import schedule_nfe
from diffusion_pl.errors import UserInputError


def test_registry_is_the_list_of_methods():
    """The registry holds the five methods (a new sampler adds itself; the tests below run over SAMPLING_METHODS)."""
    assert {"ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "heun"} <= set(SAMPLING_METHODS)
    assert get_sampler("heun").nfe(10) == 19 and get_sampler("dpmpp_2m").nfe(10) == 10
    assert get_sampler("heun").nfe(10, euler_steps=2) == 17
    assert get_sampler("ddpm").draws_noise(0.0) and not get_sampler("ddim").draws_noise(0.0)
    assert get_sampler("dpmpp_2m_sde").draws_noise(resolve_eta("dpmpp_2m_sde", None))


def test_unknown_method_names_the_registry():
    names = ", ".join(SAMPLERS)
    with pytest.raises(UserInputError, match=rf"unknown --method 'dpm'; choose from {names} \(ddpm: ancestral"):
        get_sampler("dpm", "--method")
    with pytest.raises(UserInputError, match="unknown method 'euler'"):
        sample_loop(create_diffusion(10), TanhEps(), shape=(1, 2, 2, 2), method="euler")


@pytest.mark.parametrize(
    "method, steps, message",
    [
        ("dpmpp_2m", "2", r"--steps '2' gives 2 step\(s\), but method dpmpp_2m needs at least 3.*--steps 3"),
        ("heun", "karras2", r"method heun needs at least 3.*--steps karras3"),
        ("dpmpp_2m_sde", "ddim2", r"needs at least 3"),
        ("ddim", "karras0", r"karras0 asks for 0 noise levels; the T = 100 process allows 1..100"),
        ("ddim", "karras", r"write the count right after the name, e.g. 'karras20'"),
        ("ddpm", "ddim45", r"cannot take exactly 45 steps"),
    ],
)
def test_too_short_or_bad_schedules_are_refused(method, steps, message):
    with pytest.raises(UserInputError, match=message):
        check_steps(method, 100, steps, "--steps")


def test_smallest_schedules_are_accepted():
    assert check_steps("dpmpp_2m", 100, "3") == 3 and check_steps("heun", 100, "karras3") == 3
    assert check_steps("ddpm", 100, "") == 100 and check_steps("ddim", 100, "logsnr1") == 1


@pytest.mark.parametrize(
    "method, eta, message",
    [
        ("ddpm", 0.5, r"--eta 0.5 only applies to method ddim or dpmpp_2m_sde; ddpm sampling has no eta"),
        ("heun", 0.1, r"only applies to method ddim or dpmpp_2m_sde; heun"),
        ("ddim", -0.1, r"--eta must be >= 0 \(0: deterministic DDIM, 1: DDPM-like noise\), got -0.1"),
        ("dpmpp_2m_sde", 1.5, r"--eta must be in \[0, 1\] \(0: the deterministic dpmpp_2m, 1: the full SDE\), got 1.5"),
    ],
)
def test_eta_out_of_range_is_refused(method, eta, message):
    with pytest.raises(UserInputError, match=message):
        check_eta(method, eta, "--eta")


def test_eta_defaults_come_from_the_registry():
    assert resolve_eta("ddim", None) == 0.0 and resolve_eta("dpmpp_2m_sde", None) == 1.0
    assert resolve_eta("heun", None) == 0.0 and resolve_eta("dpmpp_2m_sde", 0.3) == 0.3


def test_discrete_methods_map_level_schedules_to_trained_steps():
    process = create_diffusion(100, "cosine", var_type="fixed_small", loss_type="simple")
    sigmas = ((1 - process.alphas_cumprod) / process.alphas_cumprod).sqrt()
    assert discrete_steps(sigmas, "uniform5") == [0, 25, 50, 74, 99]  # round(linspace(99, 0, 5))
    assert discrete_steps(sigmas, "ddim4") == [0, 25, 50, 75]
    karras = discrete_steps(sigmas, "karras6")
    levels = schedule_sigmas(DiscreteTimeDenoiser(process, None), "karras6")[:-1]
    # each level went to its nearest trained step in log sigma
    assert karras == sorted((levels.log()[:, None] - sigmas.log()).abs().argmin(1).tolist())
    # the top trained step (sigma_99 = 2029 > 80: the top crossing), then Karras levels from 80 (sigma_98 = 64)
    assert karras == [0, 29, 84, 96, 98, 99]
    respaced = schedule_process(process, "karras6")
    assert respaced.timestep_map.tolist() == karras
    with pytest.raises(ValueError, match="puts two of its 90 noise levels on the same trained step"):
        discrete_steps(sigmas, "karras90")


def test_continuous_view_guidance_uses_training_steps_and_score_form():
    """Classifier guidance eps' = eps - sqrt(1 - alpha_bar) g at x_t with the training index; classifier-free guidance
    through the model wrapper; both at once; with a learned variance only the mean channels count."""
    process = create_diffusion(100, "cosine", var_type="learned_range", loss_type="hybrid")
    model = TanhEps(out_channels=4)  # [eps | variance]
    y = torch.tensor([1, 3])
    seen = []
    g = torch.randn(2, 2, 3, 3, dtype=torch.float64)

    def cond_fn(x_t, t, y=None):
        seen.append((x_t.clone(), t.clone()))
        return g

    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    step = 44
    sigma = ((1 - process.alphas_cumprod[step]) / process.alphas_cumprod[step]).sqrt()
    cfg = classifier_free_model(model, 3.0, null_class=10)
    both = DiscreteTimeDenoiser(process, cfg, {"y": y}, cond_fn, timestep_mode="nearest")(x, sigma)
    x_t = x / (1 + sigma**2).sqrt()
    t = torch.full((2,), step)
    assert torch.equal(seen[0][1], t) and torch.allclose(seen[0][0], x_t)
    eps = 4.0 * model(x_t, t, y)[:, :2] - 3.0 * model(x_t, t, torch.full_like(y, 10))[:, :2]
    ab = process.alphas_cumprod[step]
    expected = (x_t - (1 - ab).sqrt() * (eps - (1 - ab).sqrt() * g)) / ab.sqrt()
    assert torch.allclose(both, expected, atol=1e-12)
    plain = DiscreteTimeDenoiser(process, model, {"y": y}, timestep_mode="nearest")(x, sigma)
    assert torch.allclose(plain, (x_t - (1 - ab).sqrt() * model(x_t, t, y)[:, :2]) / ab.sqrt(), atol=1e-12)
    # Between trained steps the model gets the index interpolated in log sigma.
    view = DiscreteTimeDenoiser(process, model, {"y": y})
    assert float(view.model_timestep((view.sigmas[step] * view.sigmas[step + 1]).sqrt())) == pytest.approx(44.5)


def test_guided_clipped_denoiser_is_the_reference_ddim_prediction():
    """With clip_denoised and a classifier, D(x; sigma_t) is the x_0 of the reference's DDIM step at t: x_0 clamped,
    eps re-derived from it, guided in score form, x_0 recomputed and not clamped again (condition_score)."""
    process = create_diffusion(100, "cosine", var_type="learned_range", loss_type="hybrid")
    model = TanhEps(out_channels=4)
    kwargs = {"y": torch.tensor([1, 3])}
    g = 2.0 * torch.randn(2, 2, 3, 3, dtype=torch.float64)
    cond_fn = lambda x_t, t, y=None: g  # noqa: E731
    step = 30
    ab = process.alphas_cumprod[step]
    x_t = 2.0 * torch.randn(2, 2, 3, 3, dtype=torch.float64)
    t = torch.full((2,), step)
    out = process.p_mean_variance(lambda x, t, y=None: 3.0 * model(x, t, y), x_t, t, True, kwargs)
    assert (out["pred_xstart"].abs() == 1.0).any()  # the clamp is active
    reference = process.condition_score(cond_fn, out, x_t, t, kwargs)["pred_xstart"]
    view = DiscreteTimeDenoiser(process, lambda x, t, y=None: 3.0 * model(x, t, y), kwargs, cond_fn,
                                clip_denoised=True, timestep_mode="nearest")  # fmt: skip
    denoised = view(x_t / ab.sqrt(), ((1 - ab) / ab).sqrt())
    assert torch.allclose(denoised, reference, atol=1e-12) and denoised.abs().max() > 1.0


def test_continuous_view_refuses_a_respaced_process():
    respaced = create_diffusion(100, "cosine", var_type="fixed_small", loss_type="simple").respaced("10")
    with pytest.raises(UserInputError, match="full 100-step training process, got one respaced to 10 steps"):
        DiscreteTimeDenoiser(respaced, TanhEps())
    with pytest.raises(UserInputError, match="before respacing"):
        sample_loop(respaced, TanhEps(), shape=(1, 2, 2, 2), method="dpmpp_2m", steps="karras5")
    assert sample_loop(respaced, TanhEps(), shape=(1, 2, 2, 2), method="ddim").shape == (1, 2, 2, 2)


def test_start_x_models_and_clipping():
    process = create_diffusion(50, "linear", mean_type="start_x", var_type="fixed_small", loss_type="simple")
    x = 3 * torch.randn(2, 2, 2, 2, dtype=torch.float64)
    model = TanhEps()
    view = DiscreteTimeDenoiser(process, lambda x_t, t: 2 * model(x_t, t), clip_denoised=True)
    out = view(x, 0.7)
    assert out.abs().max() <= 1.0 and (out.abs() == 1.0).any()
    with pytest.raises(ValueError, match="previous_x"):
        DiscreteTimeDenoiser(create_diffusion(50, mean_type="previous_x", var_type="fixed_small",
                                              loss_type="simple"), model)  # fmt: skip


@pytest.mark.parametrize("method", [name for name, spec in SAMPLERS.items() if spec.kind == "continuous"])
def test_sample_loop_runs_every_solver_with_a_classifier(method):
    process = create_diffusion(100, "cosine", var_type="fixed_small", loss_type="simple")
    gen = torch.Generator().manual_seed(0)
    times = []

    def cond_fn(x_t, t, y=None):
        times.append(t)
        return 0.1 * torch.ones_like(x_t)

    def run(guide):
        return sample_loop(process, TanhEps(), shape=(2, 2, 3, 3), method=method, steps="karras6",
                           model_kwargs={"y": torch.tensor([0, 1])}, cond_fn=guide, generator=gen.manual_seed(0),
                           return_intermediates=True)  # fmt: skip

    (a, steps_a), (b, _), (plain, _) = run(cond_fn), run(cond_fn), run(None)
    assert torch.equal(a, b) and len(steps_a) == 6
    # The guidance changes the sample, and the classifier is called once per network evaluation, with training indices.
    assert (a - plain).abs().max() > 0.1
    assert len(times) == 2 * schedule_nfe(process, method, "karras6")
    assert all(0.0 <= float(t.min()) and float(t.max()) <= 99.0 for t in times)


@pytest.mark.parametrize("method", SAMPLING_METHODS)
@pytest.mark.parametrize("steps", ["karras20", "karras45", "logsnr7", "uniform9", "ddim25", "50"])
def test_network_evaluations_are_counted_as_they_happen(method, steps):
    """schedule_nfe (the demo's and the benchmark's NFE) equals the model calls of a sample (heun: 2 per step, 1 for
    the final step and for each Euler step of the top crossing from sigma_{T-1} ~ 2e4 down to 80; karras45 crosses it
    in 2 steps)."""
    process = create_diffusion(1000, "cosine", var_type="fixed_small", loss_type="simple")
    model = TanhEps()
    sample_loop(process, model, shape=(1, 2, 2, 2), method=method, steps=steps, generator=torch.Generator())
    assert len(model.calls) == schedule_nfe(process, method, steps)
    if method == "heun":
        levels = schedule_sigmas(DiscreteTimeDenoiser(process, None), steps)[:-1]
        euler = int((levels[:-1] > 80).sum())  # steps from above 80 (ddim25 starts at sigma_960 ~ 16: none)
        assert euler == {"karras45": 2, "ddim25": 0}.get(steps, 1)
        assert len(model.calls) == 2 * len(levels) - 1 - euler


def test_zero_steps_means_all_steps_everywhere():
    """steps 0 / "0" / "" / None: all T trained steps, in the checks as in the samplers."""
    process = create_diffusion(20, "cosine", var_type="fixed_small", loss_type="simple")
    for steps in (0, "0", "", None):
        check_method_options("heun", None, steps)
        check_schedule(process, steps, "heun")
        assert schedule_process(process, steps) is process
        assert len(schedule_sigmas(DiscreteTimeDenoiser(process, None), steps)) == 21
