"""DiffusionModule: training logs, importance-sampler state in checkpoints, plain loading, config errors."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lit_helpers import TinyDataModule, tiny_diffusion_kwargs, trainer_kwargs

from diffusion_pl.diffusion import LossSecondMomentSampler
from diffusion_pl.lightning import DiffusionModule
from diffusion_pl.lightning.common import lr_factor


def test_fit_logs_paper_metrics_and_quartiles(tmp_path):
    L.seed_everything(0)
    model = DiffusionModule(**tiny_diffusion_kwargs())
    logger = CSVLogger(str(tmp_path), name="logs")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=logger, limit_val_batches=1,
                                         val_check_interval=4, check_val_every_n_epoch=None))
    trainer.fit(model, TinyDataModule())
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for key in ("loss", "mse", "vb"):
        assert f"train/{key}" in columns
        assert any(f"train/{key}_q{q}" in columns for q in range(4))
    for key in ("train/grad_norm", "train/lr", "train/images_per_sec", "val/loss", "val/mse", "val/vb"):
        assert key in columns, key
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_lr_warmup_and_linear_anneal():
    assert lr_factor(0, 4, None) == pytest.approx(0.25)
    assert lr_factor(3, 4, None) == 1.0 and lr_factor(100, 4, None) == 1.0
    assert lr_factor(0, 0, 10) == 1.0
    assert lr_factor(5, 0, 10) == pytest.approx(0.5)
    assert lr_factor(10, 0, 10) == 0.0


def test_anneal_reaches_zero_at_max_steps(tmp_path):
    model = DiffusionModule(**tiny_diffusion_kwargs(anneal_lr=True, lr=1e-3))
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(model, TinyDataModule())
    # After 4 of 4 steps the scheduler has been stepped 4 times: lr = 1e-3 * (1 - 4/4).
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)


def test_loss_second_moment_history_survives_checkpoint(tmp_path):
    L.seed_everything(0)
    model = DiffusionModule(**tiny_diffusion_kwargs(diffusion_steps=4, timestep_sampler="loss-second-moment"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=16, enable_checkpointing=True, callbacks=[ckpt],
                                         limit_train_batches=4))
    trainer.fit(model, TinyDataModule(n_train=16, batch_size=4))
    sampler = model.timestep_sampler
    assert isinstance(sampler, LossSecondMomentSampler)
    assert sampler.warmed_up()  # 64 losses over 4 timesteps: the importance-sampling path was exercised
    assert not torch.allclose(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))

    path = str(tmp_path / "ckpt" / "last.ckpt")
    raw = torch.load(path, weights_only=True)  # hparams and sampler state are plain types / tensors
    assert raw["hyper_parameters"]["timestep_sampler"] == "loss-second-moment"
    restored = DiffusionModule.load_from_checkpoint(path)
    assert torch.equal(restored.timestep_sampler.loss_history, sampler.loss_history)
    assert torch.equal(restored.timestep_sampler.loss_counts, sampler.loss_counts)
    assert torch.allclose(restored.timestep_sampler.probabilities(), sampler.probabilities())


def test_p_uncond_needs_null_class():
    with pytest.raises(ValueError, match="null_class"):
        DiffusionModule(**tiny_diffusion_kwargs(null_class=False, p_uncond=0.1))
    with pytest.raises(ValueError, match="p_uncond"):
        DiffusionModule(**tiny_diffusion_kwargs(p_uncond=1.0))


def test_validation_bits_per_dim_settings_are_checked_when_built():
    """Checked when the module is built, not at the first validation (which may come after many training steps)."""
    with pytest.raises(ValueError, match=r"model.init_args.val_bpd_respacing '5000' does not fit the model's T = "):
        DiffusionModule(**tiny_diffusion_kwargs(val_bpd_batches=1, val_bpd_respacing="5000"))
    with pytest.raises(ValueError, match=r"model.init_args.val_bpd_batches must be >= 0, got -1"):
        DiffusionModule(**tiny_diffusion_kwargs(val_bpd_batches=-1))
    DiffusionModule(**tiny_diffusion_kwargs(val_bpd_batches=1, val_bpd_respacing="5"))


def test_class_dropout_uses_the_null_label(tmp_path):
    model = DiffusionModule(**tiny_diffusion_kwargs(p_uncond=0.5))
    seen = []
    original = model.unet.forward

    def spy(x, t, y=None):
        seen.append(y.clone())
        return original(x, t, y=y)

    model.unet.forward = spy
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(model, TinyDataModule(batch_size=8))
    labels = torch.cat(seen)
    assert (labels == 3).any() and (labels < 3).any()  # null label = num_classes


@pytest.mark.parametrize(
    "override, data, message",
    [
        (
            {"image_size": 16, "attention_resolutions": (8,)},
            {},
            r"data.image_size = 8 .* image_size = 16.*model.init_args.image_size: 8",
        ),
        ({"in_channels": 3}, {}, r"data.in_channels = 1 .* in_channels = 3.*model.init_args.in_channels: 1"),
        ({"num_classes": 5}, {}, r"data.num_classes = 3 .* num_classes = 5.*model.init_args.num_classes: 3"),
    ],
)
def test_data_network_mismatch_fails_before_training(tmp_path, override, data, message):
    model = DiffusionModule(**tiny_diffusion_kwargs(**override))
    trainer = L.Trainer(**trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, TinyDataModule(**data))
    assert trainer.global_step == 0


def test_unconditional_model_ignores_data_classes(tmp_path):
    model = DiffusionModule(**tiny_diffusion_kwargs(class_cond=False, null_class=False, p_uncond=0.0, num_classes=7))
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(model, TinyDataModule())
    assert trainer.global_step == 1


def test_validation_bits_per_dim(tmp_path):
    model = DiffusionModule(**tiny_diffusion_kwargs(val_bpd_batches=1, val_bpd_respacing="5"))
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=1, limit_val_batches=2))
    (metrics,) = trainer.validate(model, TinyDataModule(), verbose=False)
    assert metrics["val/bpd"] > 0 and torch.isfinite(torch.tensor(metrics["val/bpd"]))
    # Fixed noise per batch: validating twice gives the same loss.
    (again,) = trainer.validate(model, TinyDataModule(), verbose=False)
    assert again["val/loss"] == pytest.approx(metrics["val/loss"])


def test_final_last_checkpoint_keeps_raw_weights_for_resuming(tmp_path):
    """EMAWeightAveraging copies the EMA weights into the module at on_train_end and ModelCheckpoint(save_last)
    then writes last.ckpt: its current_model_state must still be the raw weights, its state_dict the EMA ones."""
    from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

    class Raw(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    raw = Raw()
    model = DiffusionModule(**tiny_diffusion_kwargs())
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=100)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=3, enable_checkpointing=True,
                                         callbacks=[EMAWeightAveraging(decay=0.5), raw, checkpoint]))
    trainer.fit(model, TinyDataModule())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert all(torch.equal(saved["current_model_state"][k], v) for k, v in raw.state.items())
    assert any(not torch.equal(saved["state_dict"][k], v) for k, v in raw.state.items())
