"""Reading checkpoint files safely and telling what they hold, and checking that a checkpoint fits a module.

    read_checkpoint(path, option)       torch.load(weights_only), a clear error for missing / corrupt / truncated files;
                                        hyperparameters saved under an old name are renamed (RENAMED_HPARAMS)
    checkpoint_kind(obj)                "DiffusionModule" | "NoisyClassifierModule" | "lightning" | "openai-unet" |
                                        "openai-classifier" | "unknown"
    read_module_checkpoint(path, name, option)  read_checkpoint + check that the file holds that kind of module
    load_module(cls, path, option)      Module.load_from_checkpoint after those checks
    load_kwargs(path, kwargs)           the kwargs a module's load_from_checkpoint passes on to Lightning's
    check_checkpoint_fits(module, ckpt) for on_load_checkpoint: same module class, same fixed settings, same shapes
    apply_optimizer_settings(module, ckpt)  a resumed run uses the lr / betas / weight_decay of its config

A module lists the hyperparameters a resumed run may change in ``RESUME_CHANGEABLE_HPARAMS`` (training settings such
as lr or dropout); every other hyperparameter fixes the network or its diffusion process and must equal the
checkpoint's.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from diffusion_pl.errors import UserFileNotFoundError, UserInputError

MODULE_KINDS = ("DiffusionModule", "NoisyClassifierModule")
_PREFIX_KIND = {"unet.": "DiffusionModule", "classifier.": "NoisyClassifierModule"}
KIND_DESCRIPTIONS = {
    "DiffusionModule": "a diffusion-pl DiffusionModule checkpoint (a diffusion model)",
    "NoisyClassifierModule": "a diffusion-pl NoisyClassifierModule checkpoint (a noisy classifier)",
    "lightning": "a PyTorch Lightning checkpoint of another LightningModule",
    "openai-unet": "a bare state dict in the OpenAI guided-/improved-diffusion U-Net layout",
    "openai-classifier": "a bare state dict in the OpenAI guided-diffusion classifier layout",
    "unknown": "not a checkpoint diffusion-pl knows",
}
_MAX_LISTED = 12
# Hyperparameters renamed since checkpoints were written (old name -> current name): older checkpoints keep loading.
RENAMED_HPARAMS = {"steps": "diffusion_steps"}


def rename_old_names(hparams: Any) -> None:
    """In place: a module's settings (a checkpoint's ``hyper_parameters``, a saved config's ``model.init_args``)
    saved under an old name (RENAMED_HPARAMS) get the current name. Anything that is not a dict is left alone."""
    if isinstance(hparams, dict):
        for old, new in RENAMED_HPARAMS.items():
            if old in hparams and new not in hparams:
                hparams[new] = hparams.pop(old)


def rename_old_hparams(checkpoint: Any) -> Any:
    """``checkpoint`` with its ``hyper_parameters`` saved under an old name (RENAMED_HPARAMS) renamed, in place."""
    rename_old_names(checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None)
    return checkpoint


def read_checkpoint(path: str | os.PathLike, option: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped when the format allows), or a UserError that
    names ``option`` and the file: missing, a directory, or unreadable (corrupt / truncated / not a torch file)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserInputError(f"{option} {path} is a directory; give the checkpoint file itself (e.g. {path}/last.ckpt)")
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{option} {path}: no such checkpoint file")
    try:
        try:
            return rename_old_hparams(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # legacy (non-zip) format or not torch
            return rename_old_hparams(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
        if blocked:
            raise UserInputError(
                f"{option} {path} was refused by safe loading (torch.load with weights_only=True): it refers to the "
                f"Python object {blocked.group(1)}, and loading it would import that object and could run any code "
                "stored in the file (a code-execution risk), so diffusion-pl only reads checkpoints made of tensors "
                "and plain values. Use a checkpoint written by diffusion-pl; if you made this file yourself and trust "
                "it, load it in Python with weights_only=False and save its tensors again"
            ) from e
        raise _unreadable(option, path, e) from e
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile, OSError) as e:
        raise _unreadable(option, path, e) from e


def saved_class_names(checkpoint: Mapping) -> list[str] | None:
    """The class names a DataModule saved in a Lightning checkpoint (label i = names[i]), if any."""
    for key, state in checkpoint.items():
        if isinstance(key, str) and key.endswith("DataModule") and isinstance(state, Mapping):
            names = state.get("class_names")
            if names:
                return list(names)
    return None


def _unreadable(option: str, path: str, error: BaseException) -> UserInputError:
    reason = str(error).strip().splitlines()[0].split(". ")[0][:160] if str(error).strip() else ""
    size = os.path.getsize(path)
    return UserInputError(
        f"{option} {path} ({size:,} bytes) cannot be read as a torch checkpoint ({type(error).__name__}"
        f"{': ' + reason if reason else ''}): the file is corrupt or truncated (an interrupted copy or download?). "
        "Copy it again, or use another checkpoint of the run (e.g. an earlier epoch)"
    )


def checkpoint_kind(obj: Any) -> str:
    """What a loaded checkpoint holds (see the module docstring for the names)."""
    if not isinstance(obj, Mapping):
        return "unknown"
    state = obj.get("state_dict")
    if isinstance(state, Mapping):
        class_path = str((obj.get("hyper_parameters") or {}).get("_class_path", ""))
        if class_path.rsplit(".", 1)[-1] in MODULE_KINDS:
            return class_path.rsplit(".", 1)[-1]
        for prefix, kind in _PREFIX_KIND.items():
            if any(str(k).startswith(prefix) for k in state):
                return kind
        return "lightning"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if "input_blocks.0.0.weight" in obj:
            return "openai-unet" if any(str(k).startswith("output_blocks.") for k in obj) else "openai-classifier"
    return "unknown"


def describe_kind(kind: str, obj: Any = None) -> str:
    text = KIND_DESCRIPTIONS.get(kind, kind)
    if kind == "unknown" and isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:6]]
        text += f" (a mapping with keys {keys}{' ...' if len(obj) > 6 else ''})"
    elif kind == "unknown":
        text += f" (a {type(obj).__name__})"
    return text


def read_module_checkpoint(path: str, cls_name: str, option: str, suggestions: Mapping[str, str] | None = None):
    """The loaded checkpoint (tensors memory-mapped where possible), after checking that it is readable and holds a
    ``cls_name`` module. ``suggestions`` maps another kind of checkpoint to the option that takes it (e.g.
    "NoisyClassifierModule" -> "--classifier_ckpt"), for the message when the user swapped two files."""
    checkpoint = read_checkpoint(path, option)
    kind = checkpoint_kind(checkpoint)
    if kind != cls_name:
        fix = (suggestions or {}).get(kind)
        raise UserInputError(
            f"{option} {path} is {describe_kind(kind, checkpoint)}, but {option} takes "
            f"{KIND_DESCRIPTIONS.get(cls_name, cls_name)}" + (f": pass this file as {fix}" if fix else "")
        )
    return checkpoint


def load_module(cls: type, path: str, option: str, suggestions: Mapping[str, str] | None = None,
                map_location: Any = "cpu"):  # fmt: skip
    """``cls.load_from_checkpoint(path)`` after :func:`read_module_checkpoint`'s checks."""
    read_module_checkpoint(path, cls.__name__, option, suggestions)
    return cls.load_from_checkpoint(path, map_location=map_location)


def load_kwargs(checkpoint_path: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for Lightning's load_from_checkpoint: ``init_from`` None (the checkpoint holds the weights) and
    the values of hyperparameters the file saved under an old name (Lightning would drop those keys and use the
    defaults)."""
    kwargs.setdefault("init_from", None)
    if isinstance(checkpoint_path, (str, os.PathLike)) and os.path.isfile(checkpoint_path):
        saved = read_checkpoint(checkpoint_path).get("hyper_parameters") or {}
        for new in RENAMED_HPARAMS.values():
            if new in saved:
                kwargs.setdefault(new, saved[new])
    return kwargs


# ------------------------------------------------------------------------------------------------ fitting a module
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def hparam_differences(checkpoint_hp: Mapping, current_hp: Mapping, changeable: frozenset[str] | set[str]):
    """(fixed, changed): keys of both whose values differ, split into the ones that must match and the ones a resumed
    run may change; each a list of (key, checkpoint value, current value). Private keys (``_class_path``) are
    skipped."""
    fixed, changed = [], []
    for key, value in current_hp.items():
        if key.startswith("_") or key not in checkpoint_hp:
            continue
        old, new = _plain(checkpoint_hp[key]), _plain(value)
        if old != new:
            (changed if key in changeable else fixed).append((key, old, new))
    return fixed, changed


def state_dict_problems(checkpoint_state: Mapping[str, Any], own_state: Mapping[str, torch.Tensor]) -> list[str]:
    """Shape mismatches, missing and unexpected keys between a checkpoint's state_dict and a module's."""
    problems = []
    for key, tensor in own_state.items():
        if key not in checkpoint_state:
            problems.append(f"missing {key} {tuple(tensor.shape)}")
        elif tuple(checkpoint_state[key].shape) != tuple(tensor.shape):
            problems.append(f"{key}: checkpoint {tuple(checkpoint_state[key].shape)} vs model {tuple(tensor.shape)}")
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in checkpoint_state.items() if k not in own_state]
    return problems


def _listed(items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return "\n  " + "\n  ".join(shown) + more


def check_checkpoint_fits(module, checkpoint: Mapping[str, Any], changeable: frozenset[str]) -> None:
    """Raise UserInputError unless ``checkpoint`` holds this module class with the same fixed hyperparameters and
    tensor shapes (called from on_load_checkpoint: before Lightning loads the weights on resume / validate / test)."""
    name = type(module).__name__
    rename_old_hparams(checkpoint)
    kind = checkpoint_kind(checkpoint)
    if kind in MODULE_KINDS and kind != name:
        raise UserInputError(
            f"the checkpoint holds a {kind}, but the model to load it into is a {name}: use a {name} checkpoint, "
            f"or the config the checkpoint was trained with (model.class_path: {kind})"
        )
    fixed, changed = hparam_differences(checkpoint.get("hyper_parameters") or {}, dict(module.hparams), changeable)
    problems = [f"{k}: checkpoint {old!r} vs model {new!r}" for k, old, new in fixed]
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping) and not fixed:
        problems += state_dict_problems(state, module.state_dict())
    if problems:
        raise UserInputError(
            f"the checkpoint does not fit this {name} (these settings fix the network and its diffusion process):"
            f"{_listed(problems)}\nBuild the model with the checkpoint's settings (e.g. the config.yaml saved with "
            f"its run), or train from scratch instead of loading this checkpoint."
        )
    if changed and "optimizer_states" in checkpoint:
        rank_zero_info(
            f"{name}: resuming with settings changed from the checkpoint: "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed)
        )


def apply_optimizer_settings(module, checkpoint: dict[str, Any]) -> None:
    """Make a resumed run use the module's lr, betas and weight_decay instead of the ones in the restored AdamW and
    LambdaLR states (Lightning restores those after on_load_checkpoint). The lr keeps its schedule position: the
    restored group lr is scaled by new / old base lr."""
    hp = checkpoint.get("hyper_parameters") or {}
    if "optimizer_states" not in checkpoint or "lr" not in hp:
        return
    old_lr, new_lr = float(hp["lr"]), float(module.hparams.lr)
    ratio = new_lr / old_lr if old_lr > 0 else None
    for state in checkpoint.get("optimizer_states") or []:
        for group in state.get("param_groups", []):
            if ratio is not None and "lr" in group:
                group["lr"] = group["lr"] * ratio
            if "initial_lr" in group:
                group["initial_lr"] = new_lr
            if "betas" in group:
                group["betas"] = tuple(float(b) for b in module.hparams.betas)
            if "weight_decay" in group:
                group["weight_decay"] = float(module.hparams.weight_decay)
    for state in checkpoint.get("lr_schedulers") or []:
        if "base_lrs" in state:
            state["base_lrs"] = [new_lr for _ in state["base_lrs"]]
        if ratio is not None and "_last_lr" in state:
            state["_last_lr"] = [lr * ratio for lr in state["_last_lr"]]
