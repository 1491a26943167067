"""Evaluation over the processes of a run: uneven all-gather of features (torchmetrics), compute on rank 0, broadcast.

The caller says which processes there are by passing a ``launcher``: None for one process, else the object that
started them (see :class:`Launcher`; a Lightning Fabric as is). The rank is found there, once, never here: this module
does not ask torch.distributed or the environment which process it runs in.

Everything keeps rank order (rank 0's rows first), so a gathered feature matrix is the same on every run and equals the
concatenation a single process would build from the same shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torchmetrics.utilities.distributed import gather_all_tensors

from diffusion_pl.errors import OtherRankError


class Launcher(Protocol):
    """The processes of a run as the evaluation layer needs them. A Lightning Fabric (diffusion_pl.commands.launcher)
    is one; in a Trainer, ``SimpleNamespace(global_rank=trainer.global_rank, world_size=trainer.world_size,
    device=pl_module.device, broadcast=trainer.strategy.broadcast)``."""

    global_rank: int
    world_size: int
    device: torch.device  # where this process's collectives run (cuda for nccl, cpu for gloo)

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...


def is_many(launcher: Launcher | None) -> bool:
    """True when ``launcher`` runs more than one process."""
    return launcher is not None and launcher.world_size > 1


def rank_of(launcher: Launcher | None) -> int:
    return launcher.global_rank if launcher is not None else 0


def all_gather_uneven(tensor: torch.Tensor, launcher: Launcher | None) -> torch.Tensor:
    """Concatenate `tensor` from all processes of ``launcher`` along dim 0, in rank order; processes may hold
    different numbers of rows.

    torchmetrics' ``gather_all_tensors`` (pads to the largest shape, all-gathers, trims), then a check that the shapes
    beyond dim 0 agree (a rank may hold 0 rows, e.g. shape [0, 2048]); every rank raises the same ValueError when
    they do not. Returns the result on the input's device. Identity for one process.
    """
    if not is_many(launcher):
        return tensor
    if tensor.ndim == 0:
        raise ValueError("all_gather_uneven expects a tensor with at least one dimension, got a scalar")
    parts = gather_all_tensors(tensor.detach().to(launcher.device))
    if len({tuple(p.shape[1:]) for p in parts}) != 1:
        per_rank = {r: tuple(p.shape) for r, p in enumerate(parts)}
        raise ValueError(f"all_gather_uneven: shapes disagree beyond dim 0 across ranks: {per_rank}")
    return torch.cat(parts, dim=0).to(tensor.device)


def compute_on_rank_zero_and_broadcast(fn: Callable[[], dict[str, float]],
                                       launcher: Launcher | None) -> dict[str, float]:  # fmt: skip
    """Run `fn()` on rank 0 only and give its dict of floats to every process of ``launcher``.

    If `fn` raises on rank 0, the error is broadcast too: rank 0 re-raises it and every other rank raises an
    OtherRankError (a RuntimeError) quoting it, instead of waiting forever in the broadcast.
    """
    if not is_many(launcher):
        return fn()
    payload: Any = None
    error: BaseException | None = None
    if launcher.global_rank == 0:
        try:
            payload = ("ok", {k: float(v) for k, v in fn().items()})
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            error = e
            payload = ("error", f"{type(e).__name__}: {e}")
    status, value = launcher.broadcast(payload, src=0)
    if error is not None:
        raise error
    if status == "error":
        raise OtherRankError(f"evaluation failed on rank 0: {value}")
    return value
