"""Helpers shared by the evaluation tests (imported as a plain module; tests/evaluation is on sys.path)."""

from __future__ import annotations

import numpy as np
import torch


def smooth_images(n: int, size: int = 32, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """uint8 NCHW images with some structure (low-frequency colour fields plus noise), deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x * 200 + 20 + shift + 25 * torch.rand(n, 3, size, size, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


class TinyFeatures:
    """A small deterministic feature network for fast metric/DDP tests: uint8 NCHW -> dict(pool [N, 8], logits [N, 10]).

    Per-image float64 computation, so features do not depend on how images are batched or sharded.
    """

    identity = "tiny-features-v1"

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w_pool = torch.randn(3 * 4 * 4, 8, generator=g, dtype=torch.float64)
        self.w_logits = torch.randn(8, 10, generator=g, dtype=torch.float64)
        self.calls = 0
        self.images_seen = 0

    def __call__(self, images):
        batches = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else list(images)
        pools, logits = [], []
        for b in batches:
            x = torch.as_tensor(b)
            assert x.dtype == torch.uint8
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            f = torch.nn.functional.adaptive_avg_pool2d(x.double() / 255.0, 4).flatten(1)
            p = torch.tanh(f @ self.w_pool)
            pools.append(p.float())
            logits.append((p @ self.w_logits).float())
            self.images_seen += x.shape[0]
        self.calls += 1
        return {"pool": torch.cat(pools), "logits": torch.cat(logits)}


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Data shared by the DDP worker and the single-process check in test_eval_distributed.py.
DDP_SHARDS = (7, 5)  # uneven generated images per rank
DDP_METRIC_OPTIONS = dict(metrics=("fid", "isc", "prc", "kid"), kid_subset_size=5, isc_splits=3)
INCEPTION_DDP_SHARDS = (3, 2)
# No FID here: eigvals of a 2048x2048 matrix costs 5-30 s on the shared CPUs; the FID gather path is covered by the
# tiny-feature run, FID on Inception features by test_eval_parity.py.
INCEPTION_DDP_OPTIONS = dict(metrics=("isc", "prc", "kid"), kid_subset_size=4, isc_splits=2)


def ddp_generated_images() -> torch.Tensor:
    return smooth_images(sum(DDP_SHARDS), size=16, seed=3, shift=10.0)


def ddp_reference_images() -> torch.Tensor:
    return smooth_images(12, size=16, seed=4)


def inception_ddp_generated_images() -> torch.Tensor:
    return smooth_images(sum(INCEPTION_DDP_SHARDS), size=16, seed=5, shift=10.0)


def _shard(x: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def start_fabric(rank: int, world_size: int, port: int):
    """A launched 2-process CPU Fabric (gloo) in a process started from outside, as torchrun would start it."""
    import os

    from lightning.fabric import Fabric

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    fabric = Fabric(accelerator="cpu", devices=world_size, strategy="ddp")
    fabric.launch()
    return fabric


def ddp_worker(rank: int, world_size: int, port: int, outdir: str, inception_weights: str | None, inception_ref: str):
    """Runs in each spawned process (a Fabric on gloo, CPU); saves what it observed to <outdir>/rank<r>.pt."""
    import os

    import torch.distributed as dist

    from diffusion_pl.evaluation import (
        InceptionFeatures,
        all_gather_uneven,
        compute_on_rank_zero_and_broadcast,
        evaluate_samples,
    )

    torch.set_num_threads(1)
    fabric = start_fabric(rank, world_size, port)
    out: dict = {}
    try:
        rows = DDP_SHARDS[rank]
        local = torch.arange(rows * 3, dtype=torch.float64).reshape(rows, 3) + 1000 * rank
        out["gather_float"] = all_gather_uneven(local, fabric)
        empty_on_rank0 = torch.full((0 if rank == 0 else 4, 2), rank, dtype=torch.int64)
        out["gather_int_empty"] = all_gather_uneven(empty_on_rank0, fabric)
        try:
            all_gather_uneven(torch.zeros(2, 3 + rank), fabric)
            out["mismatch_error"] = None
        except ValueError as e:
            out["mismatch_error"] = str(e)

        def failing():
            raise KeyError("reference has no pool")

        try:
            compute_on_rank_zero_and_broadcast(failing, fabric)
            out["rank0_error"] = None
        except Exception as e:  # noqa: BLE001 - recorded for the parent
            out["rank0_error"] = f"{type(e).__name__}: {e}"

        tiny = TinyFeatures()
        ref = TinyFeatures()(ddp_reference_images()) if rank == 0 else None  # only rank 0 needs the reference
        shard = _shard(ddp_generated_images(), DDP_SHARDS, rank)
        out["tiny_metrics"] = evaluate_samples(
            shard, ref, feature_extractor=tiny, launcher=fabric, **DDP_METRIC_OPTIONS
        )
        out["tiny_images_seen"] = tiny.images_seen

        if inception_weights is not None:
            inception = InceptionFeatures(inception_weights, device="cpu", batch_size=8, progress=False)
            ref = torch.load(inception_ref) if rank == 0 else None
            shard = _shard(inception_ddp_generated_images(), INCEPTION_DDP_SHARDS, rank)
            out["inception_metrics"] = evaluate_samples(
                shard, ref, feature_extractor=inception, launcher=fabric, **INCEPTION_DDP_OPTIONS
            )
    finally:
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()
