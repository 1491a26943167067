"""Behaviour under training: gradient checkpointing with dropout, bf16 autocast, input validation, embeddings."""

import math

import pytest
import torch
from conftest import randomize_
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_pl.models import EncoderUNetModel, GroupNorm32, UNetModel, timestep_embedding
from diffusion_pl.models.layers import ResBlock

KW = dict(
    image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
    num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, num_classes=5, learn_sigma=True,
)


def grads_after_step(use_checkpoint, seed=123, dropout=0.3):
    model = UNetModel(**KW, dropout=dropout, use_checkpoint=use_checkpoint).train()
    randomize_(model, std=0.1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([3, 9]), torch.tensor([1, 2])
    torch.manual_seed(seed)  # the dropout masks
    out = model(x, t, y)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_identical_gradients_under_dropout(monkeypatch):
    calls = {"n": 0}
    original = ResBlock._forward

    def counting(self, x, emb):
        calls["n"] += 1
        return original(self, x, emb)

    monkeypatch.setattr(ResBlock, "_forward", counting)
    out_plain, g_plain = grads_after_step(False)
    plain_calls = calls["n"]
    calls["n"] = 0
    out_ckpt, g_ckpt = grads_after_step(True)
    assert calls["n"] == 2 * plain_calls  # every ResBlock is recomputed during backward: checkpointing is active
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # dropout really is active: another seed gives other gradients
    _, g_other = grads_after_step(False, seed=7)
    assert not torch.allclose(g_other["input_conv.weight"], g_plain["input_conv.weight"])


def test_checkpointing_is_off_in_eval_and_no_grad():
    model = UNetModel(**KW, use_checkpoint=True).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 9]), torch.tensor([1, 2])
    with torch.no_grad():
        model(x, t, y)  # no warnings/errors, no checkpoint machinery needed


class RecordDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if isinstance(args[0], torch.Tensor):
            self.seen.setdefault(name, set()).add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_forward_runs_with_fp32_group_norm():
    model = randomize_(UNetModel(**KW), std=0.1).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 9]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16), RecordDtypes() as rec:
            out = model(x, t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.bfloat16 in rec.seen["convolution"]  # autocast is really active
    assert rec.seen["native_group_norm"] == {torch.float32}  # ... but every GroupNorm computes in fp32
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_group_norm32_returns_input_dtype_and_matches_fp32_maths():
    gn = randomize_(GroupNorm32(64), std=0.5)
    x = (torch.randn(2, 64, 4, 4) * 3 + 100).to(torch.bfloat16)  # large offset: a bf16 variance would be poor
    out = gn(x)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.group_norm(x.float(), 32, gn.weight, gn.bias, 1e-5).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)


def test_bf16_autocast_backward_runs():
    model = UNetModel(**KW, use_checkpoint=True).train()
    randomize_(model, std=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 4]))
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.input_conv.weight.grad.dtype == torch.float32


def test_class_label_errors():
    cond = UNetModel(**KW)
    uncond = UNetModel(**{**KW, "num_classes": None})
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class-conditional: pass y"):
        cond(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"y must have shape \[N\]"):
        cond(x, t, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"timesteps must have shape"):
        uncond(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"divisible by 2"):
        uncond(torch.randn(1, 3, 15, 15), torch.tensor([1]))
    assert uncond(x, torch.tensor(5)).shape == (2, 6, 16, 16)  # a scalar t is broadcast


def test_null_class_adds_an_embedding_row():
    model = UNetModel(**KW, null_class=True)
    assert model.class_embed.num_embeddings == 6
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([5, 0]))  # 5 = the null label
    assert out.shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="null_class=True needs num_classes"):
        UNetModel(**{**KW, "num_classes": None}, null_class=True)


def test_in_channels_1_and_classifier_shapes():
    model = UNetModel(**{**KW, "num_classes": None}, in_channels=1)
    assert model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])).shape == (2, 2, 16, 16)
    cls = EncoderUNetModel(16, in_channels=1, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
                           out_channels=10, num_res_blocks=1)  # fmt: skip
    assert cls.head.num_heads == 1  # head channels default to 64 as in the released classifiers
    assert cls(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])).shape == (2, 10)
    with pytest.raises(ValueError, match="built for 8x8 features"):
        cls(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]))


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 250.5])
    emb = timestep_embedding(t, 8)
    half = 4
    for j in range(half):
        f = math.exp(-math.log(10000) * j / half)
        torch.testing.assert_close(emb[:, j], torch.cos(t * f))  # cos first
        torch.testing.assert_close(emb[:, half + j], torch.sin(t * f))
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    odd = timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, -1], torch.zeros(3)) and torch.equal(odd[:, :8], emb)
    from guided_diffusion.nn import timestep_embedding as ref_emb

    torch.testing.assert_close(timestep_embedding(t, 64), ref_emb(t, 64), rtol=0, atol=0)
