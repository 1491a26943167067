"""Parity with the reference process at the released settings (T = 1000 / 4000, the respacings the papers sample
with), t = 0 decoder terms, the loss weights at T != 1000 and the bits/dim loop with fixed per-t noise.

The oracle is the installed guided_diffusion package; diffusion_test_utils documents where it differs from
openai/guided-diffusion (none of the functions used here).
"""

import itertools

import numpy as np
import pytest
import torch
from diffusion_test_utils import ToyModel, make_pair, toy_data
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import respace as ref_respace

from diffusion_pl.diffusion import create_diffusion, discretized_gaussian_log_likelihood

TOL = dict(rtol=1e-5, atol=1e-6)
SCHEDULE_ARRAYS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recipm1_alphas_cumprod",
                   "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                   "posterior_mean_coef2"]  # fmt: skip


@pytest.fixture(scope="module")
def full_processes():
    """(ours, reference) full processes for both schedules at T = 1000 and 4000 (built once)."""
    out = {}
    for schedule, steps in itertools.product(["linear", "cosine"], [1000, 4000]):
        ours = create_diffusion(diffusion_steps=steps, noise_schedule=schedule)
        ref = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule(schedule, steps),
                                   model_mean_type=gd.ModelMeanType.EPSILON,
                                   model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE)
        out[schedule, steps] = ours, ref
    return out


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 4000])
def test_full_schedule_arrays_match_reference(full_processes, schedule, steps):
    ours, ref = full_processes[schedule, steps]
    for name in SCHEDULE_ARRAYS:
        np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(ref, name), rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 4000])
@pytest.mark.parametrize("spec", ["250", "10,10,20", "ddim25", "ddim50"])
def test_respaced_betas_and_timestep_map_match_reference(full_processes, schedule, steps, spec):
    full, _ = full_processes[schedule, steps]
    ours = full.respaced(spec)
    ref = ref_respace.SpacedDiffusion(
        use_timesteps=ref_respace.space_timesteps(steps, spec), betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE)  # fmt: skip
    assert ours.timestep_map.tolist() == ref.timestep_map
    assert ours.num_timesteps == ref.num_timesteps == {"250": 250, "10,10,20": 40, "ddim25": 25, "ddim50": 50}[spec]
    assert ours.original_num_steps == ref.original_num_steps == steps
    for name in SCHEDULE_ARRAYS:
        np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(ref, name), rtol=1e-12, atol=0, err_msg=name)
    # The model and a classifier see the original indices: timestep_map, as the reference's _WrappedModel.
    model_a, model_b = ToyModel(2, learn_sigma=True), ToyModel(2, learn_sigma=True)
    x = torch.randn(3, 2, 3, 3)
    t = torch.tensor([0, ours.num_timesteps // 2, ours.num_timesteps - 1])
    a = ours.p_mean_variance(model_a, x, t)
    b = ref.p_mean_variance(model_b, x, t)
    assert model_a.calls[0].tolist() == model_b.calls[0].tolist() == [ref.timestep_map[i] for i in t.tolist()]
    for key in ["mean", "log_variance", "pred_xstart"]:
        torch.testing.assert_close(a[key], b[key], **TOL, msg=key)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 4000])
def test_q_sample_and_posterior_at_released_T(full_processes, schedule, steps):
    ours, ref = full_processes[schedule, steps]
    x0 = toy_data(n=5)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, steps // 2, steps - 2, steps - 1])
    xt = ours.q_sample(x0, t, noise)
    torch.testing.assert_close(xt, ref.q_sample(x0, t, noise), rtol=0, atol=0)
    for a, b in zip(ours.q_posterior_mean_variance(x0, xt, t), ref.q_posterior_mean_variance(x0, xt, t), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.prior_bpd(x0), ref._prior_bpd(x0), **TOL)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("mean_type", ["epsilon", "start_x", "previous_x"])
@pytest.mark.parametrize("clip", [True, False])
def test_vb_terms_including_t0_decoder_match_reference(var_type, mean_type, clip):
    ours, ref = make_pair("cosine", steps=30, mean_type=mean_type, var_type=var_type)
    model = ToyModel(2, learn_sigma=var_type.startswith("learned"), scale=1.5)
    x0 = toy_data(n=4)
    t = torch.tensor([0, 0, 1, 29])
    x_t = ours.q_sample(x0, t, torch.randn_like(x0))
    a = ours.vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip)
    b = ref._vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip)
    torch.testing.assert_close(a["output"], b["output"], **TOL)
    torch.testing.assert_close(a["pred_xstart"], b["pred_xstart"], **TOL)
    # At t = 0 the term is the discretised-Gaussian decoder NLL (bits/dim) of x_0 under p(x_0 | x_1).
    p = ours.p_mean_variance(model, x_t, t, clip_denoised=clip)
    nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
    torch.testing.assert_close(a["output"][:2], nll[:2].mean(dim=(1, 2, 3)) / np.log(2.0), **TOL)


@pytest.mark.parametrize("steps", [1000, 4000])
@pytest.mark.parametrize("loss_type,rescale", [("hybrid", False), ("hybrid", True), ("kl", False), ("kl", True)])
def test_loss_weights_at_released_T(steps, loss_type, rescale):
    """At T = 4000 the rescaled hybrid weight is 4 and rescaled kl is 4000x: values that a wrong weight cannot hit."""
    ours, ref = make_pair("cosine", steps=steps, var_type="learned_range", loss_type=loss_type,
                          rescale_learned_sigmas=rescale)  # fmt: skip
    model = ToyModel(2, learn_sigma=True)
    x0 = toy_data()
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, steps // 3, steps - 1])
    a = ours.training_losses(model, x0, t, noise=noise)
    b = ref.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(a["loss"], b["loss"], **TOL)
    if loss_type == "hybrid":
        # the reference's "vb" already carries the weight T/1000 (RESCALED_MSE); ours is the unweighted L_t
        weight = steps / 1000 if rescale else 1.0
        torch.testing.assert_close(a["mse"], b["mse"], **TOL)
        torch.testing.assert_close(a["vb"] * weight, b["vb"], **TOL)
        torch.testing.assert_close(a["loss"], a["mse"] + weight * a["vb"], **TOL)
    else:
        torch.testing.assert_close(a["loss"], a["vb"] * (steps if rescale else 1), **TOL)


@pytest.mark.parametrize("respacing,rescale_timesteps", [("", False), ("5", False), ("4,2", True)])
@pytest.mark.parametrize("clip", [True, False])
def test_calc_bpd_loop_with_fixed_per_t_noise(monkeypatch, respacing, rescale_timesteps, clip):
    ours, ref = make_pair("linear", steps=60, respacing=respacing, rescale_timesteps=rescale_timesteps)
    T = ours.num_timesteps
    model_a, model_b = ToyModel(2, learn_sigma=True), ToyModel(2, learn_sigma=True)
    x0 = toy_data(n=3)
    noise = torch.randn(T, *x0.shape, generator=torch.Generator().manual_seed(8))  # noise[t] is used at step t
    a = ours.calc_bpd_loop(model_a, x0, clip_denoised=clip, noise=noise)
    # The reference draws th.randn_like(x_start) once per step, for t = T-1 first.
    queue = [noise[t] for t in reversed(range(T))]
    monkeypatch.setattr(torch, "randn_like", lambda x, *args, **kwargs: queue.pop(0).clone())
    b = ref.calc_bpd_loop(model_b, x0, clip_denoised=clip)
    assert not queue
    for key in ["total_bpd", "prior_bpd"]:
        torch.testing.assert_close(a[key], b[key], **TOL, msg=key)
    for key in ["vb", "xstart_mse", "mse"]:  # reference column 0 is t = T-1; ours column t is step t
        torch.testing.assert_close(a[key], b[key].flip(1), **TOL, msg=key)
    assert [c.tolist() for c in model_a.calls] == [c.tolist() for c in model_b.calls]
