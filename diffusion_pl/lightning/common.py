"""Pieces shared by the LightningModules: learning-rate schedule, per-step RNG, the network from the hyperparameters,
data/network checks, quartile logs."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping

import torch

from diffusion_pl.errors import UserInputError
from diffusion_pl.utils.seeds import derive_seed


def lr_factor(step: int, warmup_steps: int, anneal_steps: int | None) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    Linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps, then (if ``anneal_steps``) linear
    decay to 0 at ``anneal_steps`` as guided-diffusion's ``lr_anneal_steps`` (lr * (1 - step / anneal_steps)).
    """
    factor = 1.0
    if warmup_steps > 0:
        factor = min(1.0, (step + 1) / warmup_steps)
    if anneal_steps:
        factor *= max(0.0, 1.0 - step / anneal_steps)
    return factor


def base_seed() -> int:
    """The run's seed: PL_GLOBAL_SEED as set by seed_everything (LightningCLI's ``seed_everything``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


_EPOCH, _STEP = 1, 2


def reseed_for_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch's global RNG from (seed, epoch, rank) just before an epoch's dataloader iterator draws its shuffle."""
    torch.manual_seed(derive_seed(seed, _EPOCH, epoch, rank))


def reseed_for_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's global RNG from (seed, global step, rank) before a training step.

    Everything random in a step (timesteps, noise, class dropout, dropout masks) is then a function of the step index,
    so a run resumed from a checkpoint draws exactly what the uninterrupted run drew, whether or not the global RNG
    state was restored. Ranks get different streams.
    """
    torch.manual_seed(derive_seed(seed, _STEP, step, rank))


def network_from_hparams(cls: type[torch.nn.Module], hparams: Mapping, **overrides) -> torch.nn.Module:
    """``cls(...)`` (UNetModel, EncoderUNetModel) with each constructor argument taken from the LightningModule's
    hyperparameter of the same name; ``overrides`` give the arguments the module derives (e.g. ``num_classes``)."""
    names = inspect.signature(cls).parameters
    return cls(**{**{k: v for k, v in hparams.items() if k in names}, **overrides})


def check_data_matches(datamodule: object | None, expected: dict[str, tuple[int, str]], model_name: str) -> None:
    """Raise ValueError if the datamodule's image_size / in_channels / num_classes differ from the network's.

    ``expected`` maps a datamodule attribute to (the network's value, the config key that sets it).
    Attributes the datamodule does not expose are not checked.
    """
    if datamodule is None:
        return
    problems = []
    for attribute, (value, key) in expected.items():
        data_value = getattr(datamodule, attribute, None)
        if data_value is None or value is None:
            continue
        if int(data_value) != int(value):
            problems.append(
                f"  data.{attribute} = {data_value} ({type(datamodule).__name__}) but {model_name} has {key} = {value}:"
                f" set `model.init_args.{key}: {data_value}` (or use data with {attribute} = {value})"
            )
    if problems:
        raise UserInputError("the data does not fit the network:\n" + "\n".join(problems))


def quartile_means(values: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> dict[int, torch.Tensor]:
    """Mean of ``values`` per timestep quartile q = floor(4 t / T) (ADM's ``loss_q0`` .. ``loss_q3``); absent -> no
    key."""
    quartile = (4 * t.detach() // num_timesteps).clamp(max=3)
    out = {}
    for q in range(4):
        mask = quartile == q
        if bool(mask.any()):
            out[q] = values.detach()[mask].float().mean()
    return out


def make_all_gather(module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A callable concatenating a tensor from all ranks along dim 0 (rank order), or None on a single process.

    Built on LightningModule.all_gather (which stacks a new leading rank dimension) and used by
    LossSecondMomentSampler.update_with_local_losses, so every rank records every rank's losses.
    """
    if module.trainer.world_size <= 1:
        return None

    def all_gather(tensor: torch.Tensor) -> torch.Tensor:
        gathered = module.all_gather(tensor)  # [world, *tensor.shape]
        return gathered.reshape(-1, *tensor.shape[1:])

    return all_gather
