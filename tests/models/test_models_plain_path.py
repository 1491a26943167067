"""The plain path (stock nn.GroupNorm / nn.SiLU / nn.Conv2d) and the fused CPU path compute the same outputs and
gradients from the same state dict, for the U-Net and the classifier; `fused_norm=None` picks the fused path on the
CPU and the plain one under torch.compile."""

import pytest
import torch
from conftest import randomize_
from test_models_parity import BASE, make_pair

from diffusion_pl.models import EncoderUNetModel, UNetModel, fused, load_openai_state_dict

SMALL = dict(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
             num_head_channels=32)  # fmt: skip
UNET_CASES = {
    "additive": dict(num_classes=3),
    "adagn-updown-sigma": dict(use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True),
    "adagn-resample-conv": dict(use_scale_shift_norm=True, num_classes=3),
    "additive-updown-dropout": dict(resblock_updown=True, dropout=0.3),
}
CLASSIFIER_CASES = {
    "attention-pool-adagn-updown": dict(pool="attention", use_scale_shift_norm=True, resblock_updown=True),
    "adaptive-pool-additive": dict(pool="adaptive"),
}


def _outputs_and_grads(model, x, t, y=None, seed=0):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks in both paths
    out = model(x, t) if y is None else model(x, t, y)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same(plain, fused_):
    (out_p, dx_p, g_p), (out_f, dx_f, g_f) = plain, fused_
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-4, atol=1e-5)
    assert g_f.keys() == g_p.keys()
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-4, atol=2e-5, msg=name)


def _pair(cls, kw):
    """The same weights in a plain and a fused network (loaded through the state dict: its keys must be equal)."""
    plain = randomize_(cls(**kw, fused_norm=False))
    fused_ = cls(**kw, fused_norm=True)
    fused_.load_state_dict(plain.state_dict(), strict=True)
    mode = "train" if kw.get("dropout") else "eval"
    return getattr(plain, mode)(), getattr(fused_, mode)()


@pytest.mark.parametrize("case", UNET_CASES.values(), ids=UNET_CASES.keys())
def test_unet_plain_and_fused_agree(case):
    plain, fused_ = _pair(UNetModel, {**SMALL, **case})
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 800])
    y = torch.tensor([0, 2]) if case.get("num_classes") else None
    _assert_same(_outputs_and_grads(plain, x, t, y), _outputs_and_grads(fused_, x, t, y))


@pytest.mark.parametrize("case", CLASSIFIER_CASES.values(), ids=CLASSIFIER_CASES.keys())
def test_classifier_plain_and_fused_agree(case):
    plain, fused_ = _pair(EncoderUNetModel, {**SMALL, "out_channels": 5, **case})
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 400, 999])
    _assert_same(_outputs_and_grads(plain, x, t), _outputs_and_grads(fused_, x, t))


def test_plain_path_matches_the_reference():
    case = dict(num_head_channels=32, resblock_updown=True, use_scale_shift_norm=True, num_classes=5)
    ref, _ = make_pair(case)
    plain = UNetModel(**{**BASE, **case}, fused_norm=False).eval()
    load_openai_state_dict(plain, ref.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([5, 600]), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, y), ref(x, t, y), rtol=1e-5, atol=1e-5)


def test_auto_is_fused_on_cpu_and_plain_when_compiling(monkeypatch):
    calls = []
    real = fused.norm_act_conv
    monkeypatch.setattr(fused, "norm_act_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = UNetModel(**SMALL).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1])
    with torch.no_grad():
        auto = model(x, t)
        assert calls, "auto (fused_norm=None) runs the fused path on the CPU"
        calls.clear()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled_view = model(x, t)
    assert not calls, "under torch.compile auto runs the plain modules"
    torch.testing.assert_close(compiled_view, auto, rtol=1e-5, atol=1e-5)
    assert fused.use_fused(None, torch.empty(0, device="meta")) is False  # not a CPU tensor: plain
    assert fused.use_fused(True, torch.empty(0, device="meta")) is True
