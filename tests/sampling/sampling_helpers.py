"""Tiny checkpoints for the sampling/evaluation command tests (8 px, 1 channel, 32-channel U-Nets, T = 10)."""

from __future__ import annotations

import lightning as L
import torch

from diffusion_pl.lightning import DiffusionModule, NoisyClassifierModule


def tiny_diffusion_kwargs(**overrides) -> dict:
    kwargs = dict(
        image_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(4,), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
        class_cond=True, num_classes=3, null_class=True, p_uncond=0.2, diffusion_steps=10,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def tiny_classifier_kwargs(**overrides) -> dict:
    kwargs = dict(
        image_size=8, in_channels=1, model_channels=32, out_channels=3, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(4,), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
        pool="attention", diffusion_steps=10,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def randomize_zero_init(module: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised output layers random weights, so outputs depend on inputs, labels and t."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def save_module_checkpoint(module: L.LightningModule, path: str) -> str:
    """A checkpoint that ``Module.load_from_checkpoint`` reads (state dict + hyperparameters)."""
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "pytorch-lightning_version": L.__version__},
        path,
    )  # fmt: skip
    return path


def make_diffusion_ckpt(path, seed: int = 0, **overrides) -> str:
    torch.manual_seed(seed)
    module = DiffusionModule(**tiny_diffusion_kwargs(**overrides))
    randomize_zero_init(module, seed)
    return save_module_checkpoint(module, str(path))


def make_classifier_ckpt(path, seed: int = 1, **overrides) -> str:
    torch.manual_seed(seed)
    module = NoisyClassifierModule(**tiny_classifier_kwargs(**overrides))
    randomize_zero_init(module, seed)
    return save_module_checkpoint(module, str(path))


class TinyDataModule(L.LightningDataModule):
    """Fixed smooth random 1x8x8 images in [-1, 1] with 3 classes (train 12, val 6), independent of the global RNG."""

    def __init__(self, n_train: int = 12, n_val: int = 6, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size, self.image_size, self.in_channels, self.num_classes = batch_size, 8, 1, 3
        g = torch.Generator().manual_seed(4321)
        n = n_train + n_val
        x = torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=8, mode="bilinear") * 2 - 1
        x = (((x + 1) * 127.5).round() / 127.5 - 1).clamp(-1, 1)  # 8-bit values, as real data
        y = torch.randint(0, 3, (n,), generator=g)
        self.train_set = torch.utils.data.TensorDataset(x[:n_train], y[:n_train])
        self.val_set = torch.utils.data.TensorDataset(x[n_train:], y[n_train:])

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size)


def run_command(command, **options):
    """Call a command function (sample / evaluate / sweep) with flat options named as on its command line."""
    from diffusion_pl.commands.parser import grouped

    return command(**grouped(command, options))
