"""The fused memory-efficient blocks (GroupNorm/AdaGN/SiLU [+ dropout] [+ resample] + conv with a hand-written
backward, internal channels_last) against plain autograd and against the reference, including dropout."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from test_models_parity import make_pair
from torch import nn

from diffusion_pl.models import load_openai_state_dict, openai_key_map
from diffusion_pl.models.fused import norm_act, norm_act_conv
from diffusion_pl.models.layers import GroupNorm32


def plain(norm, conv, x, scale, shift, act, resample):
    h = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    h = (F.silu(h) if act else h).to(x.dtype)
    if resample == "up":
        h = F.interpolate(h, scale_factor=2, mode="nearest")
    elif resample == "down":
        h = F.avg_pool2d(h, 2)
    return conv(h) if conv is not None else h


CASES = [(cl, mod, act, res, conv) for cl in (False, True) for mod in (False, True) for act in (True, False)
         for res in (None, "up", "down") for conv in (False, True)
         if (act or not conv) and (conv or res is None)]  # fmt: skip


@pytest.mark.parametrize("channels_last,modulated,act,resample,with_conv", CASES)
def test_fused_blocks_match_autograd(channels_last, modulated, act, resample, with_conv):
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(64, generator=g))
        norm.bias.copy_(0.5 * torch.randn(64, generator=g))
    conv = nn.Conv2d(64, 32, 3, padding=1) if with_conv else None
    x = torch.randn(3, 64, 8, 8, generator=g) * 2 + 5  # an offset: the statistics must be computed robustly
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale = 0.3 * torch.randn(3, 64, generator=g) if modulated else None
    shift = 0.3 * torch.randn(3, 64, generator=g) if modulated else None
    side = {"up": 16, "down": 4}.get(resample, 8)
    grad = torch.randn(3, 32 if with_conv else 64, side, side, generator=g)
    results = []
    for impl in ("plain", "fused"):
        xx = x.clone().requires_grad_()
        ss = scale.clone().requires_grad_() if modulated else None
        sh = shift.clone().requires_grad_() if modulated else None
        params = list(norm.parameters()) + (list(conv.parameters()) if conv is not None else [])
        for p in params:
            p.grad = None
        if impl == "plain":
            out = plain(norm, conv, xx, ss, sh, act, resample)
        elif with_conv:
            out = norm_act_conv(norm, conv, xx, ss, sh, resample)
        else:
            out = norm_act(norm, xx, ss, sh, act)
        out.backward(grad)
        grads = [ss.grad, sh.grad] if modulated else []
        results.append([out.detach(), xx.grad, *grads] + [p.grad.clone() for p in params])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_training_matches_reference_masks_and_gradients(channels_last):
    ref, ours = make_pair(dict(num_heads=2, resblock_updown=True, use_scale_shift_norm=True, num_classes=3))
    load_openai_state_dict(ours, ref.state_dict())
    for m in list(ref.modules()) + list(ours.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.3
    ref.train()
    ours.train()
    ours.cpu_channels_last = channels_last
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 600]), torch.tensor([0, 2])
    torch.manual_seed(7)
    expected = ref(x, t, y)
    expected.square().sum().backward()
    torch.manual_seed(7)
    got = ours(x, t, y)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # the same dropout masks for the same seed
    ref_params = dict(ref.named_parameters())
    key_map = openai_key_map(ours)
    for name, p in ours.named_parameters():
        r = ref_params[key_map[name][0]]
        torch.testing.assert_close(p.grad.reshape(r.shape), r.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_internal_layout_is_invisible():
    _, ours = make_pair(dict(num_heads=2, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True))
    randomize_(ours)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        nhwc = ours(x, t)
        ours.cpu_channels_last = False
        nchw = ours(x, t)
    assert nhwc.is_contiguous() and nhwc.shape == (2, 6, 16, 16)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("resample", [None, "up", "down"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_input_gradient_with_frozen_weights(channels_last, resample, dtype):
    """Classifier guidance differentiates to x with frozen weights: that backward skips rebuilding the convolution's
    input (only its shape is needed) and must give the same dx as the backward that also makes weight gradients."""
    g = torch.Generator().manual_seed(1)
    norm, conv = GroupNorm32(64), nn.Conv2d(64, 32, 3, padding=1)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(64, generator=g))
        norm.bias.copy_(0.5 * torch.randn(64, generator=g))
    x = torch.randn(2, 64, 8, 8, generator=g) + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = 0.3 * torch.randn(2, 64, generator=g), 0.3 * torch.randn(2, 64, generator=g)
    side = {"up": 16, "down": 4}.get(resample, 8)
    grad = torch.randn(2, 32, side, side, generator=g)
    dxs = []
    for frozen in (False, True):
        for p in [*norm.parameters(), *conv.parameters()]:
            p.requires_grad_(not frozen)
            p.grad = None
        xx = x.clone().requires_grad_()
        torch.manual_seed(0)  # the same dropout masks in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = norm_act_conv(norm, conv, xx, scale, shift, resample, dropout=0.2)
        out.float().backward(grad)
        assert frozen == (conv.weight.grad is None)
        dxs.append(xx.grad)
    assert dxs[1].abs().sum() > 0
    torch.testing.assert_close(dxs[1], dxs[0], rtol=0, atol=0)
