"""Resuming from a step checkpoint (ModelCheckpoint every_n_train_steps, as the configs write them) continues the
uninterrupted run bit for bit in 32-true: raw weights, EMA weights, AdamW moments, the loss-second-moment history,
the GuidedSampler's validation-run count, SampleQualityEvaluation's schedule and the batches (order and position
within the epoch), also from a checkpoint written just before a validation run (which the resumed run skips)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lit_helpers import TinyDataModule, tiny_diffusion_kwargs, trainer_kwargs

import diffusion_pl.data.common as data_common
from diffusion_pl.lightning import DiffusionModule, GuidedSampler
from diffusion_pl.lightning.callbacks import validation_follows_checkpoint
from diffusion_pl.lightning.evaluation_callback import SampleQualityEvaluation

MAX_STEPS = 12  # 22 examples in batches of 4: 5 steps per epoch (drop_last), so step 5 ends epoch 0


class StepOnlyEvaluation(SampleQualityEvaluation):
    """SampleQualityEvaluation whose evaluation only records its step (no sampling, no Inception)."""

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        self.evaluated_at.append(trainer.global_step)
        return {"fid": float(trainer.global_step)}


class Record(Callback):
    """Every step's batch, and the state after the last optimizer step (EMA copies its average in at fit end); the
    steps validation ran at and the steps validation_follows_checkpoint predicted."""

    def __init__(self) -> None:
        self.batches: dict[int, torch.Tensor] = {}
        self.predicted, self.validated = set(), set()

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated.add(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = batch[0].clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if validation_follows_checkpoint(trainer):
            self.predicted.add(trainer.global_step)
        self.raw = copy.deepcopy(pl_module.state_dict())
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


def _fit(root, ckpt_path=None, seed=0, every_n_epochs=1):
    L.seed_everything(seed)  # a resumed process may be seeded differently: nothing may depend on it
    model = DiffusionModule(**tiny_diffusion_kwargs(
        diffusion_steps=4, timestep_sampler="loss-second-moment", warmup_steps=3, dropout=0.1, p_uncond=0.3,
    ))  # fmt: skip
    record, sampler = Record(), GuidedSampler(every_n_val_runs=2, respacing="2", samples_per_class=1)
    weights = root / "inception.pth"  # never read: StepOnlyEvaluation does not evaluate
    weights.write_bytes(b"")
    evaluation = StepOnlyEvaluation(every_n_steps=3, num_samples=2, steps="2", metrics=["fid"],
                                    inception_weights=str(weights))  # fmt: skip
    evaluation.evaluated_at = []
    callbacks = [
        EMAWeightAveraging(decay=0.9, update_starting_at_step=2), record, sampler, evaluation,
        ModelCheckpoint(dirpath=str(root / "checkpoints"), filename="{step}", every_n_train_steps=1, save_top_k=-1),
    ]  # fmt: skip
    trainer = L.Trainer(**trainer_kwargs(
        root, max_steps=MAX_STEPS, enable_checkpointing=True, callbacks=callbacks, limit_val_batches=1,
        val_check_interval=2, check_val_every_n_epoch=every_n_epochs, precision="32-true",
    ))  # fmt: skip
    trainer.fit(model, TinyDataModule(n_train=22, batch_size=4), ckpt_path=ckpt_path)
    return model, trainer, record, sampler, evaluation


def _assert_same_run(full, resumed):
    (full_model, _, full_record, full_sampler, full_eval), (model, trainer, record, sampler, evaluation) = full, resumed
    assert trainer.global_step == MAX_STEPS
    for step, batch in record.batches.items():
        assert torch.equal(batch, full_record.batches[step]), f"batch of step {step}"
    for name, value in full_record.raw.items():
        assert torch.equal(record.raw[name], value), f"raw weight {name}"
    for name, value in full_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), f"EMA weight {name}"
    for index, state in full_record.optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(record.optimizer["state"][index][key], value), f"AdamW {key} of parameter {index}"
    assert record.optimizer["param_groups"][0]["lr"] == full_record.optimizer["param_groups"][0]["lr"]
    assert torch.equal(model.timestep_sampler.loss_history, full_model.timestep_sampler.loss_history)
    assert torch.equal(model.timestep_sampler.loss_counts, full_model.timestep_sampler.loss_counts)
    assert sampler.state_dict() == full_sampler.state_dict()
    assert evaluation.state_dict() == full_eval.state_dict()
    # The same later evaluations (one due at the checkpoint's step is skipped with its validation run).
    assert evaluation.evaluated_at == [s for s in full_eval.evaluated_at if s > min(record.batches)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("full"))


@pytest.mark.parametrize("step", [3, 5, 7], ids=["mid-epoch", "last-batch-of-epoch", "before-a-validation"])
def test_resume_from_step_checkpoint_equals_uninterrupted_run(full_run, tmp_path, step):
    checkpoint = full_run[1].checkpoint_callback.dirpath + f"/step={step}.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == step
    # The counter is saved as after the validation that follows the checkpoint's step (the resumed run skips it).
    assert saved["callbacks"]["GuidedSampler"]["val_runs"] == len([s for s in full_run[2].validated if s <= step])
    _assert_same_run(full_run, _fit(tmp_path, ckpt_path=checkpoint, seed=123))


@pytest.mark.parametrize("every_n_epochs", [1, None], ids=["per-epoch-batches", "total-batches"])
def test_validation_follows_checkpoint_predicts_lightnings_validation_steps(full_run, tmp_path, every_n_epochs):
    record = full_run[2] if every_n_epochs == 1 else _fit(tmp_path, every_n_epochs=None)[2]
    assert record.predicted == record.validated and len(record.validated) >= 4


def test_resume_without_the_loader_position_differs(full_run, tmp_path, monkeypatch):
    """Negative control: a loader that ignores its saved position restarts the epoch, and the batches differ."""
    monkeypatch.setattr(data_common.ResumableDataLoader, "load_state_dict", lambda self, state: None)
    checkpoint = full_run[1].checkpoint_callback.dirpath + "/step=3.ckpt"
    resumed = _fit(tmp_path, ckpt_path=checkpoint, seed=123)
    assert not all(torch.equal(b, full_run[2].batches[s]) for s, b in resumed[2].batches.items())
