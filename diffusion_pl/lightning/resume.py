"""Resuming a fit run: which settings may change, continuing in the run's own folder, and ``--ckpt_path last``.

    RESUME_CHANGEABLE_TRAINER_KEYS   trainer settings a resumed run may change (how long, how often to validate/log);
                                     with the model's RESUME_CHANGEABLE_HPARAMS they form resume_changeable_keys
    continue_in_checkpoint_run      resuming <run>/checkpoints/X.ckpt with a CSV / TensorBoard logger whose version
                                     is not fixed logs into <run> again (its metrics.csv continues) instead of a new
                                     version_N folder
    resolve_last_checkpoint          what ``--ckpt_path last`` resumes (checked like any --ckpt_path); a one-line
                                     refusal when the logger's version is not fixed and its new folder has no
                                     checkpoint (Lightning would start from step 0 with a warning: a run of that
                                     config can never resume that way); a fixed folder without one starts at step 0
"""

from __future__ import annotations

import glob
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from diffusion_pl.errors import UserFileNotFoundError
from diffusion_pl.lightning.checkpoints import read_checkpoint

RESUME_CHANGEABLE_TRAINER_KEYS = (
    "max_steps", "max_epochs", "max_time", "min_steps", "min_epochs", "val_check_interval",
    "check_val_every_n_epoch", "limit_val_batches", "num_sanity_val_steps", "log_every_n_steps",
    "enable_progress_bar", "enable_model_summary", "logger.init_args.version",
)  # fmt: skip
_VERSIONED_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger",
                      "diffusion_pl.lightning.loggers.AppendingCSVLogger")  # fmt: skip


def resume_changeable_keys(model_class: Any) -> set[str]:
    """Flattened config keys (``trainer.max_steps``, ``model.init_args.lr``, ...) a resumed run may change."""
    keys = {f"trainer.{k}" for k in RESUME_CHANGEABLE_TRAINER_KEYS}
    keys |= {f"model.init_args.{k}" for k in getattr(model_class, "RESUME_CHANGEABLE_HPARAMS", ())}
    return keys


def _single_logger(trainer_config: Any) -> Any:
    logger = trainer_config.get("logger") if trainer_config is not None else None
    if isinstance(logger, list):
        logger = logger[0] if len(logger) == 1 else None
    return logger if getattr(logger, "class_path", None) in _VERSIONED_LOGGERS else None


def continue_in_checkpoint_run(trainer_config: Any, ckpt_path: str | None) -> str | None:
    """If ``ckpt_path`` is ``<save_dir>/<name>/<version>/checkpoints/X.ckpt`` of this config's CSV / TensorBoard
    logger and the logger's version is not fixed, fix it to ``<version>``; returns the run folder, or None."""
    logger = _single_logger(trainer_config)
    if logger is None or not ckpt_path or not os.path.isfile(ckpt_path):
        return None
    init_args = logger.get("init_args")
    if init_args is None or init_args.get("version") is not None:
        return None
    checkpoints_dir = os.path.dirname(os.path.abspath(ckpt_path))
    run_dir = os.path.dirname(checkpoints_dir)
    save_dir = init_args.get("save_dir") or "."
    name = init_args.get("name") if init_args.get("name") is not None else "lightning_logs"
    expected_parent = os.path.abspath(os.path.join(save_dir, name) if name else save_dir)
    if os.path.basename(checkpoints_dir) != "checkpoints" or os.path.dirname(run_dir) != expected_parent:
        return None
    init_args["version"] = os.path.basename(run_dir)
    return run_dir


def resolve_last_checkpoint(trainer: Any, trainer_config: Any) -> str | None:
    """What ``--ckpt_path last`` resumes: the newest last*.ckpt of the run's checkpoint folders (read like any
    --ckpt_path); None when there is none yet and the logger's version is fixed (or there is no logger): a first run,
    said in a line; refused when the logger starts a new version per run (it could never resume that way). Other
    loggers name their folder only once they start: "last" is left to Lightning."""
    logger = trainer.logger
    if logger is not None and not isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return "last"
    run_dir = logger.log_dir if logger is not None else trainer.default_root_dir
    dirs = [c.dirpath or os.path.join(run_dir, "checkpoints") for c in trainer.checkpoint_callbacks]
    fixed = logger is None or logger_version_fixed(trainer_config)
    path = find_last_checkpoint(dirs, logger.root_dir if logger is not None else None, fixed)
    if path is None:
        rank_zero_info(f"--ckpt_path last: no checkpoint in {', '.join(dirs) or run_dir} yet; starting at step 0")
        return None
    read_checkpoint(path, "--ckpt_path last")
    rank_zero_info(f"--ckpt_path last: resuming from {path}")
    return path


def logger_version_fixed(trainer_config: Any) -> bool:
    """Whether the config's CSV / TensorBoard logger names its version (the same folder on every run)."""
    logger = _single_logger(trainer_config)
    init_args = logger.get("init_args") if logger is not None else None
    return init_args is not None and init_args.get("version") is not None


def find_last_checkpoint(checkpoint_dirs: list[str], logger_root: str | None, version_fixed: bool) -> str | None:
    """The newest ``last*.ckpt`` in ``checkpoint_dirs`` (Lightning's choice for ``ckpt_path="last"``). None when
    there is none but the folders are the run's own (``version_fixed``: a first run, e.g. a resubmitted job script);
    else a UserFileNotFoundError naming the folders and the newest last.ckpt of other versions under ``logger_root``."""
    found = [p for d in checkpoint_dirs for p in glob.glob(os.path.join(glob.escape(d), "last*.ckpt"))]
    if found:
        return max(found, key=os.path.getmtime)
    if version_fixed:
        return None
    elsewhere = sorted(glob.glob(os.path.join(glob.escape(logger_root), "*", "checkpoints", "last*.ckpt")),
                       key=os.path.getmtime) if logger_root else []  # fmt: skip
    fix = f"; resume the run you mean by its file, e.g. --ckpt_path {elsewhere[-1]} (the newest)" if elsewhere else ""
    raise UserFileNotFoundError(
        f"--ckpt_path last: no checkpoint in {', '.join(checkpoint_dirs)}, so training would start again from step 0 "
        f"(the logger starts a new version folder for every run, so `last` cannot find an earlier run there){fix}"
    )
