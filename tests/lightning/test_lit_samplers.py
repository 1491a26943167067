"""The callbacks take their sampling methods from the sampler registry: the "auto" rule, eta defaults and range, step
schedules of the solvers (their method choices: sampling/test_sampling_method_options.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lit_helpers import tiny_diffusion_kwargs

from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning import DiffusionModule, GuidedSampler
from diffusion_pl.lightning.cli import build_lightning_cli
from diffusion_pl.lightning.evaluation_callback import SampleQualityEvaluation

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("respacing, method", [("ddim4", "ddim"), ("karras4", "dpmpp_2m"), ("4", "ddpm"),
                                               ("", "ddpm")])  # fmt: skip
def test_auto_rule(respacing, method):
    sampler = GuidedSampler(respacing=respacing)
    assert (sampler.method, sampler.sampling_method) == ("auto", method)


def test_auto_is_resolved_for_sampling_and_saved_as_written(tmp_path, monkeypatch):
    """The quickstart config's GuidedSampler (respacing ddim25, method left at "auto") draws with ddim, and the
    config a run saves still says "auto"."""
    monkeypatch.chdir(tmp_path)
    cli = build_lightning_cli(args=["--config", str(ROOT / "configs" / "quickstart.yaml")], run=False)
    (sampler,) = [c for c in cli.trainer.callbacks if isinstance(c, GuidedSampler)]
    assert (sampler.method, sampler.sampling_method) == ("auto", "ddim")
    saved = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    (entry,) = [c for c in saved["trainer"]["callbacks"] if c["class_path"].endswith("GuidedSampler")]
    assert entry["init_args"]["method"] == "auto"


def test_guided_sampler_draws_with_a_solver():
    torch.manual_seed(0)
    model = DiffusionModule(**tiny_diffusion_kwargs()).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output layers -> random: a non-trivial eps
            if p.ndim > 1 and bool((p == 0).all()):
                p.normal_(0, 0.05)
        auto = GuidedSampler(respacing="karras4", samples_per_class=2, cfg_scale=1.0).draw(model)
        explicit = GuidedSampler(respacing="karras4", method="dpmpp_2m", samples_per_class=2, cfg_scale=1.0).draw(model)
        heun = GuidedSampler(respacing="karras4", method="heun", samples_per_class=2, cfg_scale=1.0).draw(model)
    assert torch.equal(auto, explicit)
    assert auto.shape == (6, 1, 8, 8) and (auto.abs() < 1).any()
    assert not torch.equal(auto, heun)


def test_bad_method_options_are_refused_when_built():
    with pytest.raises(UserInputError, match=r"GuidedSampler.eta 0.5 only applies to method ddim or dpmpp_2m_sde"):
        GuidedSampler(method="heun", eta=0.5)
    with pytest.raises(UserInputError, match=r"GuidedSampler.eta 0.5 only applies"):
        GuidedSampler(respacing="250", eta=0.5)  # auto -> ancestral
    with pytest.raises(UserInputError, match=r"SampleQualityEvaluation.eta must be in \[0, 1\]"):
        SampleQualityEvaluation(num_samples=20, metrics=["prc"], isc_splits=1, method="dpmpp_2m_sde", eta=1.5)
    # Unknown methods and too-short schedules, before any model or classifier file is read.
    with pytest.raises(UserInputError, match=r"unknown SampleQualityEvaluation.method 'euler'; choose from ddpm"):
        SampleQualityEvaluation(num_samples=20, metrics=["prc"], isc_splits=1, method="euler")
    with pytest.raises(UserInputError, match=r"SampleQualityEvaluation.steps 'karras2' gives 2 step\(s\), but method "
                       r"dpmpp_2m needs at least 3 .* use e.g. SampleQualityEvaluation.steps karras3"):  # fmt: skip
        SampleQualityEvaluation(num_samples=20, metrics=["prc"], isc_splits=1, method="dpmpp_2m", steps="karras2")
    with pytest.raises(UserInputError, match=r"GuidedSampler.respacing '2' gives 2 step\(s\), but method heun"):
        GuidedSampler(respacing="2", method="heun")
