"""The option groups of `diffusion-pl sample / evaluate / sweep`, each defined once.

Every group is a frozen dataclass. The command lines are built from them (flat options, one --help section per group:
see diffusion_pl.commands.parser) and settings.json is written from them (:func:`settings_of`), so an option is named,
typed, defaulted and described in one place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from diffusion_pl.diffusion import DEFAULT_METHOD, SAMPLERS, SAMPLING_METHODS, check_method_options, methods_help
from diffusion_pl.errors import UserInputError

# The sampling methods: the sampler registry's (SampleEngine runs them all), so a method added there is an option here.
Method = Literal[SAMPLING_METHODS]  # type: ignore[valid-type]
Metric = Literal["fid", "isc", "prc", "kid"]
ALL_METRICS: tuple[str, ...] = ("fid", "isc", "prc", "kid")


@dataclass(frozen=True)
class ModelSource:
    """Model: a diffusion-pl checkpoint, or a released OpenAI checkpoint with its architecture and training process.

    Args:
        ckpt: a diffusion-pl DiffusionModule checkpoint (it carries its config; EMA weights if trained with EMA)
        openai_ckpt: a released OpenAI guided-/improved-diffusion checkpoint (.pt), with --arch
        arch: released preset name (e.g. adm_imagenet64) or a YAML file of UNetModel arguments (with --openai_ckpt)
        diffusion_steps: T, the number of steps of the OpenAI model's training process (with --openai_ckpt; default:
            the --arch preset's, 1000 for a YAML arch; a --ckpt carries its own)
        noise_schedule: beta schedule of the OpenAI model's training process (with --openai_ckpt; default: the
            preset's, cosine for a YAML arch)
        var_type: variance of the OpenAI model (with --openai_ckpt); auto = learned_range if the arch learns sigma,
            else fixed_large
        rescale_timesteps: the OpenAI model takes t * 1000 / T (with --openai_ckpt; default: the preset's, false for a
            YAML arch)
    """

    ckpt: str | None = None
    openai_ckpt: str | None = None
    arch: str | None = None
    diffusion_steps: int | None = None
    noise_schedule: Literal["linear", "cosine"] | None = None
    var_type: Literal["auto", "fixed_small", "fixed_large", "learned", "learned_range"] = "auto"
    rescale_timesteps: bool | None = None


@dataclass(frozen=True)
class ClassifierSource:
    """Classifier guidance: the noisy classifier whose gradient steers the samples.

    Args:
        classifier_ckpt: a diffusion-pl NoisyClassifierModule checkpoint
        classifier_openai_ckpt: a released OpenAI classifier (.pt), with --classifier_arch
        classifier_arch: released classifier preset (e.g. adm_imagenet64_classifier) or a YAML file of EncoderUNetModel
            arguments (with --classifier_openai_ckpt)
    """

    classifier_ckpt: str | None = None
    classifier_openai_ckpt: str | None = None
    classifier_arch: str | None = None


@dataclass(frozen=True)
class Guidance:
    """Guidance scales.

    Args:
        classifier_scale: classifier guidance scale s (0 = off; needs a classifier)
        cfg_scale: classifier-free guidance scale w (0 = off; needs a model trained with a null class)
    """

    classifier_scale: float = 0.0
    cfg_scale: float = 0.0


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling: sample i depends only on (seed, i) and these settings, not on the batch size or the processes.

    Args:
        steps: step schedule over the T training steps (docs/SAMPLERS.md): a count like 250, a section string like
            10,10,20, ddimN, "" for all T steps, or noise levels for the solvers: uniformN, logsnrN, karrasN
        method: {methods}
        eta: {eta}
        clip_denoised: clamp the predicted x_0 to [-1, 1]
        label_mode: the classes of a class-conditional or classifier-guided model's samples: random (uniform,
            per-sample seeded) or balanced (sample i gets class i mod K)
        seed: run seed
        precision: autocast of the networks, spelt as Lightning does: 32-true, bf16-mixed, or 16-mixed (fp16, for
            GPUs without bf16)
        sample_batch_size: samples per forward pass (does not change the images)
    """

    steps: str = "250"
    method: Method = DEFAULT_METHOD  # type: ignore[valid-type]
    eta: float | None = None
    clip_denoised: bool = True
    label_mode: Literal["random", "balanced"] = "random"
    seed: int = 0
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    sample_batch_size: int = 16

    def __post_init__(self) -> None:
        # Method, eta and the fewest steps of the method need no model: refused before any network is loaded.
        check_method_options(self.method, self.eta, self.steps)


# The help of --method and --eta comes from the sampler registry.
SamplingOptions.__doc__ = SamplingOptions.__doc__.format(
    methods=f"sampling method ({methods_help()})",
    eta="stochasticity, unset = the method's default; "
    + "; ".join(f"{s.name}: {s.eta_help} (default {s.default_eta:g})" for s in SAMPLERS.values() if s.eta),
)


@dataclass(frozen=True)
class Launch:
    """Processes: DDP over devices x num_nodes processes when there is more than one (Lightning Fabric).

    Args:
        accelerator: Lightning accelerator (cpu, gpu, auto)
        devices: number of processes (devices) per node
        num_nodes: number of nodes (multi-node DDP, e.g. under SLURM: srun ... --devices 8 --num_nodes 4)
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1


@dataclass(frozen=True)
class Evaluation:
    """Evaluation: the reference the samples are compared with (or, with --nll, the data), and the metrics.

    Args:
        reference: an image folder, an ADM reference npz, or a diffusion-pl reference cache npz
        data_class: a LightningDataModule class (short names resolve in diffusion_pl.data) whose split is the
            reference, or the data of --nll
        data_args: its constructor arguments (with --data_class)
        split: the DataModule split (with --data_class)
        inception_weights: a local Inception weights file (default: torch-fidelity's cache / download)
        metrics: subset of fid, isc (Inception Score), prc (precision/recall), kid
        kid_subset_size: KID subset size
        isc_splits: Inception Score splits
        inception_batch_size: images per Inception forward pass
        cache_dir: reference feature cache directory
    """

    reference: str | None = None
    data_class: str | None = None
    data_args: dict[str, Any] | None = None
    split: Literal["train", "val"] = "val"
    inception_weights: str | None = None
    metrics: list[Metric] = field(default_factory=lambda: list(ALL_METRICS))
    kid_subset_size: int = 1000
    isc_splits: int = 10
    inception_batch_size: int = 64
    cache_dir: str | None = None


# Options that do not change the images: left out of settings.json (a resume may change them).
NOT_SETTINGS = frozenset({"sample_batch_size"})


def settings_of(*groups: Any, **more: Any) -> dict[str, Any]:
    """The settings that determine the images, from option groups (dataclasses.asdict) and ``more``: recorded in
    settings.json, and a resume must match them. Checkpoint paths are made absolute."""
    out: dict[str, Any] = {}
    for group in groups:
        out.update((k, v) for k, v in asdict(group).items() if k not in NOT_SETTINGS)
    out.update(more)
    return {k: (os.path.abspath(v) if k.endswith("ckpt") and isinstance(v, str) else v) for k, v in out.items()}


# The options of ModelSource that describe a released OpenAI checkpoint (a diffusion-pl checkpoint carries its own).
OPENAI_MODEL_OPTIONS = ("arch", "diffusion_steps", "noise_schedule", "var_type", "rescale_timesteps")


def given(group: Any, names: Iterable[str] | None = None) -> list[str]:
    """The fields of an option group (of ``names``, default all) set to other than their defaults: the options the user
    gave (one given at its default value cannot be told from one left out, and changes nothing)."""
    out = []
    for f in fields(group):
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        if (names is None or f.name in names) and getattr(group, f.name) != default:
            out.append(f.name)
    return out


def refuse_options(names: Iterable[str], where: str) -> None:
    """A one-line UserInputError naming the options of ``names`` (given, but not used ``where``), if there are any."""
    names = [f"--{n}" for n in names]
    if names:
        verb, pronoun = ("does", "it") if len(names) == 1 else ("do", "them")
        raise UserInputError(f"{', '.join(names)} {verb} not apply {where}; leave {pronoun} out")
