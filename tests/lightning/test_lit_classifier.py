"""NoisyClassifierModule: trains, logs accuracy overall and by timestep quartile, loads from its checkpoint alone."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lit_helpers import TinyDataModule, tiny_classifier_kwargs, trainer_kwargs

from diffusion_pl.lightning import NoisyClassifierModule


def test_classifier_trains_and_logs_accuracy(tmp_path):
    L.seed_everything(0)
    model = NoisyClassifierModule(**tiny_classifier_kwargs(anneal_lr=True, weight_decay=0.05))
    logger = CSVLogger(str(tmp_path), name="clf")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=logger, limit_val_batches=1,
                                         val_check_interval=6, check_val_every_n_epoch=None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, TinyDataModule(batch_size=8))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "train/grad_norm", "train/lr"} <= columns
    assert any(f"train/acc_q{q}" in columns for q in range(4))
    accuracies = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    assert len(accuracies) == 6 and all(0.0 <= a <= 1.0 for a in accuracies)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)  # annealed to 0 at max_steps

    path = tmp_path / "clf.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert raw["hyper_parameters"]["diffusion_steps"] == 10 and raw["hyper_parameters"]["noise_schedule"] == "cosine"
    restored = NoisyClassifierModule.load_from_checkpoint(path).eval()
    model.eval()
    x, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([0, 9])
    torch.testing.assert_close(restored(x, t), model(x, t))


def test_timestep_range_restriction(tmp_path):
    model = NoisyClassifierModule(**tiny_classifier_kwargs(t_min=2, t_max=5))
    seen = []
    original = model.classifier.forward
    model.classifier.forward = lambda x, t: (seen.append(t.clone()), original(x, t))[1]
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(model, TinyDataModule(batch_size=8))
    t = torch.cat(seen)
    assert int(t.min()) >= 2 and int(t.max()) <= 4
    with pytest.raises(ValueError, match="t_min"):
        NoisyClassifierModule(**tiny_classifier_kwargs(t_min=5, t_max=5))


def test_classifier_classes_must_match_data(tmp_path):
    model = NoisyClassifierModule(**tiny_classifier_kwargs(out_channels=10))
    trainer = L.Trainer(**trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"data.num_classes = 3 .* out_channels = 10"):
        trainer.fit(model, TinyDataModule())
