"""Run by test_data_image_folder.py: a tiny DDP fit on 2 CPU processes (gloo) on an image folder; every call of
prepare_data and setup is recorded in a file per process."""

import os
import sys

import lightning as L
import torch

from diffusion_pl.data import ImageFolderDataModule
from diffusion_pl.lightning import DiffusionModule


class RecordingFolder(ImageFolderDataModule):
    def prepare_data(self) -> None:
        with open(os.path.join(sys.argv[2], f"prepare_{os.getpid()}"), "w") as f:
            f.write(str(self.trainer.global_rank))
        super().prepare_data()

    def setup(self, stage=None) -> None:
        super().setup(stage)
        with open(os.path.join(sys.argv[2], f"setup_{self.trainer.global_rank}"), "w") as f:
            f.write(f"{len(self.train_dataset)} {self.train_dataset.images.filename}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    L.seed_everything(0)
    data = RecordingFolder(data_dir=sys.argv[1], image_size=8, batch_size=2, num_workers=0, val_fraction=0.2)
    model = DiffusionModule(
        image_size=8,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(4,),
        num_head_channels=32,
        class_cond=True,
        num_classes=2,
        diffusion_steps=10,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=sys.argv[2],
    )
    trainer.fit(model, data)
