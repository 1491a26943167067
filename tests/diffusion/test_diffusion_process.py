import itertools
import math

import pytest
import torch
from diffusion_test_utils import ToyModel, make_pair, toy_data

from diffusion_pl.diffusion import GaussianDiffusion, create_diffusion, get_named_beta_schedule

ALL_VAR = ["fixed_small", "fixed_large", "learned", "learned_range"]
ALL_MEAN = ["epsilon", "start_x", "previous_x"]
TOL = dict(rtol=1e-5, atol=1e-6)


def _t(*values):
    return torch.tensor(values, dtype=torch.int64)


def test_derived_arrays_match_reference():
    ours, ref = make_pair("linear", steps=50)
    for name in ["alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"]:
        value = getattr(ours, name)
        assert value.dtype == torch.float64, name
        torch.testing.assert_close(value, torch.from_numpy(getattr(ref, name)), rtol=1e-12, atol=1e-15, msg=name)
    assert ours.posterior_log_variance_clipped[0] == ours.posterior_log_variance_clipped[1]
    assert ours.posterior_variance[0] == 0


def test_q_sample_and_posterior_match_reference():
    ours, ref = make_pair("cosine", steps=30)
    x0 = toy_data()
    noise = torch.randn_like(x0)
    t = _t(0, 7, 15, 29)
    xt = ours.q_sample(x0, t, noise)
    assert xt.dtype == torch.float32
    torch.testing.assert_close(xt, ref.q_sample(x0, t, noise), rtol=0, atol=0)
    for a, b in zip(ours.q_mean_variance(x0, t), ref.q_mean_variance(x0, t), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ours.q_posterior_mean_variance(x0, xt, t), ref.q_posterior_mean_variance(x0, xt, t), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_posterior_is_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}, in float64."""
    process = create_diffusion(diffusion_steps=40, noise_schedule="linear")
    x0 = toy_data().double()
    xt = torch.randn_like(x0)
    t = _t(1, 5, 20, 39)
    ab_prev = process.alphas_cumprod[t - 1].view(-1, 1, 1, 1)
    alpha = (1 - process.betas[t]).view(-1, 1, 1, 1)
    beta = process.betas[t].view(-1, 1, 1, 1)
    precision = 1 / (1 - ab_prev) + alpha / beta
    var = 1 / precision
    mean = var * (ab_prev.sqrt() * x0 / (1 - ab_prev) + alpha.sqrt() * xt / beta)
    ours_mean, ours_var, ours_logvar = process.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(ours_mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_var, var.expand_as(x0), rtol=1e-10, atol=0)
    torch.testing.assert_close(ours_logvar, var.log().expand_as(x0), rtol=1e-10, atol=0)


@pytest.mark.parametrize("mean_type,var_type,clip", list(itertools.product(ALL_MEAN, ALL_VAR, [True, False])))
def test_p_mean_variance_matches_reference(mean_type, var_type, clip):
    ours, ref = make_pair("cosine", steps=20, mean_type=mean_type, var_type=var_type)
    model = ToyModel(2, learn_sigma=var_type.startswith("learned"), scale=2.0)  # large outputs: clipping is active
    x = torch.randn(4, 2, 3, 3)
    t = _t(0, 1, 10, 19)
    a = ours.p_mean_variance(model, x, t, clip_denoised=clip)
    b = ref.p_mean_variance(model, x, t, clip_denoised=clip)
    for key in ["mean", "variance", "log_variance", "pred_xstart"]:
        assert a[key].shape == x.shape and a[key].dtype == torch.float32
        torch.testing.assert_close(a[key], b[key], **TOL, msg=key)
    eps_ref = ref._predict_eps_from_xstart(x, t, b["pred_xstart"])
    torch.testing.assert_close(a["eps"], eps_ref, **TOL)
    if clip:
        assert a["pred_xstart"].abs().max() <= 1.0


def test_clipped_mean_is_posterior_mean_of_clipped_x0():
    process = create_diffusion(diffusion_steps=20, var_type="fixed_small", loss_type="simple")
    model = ToyModel(2, scale=3.0)
    x = torch.randn(4, 2, 3, 3) * 3
    t = _t(3, 8, 12, 19)
    out = process.p_mean_variance(model, x, t, clip_denoised=True)
    raw_x0 = process.predict_xstart_from_eps(x, t, model(x, t))
    assert raw_x0.abs().max() > 1.0  # the clamp is active in this test
    expected, _, _ = process.q_posterior_mean_variance(raw_x0.clamp(-1, 1), x, t)
    torch.testing.assert_close(out["mean"], expected)


LOSS_CASES = [
    ("epsilon", "fixed_small", "simple", False), ("epsilon", "fixed_large", "simple", False),
    ("start_x", "fixed_large", "simple", False), ("previous_x", "fixed_small", "simple", False),
    ("epsilon", "learned_range", "hybrid", False), ("epsilon", "learned_range", "hybrid", True),
    ("epsilon", "learned", "hybrid", False), ("start_x", "learned_range", "hybrid", True),
    ("epsilon", "learned_range", "kl", False), ("epsilon", "learned_range", "kl", True),
    ("epsilon", "fixed_small", "kl", True), ("previous_x", "learned", "kl", False),
]


@pytest.mark.parametrize("mean_type,var_type,loss_type,rescale", LOSS_CASES)
def test_training_losses_match_reference(mean_type, var_type, loss_type, rescale):
    ours, ref = make_pair("cosine", steps=40, mean_type=mean_type, var_type=var_type, loss_type=loss_type,
                          rescale_learned_sigmas=rescale)
    model = ToyModel(2, learn_sigma=var_type.startswith("learned"))
    x0 = toy_data()
    noise = torch.randn_like(x0)
    t = _t(0, 1, 17, 39)
    a = ours.training_losses(model, x0, t, noise=noise)
    b = ref.training_losses(model, x0, t, noise=noise)
    assert set(a) == {"loss", "mse", "vb"} and all(v.shape == (4,) for v in a.values())
    torch.testing.assert_close(a["loss"], b["loss"], **TOL)
    if "mse" in b:
        torch.testing.assert_close(a["mse"], b["mse"], **TOL)
    if "vb" in b:  # the reference stores the weighted vb; ours is the unweighted L_t
        weight = 40 / 1000 if rescale else 1.0
        torch.testing.assert_close(a["vb"] * weight, b["vb"], **TOL)
    # Our vb is always the unweighted L_t term of the bound (no clipping).
    x_t = ours.q_sample(x0, t, noise)
    torch.testing.assert_close(a["vb"], ours.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"], **TOL)


def test_rescaled_kl_is_T_times_vb():
    process = create_diffusion(diffusion_steps=40, loss_type="kl", rescale_learned_sigmas=True)
    out = process.training_losses(ToyModel(2, learn_sigma=True), toy_data(), _t(0, 3, 9, 39))
    torch.testing.assert_close(out["loss"], 40 * out["vb"])


class _SplitModel(torch.nn.Module):
    """Mean channels from one parameter, variance channels from another: to track where gradients go."""

    def __init__(self):
        super().__init__()
        self.mean_scale = torch.nn.Parameter(torch.tensor(0.3))
        self.var_scale = torch.nn.Parameter(torch.tensor(0.2))

    def forward(self, x, t):
        return torch.cat([self.mean_scale * x, torch.tanh(self.var_scale * x)], dim=1)


def test_hybrid_vb_does_not_train_the_mean():
    process = create_diffusion(diffusion_steps=30, var_type="learned_range", loss_type="hybrid")
    model = _SplitModel()
    out = process.training_losses(model, toy_data(), _t(0, 5, 15, 29))
    grad_mean, grad_var = torch.autograd.grad(out["vb"].sum(), [model.mean_scale, model.var_scale],
                                              allow_unused=True, retain_graph=True)
    assert grad_mean is None or grad_mean.item() == 0.0
    assert grad_var is not None and grad_var.abs().item() > 0
    grad_mean_mse, grad_var_mse = torch.autograd.grad(out["mse"].sum(), [model.mean_scale, model.var_scale],
                                                      allow_unused=True)
    assert grad_mean_mse.abs().item() > 0 and (grad_var_mse is None or grad_var_mse.item() == 0.0)
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])


@pytest.mark.parametrize("rescale_timesteps", [False, True])
@pytest.mark.parametrize("respacing", ["", "ddim5", "4,3"])
def test_model_receives_original_timesteps(rescale_timesteps, respacing):
    ours, ref = make_pair("linear", steps=40, rescale_timesteps=rescale_timesteps, respacing=respacing,
                          var_type="learned_range")
    model_a, model_b = ToyModel(2, learn_sigma=True), ToyModel(2, learn_sigma=True)
    x = torch.randn(3, 2, 3, 3)
    t = torch.tensor([0, 1, ours.num_timesteps - 1])
    a = ours.p_mean_variance(model_a, x, t)
    b = ref.p_mean_variance(model_b, x, t)
    torch.testing.assert_close(model_a.calls[0], model_b.calls[0], check_dtype=False, rtol=0, atol=0)
    for key in ["mean", "variance", "pred_xstart"]:
        torch.testing.assert_close(a[key], b[key], **TOL)
    expected = ours.timestep_map[t]
    if rescale_timesteps:
        torch.testing.assert_close(model_a.calls[0], expected.float() * 1000 / 40)
    else:
        assert model_a.calls[0].tolist() == expected.tolist()
    # training_losses maps timesteps too.
    noise = torch.randn_like(x)
    torch.testing.assert_close(ours.training_losses(model_a, x.clamp(-1, 1), t, noise)["loss"],
                               ref.training_losses(model_b, x.clamp(-1, 1), t, noise=noise)["loss"], **TOL)


@pytest.mark.parametrize("respacing", ["", "5"])
@pytest.mark.parametrize("clip", [True, False])
def test_calc_bpd_loop_matches_reference(respacing, clip):
    ours, ref = make_pair("cosine", steps=10, respacing=respacing)
    model = ToyModel(2, learn_sigma=True)
    x0 = toy_data(n=2)
    torch.manual_seed(123)
    b = ref.calc_bpd_loop(model, x0, clip_denoised=clip)
    torch.manual_seed(123)
    a = ours.calc_bpd_loop(model, x0, clip_denoised=clip)
    for key in ["total_bpd", "prior_bpd"]:
        torch.testing.assert_close(a[key], b[key], **TOL, msg=key)
    # The reference stacks columns in loop order (column 0 = t = T-1); ours puts step t in column t.
    for key in ["vb", "xstart_mse", "mse"]:
        torch.testing.assert_close(a[key], b[key].flip(1), **TOL, msg=key)
    assert a["vb"].shape == (2, ours.num_timesteps)
    torch.testing.assert_close(a["total_bpd"], a["vb"].sum(1) + a["prior_bpd"])


def test_calc_bpd_loop_explicit_noise_and_generator():
    process = create_diffusion(diffusion_steps=6)
    model = ToyModel(2, learn_sigma=True)
    x0 = toy_data(n=2)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn((6, *x0.shape), generator=g)
    a = process.calc_bpd_loop(model, x0, noise=noise)
    # The generator path draws noise for t = T-1 first.
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(x0.shape, generator=g) for _ in range(6)]
    b = process.calc_bpd_loop(model, x0, noise=torch.stack(draws[::-1]))
    g = torch.Generator().manual_seed(5)
    c = process.calc_bpd_loop(model, x0, generator=g)
    torch.testing.assert_close(b["total_bpd"], c["total_bpd"])
    assert not torch.allclose(a["total_bpd"], b["total_bpd"])
    with pytest.raises(ValueError, match=r"\[T, \*x_start.shape\]"):
        process.calc_bpd_loop(model, x0, noise=noise[:3])


def test_prior_bpd_is_kl_to_standard_normal():
    process = create_diffusion(diffusion_steps=60, noise_schedule="linear")
    x0 = toy_data(n=2).double()
    ab = process.alphas_cumprod[-1]
    mean, var = ab.sqrt() * x0, 1 - ab
    kl = 0.5 * (var + mean**2 - 1 - torch.log(var))
    torch.testing.assert_close(process.prior_bpd(x0), kl.mean(dim=(1, 2, 3)) / math.log(2))


def test_bad_settings_raise_clear_errors():
    betas = get_named_beta_schedule("linear", 100)
    with pytest.raises(ValueError, match="use loss_type='hybrid'"):
        GaussianDiffusion(betas, "epsilon", "learned_range", "simple")
    with pytest.raises(ValueError, match="loss_type='simple'"):
        GaussianDiffusion(betas, "epsilon", "fixed_small", "hybrid")
    with pytest.raises(ValueError, match="epsilon, start_x, previous_x"):
        GaussianDiffusion(betas, "eps", "fixed_small", "simple")
    with pytest.raises(ValueError, match="fixed_small, fixed_large, learned, learned_range"):
        GaussianDiffusion(betas, "epsilon", "small", "simple")
    with pytest.raises(ValueError, match="simple, hybrid, kl"):
        GaussianDiffusion(betas, "epsilon", "fixed_small", "mse")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        GaussianDiffusion(torch.tensor([0.1, 0.0]), "epsilon", "fixed_small", "simple")
    process = GaussianDiffusion(betas, "epsilon", "learned_range", "hybrid")
    with pytest.raises(ValueError, match="learn_sigma=True"):
        process.p_mean_variance(ToyModel(2), torch.randn(2, 2, 3, 3), _t(1, 2))
    with pytest.raises(ValueError, match="noise has shape"):
        process.q_sample(torch.randn(2, 2, 3, 3), _t(1, 2), torch.randn(2, 2, 3))


def test_create_diffusion_respacing():
    process = create_diffusion(diffusion_steps=100, timestep_respacing="ddim10", rescale_timesteps=True)
    assert process.num_timesteps == 10 and process.original_num_steps == 100
    assert process.timestep_map.tolist() == list(range(0, 100, 10))
    assert process.rescale_timesteps
    assert create_diffusion(diffusion_steps=100).num_timesteps == 100
