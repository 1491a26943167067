"""Loading openai/improved-diffusion checkpoints (the iDDPM CIFAR-10 / ImageNet-64 releases).

improved-diffusion's unet.py predates guided-diffusion's: no BigGAN up/down blocks, no num_head_channels, no
attention-order option, conv resampling, the input conv always has model_channels outputs. Its state dict layout is
enumerated below from that source (module registration order, parameter shapes), independently of both our key map
and guided_diffusion, so a layout drift on either side fails here. Its attention (AttentionBlock + QKVAttention)
reshapes qkv to [N * heads, 3 * C / heads, T] BEFORE splitting q, k, v: guided-diffusion's "legacy" order.
"""

import math

import pytest
import torch
from guided_diffusion.unet import UNetModel as RefUNet

from diffusion_pl.models import (
    AttentionBlock,
    UNetModel,
    build_released,
    export_openai_state_dict,
    load_openai_state_dict,
    released_config,
)
from diffusion_pl.models.presets import RELEASED_CONFIGS


def _resblock(sd, prefix, cin, cout, emb, scale_shift):
    sd[f"{prefix}.in_layers.0.weight"] = (cin,)  # GroupNorm32
    sd[f"{prefix}.in_layers.0.bias"] = (cin,)
    sd[f"{prefix}.in_layers.2.weight"] = (cout, cin, 3, 3)  # in_layers.1 is SiLU
    sd[f"{prefix}.in_layers.2.bias"] = (cout,)
    sd[f"{prefix}.emb_layers.1.weight"] = (2 * cout if scale_shift else cout, emb)  # emb_layers.0 is SiLU
    sd[f"{prefix}.emb_layers.1.bias"] = (2 * cout if scale_shift else cout,)
    sd[f"{prefix}.out_layers.0.weight"] = (cout,)
    sd[f"{prefix}.out_layers.0.bias"] = (cout,)
    sd[f"{prefix}.out_layers.3.weight"] = (cout, cout, 3, 3)  # SiLU, Dropout, zero-initialised conv
    sd[f"{prefix}.out_layers.3.bias"] = (cout,)
    if cin != cout:
        sd[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
        sd[f"{prefix}.skip_connection.bias"] = (cout,)


def _attention(sd, prefix, ch):
    sd[f"{prefix}.norm.weight"] = (ch,)
    sd[f"{prefix}.norm.bias"] = (ch,)
    sd[f"{prefix}.qkv.weight"] = (3 * ch, ch, 1)  # conv_nd(1, ch, 3 ch, 1); QKVAttention has no parameters
    sd[f"{prefix}.qkv.bias"] = (3 * ch,)
    sd[f"{prefix}.proj_out.weight"] = (ch, ch, 1)
    sd[f"{prefix}.proj_out.bias"] = (ch,)


def improved_diffusion_layout(in_channels, model_channels, out_channels, num_res_blocks, attention_ds, channel_mult,
                              num_classes=None, use_scale_shift_norm=True):  # fmt: skip
    """{key: shape} of improved_diffusion.unet.UNetModel(...).state_dict(), in its order."""
    mc, emb = model_channels, 4 * model_channels
    sd = {"time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,),
          "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)}  # fmt: skip
    if num_classes is not None:
        sd["label_emb.weight"] = (num_classes, emb)
    sd["input_blocks.0.0.weight"] = (mc, in_channels, 3, 3)
    sd["input_blocks.0.0.bias"] = (mc,)
    chans, ch, ds, block = [mc], mc, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            _resblock(sd, f"input_blocks.{block}.0", ch, mult * mc, emb, use_scale_shift_norm)
            ch = mult * mc
            if ds in attention_ds:
                _attention(sd, f"input_blocks.{block}.1", ch)
            chans.append(ch)
            block += 1
        if level != len(channel_mult) - 1:
            sd[f"input_blocks.{block}.0.op.weight"] = (ch, ch, 3, 3)  # Downsample(use_conv=True): stride-2 conv
            sd[f"input_blocks.{block}.0.op.bias"] = (ch,)
            chans.append(ch)
            ds *= 2
            block += 1
    _resblock(sd, "middle_block.0", ch, ch, emb, use_scale_shift_norm)
    _attention(sd, "middle_block.1", ch)
    _resblock(sd, "middle_block.2", ch, ch, emb, use_scale_shift_norm)
    block = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            _resblock(sd, f"output_blocks.{block}.0", ch + chans.pop(), mc * mult, emb, use_scale_shift_norm)
            ch, layer = mc * mult, 1
            if ds in attention_ds:
                _attention(sd, f"output_blocks.{block}.1", ch)
                layer = 2
            if level and i == num_res_blocks:
                sd[f"output_blocks.{block}.{layer}.conv.weight"] = (ch, ch, 3, 3)  # Upsample(use_conv=True)
                sd[f"output_blocks.{block}.{layer}.conv.bias"] = (ch,)
                ds //= 2
            block += 1
    sd["out.0.weight"] = (ch,)
    sd["out.0.bias"] = (ch,)
    sd["out.2.weight"] = (out_channels, mc, 3, 3)
    sd["out.2.bias"] = (out_channels,)
    return sd


def _layout_for(kw):
    return improved_diffusion_layout(
        kw.get("in_channels", 3), kw["model_channels"], 2 * kw.get("in_channels", 3) if kw["learn_sigma"] else 3,
        kw["num_res_blocks"], {kw["image_size"] // r for r in kw["attention_resolutions"]}, kw["channel_mult"],
        kw.get("num_classes"), kw["use_scale_shift_norm"],
    )  # fmt: skip


@pytest.mark.parametrize("name", ["iddpm_cifar10", "iddpm_imagenet64_uncond", "iddpm_imagenet64_cond"])
def test_released_iddpm_configs_have_the_improved_diffusion_layout(name):
    _, kw = released_config(name)
    assert kw.get("use_new_attention_order", False) is False and kw.get("resblock_updown", False) is False
    layout = _layout_for(kw)
    # the enumeration reproduces the parameter count measured with the reference code
    assert sum(math.prod(s) for s in layout.values()) == RELEASED_CONFIGS[name][2]
    model = build_released(name, device="meta")
    exported = export_openai_state_dict(model)
    assert list(exported) == list(layout)  # same keys, same order
    assert {k: tuple(v.shape) for k, v in exported.items()} == layout
    # a checkpoint in that layout loads strictly (meta tensors: no memory, shapes and keys checked)
    missing, unexpected = load_openai_state_dict(model, {k: torch.empty(s, device="meta") for k, s in layout.items()})
    assert missing == [] and unexpected == []


SMALL = dict(image_size=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8, 4),
             num_heads=4, use_scale_shift_norm=True, learn_sigma=True, num_classes=10)  # fmt: skip


def test_small_improved_diffusion_state_dict_loads_and_runs_like_the_reference():
    layout = _layout_for(SMALL)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in layout.items()}
    ours = UNetModel(**SMALL).eval()
    load_openai_state_dict(ours, state)  # strict
    assert all(torch.equal(a, state[k]) for k, a in export_openai_state_dict(ours).items())
    # improved-diffusion's network is guided-diffusion's with legacy attention and conv resampling: the oracle takes
    # the very same state dict (strict) and must give the same output.
    ref = RefUNet(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2,
                  attention_resolutions=(2, 4), channel_mult=(1, 2, 2), num_classes=10, num_heads=4,
                  use_scale_shift_norm=True).eval()  # fmt: skip
    ref.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([3, 3999]).float() * (1000.0 / 4000)  # iDDPM: rescale_timesteps=True, T = 4000
    y = torch.tensor([2, 9])
    with torch.no_grad():
        expected, got = ref(x, t, y), ours(x, t, y)
    assert expected.abs().max() > 0.05
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _improved_diffusion_attention(x, norm, qkv_weight, qkv_bias, proj_weight, proj_bias, heads):
    """improved_diffusion.unet.AttentionBlock._forward + QKVAttention.forward, from its formulas."""
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    qkv = torch.einsum("oc,bct->bot", qkv_weight, norm(flat)) + qkv_bias[None, :, None]
    qkv = qkv.reshape(b * heads, -1, qkv.shape[2])  # heads first ...
    ch = qkv.shape[1] // 3
    q, k, v = torch.split(qkv, ch, dim=1)  # ... then q, k, v
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, flat.shape[-1])
    h = torch.einsum("oc,bct->bot", proj_weight, h) + proj_bias[None, :, None]
    return (flat + h).reshape(b, c, hh, ww)


@pytest.mark.parametrize("heads", [1, 4])
def test_improved_diffusion_attention_is_the_legacy_order(heads):
    block = AttentionBlock(64, num_heads=heads, use_new_attention_order=False).eval()
    g = torch.Generator().manual_seed(heads)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(2, 64, 4, 4, generator=g)
    expected = _improved_diffusion_attention(x, block.norm, block.qkv.weight, block.qkv.bias, block.proj_out.weight,
                                             block.proj_out.bias, heads)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
        if heads > 1:  # the other channel order is a different function of the same weights
            block.use_new_attention_order = True
            assert not torch.allclose(block(x), expected, atol=1e-3)
