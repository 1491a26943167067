"""Reference statistics from a DataModule split use ALL its images as stored (in order, unflipped, the last partial
batch kept), in `diffusion-pl evaluate --split train` and in SampleQualityEvaluation(reference_split="train"), although
the training loader shuffles, flips and drops its last batch. Real data: MNIST-5k (4,500 training images, not a
multiple of the batch size), a recording feature extractor instead of Inception."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion_pl.commands.metrics import datamodule_reference
from diffusion_pl.data import MNIST5kDataModule
from diffusion_pl.data.common import evaluation_dataloader
from diffusion_pl.lightning.evaluation_callback import SampleQualityEvaluation

BATCH = 128  # 4500 = 35 x 128 + 20: the training loader drops 20 images


class RecordingExtractor:
    """Stands in for Inception: keeps the uint8 NCHW images it is given, features = the flattened pixels."""

    identity = "recording-extractor"

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def __call__(self, batches) -> dict[str, torch.Tensor]:
        for batch in batches:
            self.images.append(batch.clone())
        seen = torch.cat(self.images)
        return {"pool": seen.flatten(1).float()[:, :16], "logits": torch.zeros(seen.shape[0], 4)}

    def seen_nhwc(self) -> np.ndarray:
        return torch.cat(self.images).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def mnist():
    dm = MNIST5kDataModule(batch_size=BATCH, random_flip=True)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 4500 and len(dm.train_dataloader()) == 4500 // BATCH  # drop_last in training
    return dm


def check_all_unflipped(extractor: RecordingExtractor, dm) -> None:
    stored = np.asarray(dm.train_dataset.images)  # uint8 NHWC, as stored (the flip happens in __getitem__)
    seen = extractor.seen_nhwc()
    assert seen.shape == stored.shape  # every image, the last partial batch included
    np.testing.assert_array_equal(seen, stored)  # in order and never flipped


def test_evaluation_dataloader(mnist):
    loader = evaluation_dataloader(mnist, "train")
    assert len(loader.dataset) == 4500 and len(loader) == 36 and not loader.drop_last
    assert mnist.train_dataset.random_flip  # the training dataset itself is unchanged
    images = torch.cat([x for x, _ in loader])
    again = torch.cat([x for x, _ in evaluation_dataloader(mnist, "train")])
    assert torch.equal(images, again)  # deterministic
    assert len(evaluation_dataloader(mnist, "val", batch_size=7).dataset) == 500


def test_evaluate_split_train_uses_every_unflipped_image(tmp_path):
    extractor = RecordingExtractor()
    ref = datamodule_reference("MNIST5kDataModule", {"batch_size": BATCH, "random_flip": True}, "train", extractor,
                               str(tmp_path))  # fmt: skip
    assert ref["pool"].shape[0] == 4500
    dm = MNIST5kDataModule(batch_size=BATCH)
    dm.setup("fit")
    check_all_unflipped(extractor, dm)


def test_callback_train_reference_uses_every_unflipped_image(mnist, tmp_path):
    callback = SampleQualityEvaluation(reference_split="train", cache_dir=str(tmp_path))
    callback._inception = RecordingExtractor()
    ref = callback._reference(SimpleNamespace(datamodule=mnist))
    assert ref["pool"].shape[0] == 4500
    check_all_unflipped(callback._inception, mnist)


def test_flip_that_cannot_be_turned_off_is_refused():
    class FlippingDataModule:
        random_flip = True

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
            return torch.utils.data.DataLoader(data, batch_size=2)

    with pytest.raises(ValueError, match="random_flip false"):
        evaluation_dataloader(FlippingDataModule(), "train")
