"""`diffusion-pl evaluate`: FID / IS / precision / recall / KID of samples against a reference, or bits/dim (--nll).

    diffusion-pl evaluate --samples out/samples.npz --reference VIRTUAL_imagenet64_labeled.npz
    diffusion-pl evaluate --samples out/samples.npz --data_class MNIST5kDataModule --split val \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth
    diffusion-pl evaluate --ckpt last.ckpt --num_samples 5000 --steps 250 --reference real_images/ --devices 2
    diffusion-pl evaluate --ckpt last.ckpt --nll --data_class MNIST5kDataModule --devices 2
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import os
import sys
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from diffusion_pl.commands.common import (
    LoadedModel,
    check_devices,
    check_file,
    check_out_dir,
    engine_options,
    load_classifier,
    load_model,
    write_json,
)
from diffusion_pl.data.common import EVALUATION_LOADER_VERSION, evaluation_dataloader
from diffusion_pl.errors import UserFileExistsError, UserFileNotFoundError, UserInputError
from diffusion_pl.evaluation import (
    all_gather_uneven,
    check_enough_images,
    evaluate_samples_distributed,
    load_samples_npz,
    reference_features,
)
from diffusion_pl.evaluation.features import (
    InceptionFeatures,
    InceptionWeightsUnavailableError,
    missing_weights_message,
)
from diffusion_pl.evaluation.npz import atomic_write, check_samples_npz
from diffusion_pl.evaluation.reference import load_reference, read_cache, resolution_mismatch
from diffusion_pl.utils.images import nhwc_to_nchw, to_uint8

Metric = Literal["fid", "isc", "prc", "kid"]
ALL: list[Metric] = ["fid", "isc", "prc", "kid"]


# ------------------------------------------------------------------------------------------------ launching
def launch(accelerator: str, devices: int, num_nodes: int = 1):
    """Start ``devices`` processes per node on ``num_nodes`` nodes (Lightning Fabric, DDP) when there is more than one
    process in all (under SLURM / torchrun Fabric joins the processes the launcher started); returns the torch.device
    of this rank."""
    check_devices(devices, num_nodes)
    if devices * num_nodes > 1:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
        fabric.launch()
        return fabric.device
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------ data modules
def build_datamodule(data_class: str, data_args: dict[str, Any] | None):
    """Instantiate a LightningDataModule from a class path (short names resolve in diffusion_pl.data) and set it up."""
    if "." in data_class:
        module_name, _, name = data_class.rpartition(".")
    else:
        module_name, name = "diffusion_pl.data", data_class
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise UserInputError(
            f"--data_class {data_class!r}: cannot import it ({e}); use a class of diffusion_pl.data "
            "(MNIST5kDataModule, CIFAR10DataModule, ImageNet64DataModule) or a full module.ClassName"
        ) from None
    try:
        datamodule = cls(**(data_args or {}))
    except TypeError as e:
        raise UserInputError(f"--data_args {data_args} do not fit {name}: {e}") from e
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def _uint8_batches(loader):
    for x, _ in loader:
        yield to_uint8(x)


def datamodule_reference(data_class, data_args, split, extractor, cache_dir):
    """Reference features of ALL images of a DataModule split as stored (in order, never flipped, the last partial
    batch included: :func:`evaluation_dataloader`), cached by source."""
    datamodule = build_datamodule(data_class, data_args)
    loader = evaluation_dataloader(datamodule, split)
    source_id = f"{data_class}:{json.dumps(data_args or {}, sort_keys=True)}:{split}:{EVALUATION_LOADER_VERSION}"
    return reference_features(
        _uint8_batches(loader), feature_extractor=extractor, source_id=source_id,
        num_images=len(loader.dataset), cache_dir=cache_dir,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ metrics
def check_evaluation_inputs(reference: str | None, data_class: str | None, metrics, inception_weights: str | None):
    """The reference and Inception weights options, checked before any sampling or feature extraction."""
    if any(m != "isc" for m in metrics) and (reference is None) == (data_class is None):
        raise UserInputError(
            "give exactly one reference: --reference (a folder of images, an ADM reference npz or a diffusion-pl "
            "reference cache) or --data_class (+ --data_args, --split); only --metrics [isc] needs none"
        )
    if reference is not None and not os.path.exists(reference):
        raise UserFileNotFoundError(
            f"--reference {reference}: no such file or directory (expected a folder of images, an ADM reference npz "
            "such as VIRTUAL_imagenet64_labeled.npz, or a reference cache npz written by diffusion-pl)"
        )
    if inception_weights is not None and not os.path.isfile(inception_weights):
        reason = f"no file at --inception_weights {inception_weights}"
        raise InceptionWeightsUnavailableError(missing_weights_message(reason))


def sample_metrics(
    samples_path: str,
    reference: str | None,
    data_class: str | None,
    data_args: dict[str, Any] | None,
    split: str,
    inception_weights: str | None,
    metrics: list[str],
    kid_subset_size: int,
    isc_splits: int,
    batch_size: int,
    cache_dir: str | None,
    device,
) -> dict[str, float]:
    """Metrics of an ADM npz; every rank extracts features of its contiguous slice, features are gathered, rank 0
    computes (reference: cache / ADM npz / image folder, or a DataModule split), every rank returns the same dict."""
    rank, world = rank_world()
    images, _ = load_samples_npz(samples_path)
    mine = np.array_split(np.arange(images.shape[0]), world)[rank]
    extractor = InceptionFeatures(inception_weights, device=device, batch_size=batch_size, progress=rank == 0)
    ref = None
    needs_ref = any(m != "isc" for m in metrics)
    if needs_ref and rank == 0:
        check_evaluation_inputs(reference, data_class, metrics, None)
        if reference is not None:
            if os.path.isfile(reference) and read_cache(reference) is not None:
                ref = load_reference(reference)
            else:
                ref = reference_features(reference, feature_extractor=extractor, cache_dir=cache_dir)
        else:
            ref = datamodule_reference(data_class, data_args, split, extractor, cache_dir)
        _, h, w, c = images.shape
        mismatch = resolution_mismatch((c, h, w), ref)
        if mismatch:
            print(f"diffusion-pl: warning: {mismatch}", file=sys.stderr)
    return evaluate_samples_distributed(
        nhwc_to_nchw(images[mine]), ref, feature_extractor=extractor, metrics=metrics,
        kid_subset_size=kid_subset_size, isc_splits=isc_splits, progress=rank == 0,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ bits/dim
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


def nll_bpd(
    model: LoadedModel,
    data_class: str,
    data_args: dict[str, Any] | None,
    split: str,
    nll_batches: int | None,
    clip_denoised: bool,
    seed: int,
    device,
) -> dict[str, Any]:
    """Bits/dim with the FULL process (calc_bpd_loop), val batches shared round-robin over ranks, gathered to all."""
    rank, world = rank_world()
    datamodule = build_datamodule(data_class, data_args)
    loader = evaluation_dataloader(datamodule, split)
    net = model.net.to(device).eval()
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")}
    used: list[torch.Tensor] = []
    from tqdm.auto import tqdm

    limit = len(loader) if nll_batches is None else min(nll_batches, len(loader))
    bar = tqdm(total=limit * model.diffusion.num_timesteps, unit="step", desc="bits/dim", disable=rank != 0)
    for i, (x, y) in enumerate(loader):
        if i >= limit:
            break
        used.append(to_uint8(x))
        if i % world != rank:
            continue
        x, y = x.to(device), y.to(device)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        kwargs = {"y": y} if model.class_cond else None
        with torch.inference_mode():
            out = model.diffusion.calc_bpd_loop(net, x, clip_denoised=clip_denoised, model_kwargs=kwargs,
                                                generator=generator)  # fmt: skip
        for k in rows:
            rows[k].append(out[k].float().cpu())
        bar.update(model.diffusion.num_timesteps * (world if rank == 0 else 1))
    bar.close()
    T = model.diffusion.num_timesteps
    local = {
        k: torch.cat(v) if v else torch.zeros((0, T) if k in ("vb", "xstart_mse", "mse") else (0,))
        for k, v in rows.items()
    }
    gathered = {k: all_gather_uneven(v) for k, v in local.items()}
    n = gathered["total_bpd"].shape[0]
    vb = gathered["vb"].double().mean(0)
    result = {
        "num_images": n,
        "total_bpd": float(gathered["total_bpd"].double().mean()),
        "prior_bpd": float(gathered["prior_bpd"].double().mean()),
        "vb_sum_bpd": float(vb.sum()),
        "per_t": {
            "t": list(range(T)),
            "vb_bpd": vb.tolist(),
            "xstart_mse": gathered["xstart_mse"].double().mean(0).tolist(),
            "eps_mse": gathered["mse"].double().mean(0).tolist(),
        },
        "baselines": {"uniform_8bit_bpd": 8.0},
    }
    if rank == 0:
        result["baselines"]["per_pixel_histogram_bpd"] = histogram_baseline_bpd(
            evaluation_dataloader(datamodule, "train"), used
        )
    return result


def write_nll_outputs(out_dir: str, result: dict[str, Any], overwrite: bool) -> dict[str, str]:
    per_t = result["per_t"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["t", "vb_bpd", "xstart_mse", "eps_mse"])
    for row in zip(per_t["t"], per_t["vb_bpd"], per_t["xstart_mse"], per_t["eps_mse"], strict=True):
        writer.writerow(row)
    csv_path = atomic_write(os.path.join(out_dir, "nll_terms.csv"), lambda f: f.write(buffer.getvalue().encode()),
                            overwrite=overwrite)  # fmt: skip
    return {"nll_terms": csv_path}


# ------------------------------------------------------------------------------------------------ command
def evaluate(
    samples: str | None = None,
    ckpt: str | None = None,
    openai_ckpt: str | None = None,
    arch: str | None = None,
    diffusion_steps: int = 1000,
    noise_schedule: Literal["linear", "cosine"] = "cosine",
    var_type: Literal["auto", "fixed_small", "fixed_large", "learned", "learned_range"] = "auto",
    rescale_timesteps: bool = False,
    out_dir: str = "evaluation",
    num_samples: int = 1000,
    sample_batch_size: int = 16,
    steps: str = "250",
    method: Literal["ddpm", "ddim"] = "ddpm",
    eta: float = 0.0,
    clip_denoised: bool = True,
    classifier_ckpt: str | None = None,
    classifier_openai_ckpt: str | None = None,
    classifier_arch: str | None = None,
    classifier_scale: float = 0.0,
    cfg_scale: float = 0.0,
    label_mode: Literal["random", "balanced"] = "random",
    seed: int = 0,
    precision: Literal["fp32", "bf16"] = "fp32",
    reference: str | None = None,
    data_class: str | None = None,
    data_args: dict[str, Any] | None = None,
    split: Literal["train", "val"] = "val",
    inception_weights: str | None = None,
    metrics: list[Metric] = ALL,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    batch_size: int = 64,
    cache_dir: str | None = None,
    nll: bool = False,
    nll_batches: int | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate samples (FID, IS, precision, recall, KID; ADM protocol, torch-fidelity Inception) or bits/dim (--nll).

    Samples: --samples (an ADM npz) or --ckpt/--openai_ckpt (num_samples fresh samples written to OUT_DIR/samples).
    Reference: --reference (image folder, ADM reference npz, or a diffusion-pl reference cache) or --data_class
    (+ --data_args, --split). Writes OUT_DIR/metrics.json (and nll.json + nll_terms.csv with --nll).

    :param samples: ADM sample npz to evaluate (arr_0 uint8 NHWC)
    :param ckpt: diffusion-pl checkpoint: generate samples to evaluate, or the model of --nll
    :param openai_ckpt: released OpenAI checkpoint (with --arch) instead of --ckpt
    :param arch: released preset name or YAML of UNetModel arguments (with --openai_ckpt)
    :param diffusion_steps: T of the OpenAI model
    :param noise_schedule: beta schedule of the OpenAI model
    :param var_type: variance of the OpenAI model (auto = learned_range if it learns sigma, else fixed_large)
    :param rescale_timesteps: the OpenAI model takes t * 1000 / T
    :param out_dir: where metrics.json (and generated samples) go
    :param num_samples: samples to generate with --ckpt
    :param sample_batch_size: sampling batch size with --ckpt
    :param steps: sampling steps (250, 10,10,20, ddim50, "" = all T)
    :param method: ddpm or ddim
    :param eta: DDIM eta
    :param clip_denoised: clamp predicted x_0 (sampling and --nll)
    :param classifier_ckpt: NoisyClassifierModule checkpoint for guided samples
    :param classifier_openai_ckpt: released OpenAI classifier (with --classifier_arch)
    :param classifier_arch: released classifier preset or YAML of EncoderUNetModel arguments
    :param classifier_scale: classifier guidance scale
    :param cfg_scale: classifier-free guidance scale
    :param label_mode: random or balanced labels
    :param seed: sampling seed (and noise seed of --nll)
    :param precision: fp32 or bf16 sampling
    :param reference: image folder, ADM reference npz or reference cache npz
    :param data_class: LightningDataModule class (e.g. MNIST5kDataModule) as reference or --nll data
    :param data_args: its constructor arguments (a dict)
    :param split: split of --data_class: val (validation) or train
    :param inception_weights: local Inception weights file (pt_inception-2015-12-05) for offline machines
    :param metrics: subset of fid, isc, prc, kid
    :param kid_subset_size: KID subset size (clipped to the set sizes)
    :param isc_splits: Inception Score splits
    :param batch_size: Inception batch size
    :param cache_dir: reference feature cache directory (default $DIFFUSION_PL_CACHE/reference)
    :param nll: compute bits/dim of the model on --data_class --split with the full process instead of sample metrics
    :param nll_batches: limit --nll to the first batches of the split (default: all)
    :param accelerator: cpu, gpu or auto
    :param devices: processes per node (DDP when devices x num_nodes > 1)
    :param num_nodes: nodes (multi-node DDP, e.g. under SLURM: srun ... --devices 8 --num_nodes 4)
    :param overwrite: replace existing output files
    """
    # Every input is checked before processes are launched, models loaded or anything written.
    check_out_dir(out_dir)
    out_json = os.path.join(out_dir, "nll.json" if nll else "metrics.json")
    if os.path.exists(out_json) and not overwrite:
        raise UserFileExistsError(
            f"{out_json} already exists; pass --overwrite to replace it, or choose another --out_dir"
        )
    if nll:
        if data_class is None:
            raise UserInputError("--nll needs --data_class (and --data_args) naming the data to evaluate")
    else:
        if samples is None and ckpt is None and openai_ckpt is None:
            raise UserInputError("give --samples (an ADM npz) or a model (--ckpt / --openai_ckpt) to generate them")
        if samples is not None and (ckpt is not None or openai_ckpt is not None):
            raise UserInputError("give --samples or a model to sample from (--ckpt / --openai_ckpt), not both")
        if samples is not None:
            check_file(samples, "--samples", "an ADM sample npz: arr_0 uint8 NHWC images")
            check_samples_npz(samples)
        check_evaluation_inputs(reference, data_class, metrics, inception_weights)
        if samples is None:  # enough samples for every metric (an npz is counted when it is read)
            check_enough_images(metrics, num_samples, isc_splits=isc_splits)
    check_devices(devices, num_nodes)
    device = launch(accelerator, devices, num_nodes)
    rank, _ = rank_world()
    if nll:
        model = load_model(ckpt, openai_ckpt, arch, diffusion_steps, noise_schedule, var_type, rescale_timesteps)
        result = nll_bpd(model, data_class, data_args, split, nll_batches, clip_denoised, seed, device)
        result.update(source=os.path.abspath(ckpt or openai_ckpt), data_class=data_class, data_args=data_args,
                      split=split, clip_denoised=clip_denoised)  # fmt: skip
        if rank == 0:
            result["files"] = write_nll_outputs(out_dir, result, overwrite)
            result["files"]["nll"] = out_json
            write_json(out_json, result)
            b = result["baselines"]
            print(f"\ndiffusion-pl evaluate --nll: {result['total_bpd']:.4f} bits/dim on {result['num_images']} images "
                  f"(prior {result['prior_bpd']:.5f}; baselines: uniform 8.0, per-pixel histogram "
                  f"{b['per_pixel_histogram_bpd']:.4f})\n  {out_json}\n  {result['files']['nll_terms']}")  # fmt: skip
        return result

    info: dict[str, Any] = {}
    if samples is None:
        from diffusion_pl.commands.sample import print_summary, run_sampling_in_process, sampling_settings

        model = load_model(ckpt, openai_ckpt, arch, diffusion_steps, noise_schedule, var_type, rescale_timesteps)
        classifier = load_classifier(model, classifier_ckpt, classifier_openai_ckpt, classifier_arch)
        options = engine_options(model, classifier, steps, method, eta, clip_denoised, classifier_scale, cfg_scale,
                                 label_mode, seed, precision)  # fmt: skip
        settings = sampling_settings(
            ckpt=ckpt, openai_ckpt=openai_ckpt, arch=arch, num_samples=num_samples, steps=steps, method=method,
            eta=eta, clip_denoised=clip_denoised, classifier_ckpt=classifier_ckpt,
            classifier_openai_ckpt=classifier_openai_ckpt, classifier_scale=classifier_scale, cfg_scale=cfg_scale,
            label_mode=label_mode, seed=seed, precision=precision, shard_size=4 * sample_batch_size,
        )  # fmt: skip
        sample_dir = os.path.join(out_dir, "samples")
        result = run_sampling_in_process(model, classifier, options, sample_dir, num_samples, sample_batch_size,
                                         4 * sample_batch_size, None, settings, overwrite, device)  # fmt: skip
        if rank == 0:
            print_summary(result, model.image_shape, "generated")
        samples = os.path.join(sample_dir, "samples.npz")
        info = {"sampling": settings, "images_per_second": result.images_per_second}
    values = sample_metrics(samples, reference, data_class, data_args, split, inception_weights, list(metrics),
                            kid_subset_size, isc_splits, batch_size, cache_dir, device)  # fmt: skip
    out = {"metrics": values, "samples": os.path.abspath(samples), "reference": reference, "data_class": data_class,
           "data_args": data_args, "split": split, "inception_weights": inception_weights, **info}  # fmt: skip
    if rank == 0:
        write_json(out_json, out)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if not math.isnan(v))
        print(f"\ndiffusion-pl evaluate: {shown}\n  {out_json}")
    return out
