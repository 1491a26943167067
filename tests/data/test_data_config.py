"""The DataModules are configurable from YAML (jsonargparse) and run under a Trainer."""

import re

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from diffusion_pl.data import CIFAR10DataModule, ImageFolderDataModule, ImageNet64DataModule, MNIST5kDataModule

LOADER = {"num_workers": 4, "random_flip": True, "prepare_data_per_node": True}
# Every option of each DataModule with its default, the loader options it passes on to the base (**kwargs) included.
OPTIONS = {
    MNIST5kDataModule: dict(batch_size=128, num_workers=0, val_size=500, seed=0, random_flip=False, data_path=None),
    CIFAR10DataModule: dict(data_dir="data/cifar10", batch_size=128, download=False, **LOADER),
    ImageNet64DataModule: dict(data_dir="data/imagenet64", source="npz", cache_dir=None, image_size=64,
                               class_cond=True, label_order="sorted_wnid", batch_size=64, **LOADER),
    ImageFolderDataModule: dict(data_dir="data/images", image_size=64, channels=3, class_cond=True, val_fraction=0.05,
                                split_seed=0, random_crop=False, allow_upscale=False, skip_bad_images=False,
                                cache_dir=None, batch_size=64, **LOADER),
}  # fmt: skip


@pytest.mark.parametrize("cls", OPTIONS)
def test_every_option_is_in_the_config_with_its_type_and_default(cls):
    """jsonargparse reads the options from the constructors, following **kwargs into the base's signature."""
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    assert parser.get_defaults().data.as_dict() == OPTIONS[cls]
    help_text = parser.format_help()
    for name in OPTIONS[cls]:
        typed = re.search(rf"\n  --data\.{name}\b[^(]*\(type: ([^)]+?), default:", help_text)
        assert typed and typed.group(1) != "Any", name
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.num_workers=two"])


@pytest.mark.parametrize("cls", [MNIST5kDataModule, CIFAR10DataModule, ImageNet64DataModule])
def test_constructor_is_the_config(cls):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(["--data.batch_size=3", "--data.random_flip=false"])
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, cls) and dm.batch_size == 3 and dm.random_flip is False
    # The hyperparameters Lightning saves (in checkpoints; validate / test take them back as the data's config) are
    # the config, the options passed on to the base included.
    assert dict(dm.hparams) == cfg.data.as_dict()


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
