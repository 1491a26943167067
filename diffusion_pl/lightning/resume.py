"""Resuming a fit run: which settings may change, continuing in the run's own folder, and ``--ckpt_path last``.

    RESUME_CHANGEABLE_TRAINER_KEYS   trainer settings a resumed run may change (how long, how often to validate/log);
                                     with the model's RESUME_CHANGEABLE_HPARAMS they form resume_changeable_keys
    continue_in_checkpoint_run      resuming <run>/checkpoints/X.ckpt with a CSV / TensorBoard logger whose version
                                     is not fixed logs into <run> again (its metrics.csv continues) instead of a new
                                     version_N folder
    find_last_checkpoint             what ``--ckpt_path last`` resumes, or a one-line refusal when the run's folder
                                     has no checkpoint (Lightning would silently start from step 0)
"""

from __future__ import annotations

import glob
import os
from typing import Any

from diffusion_pl.errors import UserFileNotFoundError

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


def find_last_checkpoint(checkpoint_dirs: list[str], logger_root: str | None, version_fixed: bool) -> str:
    """The newest ``last*.ckpt`` in ``checkpoint_dirs`` (Lightning's choice for ``ckpt_path="last"``), else a
    UserFileNotFoundError naming the folders and the fix (the newest last.ckpt of other versions under
    ``logger_root``, or fixing the logger version)."""
    found = [p for d in checkpoint_dirs for p in glob.glob(os.path.join(glob.escape(d), "last*.ckpt"))]
    if found:
        return max(found, key=os.path.getmtime)
    elsewhere = sorted(glob.glob(os.path.join(glob.escape(logger_root), "*", "checkpoints", "last*.ckpt")),
                       key=os.path.getmtime) if logger_root else []  # fmt: skip
    where = ", ".join(checkpoint_dirs) or "this run's checkpoint folder"
    advice = (
        "(for the first run in a folder, leave --ckpt_path out)" if version_fixed else
        "(the logger starts a new version folder for every run, so `last` cannot find an earlier run there)"
    )  # fmt: skip
    fix = f"; resume the run you mean by its file, e.g. --ckpt_path {elsewhere[-1]} (the newest)" if elsewhere else ""
    raise UserFileNotFoundError(
        f"--ckpt_path last: no checkpoint in {where}, so training would start again from step 0 {advice}{fix}"
    )
