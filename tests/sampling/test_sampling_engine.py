"""SampleEngine: per-sample seeds (batch-size invariance), labels, guidance paths, option errors."""

from __future__ import annotations

import pytest
import torch
from sampling_helpers import randomize_zero_init

from diffusion_pl.diffusion import create_diffusion
from diffusion_pl.models import EncoderUNetModel, UNetModel
from diffusion_pl.sampling import GuidanceConfigError, SampleEngine
from diffusion_pl.utils.images import to_uint8

SMALL = dict(image_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
             attention_resolutions=(4,), num_head_channels=32)  # fmt: skip


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    net = UNetModel(**SMALL, num_classes=3, null_class=True, learn_sigma=True).eval()
    clf = EncoderUNetModel(**SMALL, out_channels=3).eval()
    randomize_zero_init(net, 0)
    randomize_zero_init(clf, 1)
    return net, clf


def engine(nets, **kw):
    net, clf = nets
    opts = dict(respacing="4", class_cond=True, num_classes=3, null_class=3, seed=7, progress=False)
    if kw.pop("guided", False):
        opts.update(classifier=clf, classifier_scale=2.0)
    opts.update(kw)
    return SampleEngine(net, create_diffusion(diffusion_steps=10), (1, 8, 8), **opts)


def images(e, indices, batch_size):
    batches = list(e.generate(indices, batch_size))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


@pytest.mark.parametrize("kw", [{}, {"guided": True}, {"cfg_scale": 1.5}, {"method": "ddim", "eta": 0.5}],
                         ids=["ddpm", "classifier", "cfg", "ddim"])  # fmt: skip
def test_batch_size_invariance(nets, kw):
    e = engine(nets, **kw)
    a, la = images(e, range(5), 2)
    b, lb = images(e, range(5), 3)
    assert torch.equal(la, lb)
    # Same noise and labels per sample; only float rounding of batch-size dependent CPU kernels may differ
    # (CFG amplifies it by 1 + 2w), so at most one 8-bit level.
    assert (a - b).abs().max() < 1e-3
    assert (to_uint8(a).int() - to_uint8(b).int()).abs().max() <= 1
    # a sample does not depend on which other samples share its batch
    c = e.sample([4, 2]).images
    assert (c - a[[4, 2]]).abs().max() < 1e-3
    assert a.std() > 0.1  # real images, not a constant


def test_seed_and_guidance_change_images(nets):
    base, labels = images(engine(nets), range(3), 3)
    other_seed, _ = images(engine(nets, seed=8), range(3), 3)
    guided, guided_labels = images(engine(nets, guided=True), range(3), 3)
    assert not torch.allclose(base, other_seed, atol=1e-3)
    assert torch.equal(labels, guided_labels)  # labels come from their own per-sample stream
    assert not torch.allclose(base, guided, atol=1e-3)


def test_labels(nets):
    e = engine(nets, label_mode="balanced")
    assert e.labels_for(range(5)).tolist() == [0, 1, 2, 0, 1]
    r = engine(nets)
    assert r.labels_for([3, 4]).tolist() == r.labels_for(range(5)).tolist()[3:]
    assert r.labels_for([0, 1], labels=[2, 2]).tolist() == [2, 2]
    with pytest.raises(ValueError, match="outside 0..2"):
        r.labels_for([0], labels=[3])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_close_to_fp32(nets, precision):
    # Deterministic DDIM, so only bf16 / fp16 rounding separates the two runs (ancestral sampling of a random network
    # can amplify a rounding difference at a single pixel through the [-1, 1] clip).
    a = engine(nets, respacing="ddim4", method="ddim").sample(range(4)).images
    b = engine(nets, respacing="ddim4", method="ddim", precision=precision).sample(range(4)).images
    assert not torch.equal(a, b)  # autocast was really used
    assert (a - b).abs().mean() < 0.05


def test_guidance_errors(nets):
    net, _ = nets
    unc = UNetModel(**SMALL)
    with pytest.raises(GuidanceConfigError, match="classifier_scale = 1.0 needs a noisy classifier.*unconditional"):
        SampleEngine(unc, create_diffusion(diffusion_steps=10, var_type="fixed_small", loss_type="simple"), (1, 8, 8),
                     classifier_scale=1.0)  # fmt: skip
    with pytest.raises(GuidanceConfigError, match="needs a model trained with a null class"):
        SampleEngine(net, create_diffusion(diffusion_steps=10), (1, 8, 8), class_cond=True, num_classes=3,
                     cfg_scale=1.0)
    with pytest.raises(ValueError, match="eta 0.5 only applies to method ddim"):
        engine(nets, eta=0.5)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        engine(nets, method="ddim", eta=-0.5)
