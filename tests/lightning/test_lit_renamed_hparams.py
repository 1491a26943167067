"""Checkpoints written before T was renamed ``steps`` -> ``diffusion_steps`` keep loading with their own T (Lightning
would otherwise drop the unknown ``steps`` and build the default T = 1000), and are still checked against a model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lit_helpers import tiny_classifier_kwargs, tiny_diffusion_kwargs

from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning import DiffusionModule, NoisyClassifierModule
from diffusion_pl.lightning.callbacks import check_classifier_file

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
