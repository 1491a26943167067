"""diffusion_pl.data: LightningDataModules yielding (x, y), x float32 NCHW in [-1, 1], y int64 labels."""

from diffusion_pl.data.cifar10 import CIFAR10DataModule
from diffusion_pl.data.image_folder import ImageFolderDataModule
from diffusion_pl.data.imagenet64 import ImageNet64DataModule
from diffusion_pl.data.mnist import MNIST5kDataModule

__all__ = ["MNIST5kDataModule", "CIFAR10DataModule", "ImageNet64DataModule", "ImageFolderDataModule"]
