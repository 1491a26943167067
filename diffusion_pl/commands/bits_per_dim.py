"""The bits/dim job of `diffusion-pl evaluate --nll`: Improved DDPM's negative log-likelihood bound with the FULL
T-step process on a DataModule split, the per-t terms, and two baselines; spread over the processes of a Fabric."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_pl.commands.common import LoadedModel
from diffusion_pl.commands.metrics import build_datamodule
from diffusion_pl.data.common import evaluation_dataloader
from diffusion_pl.evaluation import all_gather_uneven
from diffusion_pl.utils.files import atomic_write
from diffusion_pl.utils.images import to_uint8

PER_T = ("vb", "xstart_mse", "mse")  # calc_bpd_loop outputs with one column per t


def histogram_baseline_bpd(train_loader, eval_batches: list[torch.Tensor]) -> float:
    """Bits/dim of an independent per-pixel (and channel) 256-bin histogram model fit on the train split
    (add-one smoothing), evaluated on the given uint8 images."""
    counts = None
    n = 0
    for x, _ in train_loader:
        u = to_uint8(x).long()  # [N, C, H, W]
        one_hot = torch.zeros(*u.shape[1:], 256, dtype=torch.float64)
        one_hot.view(-1, 256).index_put_(
            (torch.arange(u[0].numel()).repeat(u.shape[0]), u.reshape(-1)), torch.ones(u.numel(), dtype=torch.float64),
            accumulate=True,
        )  # fmt: skip
        counts = one_hot if counts is None else counts + one_hot
        n += u.shape[0]
    log_p = torch.log2((counts + 1.0) / (n + 256.0))  # [C, H, W, 256]
    total, dims = 0.0, 0
    for u in eval_batches:
        u = u.long()
        gathered = torch.gather(log_p.unsqueeze(0).expand(u.shape[0], *log_p.shape), -1, u.unsqueeze(-1))
        total -= float(gathered.sum())
        dims += u.numel()
    return total / max(dims, 1)


def bound_terms(fabric, model: LoadedModel, loader, limit: int, clip_denoised: bool, seed: int):
    """calc_bpd_loop on batch i of ``loader`` (i < limit) on rank i mod world size, noise seeded from (seed, i).
    Returns this rank's rows {total_bpd, prior_bpd: [n]; vb, xstart_mse, mse: [n, T]} and every uint8 batch seen."""
    rank, world, T = fabric.global_rank, fabric.world_size, model.diffusion.num_timesteps
    net = model.net.to(fabric.device).eval()
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("total_bpd", "prior_bpd", *PER_T)}
    used: list[torch.Tensor] = []
    bar = tqdm(total=limit * T, unit="step", desc="bits/dim", disable=rank != 0)
    for i, (x, y) in enumerate(loader):
        if i >= limit:
            break
        used.append(to_uint8(x))
        if i % world != rank:
            continue
        x, y = x.to(fabric.device), y.to(fabric.device)
        generator = torch.Generator(device=fabric.device).manual_seed(seed * 1_000_003 + i)
        kwargs = {"y": y} if model.class_cond else None
        with torch.inference_mode():
            out = model.diffusion.calc_bpd_loop(net, x, clip_denoised=clip_denoised, model_kwargs=kwargs,
                                                generator=generator)  # fmt: skip
        for k in rows:
            rows[k].append(out[k].float().cpu())
        bar.update(T * (world if rank == 0 else 1))
    bar.close()
    local = {k: torch.cat(v) if v else torch.zeros((0, T) if k in PER_T else (0,)) for k, v in rows.items()}
    return local, used


def nll_bpd(fabric, model: LoadedModel, data_class: str, data_args: dict[str, Any] | None, split: str,
            nll_batches: int | None, clip_denoised: bool, seed: int) -> dict[str, Any]:  # fmt: skip
    """Bits/dim with the FULL process (calc_bpd_loop), batches shared round-robin over ranks, gathered to all."""
    datamodule = build_datamodule(data_class, data_args)
    loader = evaluation_dataloader(datamodule, split)
    limit = len(loader) if nll_batches is None else min(nll_batches, len(loader))
    local, used = bound_terms(fabric, model, loader, limit, clip_denoised, seed)
    gathered = {k: all_gather_uneven(v, fabric) for k, v in local.items()}
    vb = gathered["vb"].double().mean(0)
    result = {
        "num_images": gathered["total_bpd"].shape[0],
        "total_bpd": float(gathered["total_bpd"].double().mean()),
        "prior_bpd": float(gathered["prior_bpd"].double().mean()),
        "vb_sum_bpd": float(vb.sum()),
        "per_t": {
            "t": list(range(model.diffusion.num_timesteps)),
            "vb_bpd": vb.tolist(),
            "xstart_mse": gathered["xstart_mse"].double().mean(0).tolist(),
            "eps_mse": gathered["mse"].double().mean(0).tolist(),
        },
        "baselines": {"uniform_8bit_bpd": 8.0},
    }
    if fabric.global_rank == 0:
        result["baselines"]["per_pixel_histogram_bpd"] = histogram_baseline_bpd(
            evaluation_dataloader(datamodule, "train"), used
        )
    return result


def write_nll_terms(out_dir: str, result: dict[str, Any], overwrite: bool) -> str:
    """OUT_DIR/nll_terms.csv: one row per t (vb_bpd, xstart_mse, eps_mse)."""
    per_t = result["per_t"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["t", "vb_bpd", "xstart_mse", "eps_mse"])
    for row in zip(per_t["t"], per_t["vb_bpd"], per_t["xstart_mse"], per_t["eps_mse"], strict=True):
        writer.writerow(row)
    return atomic_write(os.path.join(out_dir, "nll_terms.csv"), lambda f: f.write(buffer.getvalue().encode()),
                        overwrite=overwrite)  # fmt: skip
