"""`diffusion-pl demo`: the quickstart end to end on MNIST-5k, by running the same commands a user would type.

    diffusion-pl demo --out_dir outputs/demo

1. fit configs/quickstart.yaml (class-conditional ADM-style U-Net, learned variances, L_hybrid, CFG class dropout, EMA)
2. fit configs/quickstart_classifier.yaml (the noisy classifier for classifier guidance)
3. sample a grid with a row per digit: conditional without guidance, classifier-guided (scale s), classifier-free (w)
4. evaluate bits/dim on held-out digits (full T), and FID / IS / precision / recall when Inception weights are found
5. score every sample set with a k-nearest-neighbour digit classifier on the training digits (independent of both
   networks) and write OUT_DIR/summary.json

Every step is a `diffusion-pl ...` command printed before it runs. A finished step is skipped when the demo is run again
(an interrupted fit resumes from its last.ckpt), so nothing already computed is lost or overwritten.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

from diffusion_pl.diffusion import SAMPLING_METHODS, GaussianDiffusion, check_schedule, create_diffusion
from diffusion_pl.diffusion.registry import schedule_nfe
from diffusion_pl.errors import UserFileNotFoundError, UserInputError
from diffusion_pl.utils.files import write_text

# The last mode repeats classifier-free guidance with a fast solver of the sampler registry (--fast_method,
# --fast_steps), next to ancestral sampling (--steps) in the summary.
SAMPLE_MODES = ("unguided", "classifier_guided", "classifier_free", "classifier_free_fast")
# torch-fidelity's file name of the TF-FID Inception weights (what it downloads on first use).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass
class Step:
    """One command of the demo; ``done`` is the file whose existence means it has finished."""

    name: str
    args: list[str]
    done: Path
    seconds: float = 0.0
    status: str = "pending"
    extra: dict = field(default_factory=dict)


def find_config_dir(config_dir: str | None) -> Path:
    """configs/ of the checkout this package runs from, or ``config_dir``."""
    path = Path(config_dir) if config_dir else Path(__file__).resolve().parents[2] / "configs"
    for name in ("quickstart.yaml", "quickstart_classifier.yaml"):
        if not (path / name).is_file():
            raise UserFileNotFoundError(
                f"demo: no {name} in {path}. Run the demo from a checkout of diffusion-pl (its configs/ folder), "
                "or pass --config_dir DIR holding quickstart.yaml and quickstart_classifier.yaml."
            )
    return path


def find_inception_weights(inception_weights: str | None) -> Path | None:
    """The given weights file, else torch-fidelity's download cache entry if it exists (no download is attempted)."""
    if inception_weights:
        path = Path(inception_weights)
        if not path.is_file():
            raise UserFileNotFoundError(f"demo: --inception_weights {path}: no such file")
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cache if cache.is_file() else None


def command_line(args: list[str]) -> str:
    return "diffusion-pl " + " ".join(shlex.quote(a) for a in args)


def run_step(step: Step, env: dict[str, str]) -> None:
    """Run ``diffusion-pl <args>`` in a child process (output streams to this terminal); raise if it fails."""
    print(f"\n==> [{step.name}] {command_line(step.args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "diffusion_pl.cli", *step.args], env=env)
    step.seconds = time.perf_counter() - start
    if result.returncode != 0:
        step.status = f"failed (exit {result.returncode})"
        raise UserInputError(
            f"demo step {step.name!r} failed (exit {result.returncode}); its message is above. Fix it and run the demo "
            "again: finished steps are kept and skipped."
        )
    step.status = "done"


def fit_step(name: str, config: Path, out_dir: Path, accelerator: str, max_steps: int | None,
             precision: str | None = None) -> Step:  # fmt: skip
    """`fit` logging to OUT_DIR/<name>/ (metrics.csv, config.yaml, checkpoints/last.ckpt); resumes from last.ckpt."""
    run_dir = out_dir / name
    args = [
        "fit", "--config", str(config),
        f"--trainer.accelerator={accelerator}",
        f"--trainer.logger.init_args.save_dir={out_dir}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=",
    ]  # fmt: skip
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    if precision is not None:
        args.append(f"--trainer.precision={precision}")
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        args.append(f"--ckpt_path={last}")  # an interrupted earlier demo run: continue it
    return Step(name=f"fit {name}", args=args, done=run_dir / "fit_done.json", extra={"checkpoint": str(last)})


def resolve_hardware(accelerator: str, precision: str) -> tuple[str, str, str | None]:
    """(accelerator, sampling precision, training precision override or None) for this machine.

    ``auto`` means a CUDA GPU when there is one, else the CPU (Apple's MPS is not supported, see
    :func:`diffusion_pl.utils.device.check_device_supported`). A CUDA GPU without bfloat16 (before Ampere) trains in
    16-mixed and samples in 32-true instead of the configs' bf16; ``precision="auto"`` samples in bf16-mixed otherwise.
    """
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    old_gpu = accelerator in ("gpu", "cuda") and torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
    if precision == "auto":
        precision = "32-true" if old_gpu else "bf16-mixed"
    return accelerator, precision, "16-mixed" if old_gpu else None


def knn_digit_accuracy(images_nhwc: np.ndarray, labels: np.ndarray, train_x: torch.Tensor, train_y: torch.Tensor,
                       k: int = 3) -> float:  # fmt: skip
    """Fraction of samples whose k nearest training digits (L2 on pixels in [-1, 1]) vote for the requested label;
    a tie between labels goes to the label of the nearest digit among the tied ones."""
    x = torch.from_numpy(images_nhwc).float().div(127.5).sub(1.0).flatten(1)
    nearest = torch.cdist(x, train_x).topk(k, largest=False, sorted=True).indices  # nearest first
    neighbour_labels = train_y[nearest]  # [N, k]
    counts = (neighbour_labels[:, :, None] == neighbour_labels[:, None, :]).sum(-1)  # votes for each neighbour's label
    first_top = (counts == counts.max(dim=1, keepdim=True).values).long().argmax(dim=1)  # nearest of the top-voted
    votes = neighbour_labels.gather(1, first_top[:, None])[:, 0]
    return float((votes == torch.from_numpy(labels).long()).float().mean())


def mnist_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k images (flattened, [-1, 1]) and labels of the DataModule's train or held-out split."""
    from diffusion_pl.data import MNIST5kDataModule

    datamodule = MNIST5kDataModule()
    datamodule.setup("fit")
    dataset = datamodule.train_dataset if split == "train" else datamodule.val_dataset
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs).flatten(1), torch.as_tensor(ys)


def check_demo_options(
    config: Path,
    max_steps: int | None,
    classifier_max_steps: int | None,
    steps: str,
    samples_per_class: int,
    nll_examples: int,
    fast_method: str = "dpmpp_2m_sde",
    fast_steps: str = "karras20",
) -> GaussianDiffusion:
    """The demo's own options, before any training (a bad --steps would otherwise fail after the training); returns
    the noise process of ``config``."""
    for name, value in (("--max_steps", max_steps), ("--classifier_max_steps", classifier_max_steps)):
        if value is not None and value < 1:
            raise UserInputError(f"demo: {name} must be >= 1, got {value}")
    for name, value in (("--samples_per_class", samples_per_class), ("--nll_examples", nll_examples)):
        if value < 1:
            raise UserInputError(f"demo: {name} must be >= 1, got {value}")
    with open(config) as f:
        init_args = (yaml.safe_load(f).get("model") or {}).get("init_args") or {}
    process = create_diffusion(diffusion_steps=int(init_args.get("diffusion_steps", 1000)))
    check_schedule(process, steps, option="--steps")
    check_schedule(process, fast_steps, fast_method, "--fast_steps")
    return process


def sampler_text(process: GaussianDiffusion, method: str, steps: str) -> str:
    """e.g. "dpmpp_2m karras20 (20 NFE)": a method, its --steps and its network evaluations per sample."""
    return f"{method} {steps} ({schedule_nfe(process, method, steps)} NFE)"


def sample_steps(out: Path, common: list[str], guidance: dict[str, list[str]], steps: str, fast_method: str,
                 fast_steps: str, process: GaussianDiffusion) -> list[Step]:  # fmt: skip
    """One `diffusion-pl sample` per mode: ancestral sampling with --steps, the fast mode with the solver."""
    result = []
    for mode in SAMPLE_MODES:
        fast = mode.endswith("_fast")
        method, mode_steps = (fast_method, fast_steps) if fast else ("ddpm", steps)
        folder = out / "samples" / mode
        result.append(Step(
            name=f"sample {mode}", done=folder / "samples.npz",
            extra={"sampler": sampler_text(process, method, mode_steps)},
            args=["sample", *common, "--method", method, "--steps", mode_steps,
                  *guidance[mode.removesuffix("_fast")], "--out_dir", str(folder)],
        ))  # fmt: skip
    return result


def evaluation_steps(out: Path, model_ckpt: str, accelerator: str, nll_examples: int,
                     weights: Path | None) -> list[Step]:  # fmt: skip
    """Bits/dim of the model on ``nll_examples`` held-out digits, then FID / IS / precision / recall of each sample
    set when Inception ``weights`` are found."""
    nll_step = Step(
        name="bits/dim",
        args=["evaluate", "--ckpt", model_ckpt, "--nll", "true", "--data_class", "MNIST5kDataModule",
              "--data_args", json.dumps({"batch_size": nll_examples}), "--nll_batches", "1",
              "--accelerator", accelerator, "--out_dir", str(out / "nll")],  # fmt: skip
        done=out / "nll" / "nll.json",
    )
    if weights is None:
        return [nll_step]
    fid_steps = [
        Step(name=f"FID {mode}",
             args=["evaluate", "--samples", str(out / "samples" / mode / "samples.npz"),
                   "--data_class", "MNIST5kDataModule", "--split", "val", "--inception_weights", str(weights),
                   "--metrics", '["fid", "isc", "prc"]', "--isc_splits", "1", "--accelerator", accelerator,
                   "--cache_dir", str(out / "inception_cache"), "--out_dir", str(out / "fid" / mode)],
             done=out / "fid" / mode / "metrics.json")
        for mode in SAMPLE_MODES
    ]  # fmt: skip
    return [nll_step, *fid_steps]


def demo(
    out_dir: str = "outputs/demo",
    config_dir: str | None = None,
    accelerator: str = "auto",
    max_steps: int | None = None,
    classifier_max_steps: int | None = None,
    steps: str = "100",
    samples_per_class: int = 8,
    classifier_scale: float = 20.0,
    cfg_scale: float = 3.0,
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto",
    nll_examples: int = 16,
    inception_weights: str | None = None,
    fast_method: Literal[SAMPLING_METHODS] = "dpmpp_2m_sde",  # type: ignore[valid-type]
    fast_steps: str = "karras20",
) -> dict:
    """Run the quickstart end to end on MNIST-5k and write everything under OUT_DIR.

    :param out_dir: output folder (logs, checkpoints, sample grids, metrics, summary.json); a rerun skips finished steps
    :param config_dir: folder with quickstart.yaml and quickstart_classifier.yaml (default: the checkout's configs/)
    :param accelerator: Lightning accelerator for every step (auto = a CUDA GPU when there is one, else the CPU)
    :param max_steps: training steps of the diffusion model (default: configs/quickstart.yaml)
    :param classifier_max_steps: training steps of the noisy classifier (default: configs/quickstart_classifier.yaml)
    :param steps: sampling steps (respacing of the T = 1000 process)
    :param samples_per_class: samples per digit (a row of the grid each)
    :param classifier_scale: classifier guidance scale s
    :param cfg_scale: classifier-free guidance scale w
    :param precision: sampling precision (32-true, bf16-mixed, 16-mixed, or auto = bf16-mixed unless the GPU lacks it)
    :param nll_examples: held-out digits for bits/dim (each costs T = 1000 network evaluations)
    :param inception_weights: Inception weights for FID / IS / precision / recall (default: torch-fidelity's cache)
    :param fast_method: the fast sampler shown next to ancestral sampling (classifier-free guidance; docs/SAMPLERS.md)
    :param fast_steps: its step schedule (karras20: 20 network evaluations with dpmpp_2m_sde)
    """
    started = time.perf_counter()
    configs = find_config_dir(config_dir)
    process = check_demo_options(configs / "quickstart.yaml", max_steps, classifier_max_steps, steps, samples_per_class,
                       nll_examples, fast_method, fast_steps)  # fmt: skip
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"demo: --out_dir {out} is a file; choose a folder")
    out.mkdir(parents=True, exist_ok=True)
    weights = find_inception_weights(inception_weights)
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    accelerator, precision, train_precision = resolve_hardware(accelerator, precision)

    diffusion_fit = fit_step("diffusion", configs / "quickstart.yaml", out, accelerator, max_steps, train_precision)
    classifier_fit = fit_step(
        "classifier", configs / "quickstart_classifier.yaml", out, accelerator, classifier_max_steps, train_precision
    )
    model_ckpt, classifier_ckpt = diffusion_fit.extra["checkpoint"], classifier_fit.extra["checkpoint"]
    num_samples = 10 * samples_per_class
    common = [
        "--ckpt", model_ckpt, "--num_samples", str(num_samples), "--label_mode", "balanced",
        "--sample_batch_size", str(num_samples), "--precision", precision, "--accelerator", accelerator, "--seed", "0",
    ]  # fmt: skip
    guidance = {
        "unguided": [],
        "classifier_guided": ["--classifier_ckpt", classifier_ckpt, "--classifier_scale", str(classifier_scale)],
        "classifier_free": ["--cfg_scale", str(cfg_scale)],
    }
    samplings = sample_steps(out, common, guidance, steps, fast_method, fast_steps, process)
    all_steps = [diffusion_fit, classifier_fit, *samplings,
                 *evaluation_steps(out, model_ckpt, accelerator, nll_examples, weights)]  # fmt: skip
    for step in all_steps:
        if step.done.is_file():
            step.status = "kept (finished earlier)"
            print(f"\n==> [{step.name}] finished earlier, kept: {step.done}", flush=True)
            continue
        run_step(step, env)
        if step in (diffusion_fit, classifier_fit):
            write_text(step.done, json.dumps({"checkpoint": step.extra["checkpoint"]}, indent=2))

    summary = summarize(out, all_steps, weights, time.perf_counter() - started)
    print_summary(summary)
    return summary


def summarize(out: Path, steps: list[Step], weights: Path | None, seconds: float) -> dict:
    """Collect metrics of every step into OUT_DIR/summary.json."""
    train_x, train_y = mnist_split("train")
    held_x, held_y = mnist_split("val")
    real = knn_digit_accuracy(
        ((held_x.view(-1, 32, 32, 1) + 1) * 127.5).round().to(torch.uint8).numpy(), held_y.numpy(), train_x, train_y
    )
    samples = {}
    by_name = {s.name: s for s in steps}
    for mode in SAMPLE_MODES:
        folder = out / "samples" / mode
        with np.load(folder / "samples.npz") as data:
            images, labels = data["arr_0"], data["arr_1"]
        samples[mode] = {
            "grid": str(folder / "grid.png"),
            "samples": str(folder / "samples.npz"),
            "knn_digit_accuracy": knn_digit_accuracy(images, labels, train_x, train_y),
            "sampler": by_name[f"sample {mode}"].extra["sampler"],
            "seconds": round(by_name[f"sample {mode}"].seconds, 1),
        }
        metrics_file = out / "fid" / mode / "metrics.json"
        if metrics_file.is_file():
            samples[mode]["inception_metrics"] = json.loads(metrics_file.read_text())
    full_nll = json.loads((out / "nll" / "nll.json").read_text())
    nll = {key: full_nll[key] for key in ("num_images", "total_bpd", "prior_bpd", "baselines")}
    nll["per_t_terms"] = str(out / "nll" / "nll_terms.csv")
    summary = {
        "out_dir": str(out),
        "checkpoints": {"diffusion": steps[0].extra["checkpoint"], "classifier": steps[1].extra["checkpoint"]},
        "samples": samples,
        "knn_digit_accuracy_of_real_held_out_digits": real,
        "bits_per_dim": nll,
        "inception_metrics": (
            f"computed with {weights}" if weights is not None else
            f"skipped: no Inception weights. Put torch-fidelity's {INCEPTION_FILE} in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass --inception_weights PATH, then run the demo again"
        ),  # fmt: skip
        "steps": [{"name": s.name, "command": command_line(s.args), "status": s.status, "seconds": round(s.seconds, 1)}
                  for s in steps],  # fmt: skip
        "total_seconds": round(seconds, 1),
    }
    text = json.dumps(summary, indent=2)
    write_text(out / "summary.json", text)
    return summary


def print_summary(summary: dict) -> None:
    out = summary["out_dir"]
    nll = summary["bits_per_dim"]
    lines = [
        "",
        f"diffusion-pl demo finished in {summary['total_seconds'] / 60:.1f} min. Everything is under {out}/",
        "",
        "  step                          seconds  status",
        *(f"  {s['name']:<28} {s['seconds']:>8.1f}  {s['status']}" for s in summary["steps"]),
        "",
        f"  bits/dim on held-out digits: {_bpd_text(nll)}",
        "  digit accuracy (3-NN vote of the training digits; real held-out digits score "
        f"{summary['knn_digit_accuracy_of_real_held_out_digits']:.2f}):",
    ]
    for mode, info in summary["samples"].items():
        fid = info.get("inception_metrics", {}).get("fid")
        fid_text = f"  FID {fid:.1f}" if isinstance(fid, float) else ""
        lines.append(f"    {mode:<20} {info['knn_digit_accuracy']:.2f}  {info['sampler']:<26}{fid_text}   "
                     f"grid: {info['grid']}")  # fmt: skip
    lines += [
        f"  Inception metrics: {summary['inception_metrics']}",
        f"  checkpoints: {summary['checkpoints']['diffusion']}, {summary['checkpoints']['classifier']}",
        f"  summary: {out}/summary.json",
    ]
    print("\n".join(lines), flush=True)


def _bpd_text(nll: dict) -> str:
    baselines = nll["baselines"]
    histogram = baselines.get("per_pixel_histogram_bpd")
    text = f"{nll['total_bpd']:.3f} on {nll['num_images']} images (baselines: uniform 8-bit "
    text += f"{baselines['uniform_8bit_bpd']:.1f}"
    return text + (f", per-pixel histogram {histogram:.3f})" if histogram is not None else ")")
