"""Tiny data and settings shared by the tests of diffusion_pl.lightning (8 px images, 32-channel U-Nets, T = 10)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion_pl.data.common import make_dataloader


class TinyDataModule(L.LightningDataModule):
    """Fixed random images in [-1, 1] (independent of the global RNG) with the attributes the modules check."""

    def __init__(self, n_train: int = 16, n_val: int = 8, batch_size: int = 4, image_size: int = 8,
                 in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(1234)
        n = n_train + n_val
        x = torch.rand(n, in_channels, image_size, image_size, generator=g) * 2 - 1
        y = torch.randint(0, num_classes, (n,), generator=g)
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train:], y[n_train:])

    def train_dataloader(self) -> DataLoader:
        return make_dataloader(self.train_set, batch_size=self.batch_size, num_workers=0, train=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def tiny_diffusion_kwargs(**overrides) -> dict:
    kwargs = dict(
        image_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(4,), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
        class_cond=True, num_classes=3, null_class=True, p_uncond=0.2, diffusion_steps=10, dropout=0.1, lr=1e-3,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_classifier_kwargs(**overrides) -> dict:
    kwargs = dict(
        image_size=8, in_channels=1, model_channels=32, out_channels=3, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(4,), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
        pool="attention", diffusion_steps=10, lr=1e-3,
    )
    kwargs.update(overrides)
    return kwargs


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        accelerator="cpu", devices=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        max_steps=3, log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


def write_tiny_classifier_config(path, root, data_class: str = "lit_helpers.TinyDataModule", logger: str = "false",
                                 max_steps: int = 1, limit_val_batches: int = 0) -> str:  # fmt: skip
    """A `diffusion-pl fit/validate/test` YAML for a tiny NoisyClassifierModule on 8x8 one-channel data (T = 10),
    runs under ``root``; written to ``path``, which is returned as a string."""
    Path(path).write_text(textwrap.dedent(f"""\
        seed_everything: 0
        model:
          class_path: NoisyClassifierModule
          init_args: {{image_size: 8, in_channels: 1, model_channels: 32, out_channels: 3, num_res_blocks: 1,
                      channel_mult: [1, 2], attention_resolutions: [4], num_head_channels: 32, diffusion_steps: 10}}
        data:
          class_path: {data_class}
        trainer:
          accelerator: cpu
          max_steps: {max_steps}
          default_root_dir: {root}
          enable_progress_bar: false
          enable_model_summary: false
          limit_val_batches: {limit_val_batches}
          logger: {logger}
        """))
    return str(path)


class BuggyModule(L.LightningModule):
    """A LightningModule whose constructor has a bug (a TypeError that is not about the user's settings)."""

    def __init__(self) -> None:
        super().__init__()
        len(5)


class CheckpointedTinyDataModule(TinyDataModule):
    """TinyDataModule that saves its settings in checkpoints (as the project's DataModules do), with a test split."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__(batch_size=batch_size)
        self.save_hyperparameters()

    def test_dataloader(self):
        return self.val_dataloader()


class LockProbe(L.Callback):
    """At each training batch end, reads ``folder``'s lock file and tries to take the folder's lock as a second
    writer would (a FolderLock of its own: another open file, so flock refuses it even in this process)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.holders: list[dict] = []
        self.refusals: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from diffusion_pl.utils.folder_lock import LOCK_NAME, FolderInUseError, FolderLock

        self.holders.append(json.loads((Path(self.folder) / LOCK_NAME).read_text()))
        second = FolderLock(self.folder, "the run folder", "a second writer")
        try:
            second.acquire()
        except FolderInUseError as refused:
            self.refusals.append(str(refused))
        else:  # the run's lock was not held: give this one back, the test fails on the missing refusal
            second.release()
