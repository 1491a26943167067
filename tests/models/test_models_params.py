"""Parameter counts of the released configurations (meta device) and constructor argument handling."""

import pytest
import torch
from guided_diffusion.script_util import create_classifier, create_model

from diffusion_pl.models import EncoderUNetModel, UNetModel, build_released, default_channel_mult, released_config
from diffusion_pl.models.presets import RELEASED_CONFIGS


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(RELEASED_CONFIGS))
def test_released_parameter_counts(name):
    model = build_released(name, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert n_params(model) == RELEASED_CONFIGS[name][2]


REF_SETTINGS = {  # the same configurations built with the reference's own factory functions
    "adm_imagenet64": lambda: create_model(64, 192, 3, channel_mult="1,2,3,4", learn_sigma=True, class_cond=True,
        attention_resolutions="32,16,8", num_head_channels=64, use_scale_shift_norm=True, dropout=0.1,
        resblock_updown=True, use_new_attention_order=True),
    "adm_imagenet64_classifier": lambda: create_classifier(64, False, 128, 4, "32,16,8", True, True, "attention"),
    "iddpm_cifar10": lambda: create_model(32, 128, 3, channel_mult="1,2,2,2", learn_sigma=True, num_heads=4,
        attention_resolutions="16,8", use_scale_shift_norm=True, dropout=0.3),
    "iddpm_imagenet64_uncond": lambda: create_model(64, 128, 3, learn_sigma=True, num_heads=4,
        attention_resolutions="16,8", use_scale_shift_norm=True),
    "iddpm_imagenet64_cond": lambda: create_model(64, 192, 3, learn_sigma=True, class_cond=True, num_heads=4,
        attention_resolutions="16,8", use_scale_shift_norm=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REF_SETTINGS))
def test_presets_match_reference_factory(name):
    with torch.device("meta"):
        ref = REF_SETTINGS[name]()
    ours = build_released(name, device="meta")
    assert n_params(ref) == n_params(ours) == RELEASED_CONFIGS[name][2]
    # same tensors one to one (names differ, shapes must agree after the key mapping)
    from diffusion_pl.models import openai_key_map

    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    own = ours.state_dict()
    mapped = {ref_k for ref_k, _ in openai_key_map(ours).values()}
    assert mapped == set(ref_shapes)
    for ours_k, (ref_k, _) in openai_key_map(ours).items():
        assert own[ours_k].numel() == torch.Size(ref_shapes[ref_k]).numel(), ours_k


def test_released_config_returns_fresh_kwargs_and_rejects_unknown():
    cls, kw = released_config("adm_imagenet64")
    assert cls is UNetModel and kw["num_classes"] == 1000 and kw["use_new_attention_order"] is True
    kw["model_channels"] = 1
    assert released_config("adm_imagenet64")[1]["model_channels"] == 192
    assert released_config("adm_imagenet64_classifier")[0] is EncoderUNetModel
    with pytest.raises(KeyError, match="available: adm_imagenet64"):
        released_config("adm_imagenet65")


def test_default_channel_mult_and_errors():
    assert default_channel_mult(32) == (1, 2, 2, 2)
    assert default_channel_mult(64) == (1, 2, 3, 4)
    assert default_channel_mult(128) == (1, 1, 2, 3, 4)
    assert default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert default_channel_mult(512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert default_channel_mult(28, "1,2,2") == (1, 2, 2)
    with pytest.raises(ValueError, match=r"image_size=48.*\[32, 64, 128, 256, 512\]"):
        UNetModel(48, model_channels=32)


def test_attention_resolutions_string_equals_tuple_and_bad_values_fail():
    a = UNetModel(32, model_channels=32, channel_mult=(1, 2), attention_resolutions="32,16", num_res_blocks=1)
    b = UNetModel(32, model_channels=32, channel_mult=(1, 2), attention_resolutions=(32, 16), num_res_blocks=1)
    assert a.attention_ds == b.attention_ds == frozenset({1, 2})
    assert a.state_dict().keys() == b.state_dict().keys()
    n_attn = sum(type(m).__name__ == "AttentionBlock" for m in a.modules())
    assert n_attn == 2 + 1 + 4  # down: 2 levels x 1 block; middle; up: 2 levels x (1 + 1) blocks
    with pytest.raises(ValueError, match="attention resolution 8 is not a feature-map size"):
        UNetModel(32, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,))


def test_groupnorm_channel_error_is_clear():
    with pytest.raises(ValueError, match="divisible by 32"):
        UNetModel(32, model_channels=48, channel_mult=(1, 2), attention_resolutions=(16,))
