"""torch.distributed helpers for evaluation: uneven all-gather (torchmetrics), compute on rank 0, broadcast the result.

Everything keeps rank order (rank 0's rows first), so a gathered feature matrix is the same on every run and equals the
concatenation a single process would build from the same shards. Every function is the identity / a plain call when
torch.distributed is not available or not initialised, so the same code runs in a single process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors

from diffusion_pl.errors import OtherRankError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _comm_device() -> torch.device:
    """Device collectives must run on: cuda for nccl, cpu otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0, in rank order; ranks may hold different numbers of rows.

    torchmetrics' ``gather_all_tensors`` (pads to the largest shape, all-gathers, trims), then a check that the shapes
    beyond dim 0 agree (a rank may hold 0 rows, e.g. shape [0, 2048]); every rank raises the same ValueError when
    they do not. Returns the result on the input's device. Identity when torch.distributed is not initialised.
    """
    if not is_distributed():
        return tensor
    if tensor.ndim == 0:
        raise ValueError("all_gather_uneven expects a tensor with at least one dimension, got a scalar")
    parts = gather_all_tensors(tensor.detach().to(_comm_device()))
    if len({tuple(p.shape[1:]) for p in parts}) != 1:
        per_rank = {r: tuple(p.shape) for r, p in enumerate(parts)}
        raise ValueError(f"all_gather_uneven: shapes disagree beyond dim 0 across ranks: {per_rank}")
    return torch.cat(parts, dim=0).to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to all ranks (torch.distributed.broadcast_object_list)."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    device = _comm_device() if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def compute_on_rank_zero_and_broadcast(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run `fn()` on rank 0 only and give its dict of floats to every rank.

    If `fn` raises on rank 0, the error is broadcast too: rank 0 re-raises it and every other rank raises an
    OtherRankError (a RuntimeError) quoting it, instead of waiting forever in the broadcast.
    """
    if not is_distributed():
        return fn()
    payload: Any = None
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload = ("ok", {k: float(v) for k, v in fn().items()})
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            error = e
            payload = ("error", f"{type(e).__name__}: {e}")
    status, value = broadcast_object(payload, src=0)
    if error is not None:
        raise error
    if status == "error":
        raise OtherRankError(f"evaluation failed on rank 0: {value}")
    return value
