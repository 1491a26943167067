"""norm_groups: the GroupNorm group count of every norm in the U-Net and the classifier (32 = the released models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_pl.models import EncoderUNetModel, UNetModel, export_openai_state_dict
from diffusion_pl.models.openai_checkpoint import OpenAICheckpointError

TINY = dict(
    image_size=16, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
    num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
)  # fmt: skip


def group_counts(model: nn.Module) -> set[int]:
    return {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}


@pytest.mark.parametrize("cls", [UNetModel, EncoderUNetModel])
def test_every_norm_uses_norm_groups(cls):
    kw = dict(TINY, out_channels=3) if cls is EncoderUNetModel else dict(TINY, learn_sigma=True)
    assert group_counts(cls(**kw)) == {32}
    assert group_counts(cls(**kw, norm_groups=8)) == {8}


def test_groups_change_the_function_but_not_the_parameters():
    torch.manual_seed(0)
    a = UNetModel(**TINY)
    for m in a.modules():  # undo the zero-initialised output convs so that outputs are informative
        if isinstance(m, nn.Conv2d) and not m.weight.abs().sum():
            nn.init.normal_(m.weight, std=0.1)
    b = UNetModel(**TINY, norm_groups=8)
    b.load_state_dict(a.state_dict())  # same parameter names and shapes
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    assert not torch.allclose(a(x, t), b(x, t), atol=1e-4)


def test_one_channel_per_group_hides_the_mean_of_the_last_features():
    # With 32 groups over 32 channels the output head (GroupNorm -> SiLU -> conv) is blind to a per-channel offset
    # of its input: the reason narrow networks need fewer groups to reproduce an image's mean brightness.
    torch.manual_seed(0)
    net = UNetModel(**TINY)
    nn.init.normal_(net.out_conv.weight, std=0.1)
    head = lambda h: net.out_conv(nn.functional.silu(net.out_norm(h)))  # noqa: E731
    h, offset = torch.randn(1, 32, 16, 16), torch.randn(1, 32, 1, 1)
    torch.testing.assert_close(head(h + offset), head(h), atol=1e-4, rtol=1e-4)
    grouped = UNetModel(**TINY, norm_groups=8)
    grouped.out_conv.weight.data.copy_(net.out_conv.weight)
    head8 = lambda h: grouped.out_conv(nn.functional.silu(grouped.out_norm(h)))  # noqa: E731
    assert (head8(h + offset) - head8(h)).abs().max() > 1e-2


def test_export_refuses_other_group_counts():
    with pytest.raises(OpenAICheckpointError, match="norm_groups=8.*32 groups"):
        export_openai_state_dict(UNetModel(**TINY, norm_groups=8))
    assert export_openai_state_dict(UNetModel(**TINY))


def test_channels_must_divide_into_groups():
    with pytest.raises(ValueError, match="divisible by 8"):
        UNetModel(**dict(TINY, model_channels=36), norm_groups=8)
