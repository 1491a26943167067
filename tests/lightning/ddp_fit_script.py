"""Run by test_lit_ddp.py: a tiny DDP fit on 2 CPU processes (gloo); each rank saves its sampler history."""

import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

sys.path.insert(0, os.path.dirname(__file__))
from lit_helpers import TinyDataModule, tiny_diffusion_kwargs  # noqa: E402

from diffusion_pl.lightning import DiffusionModule, GuidedSampler, NonFiniteGuard  # noqa: E402

if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = DiffusionModule(**tiny_diffusion_kwargs(diffusion_steps=50, timestep_sampler="loss-second-moment"))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=8, default_root_dir=out, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1, val_check_interval=4, check_val_every_n_epoch=None,
        callbacks=[EMAWeightAveraging(decay=0.9), GuidedSampler(respacing="ddim2", samples_per_class=1),
                   NonFiniteGuard()],
    )  # fmt: skip
    trainer.fit(model, TinyDataModule(n_train=32, batch_size=3))
    sampler = model.timestep_sampler
    torch.save(
        {"history": sampler.loss_history, "counts": sampler.loss_counts, "world_size": trainer.world_size,
         "weights": {k: v.clone() for k, v in model.state_dict().items()}},
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )  # fmt: skip
