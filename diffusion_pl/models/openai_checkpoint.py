"""Import/export of OpenAI guided-diffusion / improved-diffusion state dicts.

Our module names differ from the reference's; :func:`openai_key_map` walks a model and lists, for every tensor of
ours, the reference key and how the tensor is stored there. It is the single, explicit description of the mapping:

    ours                                  reference                                   storage there
    time_embed.fc1 / fc2                  time_embed.0 / time_embed.2                 same
    class_embed                           label_emb                                   same
    input_conv                            input_blocks.0.0                            same
    down.{i}.res / .attn / .resample      input_blocks.{i+1}.0 / .1 / .0              same (Downsample conv: .0.op)
    middle.res1 / attn / res2             middle_block.0 / .1 / .2                    same
    up.{i}.res / .attn / .resample        output_blocks.{i}.0 / .1 / next index       same (Upsample conv: .conv)
    out_norm / out_conv                   out.0 / out.2                               same
    ResBlock in_norm, in_conv             in_layers.0, in_layers.2                    same
             emb_proj                     emb_layers.1                                same
             out_norm, out_conv           out_layers.0, out_layers.3                  same
             skip                         skip_connection                             same
    AttentionBlock norm/qkv/proj_out      norm/qkv/proj_out                           qkv, proj_out: Conv1d [O, I, 1]
    Encoder out_norm                      out.0                                       same
            head (attention pool)         out.2.positional_embedding/qkv_proj/c_proj  pos: transposed [C, T]; Conv1d
            head (adaptive, Linear)       out.3                                       Conv2d [O, I, 1, 1]

openai/improved-diffusion checkpoints (iDDPM CIFAR-10 / ImageNet-64) use the same key names and shapes: its U-Net is
the subset without BigGAN up/down blocks, ``num_head_channels`` or an encoder head, with conv resampling and a first
conv of ``model_channels`` outputs. Its attention splits heads before q/k/v, i.e. the "legacy" order: build the model
with ``use_new_attention_order=False`` (the ``iddpm_*`` presets do) and sample with the process each was trained with:
T = 4000, cosine, ``rescale_timesteps=True`` except for the class-conditional ImageNet-64 model (``RELEASED_PROCESS``
in presets.py; tests/models/test_models_improved_diffusion.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from diffusion_pl.errors import UserFileNotFoundError, UserInputError

from .layers import AttentionPool2d, Downsample, ResBlock, Upsample
from .unet import EncoderUNetModel, Stage, UNetModel

__all__ = [
    "openai_key_map",
    "load_openai_state_dict",
    "export_openai_state_dict",
    "load_openai_checkpoint",
    "describe_openai_state_dict",
    "OpenAICheckpointError",
]

# storage kinds: "same"; "conv1d" (our Linear [O, I] stored as [O, I, 1]); "conv2d" ([O, I] -> [O, I, 1, 1]);
# "transpose" (our [T, C] stored as [C, T]).


class OpenAICheckpointError(UserInputError):
    """A reference state dict does not fit the model configuration."""


def _add(m: dict, ours: str, ref: str, kind: str = "same") -> None:
    m[ours] = (ref, kind)


def _linear(m, ours, ref, kind="same"):
    _add(m, f"{ours}.weight", f"{ref}.weight", kind)
    _add(m, f"{ours}.bias", f"{ref}.bias")


def _resblock(m, ours: str, ref: str, block: ResBlock) -> None:
    _linear(m, f"{ours}.in_norm", f"{ref}.in_layers.0")
    _linear(m, f"{ours}.in_conv", f"{ref}.in_layers.2")
    _linear(m, f"{ours}.emb_proj", f"{ref}.emb_layers.1")
    _linear(m, f"{ours}.out_norm", f"{ref}.out_layers.0")
    _linear(m, f"{ours}.out_conv", f"{ref}.out_layers.3")
    if isinstance(block.skip, nn.Conv2d):
        _linear(m, f"{ours}.skip", f"{ref}.skip_connection")


def _attention(m, ours: str, ref: str) -> None:
    _linear(m, f"{ours}.norm", f"{ref}.norm")
    _linear(m, f"{ours}.qkv", f"{ref}.qkv", "conv1d")
    _linear(m, f"{ours}.proj_out", f"{ref}.proj_out", "conv1d")


def _stage(m, ours: str, ref: str, stage: Stage) -> None:
    idx = 0
    if stage.res is not None:
        _resblock(m, f"{ours}.res", f"{ref}.{idx}", stage.res)
        idx += 1
    if stage.attn is not None:
        _attention(m, f"{ours}.attn", f"{ref}.{idx}")
        idx += 1
    r = stage.resample
    if isinstance(r, ResBlock):
        _resblock(m, f"{ours}.resample", f"{ref}.{idx}", r)
    elif isinstance(r, Downsample) and r.conv is not None:
        _linear(m, f"{ours}.resample.conv", f"{ref}.{idx}.op")
    elif isinstance(r, Upsample) and r.conv is not None:
        _linear(m, f"{ours}.resample.conv", f"{ref}.{idx}.conv")


def openai_key_map(model: UNetModel | EncoderUNetModel) -> dict[str, tuple[str, str]]:
    """``{our_key: (reference_key, storage_kind)}`` for every tensor in ``model.state_dict()``."""
    if not isinstance(model, (UNetModel, EncoderUNetModel)):
        raise TypeError(f"expected a UNetModel or EncoderUNetModel, got {type(model).__name__}")
    m: dict[str, tuple[str, str]] = {}
    _linear(m, "time_embed.fc1", "time_embed.0")
    _linear(m, "time_embed.fc2", "time_embed.2")
    if isinstance(model, UNetModel) and model.class_embed is not None:
        _add(m, "class_embed.weight", "label_emb.weight")
    _linear(m, "input_conv", "input_blocks.0.0")
    for i, stage in enumerate(model.down):
        _stage(m, f"down.{i}", f"input_blocks.{i + 1}", stage)
    _resblock(m, "middle.res1", "middle_block.0", model.middle.res1)
    _attention(m, "middle.attn", "middle_block.1")
    _resblock(m, "middle.res2", "middle_block.2", model.middle.res2)
    if isinstance(model, UNetModel):
        for i, stage in enumerate(model.up):
            _stage(m, f"up.{i}", f"output_blocks.{i}", stage)
    _linear(m, "out_norm", "out.0")
    if isinstance(model, UNetModel):
        _linear(m, "out_conv", "out.2")
    elif isinstance(model.head, AttentionPool2d):
        _add(m, "head.pos_embed", "out.2.positional_embedding", "transpose")
        _linear(m, "head.qkv", "out.2.qkv_proj", "conv1d")
        _linear(m, "head.proj", "out.2.c_proj", "conv1d")
    else:
        _linear(m, "head", "out.3", "conv2d")
    own = set(model.state_dict())
    if set(m) != own:  # a programming error, not a user error: the walk above must cover the model exactly
        raise RuntimeError(f"key map out of sync with the model: {sorted(own ^ set(m))[:10]}")
    return m


def _to_ref(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv1d":
        return t[:, :, None]
    if kind == "conv2d":
        return t[:, :, None, None]
    if kind == "transpose":
        return t.t()
    return t


def _from_ref(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "conv1d":
        return t[:, :, 0]
    if kind == "conv2d":
        return t[:, :, 0, 0]
    if kind == "transpose":
        return t.t()
    return t


def _ref_shape(shape: torch.Size, kind: str) -> tuple[int, ...]:
    return tuple(_to_ref(torch.empty(shape, device="meta"), kind).shape)


def describe_openai_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A few settings read off a reference-layout state dict (for error messages), e.g.
    "model_channels=192, in_channels=3, out_channels=6 (learn_sigma), num_classes=1000"."""
    parts = []
    first = state_dict.get("input_blocks.0.0.weight")
    if isinstance(first, torch.Tensor) and first.ndim == 4:
        parts += [f"model_channels={first.shape[0]}", f"in_channels={first.shape[1]}"]
    if any(k.startswith("output_blocks.") for k in state_dict):  # a U-Net
        out = state_dict.get("out.2.weight")
        if isinstance(out, torch.Tensor) and out.ndim == 4 and isinstance(first, torch.Tensor):
            parts.append(
                f"out_channels={out.shape[0]}" + (" (learn_sigma)" if out.shape[0] == 2 * first.shape[1] else "")
            )
        emb = state_dict.get("label_emb.weight")
        parts.append(f"num_classes={emb.shape[0]}" if isinstance(emb, torch.Tensor) else "no label_emb (unconditional)")
    else:  # a classifier: attention pool (out.2.c_proj) or linear head (out.3)
        head = state_dict.get("out.2.c_proj.weight", state_dict.get("out.3.weight"))
        if isinstance(head, torch.Tensor):
            parts.append(f"out_channels={head.shape[0]}")
    return ", ".join(parts)


def load_openai_state_dict(
    model: UNetModel | EncoderUNetModel,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    max_listed: int | None = None,
) -> tuple[list[str], list[str]]:
    """Load a reference-layout state dict into ``model`` (in place).

    Raises :class:`OpenAICheckpointError` listing every missing key, unexpected key and shape mismatch (in the
    reference's key names and shapes; at most ``max_listed`` of each kind when given) when the checkpoint does not
    fit. With ``strict=False`` missing/unexpected keys are tolerated (and returned as ``(missing, unexpected)``) but
    shape mismatches still fail.
    """
    key_map = openai_key_map(model)
    own = model.state_dict()
    missing, mismatched, converted = [], [], {}
    for ours, (ref, kind) in key_map.items():
        expected = _ref_shape(own[ours].shape, kind)
        if ref not in state_dict:
            missing.append(f"{ref} (expected {expected})")
            continue
        found = tuple(state_dict[ref].shape)
        if found != expected:
            mismatched.append(f"{ref}: expected {expected} vs found {found}")
            continue
        converted[ours] = _from_ref(state_dict[ref], kind)
    known = {ref for ref, _ in key_map.values()}
    unexpected = [f"{k} {tuple(getattr(v, 'shape', ()))}" for k, v in state_dict.items() if k not in known]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"the OpenAI checkpoint does not fit this {type(model).__name__} configuration:"]
        sections = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        for title, items in sections:
            if items:
                shown = items if max_listed is None else items[:max_listed]
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in shown)
                if len(shown) < len(items):
                    lines.append(f"    ... and {len(items) - len(shown)} more")
        described = describe_openai_state_dict(state_dict)
        if described:
            lines.append(f"The checkpoint looks like: {described}.")
        lines.append(
            "Check the architecture settings (model_channels, channel_mult, num_res_blocks, attention_resolutions, "
            "num_heads/num_head_channels, learn_sigma, num_classes, resblock_updown, use_scale_shift_norm, pool) "
            "against the checkpoint, e.g. diffusion_pl.models.released_config(name)."
        )
        raise OpenAICheckpointError("\n".join(lines))
    with torch.no_grad():
        for ours, tensor in converted.items():
            own[ours].copy_(tensor)
    return [m.split(" ")[0] for m in missing], [u.split(" ")[0] for u in unexpected]


def export_openai_state_dict(model: UNetModel | EncoderUNetModel) -> dict[str, torch.Tensor]:
    """``model``'s weights in the reference layout (keys, shapes and order of guided-diffusion's ``state_dict``).

    The reference's GroupNorm always has 32 groups: a model built with other ``norm_groups`` computes a different
    function there, so it is refused rather than exported silently wrong.
    """
    if model.norm_groups != 32:
        raise OpenAICheckpointError(
            f"this network uses norm_groups={model.norm_groups}; the reference layout (guided-diffusion) only has "
            "GroupNorm with 32 groups, so its weights would compute a different function there"
        )
    own = model.state_dict()
    out = {}
    for ours, (ref, kind) in openai_key_map(model).items():
        out[ref] = _to_ref(own[ours].detach(), kind).clone()
    return out


def load_openai_checkpoint(
    model: UNetModel | EncoderUNetModel, path: str | os.PathLike, strict: bool = True
) -> UNetModel | EncoderUNetModel:
    """Read a reference ``.pt`` file (``torch.load(weights_only=True)`` on CPU), load it into ``model``, return it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"OpenAI checkpoint not found: {path}")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise OpenAICheckpointError(
            f"{path}: expected a state dict (mapping of tensors), got {type(state_dict).__name__}"
        )
    try:
        load_openai_state_dict(model, state_dict, strict=strict)
    except OpenAICheckpointError as err:
        raise OpenAICheckpointError(f"{path}: {err}") from None
    return model
