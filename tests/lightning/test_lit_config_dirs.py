"""Where `diffusion-pl fit | validate | test` save the run's config: in the run's own directory, next to its
checkpoints, for W&B too (not in the save_dir shared by every W&B run); a different config there is refused with advice
that fits the logger in use; validate / test save theirs under their own name and are never refused."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import yaml
from lit_helpers import TinyDataModule, write_tiny_classifier_config

from diffusion_pl.lightning.cli import build_lightning_cli


class TinyDataModuleWithTest(TinyDataModule):
    def test_dataloader(self):
        return self.val_dataloader()


def write_config(tmp_path: Path, name: str, logger: str = "false", max_steps: int = 1, limit_val_batches: int = 0,
                 root: str = "run") -> str:  # fmt: skip
    return write_tiny_classifier_config(tmp_path / f"{name}.yaml", tmp_path / root,
                                        "test_lit_config_dirs.TinyDataModuleWithTest", logger, max_steps,
                                        limit_val_batches)  # fmt: skip


def saved(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    home = str(tmp_path / "wandb_home")  # nothing written to the user's ~/.config/wandb or ~/.cache/wandb
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": home, "WANDB_CONFIG_DIR": home,
                       "WANDB_CACHE_DIR": home, "WANDB_DATA_DIR": home}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    import wandb

    yield wandb
    wandb.finish()


def wandb_logger(save_dir: Path, run_id: str | None = None) -> str:
    args = f"project: proj, save_dir: {save_dir}" + (f", id: {run_id}" if run_id else "")
    return f"{{class_path: lightning.pytorch.loggers.WandbLogger, init_args: {{{args}}}}}"


def test_wandb_runs_sharing_a_save_dir_each_keep_their_config_next_to_their_checkpoints(tmp_path, wandb_offline):
    save_dir = tmp_path / "logs"
    first = build_lightning_cli(["fit", "--config", write_config(tmp_path, "a", wandb_logger(save_dir), max_steps=1)])
    first_id = first.trainer.logger.version
    wandb_offline.finish()
    # another configuration in the same save_dir (a new W&B run): accepted, in its own directory
    second = build_lightning_cli(["fit", "--config", write_config(tmp_path, "b", wandb_logger(save_dir), max_steps=2)])
    second_id = second.trainer.logger.version
    wandb_offline.finish()
    assert first_id != second_id
    for run_id, max_steps, cli in ((first_id, 1, first), (second_id, 2, second)):
        run_dir = save_dir / "proj" / run_id
        assert saved(str(run_dir / "config.yaml"))["trainer"]["max_steps"] == max_steps
        assert glob.glob(str(run_dir / "checkpoints" / "*.ckpt"))  # ModelCheckpoint's default folder, same run dir
        assert Path(cli.trainer.checkpoint_callback.dirpath) == run_dir / "checkpoints"
    assert not (save_dir / "config.yaml").exists()

    # A fixed run id (resubmitted job): the same config resumes into its directory; another one is refused with
    # advice that works for W&B.
    fixed = write_config(tmp_path, "c", wandb_logger(save_dir, "run1"), max_steps=1)
    build_lightning_cli(["fit", "--config", fixed])
    wandb_offline.finish()
    build_lightning_cli(["fit", "--config", fixed])
    wandb_offline.finish()
    other = write_config(tmp_path, "d", wandb_logger(save_dir, "run1"), max_steps=3)
    with pytest.raises(RuntimeError) as info:
        build_lightning_cli(["fit", "--config", other])
    message = str(info.value)
    assert str(save_dir / "proj" / "run1" / "config.yaml") in message and "trainer.max_steps" in message
    assert "W&B run id 'run1'" in message and "--trainer.logger.init_args.id" in message
    assert "default_root_dir" not in message  # it would not help with W&B
    assert saved(str(save_dir / "proj" / "run1" / "config.yaml"))["trainer"]["max_steps"] == 1


def test_csv_logger_with_a_fixed_version_refuses_another_config_with_csv_advice(tmp_path):
    csv = tmp_path / "csv"
    logger = f"{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {csv}, version: 0}}}}"
    build_lightning_cli(["fit", "--config", write_config(tmp_path, "a", logger, max_steps=1)])
    assert saved(str(tmp_path / "csv" / "lightning_logs" / "version_0" / "config.yaml"))["trainer"]["max_steps"] == 1
    with pytest.raises(RuntimeError, match=r"version 0 of the CSVLogger.*--trainer.logger.init_args.version"):
        build_lightning_cli(["fit", "--config", write_config(tmp_path, "b", logger, max_steps=2)])
    # validate of the checkpoint with another config, in the same version directory: saved under its own name
    (ckpt,) = glob.glob(str(tmp_path / "csv" / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    build_lightning_cli(["validate", "--config", write_config(tmp_path, "v", logger, limit_val_batches=1),
                         "--ckpt_path", ckpt])  # fmt: skip
    version_dir = tmp_path / "csv" / "lightning_logs" / "version_0"
    assert saved(str(version_dir / "config_validate.yaml"))["trainer"]["limit_val_batches"] == 1
    assert saved(str(version_dir / "config.yaml"))["trainer"]["limit_val_batches"] == 0  # training config kept


def test_validate_and_test_of_a_checkpoint_in_the_training_log_dir(tmp_path):
    build_lightning_cli(["fit", "--config", write_config(tmp_path, "train", max_steps=1)])
    run = tmp_path / "run"
    training_config = (run / "config.yaml").read_text()
    (ckpt,) = glob.glob(str(run / "checkpoints" / "*.ckpt"))
    # Lightning saves a config for validate/test too: here under config_<stage>.yaml, never refused
    build_lightning_cli(["validate", "--config", write_config(tmp_path, "v1", limit_val_batches=1),
                         "--ckpt_path", ckpt])  # fmt: skip
    build_lightning_cli(["validate", "--config", write_config(tmp_path, "v1", limit_val_batches=1),
                         "--ckpt_path", ckpt])  # same config again: the file is kept  # fmt: skip
    build_lightning_cli(["validate", "--config", write_config(tmp_path, "v2", limit_val_batches=2),
                         "--ckpt_path", ckpt])  # fmt: skip
    build_lightning_cli(["test", "--config", write_config(tmp_path, "t", limit_val_batches=1), "--ckpt_path", ckpt])
    assert sorted(os.path.basename(p) for p in glob.glob(str(run / "config*.yaml"))) == [
        "config.yaml", "config_test.yaml", "config_validate.yaml", "config_validate_1.yaml"]  # fmt: skip
    assert saved(str(run / "config_validate.yaml"))["trainer"]["limit_val_batches"] == 1
    assert saved(str(run / "config_validate_1.yaml"))["trainer"]["limit_val_batches"] == 2
    assert (run / "config.yaml").read_text() == training_config
    # fit with another config in the same directory is still refused, with advice for a run without a logger
    with pytest.raises(RuntimeError, match=r"config.yaml already exists .*trainer.max_steps.*default_root_dir"):
        build_lightning_cli(["fit", "--config", write_config(tmp_path, "train2", max_steps=2)])
