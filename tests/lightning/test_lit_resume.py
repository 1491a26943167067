"""A run interrupted after epoch k and resumed with ckpt_path ends bit for bit where the uninterrupted run ends.

Covered: weights, EMA weights, AdamW moments, the lr schedule (warm-up + annealing to max_steps), the
loss-second-moment history, and the randomness (shuffling, timesteps, noise, dropout, class dropout), which is
reseeded from (seed, epoch/step, rank) so it does not depend on the RNG state a resumed process starts with.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lit_helpers import TinyDataModule, tiny_diffusion_kwargs, trainer_kwargs

from diffusion_pl.lightning import DiffusionModule

STEPS_PER_EPOCH = 5
MAX_STEPS = 3 * STEPS_PER_EPOCH


class Interrupt(Exception):
    pass


class InterruptAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupt


class RawWeights(Callback):
    """The raw (non-EMA) weights after the last optimizer step (EMA copies its average in at the end of fit)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.state = copy.deepcopy(pl_module.state_dict())


def _run(tmp_path, name, extra_callbacks=(), ckpt_path=None, seed=0):
    L.seed_everything(seed)  # a resumed process may start from another seed: the checkpoint's seed wins
    model = DiffusionModule(**tiny_diffusion_kwargs(
        diffusion_steps=4, timestep_sampler="loss-second-moment", warmup_steps=3, anneal_lr=True, dropout=0.1,
        p_uncond=0.3,
    ))  # fmt: skip
    raw = RawWeights()
    callbacks = [
        EMAWeightAveraging(decay=0.9),
        raw,
        ModelCheckpoint(dirpath=str(tmp_path / name), save_last=True, every_n_epochs=1, save_on_train_epoch_end=True),
        *extra_callbacks,
    ]
    trainer = L.Trainer(**trainer_kwargs(
        tmp_path / name, max_steps=MAX_STEPS, enable_checkpointing=True, callbacks=callbacks, limit_val_batches=1,
        check_val_every_n_epoch=1,
    ))  # fmt: skip
    data = TinyDataModule(n_train=4 * STEPS_PER_EPOCH + 2, batch_size=4)  # 2 leftover examples: shuffling matters
    try:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    except Interrupt:
        pass
    return model, trainer, raw


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    full_model, full_trainer, full_raw = _run(tmp_path, "full")
    assert full_trainer.global_step == MAX_STEPS

    _, cut_trainer, _ = _run(tmp_path, "cut", extra_callbacks=[InterruptAtEpoch(2)])
    assert cut_trainer.global_step == 2 * STEPS_PER_EPOCH
    ckpt = tmp_path / "cut" / "last.ckpt"
    assert ckpt.is_file()

    resumed_model, resumed_trainer, resumed_raw = _run(tmp_path, "resumed", ckpt_path=str(ckpt), seed=123)
    assert resumed_trainer.global_step == MAX_STEPS

    # EMA weights (copied into the module at the end of fit) and the raw weights of the last step.
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for name, value in full_raw.state.items():
        torch.testing.assert_close(resumed_raw.state[name], value, rtol=0, atol=0, msg=name)
    # AdamW moments and the lr schedule.
    full_opt = full_trainer.optimizers[0].state_dict()
    resumed_opt = resumed_trainer.optimizers[0].state_dict()
    for index, state in full_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed_opt["state"][index][key], state[key], rtol=0, atol=0)
    assert resumed_opt["param_groups"][0]["lr"] == pytest.approx(full_opt["param_groups"][0]["lr"])
    # Importance-sampling history.
    assert full_model.timestep_sampler.warmed_up()
    torch.testing.assert_close(resumed_model.timestep_sampler.loss_history, full_model.timestep_sampler.loss_history)
    assert torch.equal(resumed_model.timestep_sampler.loss_counts, full_model.timestep_sampler.loss_counts)


def test_without_reseeding_the_resumed_run_differs(tmp_path, monkeypatch):
    """Negative control: the equality above is not trivial, it comes from the per-epoch/per-step reseeding."""
    import diffusion_pl.lightning.diffusion_module as dm

    monkeypatch.setattr(dm, "reseed_for_step", lambda *args: None)
    monkeypatch.setattr(dm, "reseed_for_epoch", lambda *args: None)
    full_model, _, _ = _run(tmp_path, "full")
    _run(tmp_path, "cut", extra_callbacks=[InterruptAtEpoch(2)])
    resumed_model, _, _ = _run(tmp_path, "resumed", ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    diffs = [
        (resumed_model.state_dict()[k] - v).abs().max().item()
        for k, v in full_model.state_dict().items()
        if v.is_floating_point()
    ]
    assert max(diffs) > 1e-4
