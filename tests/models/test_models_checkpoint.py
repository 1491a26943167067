"""Loading checkpoints that do not fit, non-strict loading and the file helper."""

import pytest
import torch
from conftest import randomize_
from guided_diffusion.unet import UNetModel as RefUNet

from diffusion_pl.models import (
    OpenAICheckpointError,
    UNetModel,
    export_openai_state_dict,
    load_openai_checkpoint,
    load_openai_state_dict,
)

KW = dict(
    image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,), num_heads=2
)


def ref_model(model_channels=32, **kw):
    return RefUNet(image_size=16, in_channels=3, model_channels=model_channels, out_channels=3, num_res_blocks=1,
                   attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, **kw)  # fmt: skip


def test_wrong_width_lists_shape_mismatches():
    sd = ref_model(model_channels=64).state_dict()
    with pytest.raises(OpenAICheckpointError) as err:
        load_openai_state_dict(UNetModel(**KW), sd)
    msg = str(err.value)
    assert "shape mismatches" in msg
    assert "input_blocks.0.0.weight: expected (32, 3, 3, 3) vs found (64, 3, 3, 3)" in msg
    assert "middle_block.1.qkv.weight: expected (192, 64, 1) vs found (384, 128, 1)" in msg
    assert "Check the architecture settings" in msg


def test_missing_and_unexpected_keys_are_listed_and_nothing_is_loaded():
    ref = randomize_(ref_model())
    sd = dict(ref.state_dict())
    del sd["out.2.weight"]
    sd["label_emb.weight"] = torch.zeros(10, 128)  # a class-conditional checkpoint for an unconditional model
    ours = UNetModel(**KW)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(OpenAICheckpointError) as err:
        load_openai_state_dict(ours, sd)
    msg = str(err.value)
    assert "missing keys (1):" in msg and "out.2.weight (expected (3, 32, 3, 3))" in msg
    assert "unexpected keys (1):" in msg and "label_emb.weight (10, 128)" in msg
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())  # all-or-nothing
    missing, unexpected = load_openai_state_dict(ours, sd, strict=False)
    assert missing == ["out.2.weight"] and unexpected == ["label_emb.weight"]
    assert torch.equal(ours.input_conv.weight, ref.state_dict()["input_blocks.0.0.weight"])


def test_legacy_vs_new_order_checkpoints_differ_in_meaning_not_shape():
    ref = randomize_(ref_model(use_new_attention_order=False)).eval()
    legacy = UNetModel(**KW).eval()
    new = UNetModel(**KW, use_new_attention_order=True).eval()
    load_openai_state_dict(legacy, ref.state_dict())
    load_openai_state_dict(new, ref.state_dict())  # same shapes: loads, but the order must be set right
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(legacy(x, t), ref(x, t), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(new(x, t), ref(x, t), atol=1e-4)


def test_load_from_file(tmp_path):
    ref = randomize_(ref_model()).eval()
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    ours = load_openai_checkpoint(UNetModel(**KW), path).eval()
    exported, expected = export_openai_state_dict(ours).values(), ref.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(exported, expected, strict=True))
    with pytest.raises(OpenAICheckpointError, match=str(path)):
        load_openai_checkpoint(UNetModel(**{**KW, "model_channels": 64}), path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_openai_checkpoint(UNetModel(**KW), tmp_path / "nope.pt")
