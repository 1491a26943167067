"""SampleQualityEvaluation during fit: metrics logged at the right steps (single process and 2-rank DDP)."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from sampling_helpers import TinyDataModule, randomize_zero_init, tiny_diffusion_kwargs

from diffusion_pl.lightning import DiffusionModule
from diffusion_pl.lightning.evaluation_callback import SampleQualityEvaluation

HERE = os.path.dirname(os.path.abspath(__file__))


def run_fit(root: str, weights: str, devices: int = 1) -> SampleQualityEvaluation:
    torch.manual_seed(0)
    module = DiffusionModule(**tiny_diffusion_kwargs(lr=1e-3))
    randomize_zero_init(module)
    callback = SampleQualityEvaluation(every_n_steps=2, num_samples=5, batch_size=3, steps="2",
                                       inception_weights=weights, metrics=["fid", "isc", "prc"], isc_splits=1,
                                       cache_dir=os.path.join(root, "cache"))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=4,
                        val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback],
                        logger=CSVLogger(root, name="csv", version=0), log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, datamodule=TinyDataModule(n_train=16, n_val=6, batch_size=4))
    return callback


def logged_rows(root: str) -> list[dict[str, str]]:
    with open(glob.glob(os.path.join(root, "csv", "version_0", "metrics.csv"))[0]) as f:
        return [r for r in csv.DictReader(f) if r.get("eval/fid")]


def test_callback_logs_metric_curves(tmp_path, random_inception_weights):
    callback = run_fit(str(tmp_path), random_inception_weights)
    rows = logged_rows(str(tmp_path))
    assert sorted({int(r["step"]) for r in rows}) == [2, 4]  # evaluated at steps 2 and 4
    assert all(float(r["eval/fid"]) > 0 and r["eval/precision"] != "" for r in rows)
    assert set(callback.last_metrics) == {"fid", "isc_mean", "isc_std", "precision", "recall", "f_score"}
    assert callback.last_step == 4
    assert len(rows) == 2  # logged once per evaluation


@pytest.mark.ddp
def test_callback_two_ranks(tmp_path, random_inception_weights):
    script = (
        f"import sys; sys.path.insert(0, {HERE!r})\n"
        "from test_sampling_callback import run_fit\n"
        "if __name__ == '__main__':\n"
        f"    cb = run_fit({str(tmp_path)!r}, {random_inception_weights!r}, devices=2)\n"
        "    sys.stdout.write(f'METRICS {cb.last_step} {sorted(cb.last_metrics)}\\n')\n"  # one write per rank
    )
    path = tmp_path / "run_ddp.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=400, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("METRICS 4") == 2  # both ranks finished with the same evaluations
    assert sorted({int(r["step"]) for r in logged_rows(str(tmp_path))}) == [2, 4]


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_samples=5), r"averaged over 10 splits .* needs at least 10 of them, got 5"),
    (dict(num_samples=20, metrics=["prc"], isc_splits=1, eta=0.5), r"SampleQualityEvaluation.eta 0.5 only applies"),
    (dict(num_samples=20, method="ddim", eta=-1.0), r"SampleQualityEvaluation.eta must be >= 0"),
])  # fmt: skip
def test_settings_that_cannot_work_are_refused_when_built(kwargs, message):
    """Refused when the callback is built (before training), not at its first evaluation many steps later."""
    from diffusion_pl.errors import UserInputError

    with pytest.raises(UserInputError, match=message):
        SampleQualityEvaluation(**kwargs)
    SampleQualityEvaluation(**{**kwargs, "num_samples": 20, "isc_splits": 4, "eta": 0.0})


def test_steps_that_do_not_fit_the_model_are_refused_before_training(tmp_path):
    """The step schedule is checked against the model's T = 10 in setup, naming the callback's option."""
    from diffusion_pl.errors import UserInputError

    callback = SampleQualityEvaluation(num_samples=20, metrics=["prc"], isc_splits=1, steps="ddim7")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[callback])  # fmt: skip
    with pytest.raises(UserInputError, match=r"SampleQualityEvaluation.steps 'ddim7' does not fit the model's T = 10"):
        trainer.fit(DiffusionModule(**tiny_diffusion_kwargs()), datamodule=TinyDataModule(n_train=8, n_val=4))
    assert trainer.global_step == 0


def test_reference_of_another_resolution_is_warned_once(tmp_path, random_inception_weights):
    """A reference folder of other-sized images than the model's samples: the curves are still logged, with one
    warning naming both shapes."""
    from PIL import Image

    folder = tmp_path / "ref16"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    module = DiffusionModule(**tiny_diffusion_kwargs(lr=1e-3))
    callback = SampleQualityEvaluation(every_n_steps=1, num_samples=5, batch_size=5, steps="2", metrics=["fid"],
                                       reference=str(folder), inception_weights=random_inception_weights,
                                       cache_dir=str(tmp_path / "cache"))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=1, limit_val_batches=1,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[callback], logger=False)  # fmt: skip
    with pytest.warns(UserWarning, match=r"8x8 with 1 channel\(s\) but the reference images are 16x16") as w:
        trainer.fit(module, datamodule=TinyDataModule(n_train=8, n_val=4, batch_size=4))
    assert sum("reference images are 16x16" in str(r.message) for r in w) == 1
    assert callback.last_step == 2 and callback.last_metrics["fid"] > 0


def test_guiding_classifier_is_loaded_once_and_checked(ckpts):
    """classifier_path: the checkpoint is loaded on first use, held (not reloaded at the next evaluation) and guides
    the engine; a classifier of another image size is refused with the settings that differ."""
    from diffusion_pl.lightning.checkpoints import load_module

    model = load_module(DiffusionModule, ckpts["cond"], "ckpt")
    callback = SampleQualityEvaluation(classifier_path=ckpts["classifier"], classifier_scale=1.0, steps="4",
                                       metrics=["isc"], isc_splits=1, num_samples=2)  # fmt: skip
    engine = callback._engine(model)
    classifier = callback.guiding_classifier(model)
    assert engine.classifier is classifier and callback._engine(model).classifier is classifier
    assert not any(p.requires_grad for p in classifier.parameters()) and not classifier.training
    other = SampleQualityEvaluation(classifier_path=ckpts["classifier16"], classifier_scale=1.0, metrics=["isc"],
                                    isc_splits=1, num_samples=2)  # fmt: skip
    with pytest.raises(ValueError, match="image_size: classifier 16 vs diffusion model 8"):
        other.guiding_classifier(model)
