"""The DataModules are configurable from YAML (jsonargparse) and run under a Trainer."""

import inspect

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from diffusion_pl.data import CIFAR10DataModule, ImageNet64DataModule, MNIST5kDataModule

MODULES = [MNIST5kDataModule, CIFAR10DataModule, ImageNet64DataModule]


@pytest.mark.parametrize("cls", MODULES)
def test_constructor_is_the_config(cls):
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        assert p.kind is p.POSITIONAL_OR_KEYWORD, name
        assert p.annotation is not p.empty and p.default is not p.empty, name
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(["--data.batch_size=3"])
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, cls) and dm.batch_size == 3


def test_imagenet_source_is_validated(capsys):
    parser = ArgumentParser()
    parser.add_class_arguments(ImageNet64DataModule, "data")
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.source=jpeg"])
    assert "data.source" in capsys.readouterr().err


class _Tiny(L.LightningModule):
    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(channels))
        self.num_classes = num_classes

    def training_step(self, batch, batch_idx):
        x, y = batch
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and int(y.max()) < self.num_classes
        return (x.mean((0, 2, 3)) * self.w).sum() + (self.w**2).sum()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        assert x.ndim == 4 and -1 <= x.min() and x.max() <= 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_prepare_and_setup(tmp_path):
    from test_data_imagenet64 import _write_npz

    _write_npz(tmp_path, n_per_batch=2)
    dm = ImageNet64DataModule(data_dir=str(tmp_path), batch_size=4, num_workers=0)
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(_Tiny(dm.in_channels, dm.num_classes), datamodule=dm)
    assert (tmp_path / "prepared" / "npz64_train_manifest.json").exists()
