"""SampleEngine with the ODE/SDE solvers of the registry: the same maths as sample_loop, per-sample seeds (an image
depends only on its seed, whatever the batch), both guidances at once, refusals before sampling."""

from __future__ import annotations

import pytest
import torch
from test_sampling_engine import engine, images, nets  # noqa: F401  (the module-scoped fixture)

from diffusion_pl.diffusion import classifier_cond_fn, classifier_free_model, create_diffusion, sample_loop
from diffusion_pl.errors import UserInputError
from diffusion_pl.sampling import sample_seed
from diffusion_pl.utils.images import to_uint8

BOTH = {"guided": True, "cfg_scale": 1.5}  # classifier guidance (scale 2) and classifier-free guidance at once


@pytest.mark.parametrize("method, steps", [("dpmpp_2m", "karras4"), ("heun", "logsnr3"), ("dpmpp_2m_sde", "4")])
def test_an_image_depends_only_on_its_seed(nets, method, steps):  # noqa: F811
    e = engine(nets, method=method, respacing=steps, **BOTH)
    a, la = images(e, range(5), 2)
    b, lb = images(e, range(5), 3)
    assert torch.equal(la, lb)
    assert (to_uint8(a).int() - to_uint8(b).int()).abs().max() <= 1  # batch-size dependent float rounding only
    c = e.sample([4, 2]).images
    assert (c - a[[4, 2]]).abs().max() < 1e-3
    other = engine(nets, method=method, respacing=steps, seed=8, **BOTH).sample([4, 2]).images
    assert (other - c).abs().max() > 0.1
    assert a.std() > 0.1


@pytest.mark.parametrize("method", ["dpmpp_2m", "heun"])
def test_engine_runs_the_registry_solver(nets, method):  # noqa: F811
    """The engine's image = sample_loop with the same x_T (the per-sample draw), model, guidance and schedule."""
    net, clf = nets
    e = engine(nets, method=method, respacing="karras4", **BOTH)
    batch = e.sample([0, 1])
    x_t = torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(sample_seed(7, i)))
                       for i in (0, 1)])  # fmt: skip
    process = create_diffusion(diffusion_steps=10)
    expected = sample_loop(process, classifier_free_model(net, 1.5, null_class=3), noise=x_t,
                           method=method, steps="karras4", model_kwargs={"y": batch.labels},
                           cond_fn=classifier_cond_fn(clf, 2.0))  # fmt: skip
    # (the engine casts the weights once and uses channels_last convolutions: float rounding differs slightly)
    assert torch.allclose(batch.images, expected.clamp(-1, 1), atol=2e-3)
    assert e.num_steps == 4 and e.spec.nfe(e.num_steps) == (7 if method == "heun" else 4)


def test_stochastic_solver_uses_its_eta(nets):  # noqa: F811
    noisy = engine(nets, method="dpmpp_2m_sde", respacing="karras4").sample([0]).images
    ode = engine(nets, method="dpmpp_2m", respacing="karras4").sample([0]).images
    ode_via_sde = engine(nets, method="dpmpp_2m_sde", eta=0.0, respacing="karras4").sample([0]).images
    assert torch.allclose(ode, ode_via_sde, atol=1e-6)
    assert (noisy - ode).abs().max() > 0.05


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"method": "heun", "respacing": "1"}, r"respacing '1' gives 1 step\(s\), but method heun needs at least 3"),
        ({"method": "dpmpp_2m_sde", "eta": 2.0}, r"eta must be in \[0, 1\]"),
        ({"method": "euler"}, r"unknown sampling method 'euler'; choose from ddpm, ddim, dpmpp_2m"),
        ({"method": "ddim", "respacing": "karras9"}, r"respacing 'karras9' with method ddim: karras9 puts two"),
    ],
)
def test_solver_options_are_refused_when_built(nets, kw, message):  # noqa: F811
    with pytest.raises(UserInputError, match=message):
        engine(nets, **kw)
