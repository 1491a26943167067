"""Checkpoints written before T was renamed ``steps`` -> ``diffusion_steps`` keep loading with their own T (Lightning
would otherwise drop the unknown ``steps`` and build the default T = 1000), and are still checked against a model; a
run folder whose config.yaml says ``steps`` resumes with a config that says ``diffusion_steps``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from lit_helpers import tiny_classifier_kwargs, tiny_diffusion_kwargs, write_tiny_classifier_config

from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning import DiffusionModule, NoisyClassifierModule
from diffusion_pl.lightning.callbacks import check_classifier_file
from diffusion_pl.lightning.cli import build_lightning_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sampling"))
from sampling_helpers import save_module_checkpoint  # noqa: E402


def old_checkpoint(module, path: Path) -> str:
    """``module``'s checkpoint with T saved under its old name ``steps``, as older diffusion-pl versions wrote it."""
    save_module_checkpoint(module, str(path))
    checkpoint = torch.load(path, weights_only=True)
    hp = checkpoint["hyper_parameters"]
    hp["steps"] = hp.pop("diffusion_steps")
    torch.save(checkpoint, path)
    return str(path)


def test_old_checkpoints_load_with_their_own_T(tmp_path):
    path = old_checkpoint(DiffusionModule(**tiny_diffusion_kwargs(diffusion_steps=10)), tmp_path / "old.ckpt")
    assert "steps" in torch.load(path, weights_only=True)["hyper_parameters"]
    module = DiffusionModule.load_from_checkpoint(path)
    assert module.hparams.diffusion_steps == 10 and "steps" not in module.hparams
    assert module.diffusion.num_timesteps == 10 and module.timestep_sampler.num_timesteps == 10

    classifier = old_checkpoint(NoisyClassifierModule(**tiny_classifier_kwargs(diffusion_steps=20)), tmp_path / "c")
    loaded = NoisyClassifierModule.load_from_checkpoint(classifier)
    assert loaded.hparams.diffusion_steps == 20 and loaded.t_max == 20 and loaded.diffusion.num_timesteps == 20


def test_old_checkpoints_are_still_checked_against_the_model(tmp_path):
    path = old_checkpoint(DiffusionModule(**tiny_diffusion_kwargs(diffusion_steps=10)), tmp_path / "old.ckpt")
    # resuming / validating into a model with another T (on_load_checkpoint, before the weights are loaded)
    with pytest.raises(UserInputError, match=r"diffusion_steps: checkpoint 10 vs model 20"):
        DiffusionModule(**tiny_diffusion_kwargs(diffusion_steps=20)).on_load_checkpoint(torch.load(path))
    # a classifier of the old format trained on another T cannot guide the model
    classifier = old_checkpoint(NoisyClassifierModule(**tiny_classifier_kwargs(diffusion_steps=20)), tmp_path / "c")
    model_hp = dict(DiffusionModule.load_from_checkpoint(path).hparams)
    with pytest.raises(UserInputError, match=r"diffusion_steps: classifier 20 vs diffusion model 10"):
        check_classifier_file(classifier, model_hp, "GuidedSampler.classifier_path")


def _fit(config, *extra):
    return build_lightning_cli(["fit", "--config", config, "--trainer.callbacks+=ModelCheckpoint",
                                "--trainer.callbacks.save_last=true", *extra])  # fmt: skip


def test_a_run_saved_before_the_rename_resumes(tmp_path):
    csv = "lightning.pytorch.loggers.CSVLogger"
    logger = f"{{class_path: {csv}, init_args: {{save_dir: {tmp_path / 'logs'}, version: 0}}}}"
    config = write_tiny_classifier_config(tmp_path / "c.yaml", tmp_path / "run", logger=logger, max_steps=2)
    _fit(config)
    run_dir = tmp_path / "logs" / "lightning_logs" / "version_0"
    # Make the run folder an old one: its config.yaml and its checkpoint say steps.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["model"]["init_args"]["steps"] = saved["model"]["init_args"].pop("diffusion_steps")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"]["steps"] = checkpoint["hyper_parameters"].pop("diffusion_steps")
    torch.save(checkpoint, last)
    old_config = (run_dir / "config.yaml").read_bytes()

    # A setting that may not change is still named, and only that one (steps = diffusion_steps = 10 is no change).
    with pytest.raises(RuntimeError, match=r"may not change when resuming: trainer\.accumulate_grad_batches\. A"):
        _fit(config, "--trainer.max_steps=4", "--trainer.accumulate_grad_batches=2", "--ckpt_path", str(last))

    resumed = _fit(config, "--trainer.max_steps=4", "--ckpt_path", str(last))
    assert resumed.trainer.global_step == 4 and resumed.model.hparams.diffusion_steps == 10
    assert (run_dir / "config.yaml").read_bytes() == old_config  # the run's own config is kept as it was
    changed = yaml.safe_load((run_dir / "config_resume.yaml").read_text())
    assert changed["trainer"]["max_steps"] == 4 and changed["model"]["init_args"]["diffusion_steps"] == 10
