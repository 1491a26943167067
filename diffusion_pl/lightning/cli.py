"""LightningCLI for `diffusion-pl fit | validate | test`.

    diffusion-pl fit --config configs/quickstart.yaml
    diffusion-pl fit --config configs/quickstart.yaml --trainer.max_steps=200 --model.init_args.lr=2e-4
    diffusion-pl fit --config configs/quickstart.yaml --ckpt_path=lightning_logs/version_0/checkpoints/last.ckpt

``model`` is any LightningModule given by class_path (``DiffusionModule`` or ``NoisyClassifierModule``, short names
work) and ``data`` any LightningDataModule (``MNIST5kDataModule``, ``CIFAR10DataModule``, ``ImageNet64DataModule``).
Optimisers are configured by the modules themselves (``auto_configure_optimizers=False``). Always added: the
NonFiniteGuard callback and, unless another CheckpointIO plugin is given, AtomicCheckpointIO.

``--ckpt_path``: the model's class and the settings that fix its network come from the checkpoint (validate / test
need no --config for the model); fit refuses a config that differs in those (see DiffusionCLI).
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any

import lightning as L
import yaml
from fsspec.implementations.local import LocalFileSystem
from jsonargparse import ArgumentError
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

import diffusion_pl.data  # noqa: F401  (registers the DataModules for short class names)
from diffusion_pl.errors import UserInputError, UserRuntimeError, debug_requested, find_in_chain, find_user_error
from diffusion_pl.lightning.callbacks import NonFiniteGuard
from diffusion_pl.lightning.checkpoint_io import AtomicCheckpointIO, InterruptedSaveCleanup, write_error
from diffusion_pl.lightning.checkpoints import rename_old_names
from diffusion_pl.lightning.ckpt_path import (
    checkpoint_defaults,
    ckpt_path_argument,
    is_checkpoint_file_path,
    model_for_checkpoint,
    read_ckpt_path,
)
from diffusion_pl.lightning.loggers import use_appending_csv_logger
from diffusion_pl.lightning.resume import continue_in_checkpoint_run, resolve_last_checkpoint, resume_changeable_keys
from diffusion_pl.lightning.run_folder import claim_run_folder
from diffusion_pl.parse_errors import parse_error
from diffusion_pl.utils.files import write_text
from diffusion_pl.utils.folder_lock import FolderLock
from diffusion_pl.utils.imports import import_object

# Keys that legitimately differ between a run and its resumption in the same log directory.
_IGNORED_CONFIG_KEYS = ("ckpt_path",)


def run_directory(trainer: L.Trainer) -> str:
    """The directory of this run's files, where its config is saved (call on every rank: rank 0's value is broadcast).

    No logger: ``trainer.default_root_dir``. TensorBoard / CSV loggers: their ``log_dir`` (``save_dir/name/version_N``),
    as Lightning. Any other logger (W&B, MLflow, ...): ``<save_dir>/<name>/<version>``, the folder whose
    ``checkpoints/`` ModelCheckpoint fills by default; for W&B ``<save_dir>/<project>/<run id>``. (Lightning's
    ``trainer.log_dir`` is the bare ``save_dir`` for those, shared by every run logged there.)
    """
    if not trainer.loggers or isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        return trainer.log_dir  # broadcasts
    logger = trainer.loggers[0]
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    path = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    return trainer.strategy.broadcast(path)


def _log_elsewhere_advice(trainer: L.Trainer) -> str:
    """How to give a run its own directory with the logger in use (see :func:`run_directory`)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        return "Log this run elsewhere (e.g. --trainer.default_root_dir=DIR)"
    if isinstance(logger, WandbLogger):
        return (
            f"This directory belongs to the W&B run id {logger.version!r} (a fixed --trainer.logger.init_args.id): "
            "give this run a new id (or none, for a fresh W&B run and directory), or another "
            "--trainer.logger.init_args.save_dir"
        )
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return (
            f"This directory is version {logger.version!r} of the "
            f"{'CSVLogger' if isinstance(logger, CSVLogger) else 'TensorBoardLogger'}: give this run another "
            "--trainer.logger.init_args.version (or none, for the next free version_N), or another "
            "--trainer.logger.init_args.save_dir"
        )
    return f"Give this run another {type(logger).__name__} version / run id, or another save_dir"


class SafeSaveConfigCallback(SaveConfigCallback):
    """Save the run's config in its own run directory (:func:`run_directory`, next to its checkpoints, also for W&B)
    without ever replacing a different one.

    fit writes ``config.yaml``. If the file exists with the same configuration (ignoring ``ckpt_path``, e.g. a resumed
    run logging to a fixed directory) it is kept as is; if it differs, fit stops with a message naming the file, the
    differing keys and how to log elsewhere with the logger in use, instead of Lightning's generic error or a silent
    overwrite. validate / test (/ predict) are never refused: they write ``config_<stage>.yaml`` (or
    ``config_<stage>_1.yaml``, ... when a different one is there), next to a training run's ``config.yaml``.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            run_dir = run_directory(trainer)
            target, problem = None, ""
            if trainer.is_global_zero:
                target, problem = self._target(trainer, run_dir, stage)
            target, problem = trainer.strategy.broadcast((target, problem))
            if problem:
                raise UserRuntimeError(problem)
            if trainer.is_global_zero and target is not None:
                self._write(run_dir, target)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def _current(self) -> dict:
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False)) or {}

    def _differences(self, fs, path: str) -> list[str] | None:
        """Keys in which the config at ``path`` differs from this run's; None if there is no such file."""
        if not fs.isfile(path):
            return None
        with fs.open(path, "r") as f:
            existing = yaml.safe_load(f) or {}
        model = existing.get("model") if isinstance(existing, dict) else None
        rename_old_names(model.get("init_args") if isinstance(model, dict) else None)  # a run saved before a rename
        return _differing_keys(existing, self._current())

    def _target(self, trainer: L.Trainer, run_dir: str, stage: str) -> tuple[str | None, str]:
        """(file to write, or None when an identical one exists; refusal message or "")."""
        fs = get_filesystem(run_dir)
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        path = os.path.join(run_dir, self.config_filename if stage == "fit" else self._stage_name(stage))
        if self.overwrite:
            return path, ""
        if stage != "fit":
            return self._stage_file(fs, run_dir, stage), ""
        differing = self._differences(fs, path)
        if differing is None:
            return path, ""
        if not differing:
            return None, ""
        if self.config.get("ckpt_path"):
            return self._resume_target(fs, run_dir, path, differing)
        return None, (
            f"{path} already exists and holds a different configuration (keys: {_listed_keys(differing)}). "
            f"diffusion-pl does not overwrite a previous run's config. {_log_elsewhere_advice(trainer)}; or move the "
            "old file away if it is no longer needed."
        )

    def _stage_name(self, stage: str, k: int = 0) -> str:
        stem, ext = os.path.splitext(self.config_filename)
        return f"{stem}_{stage}{f'_{k}' if k else ''}{ext}"

    def _stage_file(self, fs, run_dir: str, stage: str) -> str | None:
        """config_<stage>.yaml, or _1, _2 ... when a different one is there; None when an identical one is."""
        for k in itertools.count():
            path = os.path.join(run_dir, self._stage_name(stage, k))
            differing = self._differences(fs, path)
            if differing is None:
                return path
            if not differing:
                return None
        raise AssertionError("unreachable")

    def _resume_target(self, fs, run_dir: str, path: str, differing: list[str]) -> tuple[str | None, str]:
        """A resumed run (--ckpt_path) may change the settings of resume_changeable_keys: its config is saved as
        config_resume.yaml (_1, ...) next to the run's config.yaml; any other difference is refused."""
        changeable = resume_changeable_keys(import_object(str(self.config.model.class_path)))
        fixed = [k for k in differing if k not in changeable]
        if not fixed:
            rank_zero_info(f"Resuming the run in {run_dir} with changed settings: {', '.join(differing)}")
            return self._stage_file(fs, run_dir, "resume"), ""
        return None, (
            f"--ckpt_path resumes the run in {run_dir}, but these settings differ from its {os.path.basename(path)} "
            f"and may not change when resuming: {_listed_keys(fixed)}. A resumed run may change only how long it "
            f"trains, how it validates and logs (trainer.max_steps, trainer.max_epochs, trainer.val_check_interval, "
            f"trainer.limit_val_batches, ...) and the model's training settings (e.g. model.init_args.lr). Resume "
            f"with the run's own config (--config {path}) plus those changes, or start a new run in another folder."
        )

    def _write(self, run_dir: str, path: str) -> None:
        fs = get_filesystem(run_dir)
        fs.makedirs(run_dir, exist_ok=True)
        if self.multifile or not isinstance(fs, LocalFileSystem):
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            return
        text = self.parser.dump(self.config, skip_none=False)
        write_text(path, text)


def _listed_keys(keys: list[str]) -> str:
    return ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else "")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _differing_keys(a: dict, b: dict) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if k not in _IGNORED_CONFIG_KEYS and fa.get(k, object()) != fb.get(k, object())]


class DiffusionCLI(LightningCLI):
    """LightningCLI with one-line user errors (parse errors, a bad ``--ckpt_path``, values the classes refuse).

    ``--ckpt_path``: the model's class and the settings that fix its network and diffusion process come from the
    checkpoint, as in LightningCLI, so validate / test need no --config for the model (nor for the data when the
    checkpoint carries the data's settings). Unlike LightningCLI, the settings a module lists in
    RESUME_CHANGEABLE_HPARAMS (lr, dropout, val_bpd_* ...) are the config's, and fit refuses a config whose other
    model settings differ from the checkpoint's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.command_parsers: list[LightningArgumentParser] = []
        self.model_config = None  # the model to build, when --ckpt_path is given
        self.run_folder_lock: FolderLock | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            if self.run_folder_lock is not None:  # a refusal before the run started (its teardown never came)
                self.run_folder_lock.release()
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.command_parsers.append(parser)  # one per subcommand

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args
        command = given[0] if isinstance(given, list) and given and given[0] in self.subcommands() else None
        given_path = ckpt_path_argument(given) if command in ("validate", "test") else None
        checkpoint = (given_path, read_ckpt_path(given_path)) if given_path and os.path.isfile(given_path) else None
        for command_parser in self.command_parsers if checkpoint is not None else ():
            command_parser.set_defaults(checkpoint_defaults(checkpoint[1]))
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            if given_path and checkpoint is None:  # e.g. no --model, because the checkpoint is missing
                read_ckpt_path(given_path)
            user_error = parse_error(error, f"diffusion-pl {command or ''}".strip(), self.option_names())
            if checkpoint is not None and str(user_error).replace('Parser key "', "").startswith("model"):
                # e.g. a setting an older version saved that no longer exists
                user_error = UserInputError(f"{user_error} (the model's settings are the checkpoint's: {given_path})")
            raise user_error from error
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if is_checkpoint_file_path(ckpt_path):
            checkpoint = checkpoint[1] if checkpoint and checkpoint[0] == ckpt_path else read_ckpt_path(ckpt_path)
            self.model_config = model_for_checkpoint(ckpt_path, checkpoint, self.config[subcommand].model, subcommand)

    def option_names(self) -> list[str]:
        """The options of the subcommands (``--trainer.max_steps``, ...), for a did-you-mean after a typo."""
        names = []
        for command_parser in self.command_parsers:
            try:
                names += [f"--{key}" for key in command_parser.get_defaults().keys()]
            except Exception:  # noqa: BLE001 - defaults that do not parse (e.g. a checkpoint's): no suggestions
                pass
        return names

    def before_instantiate_classes(self) -> None:
        """A CSVLogger continues an earlier run's metrics.csv (diffusion_pl.lightning.loggers); fit resuming a
        checkpoint of a CSV / TensorBoard run folder logs into that folder (diffusion_pl.lightning.resume). With
        --ckpt_path, the model is the one parse_arguments made (the config's changeable settings are kept)."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if self.model_config is not None:  # LightningCLI has put all the checkpoint's settings into the config
            config.model = self.model_config
        trainer_config = config.get("trainer")
        if trainer_config is None:
            return
        use_appending_csv_logger(trainer_config.get("logger"))
        if subcommand == "fit":
            run_dir = continue_in_checkpoint_run(trainer_config, config.get("ckpt_path"))
            if run_dir is not None:
                rank_zero_info(f"Resuming in the checkpoint's run folder {run_dir} (its logs continue)")

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; a full disk or a read-only run folder (logs, config, checkpoints) is one line, and so is a
        checkpoint with a saved data position resumed with a DataModule whose training loader cannot take it."""
        try:
            self.trainer.fit(**kwargs)
        except OSError as error:
            target = error.filename if isinstance(error.filename, str) else "the run's files"
            if os.path.basename(target).startswith(".") and target.endswith(".tmp"):  # an atomic write's temp file
                target = f"a file in {os.path.dirname(target)}"
            user_error = write_error(error, target, "the checkpoints already written are intact")
            if user_error is None:
                raise
            raise user_error from error
        except RuntimeError as error:
            if "stateful loaders, but found" not in str(error):  # Lightning's CombinedLoader on resume
                raise
            raise UserRuntimeError(
                "the checkpoint holds the position of its training data loader (diffusion-pl's DataModules save it "
                "to resume mid-epoch exactly), but this run's train_dataloader() cannot take it back (not a "
                "diffusion_pl.data.resumable.ResumableDataLoader): resume with the DataModule the run was trained with"
            ) from error

    def before_fit(self) -> None:
        """``--ckpt_path last`` resolved and checked before the run starts (diffusion_pl.lightning.resume)."""
        if self.config["fit"].get("ckpt_path") == "last":
            path = resolve_last_checkpoint(self.trainer, self.config["fit"].get("trainer"))
            if path != "last":
                self.config["fit"]["ckpt_path"] = self.config_init["fit"]["ckpt_path"] = path

    def instantiate_classes(self) -> None:
        """A ValueError raised while the config's classes are built (a constructor refusing a value) is a user
        error: one line with the original message."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            root = find_in_chain(error, lambda e: e.__cause__ is None)
            if find_user_error(error) is not None or not isinstance(root, ValueError):
                raise
            raise UserInputError(f"the config cannot be built: {root}") from error

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer refusing a setting with a TypeError / ValueError (e.g. ``devices: abc``) is a user error."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError) as error:
            raise UserInputError(f"the config cannot be built: {error}") from error
        # Atomic checkpoint writes unless the user configured their own CheckpointIO plugin.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # One writer per run folder, no logger file written through a link (lightning/run_folder.py); a W&B run
        # without a fixed id has no folder before it starts.
        logger = trainer.loggers[0] if trainer.loggers else None
        if self.subcommand and (logger is None or logger.version is not None):
            command, advice = f"diffusion-pl {self.subcommand}", _log_elsewhere_advice(trainer)
            self.run_folder_lock = claim_run_folder(trainer, run_directory(trainer), command, advice)
        return trainer


def _short_usage(subcommand: str) -> str:
    """The usage line of `--help` (the full option list of LightningCLI is ~50 lines)."""
    return (
        f"diffusion-pl {subcommand} [--config CONFIG.yaml] [--model CLASS] [--model.init_args.KEY VALUE] "
        "[--data CLASS] [--data.init_args.KEY VALUE] [--trainer.KEY VALUE] [--ckpt_path CKPT]"
    )


def build_lightning_cli(args: list[str] | None = None, run: bool = True, **kwargs: Any) -> LightningCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` starts with the subcommand when ``run`` is True."""
    options: dict[str, Any] = dict(
        model_class=L.LightningModule,
        subclass_mode_model=True,
        datamodule_class=L.LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=SafeSaveConfigCallback,
        save_config_kwargs={"overwrite": False},
        auto_configure_optimizers=False,
        trainer_defaults={"callbacks": [NonFiniteGuard(), InterruptedSaveCleanup()]},
        parser_kwargs={
            "prog": "diffusion-pl",
            "exit_on_error": debug_requested(),  # parse errors raise ArgumentError: one line (diffusion_pl.cli)
            **{name: {"usage": _short_usage(name)} for name in ("fit", "validate", "test", "predict")},
        },
        args=args,
        run=run,
    )
    options.update(kwargs)
    return DiffusionCLI(**options)
