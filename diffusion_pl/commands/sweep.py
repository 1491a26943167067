"""`diffusion-pl sweep`: sample at several guidance scales, evaluate each, write a table and a plot.

    diffusion-pl sweep --ckpt last.ckpt --classifier_ckpt clf.ckpt --classifier_scales [0,0.5,1,2,4] \\
        --num_samples 5000 --steps 250 --reference real/ --out_dir sweeps/run1 --wandb true
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Literal

from diffusion_pl.commands.common import (
    check_devices,
    check_out_dir,
    engine_options,
    load_classifier,
    load_model,
    write_json,
)
from diffusion_pl.commands.evaluate import ALL, Metric, check_evaluation_inputs, launch, rank_world, sample_metrics
from diffusion_pl.commands.sample import run_sampling_in_process, sampling_settings
from diffusion_pl.errors import UserInputError
from diffusion_pl.evaluation import check_enough_images
from diffusion_pl.evaluation.npz import atomic_write
from diffusion_pl.sampling import check_guidance

PLOTTED = (("fid", "FID"), ("isc_mean", "IS"), ("precision", "precision"), ("recall", "recall"))


def write_table(out_dir: str, rows: list[dict[str, Any]]) -> dict[str, str]:
    """sweep.csv and sweep.json (one row per scale)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write(os.path.join(out_dir, "sweep.csv"), lambda f: f.write(buffer.getvalue().encode()))
    json_path = write_json(os.path.join(out_dir, "sweep.json"), rows)
    return {"csv": csv_path, "json": json_path}


def plot_sweep(path: str, rows: list[dict[str, Any]]) -> str:
    """PNG with one panel per metric (FID, IS, precision, recall) against the scale; one line per guidance kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in PLOTTED if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for kind in dict.fromkeys(r["guidance"] for r in rows):
            pts = sorted((r["scale"], r[key]) for r in rows if r["guidance"] == kind and key in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax.set_xlabel("guidance scale")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def sweep(
    ckpt: str | None = None,
    openai_ckpt: str | None = None,
    arch: str | None = None,
    diffusion_steps: int = 1000,
    noise_schedule: Literal["linear", "cosine"] = "cosine",
    var_type: Literal["auto", "fixed_small", "fixed_large", "learned", "learned_range"] = "auto",
    rescale_timesteps: bool = False,
    classifier_ckpt: str | None = None,
    classifier_openai_ckpt: str | None = None,
    classifier_arch: str | None = None,
    classifier_scales: list[float] | None = None,
    cfg_scales: list[float] | None = None,
    out_dir: str = "sweep",
    num_samples: int = 1000,
    batch_size: int = 16,
    steps: str = "250",
    method: Literal["ddpm", "ddim"] = "ddpm",
    eta: float = 0.0,
    clip_denoised: bool = True,
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
    inception_batch_size: int = 64,
    cache_dir: str | None = None,
    wandb: bool = False,
    wandb_project: str = "diffusion-pl",
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Sample at each classifier scale and/or CFG scale (same seeds, so only the scale differs), evaluate each against
    one reference, and write OUT_DIR/sweep.csv, sweep.json, sweep.png; samples go to OUT_DIR/<kind>_<scale>/.
    An interrupted sweep resumes: finished scales keep their samples (rerun without --overwrite).

    :param ckpt: diffusion-pl checkpoint
    :param openai_ckpt: released OpenAI checkpoint (with --arch)
    :param arch: released preset or YAML of UNetModel arguments
    :param diffusion_steps: T of the OpenAI model
    :param noise_schedule: beta schedule of the OpenAI model
    :param var_type: variance of the OpenAI model (auto = from learn_sigma)
    :param rescale_timesteps: the OpenAI model takes t * 1000 / T
    :param classifier_ckpt: NoisyClassifierModule checkpoint (for --classifier_scales)
    :param classifier_openai_ckpt: released OpenAI classifier (with --classifier_arch)
    :param classifier_arch: released classifier preset or YAML of EncoderUNetModel arguments
    :param classifier_scales: classifier guidance scales to sweep, e.g. [0, 0.5, 1, 2]
    :param cfg_scales: classifier-free guidance scales to sweep (model with a null class)
    :param out_dir: output directory
    :param num_samples: samples per scale
    :param batch_size: sampling batch size
    :param steps: sampling steps (250, ddim50, ...)
    :param method: ddpm or ddim
    :param eta: DDIM eta
    :param clip_denoised: clamp predicted x_0
    :param label_mode: random or balanced labels
    :param seed: seed (the same for every scale)
    :param precision: fp32 or bf16 sampling
    :param reference: image folder, ADM reference npz or reference cache npz
    :param data_class: LightningDataModule class whose split is the reference
    :param data_args: its constructor arguments
    :param split: val or train
    :param inception_weights: local Inception weights file
    :param metrics: subset of fid, isc, prc, kid
    :param kid_subset_size: KID subset size
    :param isc_splits: Inception Score splits
    :param inception_batch_size: Inception batch size
    :param cache_dir: reference feature cache directory
    :param wandb: log the table and the plot to W&B (the active run, else a new one in --wandb_project)
    :param wandb_project: W&B project of a new run
    :param accelerator: cpu, gpu or auto
    :param devices: processes per node (DDP when devices x num_nodes > 1)
    :param num_nodes: nodes (multi-node DDP, e.g. under SLURM: srun ... --devices 8 --num_nodes 4)
    :param overwrite: regenerate samples and replace outputs
    """
    plan = [("classifier", float(s)) for s in (classifier_scales or [])]
    plan += [("cfg", float(s)) for s in (cfg_scales or [])]
    if not plan:
        raise UserInputError("nothing to sweep: give --classifier_scales and/or --cfg_scales")
    check_out_dir(out_dir)
    check_evaluation_inputs(reference, data_class, metrics, inception_weights)
    check_enough_images(metrics, num_samples, isc_splits=isc_splits)
    check_devices(devices, num_nodes)
    device = launch(accelerator, devices, num_nodes)
    rank, _ = rank_world()
    model = load_model(ckpt, openai_ckpt, arch, diffusion_steps, noise_schedule, var_type, rescale_timesteps)
    classifier = load_classifier(model, classifier_ckpt, classifier_openai_ckpt, classifier_arch)
    # Check every point before sampling anything: the guidance of each scale, then the shared options.
    for kind, scale in plan:
        check_guidance(model.class_cond, model.null_class, classifier is not None,
                       scale if kind == "classifier" else 0.0, scale if kind == "cfg" else 0.0)  # fmt: skip
    all_options = [
        engine_options(model, classifier, steps, method, eta, clip_denoised, scale if kind == "classifier" else 0.0,
                       scale if kind == "cfg" else 0.0, label_mode, seed, precision)
        for kind, scale in plan
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for (kind, scale), options in zip(plan, all_options, strict=True):
        sample_dir = os.path.join(out_dir, f"{kind}_{scale:g}")
        settings = sampling_settings(
            ckpt=ckpt, openai_ckpt=openai_ckpt, arch=arch, num_samples=num_samples, steps=steps, method=method,
            eta=eta, clip_denoised=clip_denoised, classifier_ckpt=classifier_ckpt,
            classifier_openai_ckpt=classifier_openai_ckpt, classifier_scale=options["classifier_scale"],
            cfg_scale=options["cfg_scale"], label_mode=label_mode, seed=seed, precision=precision,
            shard_size=4 * batch_size,
        )  # fmt: skip
        npz = os.path.join(sample_dir, "samples.npz")
        images_per_second = float("nan")
        if overwrite or not os.path.exists(npz):
            result = run_sampling_in_process(model, classifier, options, sample_dir, num_samples, batch_size,
                                             4 * batch_size, None, settings, overwrite, device)  # fmt: skip
            images_per_second = result.images_per_second
        values = sample_metrics(npz, reference, data_class, data_args, split, inception_weights, list(metrics),
                                kid_subset_size, isc_splits, inception_batch_size, cache_dir, device)  # fmt: skip
        row = {"guidance": kind, "scale": scale, **values, "images_per_second": images_per_second, "samples": npz}
        rows.append(row)
        if rank == 0:
            print(f"{kind} scale {scale:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        files = write_table(out_dir, rows)
        files["plot"] = plot_sweep(os.path.join(out_dir, "sweep.png"), rows)
        if wandb:
            log_to_wandb(rows, files["plot"], wandb_project)
        print("\ndiffusion-pl sweep:\n" + "\n".join(f"  {k:<5}{v}" for k, v in files.items()))
    return rows


def log_to_wandb(rows: list[dict[str, Any]], plot_path: str, project: str) -> None:
    """Log the sweep table, per-scale metrics and the plot to the active W&B run (or a new one)."""
    import wandb

    run = wandb.run or wandb.init(project=project, job_type="guidance-sweep")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    run.log({"sweep/table": table, "sweep/plot": wandb.Image(plot_path)})
    for row in rows:
        run.log({f"sweep/{row['guidance']}/{k}": v for k, v in row.items() if isinstance(v, float)})
