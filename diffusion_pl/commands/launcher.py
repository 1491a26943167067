"""The one launcher of the commands that spread work over processes: a Lightning Fabric object, kept and passed around
(``fabric.global_rank``, ``fabric.world_size``, ``fabric.barrier()``, ``fabric.all_reduce``, ``fabric.device``)."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from diffusion_pl.commands.options import Launch
from diffusion_pl.errors import UserInputError


def check_launch(launch: Launch) -> None:
    """--devices (processes per node) and --num_nodes are positive (checked before anything is launched)."""
    for option, value in (("--devices", launch.devices), ("--num_nodes", launch.num_nodes)):
        if value < 1:
            raise UserInputError(f"{option} must be >= 1, got {value}")


def start(launch: Launch):
    """A launched Fabric: DDP over ``devices`` processes on each of ``num_nodes`` nodes when there is more than one
    process in all (under SLURM / torchrun Fabric joins the processes the launcher started), else this process alone.
    Lightning's start-up banners are silenced: the commands print what the user needs themselves."""
    from lightning.fabric import Fabric

    check_launch(launch)
    many = launch.devices * launch.num_nodes > 1
    with _quiet_lightning():
        fabric = Fabric(accelerator=launch.accelerator, devices=launch.devices, num_nodes=launch.num_nodes,
                        strategy="ddp" if many else "auto")  # fmt: skip
        fabric.launch()
    return fabric


@contextmanager
def _quiet_lightning():
    """Lightning's loggers at WARNING while Fabric starts (rank_zero_info logs to the last one imported), restored
    afterwards: a notebook or test that goes on to train keeps Lightning's own messages."""
    loggers = [logging.getLogger(name) for name in ("lightning.fabric", "lightning.pytorch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
