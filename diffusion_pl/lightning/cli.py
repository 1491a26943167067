"""LightningCLI for `diffusion-pl fit | validate | test`.

    diffusion-pl fit --config configs/quickstart.yaml
    diffusion-pl fit --config configs/quickstart.yaml --trainer.max_steps=200 --model.init_args.lr=2e-4
    diffusion-pl fit --config configs/quickstart.yaml --ckpt_path=lightning_logs/version_0/checkpoints/last.ckpt

``model`` is any LightningModule given by class_path (``DiffusionModule`` or ``NoisyClassifierModule``, short names
work) and ``data`` any LightningDataModule (``MNIST5kDataModule``, ``CIFAR10DataModule``, ``ImageNet64DataModule``).
Optimisers are configured by the modules themselves (``auto_configure_optimizers=False``). Always added: the
NonFiniteGuard callback and, unless another CheckpointIO plugin is given, AtomicCheckpointIO.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import yaml
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO

import diffusion_pl.data  # noqa: F401  (registers the DataModules for short class names)
from diffusion_pl.lightning.callbacks import NonFiniteGuard
from diffusion_pl.lightning.checkpoint_io import AtomicCheckpointIO
from diffusion_pl.lightning.classifier_module import NoisyClassifierModule  # noqa: F401
from diffusion_pl.lightning.diffusion_module import DiffusionModule  # noqa: F401

# Keys that legitimately differ between a run and its resumption in the same log directory.
_IGNORED_CONFIG_KEYS = ("ckpt_path",)


class SafeSaveConfigCallback(SaveConfigCallback):
    """Save the run's config.yaml in the log directory without ever replacing a different one.

    If the file exists with the same configuration (ignoring ``ckpt_path``, e.g. a resumed run logging to a fixed
    directory) it is kept as is; if it differs, fit stops with a message naming the file, the differing keys and the
    ways out, instead of Lightning's generic error or a silent overwrite.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir and not self.overwrite:
            log_dir = trainer.log_dir  # broadcasts: called on every rank
            assert log_dir is not None
            config_path = os.path.join(log_dir, self.config_filename)
            problem = ""
            identical = False
            if trainer.is_global_zero:
                fs = get_filesystem(log_dir)
                if fs.isfile(config_path):
                    with fs.open(config_path, "r") as f:
                        existing = yaml.safe_load(f) or {}
                    current = yaml.safe_load(self.parser.dump(self.config, skip_none=False)) or {}
                    differing = _differing_keys(existing, current)
                    identical = not differing
                    if differing:
                        problem = (
                            f"{config_path} already exists and holds a different configuration (keys: "
                            f"{', '.join(differing[:12])}{' ...' if len(differing) > 12 else ''}). diffusion-pl does "
                            "not overwrite a previous run's config. Log this run elsewhere (e.g. "
                            "--trainer.default_root_dir=DIR or a new --trainer.logger.init_args.version), or move the "
                            "old file away if it is no longer needed."
                        )
            problem, identical = trainer.strategy.broadcast((problem, identical))
            if problem:
                raise RuntimeError(problem)
            if identical:
                self.already_saved = True
                return
        super().setup(trainer, pl_module, stage)


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
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic checkpoint writes unless the user configured their own CheckpointIO plugin.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


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
        trainer_defaults={"callbacks": [NonFiniteGuard()]},
        args=args,
        run=run,
    )
    options.update(kwargs)
    return DiffusionCLI(**options)
