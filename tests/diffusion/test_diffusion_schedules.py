import math

import numpy as np
import pytest
import torch
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import respace as ref_respace

from diffusion_pl.diffusion import cosine_alpha_bar, create_diffusion, get_named_beta_schedule, space_timesteps


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 10, 100, 1000, 4000])
def test_betas_match_reference(name, steps):
    ours = get_named_beta_schedule(name, steps)
    assert ours.dtype == torch.float64 and ours.shape == (steps,)
    np.testing.assert_allclose(ours.numpy(), gd.get_named_beta_schedule(name, steps), rtol=1e-13, atol=0)


def test_linear_endpoints_scale_with_T():
    betas = get_named_beta_schedule("linear", 4000)
    assert betas[0].item() == pytest.approx(2.5e-5, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.005, rel=1e-12)


@pytest.mark.parametrize("steps", [50, 1000, 4000])
def test_cosine_alpha_bar_closed_form(steps):
    betas = get_named_beta_schedule("cosine", steps)
    alpha_bar = torch.cumprod(1 - betas, 0)
    closed = torch.tensor(
        [math.cos(((i + 1) / steps + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
         for i in range(steps)], dtype=torch.float64)
    # Exact until the 0.999 clip of the final beta.
    torch.testing.assert_close(alpha_bar[:-1], closed[:-1], rtol=1e-9, atol=1e-15)
    assert betas[-1].item() == 0.999
    assert cosine_alpha_bar(0.0) == pytest.approx(math.cos(0.008 / 1.008 * math.pi / 2) ** 2)


def test_cosine_measured_values():
    assert get_named_beta_schedule("cosine", 1000)[0].item() == pytest.approx(4.128e-5, rel=1e-3)
    assert get_named_beta_schedule("cosine", 4000)[0].item() == pytest.approx(9.866e-6, rel=1e-3)
    assert torch.cumprod(1 - get_named_beta_schedule("cosine", 1000), 0)[-1].item() == pytest.approx(2.4e-9, rel=0.05)


def test_unknown_schedule_lists_allowed_names():
    with pytest.raises(ValueError, match="linear, cosine"):
        get_named_beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="positive integer"):
        get_named_beta_schedule("linear", 0)


@pytest.mark.parametrize("steps,spec", [(1000, "250"), (1000, "10,10,20"), (1000, "ddim25"), (1000, "ddim50"),
                                        (4000, "100"), (100, "7,3,5"), (101, "10,10"), (10, "10"), (1000, "1"),
                                        (30, [3, 5, 7])])
def test_space_timesteps_matches_reference(steps, spec):
    ours = space_timesteps(steps, spec)
    assert ours == sorted(ref_respace.space_timesteps(steps, spec))


def test_space_timesteps_documented_lists():
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and s250[:4] == [0, 4, 8, 12] and s250[-3:] == [991, 995, 999]
    s = space_timesteps(1000, "10,10,20")
    assert len(s) == 40
    assert s[:2] == [0, 37] and s[9] == 333 and s[10] == 334 and s[19] == 666 and s[20:22] == [667, 684]
    assert s[-1] == 999
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))


def test_space_timesteps_errors():
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim700")
    with pytest.raises(ValueError, match="asks for 11"):
        space_timesteps(20, "11,3")
    with pytest.raises(ValueError, match="comma-separated"):
        space_timesteps(100, "ten")
    with pytest.raises(ValueError, match="ddimN"):
        space_timesteps(100, "ddimx")
    with pytest.raises(ValueError, match=">= 1"):
        space_timesteps(100, "0")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spec", ["25", "ddim10", "5,10,3"])
def test_respaced_betas_match_reference(schedule, spec):
    full = create_diffusion(diffusion_steps=100, noise_schedule=schedule)
    ours = full.respaced(spec)
    ref = ref_respace.SpacedDiffusion(
        use_timesteps=ref_respace.space_timesteps(100, spec), betas=gd.get_named_beta_schedule(schedule, 100),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE)
    np.testing.assert_allclose(ours.betas.numpy(), ref.betas, rtol=1e-12)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), ref.alphas_cumprod, rtol=1e-12)
    assert ours.timestep_map.tolist() == ref.timestep_map
    # alpha_bar of the respaced process equals the original one at the kept steps.
    torch.testing.assert_close(ours.alphas_cumprod, full.alphas_cumprod[ours.timestep_map], rtol=1e-10, atol=1e-15)
    assert ours.original_num_steps == 100 and ours.num_timesteps == len(space_timesteps(100, spec))
    assert (ours.mean_type, ours.var_type, ours.loss_type) == (full.mean_type, full.var_type, full.loss_type)


def test_respaced_cosine_last_beta_not_clipped():
    process = create_diffusion(diffusion_steps=1000, noise_schedule="cosine", timestep_respacing="250")
    assert process.betas[-1].item() == pytest.approx(0.99994, abs=1e-5)
    assert process.betas[-1].item() > 0.999


def test_respacing_composes_timestep_maps():
    full = create_diffusion(diffusion_steps=100)
    twice = full.respaced("50").respaced("ddim10")
    assert twice.timestep_map.tolist() == [full.respaced("50").timestep_map[i].item() for i in range(0, 50, 5)]
    torch.testing.assert_close(twice.alphas_cumprod, full.alphas_cumprod[twice.timestep_map], rtol=1e-10, atol=1e-15)
    assert twice.original_num_steps == 100
