"""Starting a training run from weights (``init_from``): a diffusion-pl checkpoint or a released OpenAI ``.pt``.

Weights only: the optimizer, the lr schedule and the step count start fresh. Everything must fit exactly (keys,
shapes and the settings that change what a network with the same shapes computes: saved in a diffusion-pl
checkpoint; for an OpenAI file, those of the released configuration (RELEASED_CONFIGS, and RELEASED_PROCESS for the
diffusion process) whose shapes the file has; an OpenAI file of no released shapes loads with a warning that its
settings cannot be checked), except the class-dependent tensors, which are adapted and the adaptation logged:

    model                         checkpoint                   class tensor(s)
    K classes + null class        K classes, no null class     K rows copied, the null row initialised at random
    K classes, no null class      K classes + null class       K rows copied, the null row dropped
    K classes                     another class count          initialised at random (warned)
    unconditional                 class-conditional            the class embedding is not used (warned)
    class-conditional             unconditional                initialised at random (warned)
    classifier with K outputs     another output count         the output layer initialised at random (warned)

A diffusion-pl checkpoint whose DataModule saved its class names (an image-folder run) is matched by name once the
data's names are known (the module's setup, :func:`follow_class_names`): a class of the same name keeps its row,
wherever it is in either list, a new class starts at random (warned); any class count.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning.checkpoints import (
    checkpoint_kind,
    describe_kind,
    read_checkpoint,
    saved_class_names,
    state_dict_problems,
)
from diffusion_pl.lightning.common import check_data_matches
from diffusion_pl.models import (
    RELEASED_CONFIGS,
    RELEASED_PROCESS,
    EncoderUNetModel,
    UNetModel,
    export_openai_state_dict,
    load_openai_state_dict,
)
from diffusion_pl.models.openai_checkpoint import OpenAICheckpointError, openai_key_map

OPTION = "init_from"
#: per module kind: (attribute of the network, prefix of its keys in a diffusion-pl checkpoint, OpenAI kind)
NETWORKS = {"DiffusionModule": ("unet", "unet.", "openai-unet"),
            "NoisyClassifierModule": ("classifier", "classifier.", "openai-classifier")}  # fmt: skip
RELEASED_KIND = {"DiffusionModule": "U-Net", "NoisyClassifierModule": "classifier"}
#: settings that change what a network of the same shapes computes (checked for diffusion-pl checkpoints)
FUNCTION_HPARAMS = ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order", "norm_groups",
                    "mean_type", "var_type", "rescale_timesteps", "pool")  # fmt: skip


def class_keys(network: torch.nn.Module) -> list[str]:
    """Our keys of the tensors whose first dimension is the class count: the U-Net's class embedding, or the
    classifier's output layer."""
    own = network.state_dict()
    if isinstance(network, UNetModel):
        return ["class_embed.weight"] if "class_embed.weight" in own else []
    head = "head.proj" if "head.proj.weight" in own else "head"
    return [k for k in (f"{head}.weight", f"{head}.bias") if k in own]


def adapt_class_tensors(source: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], keys: list[str],
                        model_null: bool, source_null: bool, name: str) -> None:  # fmt: skip
    """Make the class-dependent tensors ``keys`` of ``source`` fit the model's (``own``, in the same layout), in
    place, as the module docstring's table says; logs what it did."""
    if not keys:  # an unconditional U-Net: a class embedding in the checkpoint is not used
        for k in [k for k in ("class_embed.weight", "label_emb.weight") if k in source]:
            rank_zero_warn(f"{name}: the model is unconditional; the checkpoint's class embedding {k} "
                           f"({source.pop(k).shape[0]} rows) is not used")  # fmt: skip
        return
    for key in keys:
        mine = own[key]
        if key not in source:
            rank_zero_warn(f"{name}: the checkpoint is unconditional; {key} {tuple(mine.shape)} initialised at random")
            source[key] = mine.clone()
            continue
        found = source[key]
        if found.shape[1:] != mine.shape[1:]:  # not a class-count difference: the shape check lists it
            continue
        rows, want = found.shape[0], mine.shape[0]
        classes, wanted = rows - int(source_null), want - int(model_null)
        if classes == wanted and rows < want:
            source[key] = torch.cat([found.to(mine.dtype), mine[rows:]])
            rank_zero_info(f"{name}: added the null class (label {rows}) to the checkpoint's {rows} classes; its "
                           "embedding is initialised at random (fine-tune with p_uncond > 0 for classifier-free "
                           "guidance)")  # fmt: skip
        elif classes == wanted and rows > want:
            source[key] = found[:want]
            rank_zero_info(f"{name}: the checkpoint's null class (label {want}) is not used")
        elif rows != want or classes != wanted:
            source[key] = mine.clone()
            rank_zero_warn(f"{name}: the checkpoint has {classes} classes in {key}, the model {wanted}: {key} is "
                           "initialised at random")  # fmt: skip


#: the config file that has a released configuration's settings, where there is one
PRESET_CONFIG_FILES = {"adm_imagenet64": "configs/finetune_imagenet64.yaml",
                       "adm_imagenet64_classifier": "configs/adm_imagenet64_classifier.yaml",
                       "iddpm_cifar10": "configs/iddpm_cifar10.yaml"}  # fmt: skip


@functools.cache
def _released_shapes(name: str) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """``({reference key: shape}, reference keys of the class-dependent tensors)`` of a released configuration,
    built on the meta device (no memory)."""
    cls, kwargs, _ = RELEASED_CONFIGS[name]
    with torch.device("meta"):
        network = cls(**kwargs)
    key_map = openai_key_map(network)
    shapes = {k: tuple(v.shape) for k, v in export_openai_state_dict(network).items()}
    return shapes, frozenset(key_map[k][0] for k in class_keys(network))


def released_matches(state_dict: Mapping[str, torch.Tensor], network_class: type) -> list[str]:
    """The released configurations (RELEASED_CONFIGS) of ``network_class`` whose reference-layout keys and shapes
    are those of ``state_dict``, the class-dependent tensors aside (a fine-tuned file may have another class count
    or none)."""
    first = state_dict.get("input_blocks.0.0.weight")
    found = []
    for name, (cls, kwargs, _) in RELEASED_CONFIGS.items():
        if cls is not network_class or first is None or first.shape[0] != kwargs["model_channels"]:
            continue  # cheap: a preset is only built (on meta) when its width fits
        shapes, class_tensors = _released_shapes(name)
        skip = class_tensors | {"label_emb.weight"}
        theirs = {k: tuple(v.shape) for k, v in state_dict.items() if k not in skip}
        if theirs == {k: v for k, v in shapes.items() if k not in skip}:
            found.append(name)
    return found


def _effective(settings: Mapping, upsample: bool) -> dict:
    """The network function settings that are in effect: ``num_heads`` only counts without ``num_head_channels``,
    ``num_heads_upsample`` -1 means ``num_heads``."""
    out = {k: v for k, v in settings.items() if k not in ("num_heads", "num_heads_upsample")}
    if settings["num_head_channels"] == -1:
        out["num_heads"] = settings["num_heads"]
        if upsample:
            up = settings.get("num_heads_upsample", -1)
            out["num_heads_upsample"] = settings["num_heads"] if up == -1 else up
    return out


def released_setting_differences(name: str, hparams: Mapping) -> list[str]:
    """The settings in which a module's ``hparams`` differ from released configuration ``name``, in a way that
    changes what the network (or, for a U-Net, the diffusion process it is trained in) computes:
    ``"setting: released <value> vs model <value>"``."""
    cls, kwargs, _ = RELEASED_CONFIGS[name]
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty}  # fmt: skip
    released = {k: kwargs.get(k, defaults[k]) for k in FUNCTION_HPARAMS if k in defaults}  # the network's own
    model = {k: hparams.get(k, released[k]) for k in released}
    upsample = cls is UNetModel
    released_in_effect, model_in_effect = _effective(released, upsample), _effective(model, upsample)
    both = released_in_effect.keys() & model_in_effect.keys()  # num_heads counts only where both go by it
    differing = [f"{k}: released {released_in_effect[k]!r} vs model {model_in_effect[k]!r}" for k in released
                 if k in both and released_in_effect[k] != model_in_effect[k]]  # fmt: skip
    if name in RELEASED_PROCESS:  # the process the released U-Net was trained in (the file does not record it)
        steps, schedule, rescale = RELEASED_PROCESS[name]
        process = dict(diffusion_steps=steps, noise_schedule=schedule, rescale_timesteps=rescale,
                       mean_type="epsilon", var_type="learned_range")  # fmt: skip
        differing += [f"{k}: released {v!r} vs model {hparams[k]!r}" for k, v in process.items()
                      if k in hparams and hparams[k] != v]  # fmt: skip
    return differing


def _check_released_settings(source: Mapping[str, torch.Tensor], network: torch.nn.Module, hparams: Mapping,
                             path: str, name: str) -> None:  # fmt: skip
    """Refuse an OpenAI file of a released configuration's shapes into a network (or process) whose settings
    compute something else; warn that the settings of a file of no released shapes cannot be checked."""
    matches = released_matches(source, type(network))
    if not matches:
        rank_zero_warn(
            f"{name}: {path} has the shapes of no released configuration (diffusion_pl.models.RELEASED_CONFIGS): "
            "the settings that change what a network of the same shapes computes (num_heads, num_head_channels, "
            "num_heads_upsample, use_new_attention_order, and the diffusion process) cannot be checked; make sure "
            "they are those the file was trained with"
        )
        return
    differences = {m: released_setting_differences(m, hparams) for m in matches}
    if any(not d for d in differences.values()):
        return
    preset = matches[0]
    config = f" ({PRESET_CONFIG_FILES[preset]} has them)" if preset in PRESET_CONFIG_FILES else ""
    also = f" (or {', '.join(matches[1:])}, the same apart from classes)" if len(matches) > 1 else ""
    process = " and, for the process, diffusion_pl.models.RELEASED_PROCESS" if preset in RELEASED_PROCESS else ""
    raise UserInputError(
        f"{name}: {OPTION} {path} has the shapes of the released {preset}{also}, which was trained with other "
        f"settings: {'; '.join(differences[preset])}. Build the model with the released values "
        f"(diffusion_pl.models.released_config({preset!r}){process}){config}"
    )


def _check_settings(checkpoint: Mapping, hparams: Mapping, path: str, name: str) -> None:
    saved = checkpoint.get("hyper_parameters") or {}
    differing = [f"{k}: checkpoint {saved[k]!r} vs model {hparams[k]!r}" for k in FUNCTION_HPARAMS
                 if k in saved and k in hparams and saved[k] != hparams[k]]  # fmt: skip
    if differing:
        raise UserInputError(
            f"{name}: {OPTION} {path} was trained with other network settings: {'; '.join(differing)}. "
            "Use the checkpoint's values (its run's config.yaml)"
        )


@dataclass
class ClassRows:
    """What :func:`follow_class_names` needs from an ``init_from`` checkpoint: its class names (saved by its
    DataModule), its class rows and the network's freshly initialised ones, per class tensor key."""

    names: list[str]
    checkpoint: dict[str, torch.Tensor]
    fresh: dict[str, torch.Tensor]


def follow_class_names(network: torch.nn.Module, rows: ClassRows | None, names: list[str] | None,
                       name: str = f"model.init_args.{OPTION}") -> None:  # fmt: skip
    """Give class c of the data (``names[c]``) the checkpoint's row of the class of the same name, in place; a class
    the checkpoint does not know keeps a fresh random row (the null row, after the classes, is left as loaded).
    Nothing to do when either side has no names or they are equal."""
    if rows is None or not names or names == rows.names:
        return
    index = {n: i for i, n in enumerate(rows.names)}
    params = dict(network.named_parameters())
    with torch.no_grad():
        for key, saved in rows.checkpoint.items():
            target = params[key]
            for c, class_name in enumerate(names[: target.shape[0]]):
                source = saved[index[class_name]] if class_name in index else rows.fresh[key][c]
                target[c].copy_(source.to(target.dtype))
    unknown = [n for n in names if n not in index]
    new = f"; {len(unknown)} new, initialised at random: {', '.join(unknown[:6])}{' ...' * (len(unknown) > 6)}"
    rank_zero_warn(
        f"{name}: the checkpoint's classes ({len(rows.names)}) are not the data's ({len(names)}) in the same order: "
        f"class embeddings follow the class names ({len(names) - len(unknown)} matched by name{new * bool(unknown)})"
    )


def setup_for_data(module, network: torch.nn.Module, expected: dict[str, tuple[int, str]], name: str,
                   stage: str) -> None:  # fmt: skip
    """The data side of a module's ``setup``: the DataModule must fit the network (:func:`check_data_matches` with
    ``expected``); at fit, the class rows loaded from ``init_from`` (``module._init_class_rows``) follow its class
    names (:func:`follow_class_names`)."""
    datamodule = getattr(module.trainer, "datamodule", None)
    check_data_matches(datamodule, expected, name)
    if stage == "fit":
        follow_class_names(network, module._init_class_rows, getattr(datamodule, "class_names", None))
        module._init_class_rows = None


def init_network_from(network: UNetModel | EncoderUNetModel, path: str, module_kind: str,
                      hparams: Mapping) -> ClassRows | None:  # fmt: skip
    """Load the weights of ``path`` into ``network`` (in place) as the module docstring says, or raise a
    UserInputError listing what does not fit. Returns the :class:`ClassRows` of a diffusion-pl checkpoint whose
    DataModule saved class names (for :func:`follow_class_names` once the data's names are known), else None."""
    name = f"model.init_args.{OPTION}"
    checkpoint = read_checkpoint(path, name)
    kind = checkpoint_kind(checkpoint)
    _, prefix, openai_kind = NETWORKS[module_kind]
    own = network.state_dict()
    model_null = bool(hparams.get("null_class", False))
    if kind == module_kind:
        _check_settings(checkpoint, hparams, path, name)
        source = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        source_null = bool((checkpoint.get("hyper_parameters") or {}).get("null_class", False))
        keys, names = class_keys(network), saved_class_names(checkpoint)
        rows = None
        if keys and names and all(k in source and source[k].shape[0] >= len(names) for k in keys):
            rows = ClassRows(names, {k: source[k][: len(names)].clone() for k in keys},
                             {k: own[k].clone() for k in keys})  # fmt: skip
        adapt_class_tensors(source, own, keys, model_null, source_null, name)
        problems = state_dict_problems(source, own)
        if problems:
            raise UserInputError(
                f"{name}: {path} does not fit this {module_kind} (keys and shapes):\n  "
                + "\n  ".join(problems[:12])
                + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
                + "\nBuild the model with the checkpoint's settings (its run's config.yaml)"
            )
        network.load_state_dict(source)
        _initialised(module_kind, path)
        return rows
    if kind == openai_kind:
        source = dict(checkpoint)
        unchanged = dict(source)  # before the class tensors are adapted
        try:
            reference_own = export_openai_state_dict(network)  # refuses norm_groups != 32 (the reference's)
            keys = [openai_key_map(network)[k][0] for k in class_keys(network)]
            adapt_class_tensors(source, reference_own, keys, model_null, False, name)
            load_openai_state_dict(network, source, strict=True, max_listed=12)
        except OpenAICheckpointError as err:
            raise OpenAICheckpointError(f"{name}: {path}: {err}") from None
        _check_released_settings(unchanged, network, hparams, path, name)
        _initialised(module_kind, path)
        return None
    raise UserInputError(
        f"{name}: {path} is {describe_kind(kind, checkpoint)}; a {module_kind} starts from a {module_kind} "
        f"checkpoint of diffusion-pl or a released OpenAI {RELEASED_KIND[module_kind]} .pt"
    )


def _initialised(module_kind: str, path: str) -> None:
    rank_zero_info(f"{module_kind}: network initialised from {path} (weights only; optimizer, schedule and step "
                   "count start fresh)")  # fmt: skip
