"""Classifier guidance end to end against the reference: a real U-Net denoiser and a real noisy classifier
(EncoderUNetModel, loaded from reference weights), a respaced process, fixed noise.

The reference side is guided_diffusion's SpacedDiffusion driven with the cond_fn of guided-diffusion's
scripts/classifier_sample.py (grad of the selected log-softmax, times the scale). Both the model and the classifier
must receive ORIGINAL timestep indices (t * 1000 / T as float with rescale_timesteps).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, ref_attention_ds
from guided_diffusion import script_util
from guided_diffusion.unet import EncoderUNetModel as RefEncoder
from guided_diffusion.unet import UNetModel as RefUNet

from diffusion_pl.diffusion import classifier_cond_fn, create_diffusion, ddim_step, p_sample
from diffusion_pl.models import EncoderUNetModel, UNetModel, load_openai_state_dict

TOL = dict(rtol=1e-5, atol=1e-5)
STEPS, RESPACING, CLASSES, SCALE = 100, "10", 5, 4.0
NET = dict(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2))


class Recorder:
    """Wraps a network and records the timesteps it is called with."""

    def __init__(self, net):
        self.net, self.seen = net, []

    def __call__(self, x, t, *args, **kwargs):
        self.seen.append(t.detach().clone())
        return self.net(x, t, *args, **kwargs)


def reference_cond_fn(classifier, scale):
    """scripts/classifier_sample.py's cond_fn: scale * d/dx sum_i log softmax(classifier(x, t))_i[y_i]."""

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[torch.arange(x.shape[0]), y.view(-1)]
            return torch.autograd.grad(chosen.sum(), x_in)[0] * scale

    return cond_fn


@pytest.fixture(scope="module")
def nets():
    ref_unet = randomize_(RefUNet(in_channels=3, out_channels=6, attention_resolutions=ref_attention_ds(16, (8, 4)),
                                  num_classes=CLASSES, num_head_channels=32, use_scale_shift_norm=True,
                                  resblock_updown=True, use_new_attention_order=True,
                                  **NET), std=0.05, seed=1).eval()  # fmt: skip
    ours_unet = UNetModel(attention_resolutions=(8, 4), num_classes=CLASSES, num_head_channels=32,
                          use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
                          learn_sigma=True, **NET).eval()  # fmt: skip
    load_openai_state_dict(ours_unet, ref_unet.state_dict())
    ref_clf = randomize_(RefEncoder(in_channels=3, out_channels=CLASSES, pool="attention", num_head_channels=32,
                                    attention_resolutions=ref_attention_ds(16, (16, 8, 4)), use_scale_shift_norm=True,
                                    resblock_updown=True, **NET), std=0.2, seed=2).eval()  # fmt: skip
    ours_clf = EncoderUNetModel(out_channels=CLASSES, pool="attention", num_head_channels=32,
                                attention_resolutions=(16, 8, 4), use_scale_shift_norm=True, resblock_updown=True,
                                **NET).eval()  # fmt: skip
    load_openai_state_dict(ours_clf, ref_clf.state_dict())
    return ref_unet, ours_unet, ref_clf, ours_clf


def _setup(nets, rescale_timesteps, our_classifier=False):
    """Processes, recorded networks and inputs. Both sides use the REFERENCE classifier's gradient unless
    ``our_classifier``: DDIM guidance multiplies the gradient by ~1/sqrt(alpha_bar) (2e3 at the first step of a
    cosine T = 100 process), which turns the ~1e-9 float32 difference between two correct classifier
    implementations into ~4e-5. Our EncoderUNetModel's gradient is compared with the reference's separately."""
    ref_unet, ours_unet, ref_clf, ours_clf = nets
    ours = create_diffusion(diffusion_steps=STEPS, noise_schedule="cosine", var_type="learned_range",
                            rescale_timesteps=rescale_timesteps, timestep_respacing=RESPACING)  # fmt: skip
    ref = script_util.create_gaussian_diffusion(steps=STEPS, learn_sigma=True, noise_schedule="cosine",
                                                rescale_timesteps=rescale_timesteps,
                                                timestep_respacing=RESPACING)  # fmt: skip
    clf_a, clf_b = Recorder(ours_clf if our_classifier else ref_clf), Recorder(ref_clf)
    model_a, model_b = Recorder(ours_unet), Recorder(ref_unet)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 16, 16, generator=g)
    noise = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0, 4, ours.num_timesteps - 1])
    kwargs = {"y": torch.tensor([1, 4, 0])}
    expected_t = ours.timestep_map[t].float() * (1000 / STEPS) if rescale_timesteps else ours.timestep_map[t]
    return ours, ref, model_a, model_b, clf_a, clf_b, x, noise, t, kwargs, expected_t


@pytest.mark.parametrize("rescale_timesteps", [False, True])
def test_encoder_unet_guidance_gradient_matches_reference(nets, rescale_timesteps):
    """classifier_cond_fn(our EncoderUNetModel) == classifier_sample.py's cond_fn(reference EncoderUNetModel)."""
    ours, _, _, _, clf_a, clf_b, x, _, t, kwargs, expected_t = _setup(nets, rescale_timesteps, our_classifier=True)
    grad_a = classifier_cond_fn(clf_a, SCALE)(x, expected_t, **kwargs)
    grad_b = reference_cond_fn(clf_b, SCALE)(x, expected_t, **kwargs)
    assert grad_b.abs().max() > 1e-3
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-5 * grad_b.abs().max().item())


def test_ancestral_guidance_with_our_encoder_unet_matches_reference(nets, monkeypatch):
    """Fully ours (UNet, EncoderUNet, classifier_cond_fn, process) vs fully reference, one ancestral step."""
    ours, ref, model_a, model_b, clf_a, clf_b, x, noise, t, kwargs, _ = _setup(nets, False, our_classifier=True)
    with torch.no_grad():
        a = p_sample(ours, model_a, x, t, model_kwargs=kwargs, cond_fn=classifier_cond_fn(clf_a, SCALE), noise=noise)
        monkeypatch.setattr(torch, "randn_like", lambda like, *args, **kw: noise.clone())
        b = ref.p_sample(model_b, x, t, model_kwargs=kwargs, cond_fn=reference_cond_fn(clf_b, SCALE))
    torch.testing.assert_close(a["sample"], b["sample"], **TOL)
    torch.testing.assert_close(a["pred_xstart"], b["pred_xstart"], **TOL)


@pytest.mark.parametrize("rescale_timesteps", [False, True])
def test_condition_mean_and_score_with_encoder_unet_gradient(nets, rescale_timesteps):
    ours, ref, model_a, model_b, clf_a, clf_b, x, _, t, kwargs, expected_t = _setup(nets, rescale_timesteps)
    cond_a, cond_b = classifier_cond_fn(clf_a, SCALE), reference_cond_fn(clf_b, SCALE)
    with torch.no_grad():
        out_a = ours.p_mean_variance(model_a, x, t, model_kwargs=kwargs)
        out_b = ref.p_mean_variance(model_b, x, t, model_kwargs=kwargs)
        mean_a = ours.condition_mean(cond_a, out_a, x, t, model_kwargs=kwargs)
        mean_b = ref.condition_mean(cond_b, out_b, x, t, model_kwargs=kwargs)
        score_a = ours.condition_score(cond_a, out_a, x, t, model_kwargs=kwargs)
        score_b = ref.condition_score(cond_b, out_b, x, t, model_kwargs=kwargs)
    torch.testing.assert_close(mean_a, mean_b, **TOL)
    assert (mean_a - out_a["mean"]).abs().max() > 1e-3  # the gradient moved the mean
    for key in ["mean", "pred_xstart"]:
        torch.testing.assert_close(score_a[key], score_b[key], **TOL, msg=key)
    assert (score_a["pred_xstart"] - out_a["pred_xstart"]).abs().max() > 1e-3
    # model and classifier saw the original (possibly rescaled) timesteps, exactly as the reference hands them
    for seen_a, seen_b in [(model_a.seen, model_b.seen), (clf_a.seen, clf_b.seen)]:
        assert len(seen_a) == len(seen_b) >= 1
        for a, b in zip(seen_a, seen_b, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, expected_t, rtol=0, atol=0, check_dtype=False)


@pytest.mark.parametrize("rescale_timesteps", [False, True])
@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_guided_sampler_steps_with_encoder_unet(nets, monkeypatch, rescale_timesteps, method, eta):
    ours, ref, model_a, model_b, clf_a, clf_b, x, noise, t, kwargs, expected_t = _setup(nets, rescale_timesteps)
    cond_a, cond_b = classifier_cond_fn(clf_a, SCALE), reference_cond_fn(clf_b, SCALE)
    with torch.no_grad():
        if method == "ddpm":
            a = p_sample(ours, model_a, x, t, model_kwargs=kwargs, cond_fn=cond_a, noise=noise)
            plain = p_sample(ours, model_a, x, t, model_kwargs=kwargs, noise=noise)
        else:
            a = ddim_step(ours, model_a, x, t, eta=eta, model_kwargs=kwargs, cond_fn=cond_a, noise=noise)
            plain = ddim_step(ours, model_a, x, t, eta=eta, model_kwargs=kwargs, noise=noise)
        monkeypatch.setattr(torch, "randn_like", lambda like, *args, **kw: noise.clone())
        if method == "ddpm":
            b = ref.p_sample(model_b, x, t, model_kwargs=kwargs, cond_fn=cond_b)
            expected_x0 = b["pred_xstart"]
        else:
            b = ref.ddim_sample(model_b, x, t, eta=eta, model_kwargs=kwargs, cond_fn=cond_b)
            # upstream ddim_sample returns the guided x_0 (the installed SDK returns the unguided one)
            out = ref.p_mean_variance(model_b, x, t, model_kwargs=kwargs)
            expected_x0 = ref.condition_score(cond_b, out, x, t, model_kwargs=kwargs)["pred_xstart"]
    torch.testing.assert_close(a["sample"], b["sample"], **TOL)
    torch.testing.assert_close(a["pred_xstart"], expected_x0, **TOL)
    assert (a["sample"] - plain["sample"]).abs().max() > 1e-3  # guidance is not a no-op here
    assert all(torch.equal(s.to(expected_t.dtype), expected_t) for s in clf_a.seen + clf_b.seen)
