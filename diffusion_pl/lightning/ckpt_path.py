"""The ``--ckpt_path`` of `diffusion-pl fit | validate | test`: the file checked before anything is built, and the
model it gives (see DiffusionCLI in diffusion_pl.lightning.cli).

    ckpt_path_argument(args)       the --ckpt_path of a command line, read before jsonargparse parses it
    checkpoint_defaults(ckpt)      the checkpoint's model (and data) as config defaults (validate / test)
    read_ckpt_path(path)           the checkpoint, or a one-line error (missing, unreadable, not a diffusion-pl module)
    model_for_checkpoint(...)      the config's model with the checkpoint's fixed settings (fit: refused if they differ)
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from diffusion_pl.errors import UserFileNotFoundError, UserInputError
from diffusion_pl.lightning.checkpoints import (
    MODULE_KINDS,
    checkpoint_kind,
    describe_kind,
    hparam_differences,
    read_checkpoint,
)
from diffusion_pl.lightning.classifier_module import NoisyClassifierModule
from diffusion_pl.lightning.diffusion_module import DiffusionModule
from diffusion_pl.utils.imports import import_object

MODULE_CLASSES = {"DiffusionModule": DiffusionModule, "NoisyClassifierModule": NoisyClassifierModule}
# ckpt_path values Lightning resolves itself (no file of that name).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def is_checkpoint_file_path(ckpt_path: Any) -> bool:
    """True for a --ckpt_path naming a file of the user's (not "last" / "best" / "hpc" / a registry name)."""
    return bool(ckpt_path) and ckpt_path not in SPECIAL_CKPT_PATHS and not str(ckpt_path).startswith("registry")


def ckpt_path_argument(args: Any) -> str | None:
    """The ``--ckpt_path`` on a command line (a list of arguments), when it names a file of the user's."""
    if not isinstance(args, list):
        return None
    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    reader.add_argument("--ckpt_path")
    path = reader.parse_known_args(args[1:])[0].ckpt_path
    return path if is_checkpoint_file_path(path) else None


def checkpoint_defaults(checkpoint: dict) -> dict:
    """The model (and data, when saved) of a checkpoint as config defaults: ``{"model": {class_path, init_args}}``."""
    defaults = {}
    for key, saved in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hparams = dict(checkpoint.get(saved) or {})
        kind = f"diffusion_pl.lightning.{checkpoint_kind(checkpoint)}" if key == "model" else None
        class_path = hparams.get("_class_path") or kind
        if class_path:
            init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
            defaults[key] = {"class_path": class_path, "init_args": init_args}
    return defaults


def read_ckpt_path(ckpt_path: str) -> dict:
    """The checkpoint at ``--ckpt_path``, or a UserError: missing, unreadable, not a diffusion-pl module checkpoint."""
    if not os.path.exists(ckpt_path):
        raise UserFileNotFoundError(
            f"--ckpt_path {ckpt_path}: no such checkpoint file (a run's checkpoints are in its checkpoints/ "
            "folder, e.g. lightning_logs/<name>/version_0/checkpoints/last.ckpt with ModelCheckpoint save_last)"
        )
    checkpoint = read_checkpoint(ckpt_path, "--ckpt_path")
    kind = checkpoint_kind(checkpoint)
    if kind not in MODULE_KINDS:
        raise UserInputError(
            f"--ckpt_path {ckpt_path} is {describe_kind(kind, checkpoint)}; fit / validate / test take a "
            "diffusion-pl checkpoint (released OpenAI checkpoints are used with diffusion-pl sample/evaluate "
            "--openai_ckpt --arch; to fine-tune from one, set model.init_args.init_from instead)"
        )
    return checkpoint


def model_for_checkpoint(ckpt_path: str, checkpoint: dict, model_config: Any, subcommand: str) -> Any:
    """The config's model with the checkpoint's fixed settings (see DiffusionCLI); a UserInputError when the config's
    model is another class, or (fit) its fixed settings differ from the checkpoint's."""
    kind = checkpoint_kind(checkpoint)
    class_path = str(getattr(model_config, "class_path", "") or "")
    model_class = import_object(class_path)
    if not (isinstance(model_class, type) and issubclass(model_class, MODULE_CLASSES[kind])):
        raise UserInputError(
            f"--ckpt_path {ckpt_path} holds a {kind}, but the config's model is {class_path or model_config}: use "
            f"a checkpoint of that model, or the config the checkpoint was trained with (model.class_path: "
            f"{kind}; the run's config.yaml is saved in its log directory)"
        )
    model_config = model_config.clone()
    saved = checkpoint.get("hyper_parameters") or {}
    fixed, _ = hparam_differences(saved, model_config.init_args.as_dict(), model_class.RESUME_CHANGEABLE_HPARAMS)
    listed = "\n  ".join(f"model.init_args.{k}: checkpoint {old!r} vs config {new!r}" for k, old, new in fixed)
    if fixed and subcommand == "fit":
        raise UserInputError(
            f"--ckpt_path {ckpt_path} was trained with other model settings than this config:\n  {listed}\n"
            "These fix the network and its diffusion process. Use the config the checkpoint was trained with "
            "(the run's config.yaml), or start a new run without --ckpt_path. (Training settings such as lr, "
            "weight_decay, warmup_steps or dropout may differ: the config's values are used.)"
        )
    if fixed:
        rank_zero_warn(f"{subcommand} uses the checkpoint's model settings, not the config's:\n  {listed}")
    for key, _, _ in fixed:
        model_config.init_args[key] = saved[key]
    if subcommand != "fit" and model_config.init_args.get("init_from") is not None:
        model_config.init_args["init_from"] = None  # the checkpoint holds the weights: init_from is not read
    return model_config
