"""ADM U-Net (denoiser) and its encoder half (noisy classifier).

Layout (module names are ours; :mod:`diffusion_pl.models.openai_checkpoint` maps them to the reference's):

    time_embed     sinusoidal(t, C) -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C)   (+ class_embed(y) if conditional)
    input_conv     conv3x3(in_channels -> C * mult[0])
    down[i]        per level: num_res_blocks x Stage(res [+ attn]), then Stage(resample=Downsample / down-ResBlock)
    middle         ResBlock -> AttentionBlock -> ResBlock
    up[i]          per level (reversed): (num_res_blocks + 1) x Stage(res over concat(h, skip) [+ attn] [+ resample])
    out            GroupNorm -> SiLU -> zero-initialised conv3x3 (UNet) | pooling head (encoder)

``attention_resolutions`` are image resolutions: attention is used where the feature map is ``r x r``,
i.e. at downsampling factor ``ds = image_size // r``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import fused as fused_ops
from .layers import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    GroupNorm32,
    ResBlock,
    Upsample,
    timestep_embedding,
    zero_init,
)

__all__ = ["UNetModel", "EncoderUNetModel", "default_channel_mult", "parse_attention_resolutions"]

DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
    512: (0.5, 1, 1, 2, 2, 4, 4),
}


def default_channel_mult(image_size: int, channel_mult: Sequence[float] | str | None = None) -> tuple[float, ...]:
    """``channel_mult`` as a tuple; ``None``/``""`` -> the ADM default for ``image_size``; accepts ``"1,2,2,2"``."""
    if channel_mult is None or channel_mult == "":
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size={image_size}; defaults exist for "
                f"{sorted(DEFAULT_CHANNEL_MULT)}: pass channel_mult explicitly (e.g. channel_mult=(1, 2, 2))"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        channel_mult = [float(m) for m in channel_mult.split(",")]
    out = tuple(int(m) if float(m).is_integer() else float(m) for m in channel_mult)
    if not out or any(m <= 0 for m in out):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive numbers, got {channel_mult!r}")
    return out


def parse_attention_resolutions(
    attention_resolutions: Sequence[int] | str, image_size: int, num_levels: int
) -> frozenset[int]:
    """Image resolutions (``(16, 8)`` or ``"16,8"``) -> the set of downsampling factors ``ds = image_size // r``.

    Every resolution must be one the network actually has (``image_size / 2**level`` for a level it builds).
    """
    if isinstance(attention_resolutions, str):
        attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r.strip()]
    available = {image_size // 2**lvl: 2**lvl for lvl in range(num_levels) if image_size % 2**lvl == 0}
    ds = set()
    for r in attention_resolutions:
        r = int(r)
        if r not in available:
            raise ValueError(
                f"attention resolution {r} is not a feature-map size of this network (image_size={image_size}, "
                f"{num_levels} levels: {sorted(available, reverse=True)}); attention_resolutions are IMAGE resolutions"
            )
        ds.add(available[r])
    return frozenset(ds)


class Stage(nn.Module):
    """One entry of the down/up path: optional ResBlock, optional attention, optional resampling (in that order)."""

    def __init__(
        self, res: ResBlock | None = None, attn: AttentionBlock | None = None, resample: nn.Module | None = None
    ):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.res is not None:
            h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.resample is not None:
            h = self.resample(h, emb) if isinstance(self.resample, ResBlock) else self.resample(h)
        return h


class MiddleBlock(nn.Module):
    """ResBlock -> AttentionBlock -> ResBlock at the lowest resolution."""

    def __init__(self, ch: int, emb_ch: int, block_kw: dict, attn_kw: dict):
        super().__init__()
        self.res1 = ResBlock(ch, emb_ch, **block_kw)
        self.attn = AttentionBlock(ch, **attn_kw)
        self.res2 = ResBlock(ch, emb_ch, **block_kw)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(h, emb)), emb)


class TimeEmbedding(nn.Module):
    """``Linear(C, 4C) -> SiLU -> Linear(4C, 4C)`` applied to the sinusoidal embedding of t (dimension C)."""

    def __init__(self, model_channels: int, emb_channels: int):
        super().__init__()
        self.model_channels = model_channels
        self.fc1 = nn.Linear(model_channels, emb_channels)
        self.fc2 = nn.Linear(emb_channels, emb_channels)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(timestep_embedding(timesteps, self.model_channels))))


def _check_timesteps(x: torch.Tensor, timesteps: torch.Tensor | float | int) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, device=x.device)
    if timesteps.dim() == 0:
        timesteps = timesteps.expand(x.shape[0])
    if timesteps.shape != (x.shape[0],):
        raise ValueError(f"timesteps must have shape [N]=[{x.shape[0]}] (or be a scalar), got {tuple(timesteps.shape)}")
    return timesteps


class _Backbone(nn.Module):
    """Shared constructor of the down path + middle block (both UNetModel and EncoderUNetModel)."""

    #: the fused CPU path runs in channels_last memory format internally (see :meth:`_internal_layout`)
    cpu_channels_last: bool = True

    def _build_encoder(
        self,
        image_size,
        in_channels,
        model_channels,
        num_res_blocks,
        attention_resolutions,
        dropout,
        channel_mult,
        conv_resample,
        use_checkpoint,
        num_heads,
        num_head_channels,
        use_scale_shift_norm,
        resblock_updown,
        use_new_attention_order,
        norm_groups,
        fused_norm,
    ):
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        self.image_size, self.in_channels, self.model_channels = image_size, in_channels, model_channels
        self.num_res_blocks = num_res_blocks
        self.channel_mult = default_channel_mult(image_size, channel_mult)
        self.attention_ds = parse_attention_resolutions(attention_resolutions, image_size, len(self.channel_mult))
        self.num_levels = len(self.channel_mult)
        emb_ch = 4 * model_channels
        self.norm_groups, self.fused_norm = norm_groups, fused_norm
        common = dict(use_checkpoint=use_checkpoint, norm_groups=norm_groups, fused_norm=fused_norm)
        self.block_kw = dict(dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, **common)
        self.attn_kw = dict(num_heads=num_heads, num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order, **common)  # fmt: skip
        self.time_embed = TimeEmbedding(model_channels, emb_ch)
        ch = int(self.channel_mult[0] * model_channels)
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_chans, ds = [ch], 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                res = ResBlock(ch, emb_ch, out_ch, **self.block_kw)
                attn = AttentionBlock(out_ch, **self.attn_kw) if ds in self.attention_ds else None
                self.down.append(Stage(res=res, attn=attn))
                ch = out_ch
                skip_chans.append(ch)
            if level != self.num_levels - 1:
                resample = (
                    ResBlock(ch, emb_ch, ch, resample="down", **self.block_kw)
                    if resblock_updown
                    else Downsample(ch, use_conv=conv_resample)
                )
                self.down.append(Stage(resample=resample))
                skip_chans.append(ch)
                ds *= 2
        self.middle = MiddleBlock(ch, emb_ch, self.block_kw, self.attn_kw)
        return ch, ds, skip_chans, emb_ch

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        f = 2 ** (self.num_levels - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"H and W must be divisible by {f} ({self.num_levels} levels), got {tuple(x.shape[2:])}")

    def _internal_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The fused CPU path runs in channels_last (NHWC) whatever the input layout (faster oneDNN convolutions:
        benchmarks/NOTES.md); outputs are returned contiguous (NCHW), so callers see no difference.
        ``cpu_channels_last = False`` (or the plain path) keeps the input's layout."""
        if self.cpu_channels_last and x.device.type == "cpu" and fused_ops.use_fused(self.fused_norm, x):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _norm_act(self, h: torch.Tensor) -> torch.Tensor:
        """``SiLU(out_norm(h))``, the start of the output head."""
        if fused_ops.use_fused(self.fused_norm, h):
            return fused_ops.norm_act(self.out_norm, h)
        return F.silu(self.out_norm(h))

    def _encode(self, x: torch.Tensor, emb: torch.Tensor, skips: list | None = None) -> torch.Tensor:
        h = self.input_conv(x)
        if skips is not None:
            skips.append(h)
        for stage in self.down:
            h = stage(h, emb)
            if skips is not None:
                skips.append(h)
        return self.middle(h, emb)


class UNetModel(_Backbone):
    """The ADM / Improved-DDPM U-Net: ``forward(x, timesteps, y=None) -> [N, out_channels, H, W]``.

    Arguments follow ``docs/ARCHITECTURE.md``. ``out_channels`` defaults to ``in_channels`` (``2 * in_channels`` with
    ``learn_sigma``: the mean/eps channels followed by the variance interpolation channels). ``num_classes`` enables
    class conditioning (``y`` then required); ``null_class`` adds one extra embedding row (index ``num_classes``) for
    classifier-free guidance. ``use_checkpoint`` enables gradient checkpointing of every ResBlock and attention block.
    ``norm_groups`` is the number of GroupNorm groups (32 in every released model). A norm with one channel per group
    subtracts each channel's spatial mean, so the output cannot follow the mean brightness of the input: narrow
    networks (e.g. 32 channels) should use fewer groups (8 in configs/quickstart.yaml). ``fused_norm``: True runs the
    fused CPU path of :mod:`diffusion_pl.models.fused`, False the plain PyTorch modules, None (auto) the fused path on
    the CPU outside ``torch.compile`` and the plain one elsewhere; both compute the same values from the same weights.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int | None = None,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] | str = (16, 8),
        dropout: float = 0.0,
        channel_mult: Sequence[float] | str | None = None,
        conv_resample: bool = True,
        num_classes: int | None = None,
        null_class: bool = False,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        learn_sigma: bool = False,
        norm_groups: int = 32,
        fused_norm: bool | None = None,
    ):
        super().__init__()
        if null_class and num_classes is None:
            raise ValueError("null_class=True needs num_classes (the null label is index num_classes)")
        ch, ds, skip_chans, emb_ch = self._build_encoder(
            image_size, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, norm_groups, fused_norm,
        )  # fmt: skip
        base_out = out_channels or in_channels
        self.out_channels = 2 * base_out if learn_sigma else base_out
        self.learn_sigma = learn_sigma
        self.num_classes, self.null_class = num_classes, null_class
        self.class_embed = nn.Embedding(num_classes + int(null_class), emb_ch) if num_classes is not None else None

        up_attn_kw = dict(self.attn_kw, num_heads=num_heads if num_heads_upsample == -1 else num_heads_upsample)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                res = ResBlock(ch + skip_chans.pop(), emb_ch, out_ch, **self.block_kw)
                attn = AttentionBlock(out_ch, **up_attn_kw) if ds in self.attention_ds else None
                ch = out_ch
                resample = None
                if level and i == num_res_blocks:
                    resample = (
                        ResBlock(ch, emb_ch, ch, resample="up", **self.block_kw)
                        if resblock_updown
                        else Upsample(ch, use_conv=conv_resample)
                    )
                    ds //= 2
                self.up.append(Stage(res=res, attn=attn, resample=resample))
        self.out_norm = GroupNorm32(ch, norm_groups)
        self.out_conv = zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ``[N, out_channels, H, W]`` from noisy images ``x`` at (int or float) ``timesteps`` ``[N]``."""
        self._check_input(x)
        timesteps = _check_timesteps(x, timesteps)
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "this UNetModel is class-conditional: pass y (int64 labels [N])"
                if y is None
                else "this UNetModel is unconditional (num_classes=None): y must not be given"
            )
        emb = self.time_embed(timesteps)
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [N]=[{x.shape[0]}], got {tuple(y.shape)}")
            emb = emb + self.class_embed(y)
        skips: list[torch.Tensor] = []
        h = self._encode(self._internal_layout(x), emb, skips)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        h = h.contiguous()  # the head convolution in NCHW: its NHWC backward is less accurate (benchmarks/NOTES.md)
        if fused_ops.use_fused(self.fused_norm, h):
            return fused_ops.norm_act_conv(self.out_norm, self.out_conv, h).contiguous()
        return self.out_conv(self._norm_act(h))


class EncoderUNetModel(_Backbone):
    """The noisy classifier of ADM: down path + middle block + pooling head, ``forward(x, timesteps) -> [N, out]``.

    ``pool="attention"``: GroupNorm -> SiLU -> :class:`AttentionPool2d` (head channels ``num_head_channels``, or 64
    when it is -1, as in the released classifiers); ``pool="adaptive"``: GroupNorm -> SiLU -> global average pool ->
    zero-initialised 1x1 conv -> flatten. The reference's "spatial" pools are not supported. ``fused_norm`` as in
    :class:`UNetModel`.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int = 1000,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] | str = (32, 16, 8),
        dropout: float = 0.0,
        channel_mult: Sequence[float] | str | None = None,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "attention",
        norm_groups: int = 32,
        fused_norm: bool | None = None,
    ):
        super().__init__()
        if pool not in ("attention", "adaptive"):
            raise ValueError(
                f"pool={pool!r} is not supported: use 'attention' (released ADM classifiers) or 'adaptive'"
                + (
                    "; the reference's 'spatial'/'spatial_v2' heads are not implemented"
                    if "spatial" in str(pool)
                    else ""
                )
            )
        ch, ds, _, _ = self._build_encoder(
            image_size, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, norm_groups, fused_norm,
        )  # fmt: skip
        self.out_channels, self.pool = out_channels, pool
        self.out_norm = GroupNorm32(ch, norm_groups)
        if pool == "attention":
            head_ch = num_head_channels if num_head_channels != -1 else 64
            self.head = AttentionPool2d(image_size // ds, ch, head_ch, out_channels)
        else:
            self.head = zero_init(nn.Linear(ch, out_channels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, out_channels]`` of noisy images ``x`` at ``timesteps`` ``[N]``."""
        self._check_input(x)
        emb = self.time_embed(_check_timesteps(x, timesteps))
        h = self._norm_act(self._encode(self._internal_layout(x), emb))
        if self.pool == "attention":
            return self.head(h)
        return self.head(h.mean(dim=(2, 3)))
