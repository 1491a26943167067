"""`diffusion-pl evaluate`: two jobs behind one command.

* sample quality (:func:`evaluate_sample_quality`): FID / IS / precision / recall / KID of samples (an ADM npz, or fresh
  samples of a model) against a reference;
* bits/dim (:func:`evaluate_bits_per_dim`, ``--nll true``): the model's likelihood bound on a DataModule split.

    diffusion-pl evaluate --samples out/samples.npz --reference VIRTUAL_imagenet64_labeled.npz
    diffusion-pl evaluate --samples out/samples.npz --data_class MNIST5kDataModule --split val \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth
    diffusion-pl evaluate --ckpt last.ckpt --num_samples 5000 --steps 250 --reference real_images/ --devices 2
    diffusion-pl evaluate --ckpt last.ckpt --nll true --data_class MNIST5kDataModule --devices 2
"""

from __future__ import annotations

import math
import os
from typing import Any

from diffusion_pl.commands.bits_per_dim import nll_bpd, write_nll_terms
from diffusion_pl.commands.common import check_file, check_out_dir, load_model, write_json
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
from diffusion_pl.commands.sample import print_summary
from diffusion_pl.errors import UserFileExistsError, UserInputError
from diffusion_pl.evaluation import check_enough_images
from diffusion_pl.evaluation.npz import check_samples_npz
from diffusion_pl.sampling import SAMPLES_NAME
from diffusion_pl.utils.folder_lock import holds_output_folder

NUM_SAMPLES = 1000  # the default of --num_samples
# What --nll uses of the sampling and evaluation groups (with the model and the launch options).
NLL_SAMPLING, NLL_DATA = ("seed", "clip_denoised"), ("data_class", "data_args", "split")


def refuse_unused_options(samples: str | None, nll: bool, nll_batches: int | None, num_samples: int,
                          groups: dict[str, Any]) -> None:  # fmt: skip
    """The options the chosen job would ignore, refused in one line: with --nll the sample-quality options, with
    --samples the sampling options (``groups``: the command's option groups by parameter name)."""
    num = ["num_samples"] if num_samples != NUM_SAMPLES else []
    if nll:
        sampling = [n for n in given(groups["sampling"]) if n not in NLL_SAMPLING]
        metrics = [n for n in given(groups["evaluation"]) if n not in NLL_DATA]
        unused = (["samples"] if samples is not None else []) + num + given(groups["classifier"])
        refuse_options(unused + given(groups["guidance"]) + sampling + metrics,
                       "to evaluate --nll true (bits/dim of the model on --data_class --split)")  # fmt: skip
    elif nll_batches is not None:
        refuse_options(["nll_batches"], "without --nll true")
    elif samples is not None:
        # (--samples with --ckpt / --openai_ckpt is refused as "not both" by check_sample_inputs)
        unused = [n for n in given(groups["model"]) if n not in ("ckpt", "openai_ckpt")]
        unused += [n for k in ("classifier", "guidance", "sampling") for n in given(groups[k])] + num
        refuse_options(unused, "to evaluate --samples (the images of the npz are evaluated as they are; these "
                       "options are for sampling from --ckpt / --openai_ckpt)")  # fmt: skip


def evaluate_bits_per_dim(model: ModelSource, sampling: SamplingOptions, evaluation: Evaluation, launch: Launch,
                          out_json: str, nll_batches: int | None, overwrite: bool) -> dict[str, Any]:  # fmt: skip
    """Bits/dim of the model on --data_class --split (noise seeded by --seed); writes nll.json and nll_terms.csv."""
    if evaluation.data_class is None:
        raise UserInputError("--nll needs --data_class (and --data_args) naming the data to evaluate")
    loaded = load_model(model)  # checked before the processes are launched
    fabric = start(launch)
    result = nll_bpd(fabric, loaded, evaluation.data_class, evaluation.data_args, evaluation.split, nll_batches,
                     sampling.clip_denoised, sampling.seed)  # fmt: skip
    result.update(source=os.path.abspath(model.ckpt or model.openai_ckpt), data_class=evaluation.data_class,
                  data_args=evaluation.data_args, split=evaluation.split, clip_denoised=sampling.clip_denoised)
    if fabric.global_rank == 0:
        out_dir = os.path.dirname(out_json)
        result["files"] = {"nll_terms": write_nll_terms(out_dir, result, overwrite), "nll": out_json}
        write_json(out_json, result)
        b = result["baselines"]
        print(f"\ndiffusion-pl evaluate --nll: {result['total_bpd']:.4f} bits/dim on {result['num_images']} images "
              f"(prior {result['prior_bpd']:.5f}; baselines: uniform 8.0, per-pixel histogram "
              f"{b['per_pixel_histogram_bpd']:.4f})\n  {out_json}\n  {result['files']['nll_terms']}")  # fmt: skip
    return result


def check_sample_inputs(samples: str | None, model: ModelSource, evaluation: Evaluation, num_samples: int) -> None:
    """--samples or a model (not both), the reference, and enough samples for every metric."""
    has_model = model.ckpt is not None or model.openai_ckpt is not None
    if samples is None and not has_model:
        raise UserInputError("give --samples (an ADM npz) or a model (--ckpt / --openai_ckpt) to generate them")
    if samples is not None and has_model:
        raise UserInputError("give --samples or a model to sample from (--ckpt / --openai_ckpt), not both")
    if samples is not None:
        check_file(samples, "--samples", "an ADM sample npz: arr_0 uint8 NHWC images")
        check_samples_npz(samples)
    check_evaluation_inputs(evaluation)
    if samples is None:  # enough samples for every metric (an npz is counted when it is read)
        check_enough_images(evaluation.metrics, num_samples, isc_splits=evaluation.isc_splits)


def evaluate_sample_quality(samples: str | None, model: ModelSource, classifier: ClassifierSource,
                            guidance: Guidance, sampling: SamplingOptions, evaluation: Evaluation, launch: Launch,
                            out_json: str, num_samples: int, overwrite: bool) -> dict[str, Any]:  # fmt: skip
    """Metrics of --samples, or of num_samples fresh samples of the model (written to OUT_DIR/samples, resumable);
    writes metrics.json."""
    check_sample_inputs(samples, model, evaluation, num_samples)
    source = SampleSource.load(model, classifier, sampling) if samples is None else None  # checked before launching
    sample_dir = os.path.join(os.path.dirname(out_json), "samples")
    reuse = False
    if source is not None and not overwrite:  # finished samples of the same settings (metrics failed before): reused
        settings, _ = source.run_settings(guidance, sample_dir, num_samples=num_samples)
        reuse = reusable_samples(sample_dir, settings)
    fabric = start(launch)
    if overwrite and fabric.global_rank == 0 and os.path.exists(out_json):
        os.remove(out_json)  # before sampling: an interrupted overwrite leaves no old metrics next to new samples
    info: dict[str, Any] = {}
    if source is not None:
        samples = os.path.join(sample_dir, SAMPLES_NAME)
        images_per_second = float("nan")
        if reuse:
            if fabric.global_rank == 0:
                print(f"reusing {samples}: made with the same settings (its settings.json)")
        else:
            result = source.generate(fabric, guidance, sample_dir, num_samples=num_samples, overwrite=overwrite)
            if fabric.global_rank == 0:
                print_summary(result, source.loaded.image_shape, "generated")
            images_per_second = result.images_per_second
        info = {"sampling": source.settings(guidance, num_samples=num_samples),
                "images_per_second": images_per_second}  # fmt: skip
    values = sample_metrics(fabric, samples, evaluation)
    out = {"metrics": values, "samples": os.path.abspath(samples), "reference": evaluation.reference,
           "data_class": evaluation.data_class, "data_args": evaluation.data_args, "split": evaluation.split,
           "inception_weights": evaluation.inception_weights, **info}  # fmt: skip
    if fabric.global_rank == 0:
        write_json(out_json, out)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if not math.isnan(v))
        print(f"\ndiffusion-pl evaluate: {shown}\n  {out_json}")
    return out


@holds_output_folder("out_dir")  # one writer per --out_dir (diffusion_pl/utils/folder_lock.py)
def evaluate(
    model: ModelSource = ModelSource(),
    classifier: ClassifierSource = ClassifierSource(),
    guidance: Guidance = Guidance(),
    sampling: SamplingOptions = SamplingOptions(),
    evaluation: Evaluation = Evaluation(),
    launch: Launch = Launch(),
    samples: str | None = None,
    out_dir: str = "evaluation",
    num_samples: int = NUM_SAMPLES,
    nll: bool = False,
    nll_batches: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate samples (FID, IS, precision, recall, KID; ADM protocol, torch-fidelity Inception) or, with --nll true,
    the model's bits/dim.

    Samples: --samples (an ADM npz) or --ckpt / --openai_ckpt (num_samples fresh samples written to OUT_DIR/samples;
    an interrupted run resumes, and a rerun after the metrics failed reuses OUT_DIR/samples/samples.npz when its
    settings.json holds this run's settings).
    Reference: --reference (image folder, ADM reference npz, or a diffusion-pl reference cache) or --data_class
    (+ --data_args, --split). Writes OUT_DIR/metrics.json, or with --nll OUT_DIR/nll.json + nll_terms.csv.

    The model, classifier, guidance and sampling options apply only when it samples (--ckpt / --openai_ckpt); with
    --samples they are refused. With --nll true the model options, --seed, --clip_denoised, --data_class, --data_args,
    --split, --nll_batches and the process options apply; the others are refused.

    Args:
        samples: ADM sample npz to evaluate (arr_0 uint8 NHWC)
        out_dir: where metrics.json (and generated samples) go
        num_samples: samples to generate with --ckpt / --openai_ckpt
        nll: compute bits/dim of the model on --data_class --split with the full T-step process instead of sample
            metrics (noise seeded by --seed)
        nll_batches: limit --nll to the first batches of the split (default: all)
        overwrite: replace existing output files (generated samples are made anew)
    """
    # Every input is checked before processes are launched, models loaded or anything written.
    check_out_dir(out_dir)
    check_launch(launch)
    groups = dict(model=model, classifier=classifier, guidance=guidance, sampling=sampling, evaluation=evaluation)
    refuse_unused_options(samples, nll, nll_batches, num_samples, groups)
    out_json = os.path.join(out_dir, "nll.json" if nll else "metrics.json")
    if os.path.exists(out_json) and not overwrite:
        raise UserFileExistsError(
            f"{out_json} already exists; pass --overwrite to replace it, or choose another --out_dir"
        )
    if nll:
        return evaluate_bits_per_dim(model, sampling, evaluation, launch, out_json, nll_batches, overwrite)
    return evaluate_sample_quality(samples, model, classifier, guidance, sampling, evaluation, launch, out_json,
                                   num_samples, overwrite)
