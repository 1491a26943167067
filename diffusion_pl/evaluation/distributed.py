"""torch.distributed helpers for evaluation: uneven all-gather, compute on rank 0, broadcast the result.

Everything keeps rank order (rank 0's rows first), so a gathered feature matrix is the same on every run and equals the
concatenation a single process would build from the same shards. Every function is the identity / a plain call when
torch.distributed is not available or not initialised, so the same code runs in a single process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from diffusion_pl.errors import OtherRankError

_MAX_NDIM = 8


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

    Gathers every rank's shape first, pads each tensor to the largest row count, all-gathers, then trims the padding.
    The trailing shape and dtype must agree across ranks (a rank may hold 0 rows, e.g. shape [0, 2048]).
    Returns the result on the input's device. Identity when torch.distributed is not initialised.
    """
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    if tensor.ndim == 0 or tensor.ndim > _MAX_NDIM:
        raise ValueError(
            f"all_gather_uneven expects a tensor with 1..{_MAX_NDIM} dims, got shape {tuple(tensor.shape)}"
        )
    out_device = tensor.device
    device = _comm_device()
    local = tensor.detach().to(device).contiguous()

    # [ndim, dim0, dim1, ...] padded to a fixed length so ranks with different ndim fail with a message, not a hang.
    shape = torch.zeros(_MAX_NDIM + 1, dtype=torch.int64, device=device)
    shape[0] = local.ndim
    shape[1 : local.ndim + 1] = torch.tensor(local.shape, dtype=torch.int64)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_list = [s.tolist() for s in shapes]
    trailing = [tuple(s[2 : s[0] + 1]) for s in shapes_list]
    if any(s[0] != local.ndim for s in shapes_list) or len(set(trailing)) != 1:
        per_rank = {r: tuple(s[1 : s[0] + 1]) for r, s in enumerate(shapes_list)}
        raise ValueError(f"all_gather_uneven: shapes disagree beyond dim 0 across ranks: {per_rank}")
    sizes = [s[1] for s in shapes_list]
    max_rows = max(sizes)

    padded = local.new_zeros((max_rows, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)], dim=0)
    return out.to(out_device)


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
