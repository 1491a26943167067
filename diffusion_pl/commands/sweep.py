"""`diffusion-pl sweep`: sample at several guidance scales, evaluate each, write a table and a plot.

    diffusion-pl sweep --ckpt last.ckpt --classifier_ckpt clf.ckpt --classifier_scales [0,0.5,1,2,4] \\
        --num_samples 5000 --steps 250 --reference real/ --out_dir sweeps/run1 --wandb true
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Any

from diffusion_pl.commands.common import check_out_dir, write_json
from diffusion_pl.commands.generate import SampleSource, reusable_samples
from diffusion_pl.commands.launcher import check_launch, start
from diffusion_pl.commands.metrics import check_evaluation_inputs, sample_metrics
from diffusion_pl.commands.options import (
    ClassifierSource,
    Evaluation,
    Guidance,
    Launch,
    ModelSource,
    SamplingOptions,
    given,
    refuse_options,
)
from diffusion_pl.errors import UserInputError
from diffusion_pl.evaluation import check_enough_images
from diffusion_pl.sampling import SAMPLES_NAME
from diffusion_pl.utils.files import atomic_write
from diffusion_pl.utils.folder_lock import holds_output_folder

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


@dataclass(frozen=True)
class SweepPoint:
    """One point of the sweep: its kind ("classifier" or "cfg", the list it came from), scale and guidance."""

    kind: str
    scale: float

    @property
    def guidance(self) -> Guidance:
        return Guidance(classifier_scale=self.scale) if self.kind == "classifier" else Guidance(cfg_scale=self.scale)

    @property
    def folder(self) -> str:
        """Its folder under --out_dir, e.g. classifier_0.5 or cfg_0 (scale 0 of each list is a point of its own)."""
        return f"{self.kind}_{self.scale:g}"


def sweep_plan(classifier_scales: list[float] | None, cfg_scales: list[float] | None) -> list[SweepPoint]:
    """The points of the sweep: the classifier scales, then the classifier-free ones."""
    plan = [SweepPoint("classifier", float(s)) for s in (classifier_scales or [])]
    plan += [SweepPoint("cfg", float(s)) for s in (cfg_scales or [])]
    if not plan:
        raise UserInputError("nothing to sweep: give --classifier_scales and/or --cfg_scales")
    return plan


def check_reusable(source: SampleSource, point: SweepPoint, out_dir: str, num_samples: int) -> bool:
    """Whether the point's samples.npz is there to be reused (without --overwrite): only when its settings.json
    records the settings this run would sample it with; samples of other (or unknown) settings are refused."""
    sample_dir = os.path.join(out_dir, point.folder)
    settings, _ = source.run_settings(point.guidance, sample_dir, num_samples=num_samples)
    return reusable_samples(sample_dir, settings)


@holds_output_folder("out_dir")  # one writer per --out_dir (diffusion_pl/utils/folder_lock.py)
def sweep(
    model: ModelSource = ModelSource(),
    classifier: ClassifierSource = ClassifierSource(),
    sampling: SamplingOptions = SamplingOptions(),
    evaluation: Evaluation = Evaluation(),
    launch: Launch = Launch(),
    classifier_scales: list[float] | None = None,
    cfg_scales: list[float] | None = None,
    out_dir: str = "sweep",
    num_samples: int = 1000,
    wandb: bool = False,
    wandb_project: str = "diffusion-pl",
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Sample at each classifier scale and/or CFG scale (same seeds, so only the scale differs), evaluate each against
    one reference, and write OUT_DIR/sweep.csv, sweep.json and sweep.png; samples go to OUT_DIR/<kind>_<scale>/.
    An interrupted sweep resumes: finished scales keep their samples (rerun without --overwrite), reused only if their
    settings.json records this run's settings (else the sweep stops before sampling and names the differences).

    Args:
        classifier_scales: classifier guidance scales to sweep, e.g. [0, 0.5, 1, 2] (needs a classifier)
        cfg_scales: classifier-free guidance scales to sweep (needs a model with a null class)
        out_dir: output directory
        num_samples: samples per scale
        wandb: log the table and the plot to W&B (the active run, else a new one in --wandb_project)
        wandb_project: W&B project of a new run (with --wandb true)
        overwrite: regenerate the samples of every point and replace outputs
    """
    plan = sweep_plan(classifier_scales, cfg_scales)
    if not classifier_scales:
        refuse_options(given(classifier), "without --classifier_scales (only classifier guidance uses a classifier)")
    check_out_dir(out_dir)
    check_launch(launch)
    check_evaluation_inputs(evaluation)
    check_enough_images(evaluation.metrics, num_samples, isc_splits=evaluation.isc_splits)
    source = SampleSource.load(model, classifier, sampling)
    fabric = start(launch)
    # Every point is checked before anything is sampled: the guidance of each, then the shared options.
    for point in plan:
        source.check_guidance(point.guidance)
    for point in plan:
        source.engine_options(point.guidance)
    # Samples left by an earlier run are reused only if they were made with this run's settings (checked first too).
    reuse = [not overwrite and check_reusable(source, point, out_dir, num_samples) for point in plan]
    rows = [sweep_point(fabric, source, point, evaluation, out_dir, num_samples, overwrite, reused)
            for point, reused in zip(plan, reuse, strict=True)]  # fmt: skip
    if fabric.global_rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        files = write_table(out_dir, rows)
        files["plot"] = plot_sweep(os.path.join(out_dir, "sweep.png"), rows)
        if wandb:
            log_to_wandb(rows, files["plot"], wandb_project)
        print("\ndiffusion-pl sweep:\n" + "\n".join(f"  {k:<5}{v}" for k, v in files.items()))
    return rows


def sweep_point(fabric, source: SampleSource, point: SweepPoint, evaluation: Evaluation, out_dir: str,
                num_samples: int, overwrite: bool, reused: bool) -> dict[str, Any]:  # fmt: skip
    """Sample one point (unless its samples of the same settings are ``reused``) and evaluate them: its row."""
    kind, scale = point.kind, point.scale
    sample_dir = os.path.join(out_dir, point.folder)
    npz = os.path.join(sample_dir, SAMPLES_NAME)
    images_per_second = float("nan")
    if not reused:
        result = source.generate(fabric, point.guidance, sample_dir, num_samples=num_samples, overwrite=overwrite)
        images_per_second = result.images_per_second
    values = sample_metrics(fabric, npz, evaluation)
    if fabric.global_rank == 0:
        print(f"{kind} scale {scale:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return {"guidance": kind, "scale": scale, **values, "images_per_second": images_per_second, "samples": npz}


def log_to_wandb(rows: list[dict[str, Any]], plot_path: str, project: str) -> None:
    """Log the sweep table, per-scale metrics and the plot to the active W&B run (or a new one)."""
    import wandb

    run = wandb.run or wandb.init(project=project, job_type="guidance-sweep")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    run.log({"sweep/table": table, "sweep/plot": wandb.Image(plot_path)})
    for row in rows:
        run.log({f"sweep/{row['guidance']}/{k}": v for k, v in row.items() if isinstance(v, float)})
