"""Helpers shared by `diffusion-pl sample / evaluate / sweep`: loading models and classifiers (diffusion-pl or released
OpenAI checkpoints), compatibility checks, and building the sampling engine."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn

from diffusion_pl.commands.options import (
    OPENAI_MODEL_OPTIONS,
    ClassifierSource,
    Guidance,
    ModelSource,
    SamplingOptions,
    given,
    refuse_options,
)
from diffusion_pl.diffusion import GaussianDiffusion, check_schedule, create_diffusion
from diffusion_pl.errors import UserFileNotFoundError, UserInputError
from diffusion_pl.models import (
    DEFAULT_PROCESS,
    RELEASED_CONFIGS,
    RELEASED_PROCESS,
    EncoderUNetModel,
    OpenAICheckpointError,
    UNetModel,
    load_openai_state_dict,
    released_config,
)
from diffusion_pl.sampling import SampleEngine, check_guidance

# Which option takes which kind of checkpoint file (diffusion_pl.lightning.checkpoints.checkpoint_kind names): used
# in the message when a file is given to the wrong option.
OPTION_FOR_KIND = {
    "DiffusionModule": "--ckpt",
    "NoisyClassifierModule": "--classifier_ckpt",
    "openai-unet": "--openai_ckpt (with --arch)",
    "openai-classifier": "--classifier_openai_ckpt (with --classifier_arch)",
}


@dataclass
class LoadedModel:
    """A diffusion network with its FULL training process and what the sampler and the checks need to know."""

    net: nn.Module  # net(x, t, y=None) -> [N, C or 2C, H, W]
    diffusion: GaussianDiffusion
    image_size: int
    in_channels: int
    class_cond: bool
    num_classes: int | None
    null_class: int | None
    info: dict[str, Any] = field(default_factory=dict)  # hparams-like, for check_classifier_compatible
    # The training process as ModelSource names it (diffusion_steps = the model's real T), for settings.json.
    process: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


@dataclass
class LoadedClassifier:
    net: nn.Module  # net(x, t) -> logits
    num_classes: int
    info: dict[str, Any]
    source: str


class _Float32Output(nn.Module):
    """Wraps a raw network so its output is float32 (DiffusionModule.forward does the same)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.net(*args, **kwargs).float()


def resolve_arch(arch: str, cls: type, option: str) -> dict[str, Any]:
    """Constructor kwargs from a released preset name or a YAML file of kwargs (checked against ``cls``)."""
    if arch in RELEASED_CONFIGS:
        preset_cls, kwargs = released_config(arch)
        if preset_cls is not cls:
            raise UserInputError(
                f"--{option} {arch!r} is a {preset_cls.__name__} preset, but a {cls.__name__} is needed here; "
                f"presets of that kind: {', '.join(k for k, v in RELEASED_CONFIGS.items() if v[0] is cls)}"
            )
        return kwargs
    if os.path.isfile(arch):
        with open(arch) as f:
            kwargs = yaml.safe_load(f)
        if not isinstance(kwargs, dict):
            raise UserInputError(f"--{option} {arch}: expected a YAML mapping of {cls.__name__} arguments")
        for key in ("attention_resolutions", "channel_mult"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return kwargs
    presets = ", ".join(k for k, v in RELEASED_CONFIGS.items() if v[0] is cls)
    raise UserInputError(
        f"--{option} {arch!r} is neither a released preset ({presets}) nor a YAML file of {cls.__name__} arguments"
    )


def build_arch(cls: type, kwargs: dict[str, Any], option: str) -> nn.Module:
    """``cls(**kwargs)`` with a message naming ``option`` when the arguments do not build a network."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserInputError(f"{option}: these {cls.__name__} arguments do not build a network: {e}") from e


def load_openai_file(cls: type, kwargs: dict[str, Any], path: str, option: str, expected_kind: str,
                     arch_option: str) -> nn.Module:  # fmt: skip
    """``cls(**kwargs)`` with a released OpenAI state dict loaded, with messages naming ``option`` for a missing,
    corrupt or wrong kind of file (checked first) and ``arch_option`` when the arguments do not build a network or
    the checkpoint does not fit it (first keys/shapes only)."""
    from diffusion_pl.lightning.checkpoints import checkpoint_kind, describe_kind, read_checkpoint

    state_dict = read_checkpoint(path, option)
    kind = checkpoint_kind(state_dict)
    if kind != expected_kind:
        fix = OPTION_FOR_KIND.get(kind)
        raise UserInputError(
            f"{option} {path} is {describe_kind(kind, state_dict)}, but {option} takes a released OpenAI "
            f"{'U-Net' if expected_kind == 'openai-unet' else 'classifier'} state dict"
            + (f": pass this file as {fix}" if fix else "")
        )
    model = build_arch(cls, kwargs, arch_option)
    try:
        load_openai_state_dict(model, state_dict, max_listed=8)
    except OpenAICheckpointError as err:
        raise OpenAICheckpointError(
            f"{option} {path} does not fit {arch_option} (give the preset or YAML the checkpoint was released "
            f"with): {err}"
        ) from None
    return model


def openai_process(chosen: ModelSource) -> tuple[int, str, bool]:
    """(T, noise schedule, rescale_timesteps) of an --openai_ckpt: each option as given, else the --arch preset's
    (RELEASED_PROCESS), else DEFAULT_PROCESS (a YAML arch)."""
    preset = RELEASED_PROCESS.get(str(chosen.arch), DEFAULT_PROCESS)
    given_values = (chosen.diffusion_steps, chosen.noise_schedule, chosen.rescale_timesteps)
    steps, schedule, rescale = (p if g is None else g for g, p in zip(given_values, preset, strict=True))
    return int(steps), str(schedule), bool(rescale)


def load_model(chosen: ModelSource) -> LoadedModel:
    """A diffusion-pl checkpoint (it carries its config) or a released OpenAI checkpoint + arch + process settings."""
    ckpt, openai_ckpt, arch = chosen.ckpt, chosen.openai_ckpt, chosen.arch
    if (ckpt is None) == (openai_ckpt is None):
        raise UserInputError("give exactly one of --ckpt (a diffusion-pl checkpoint) or --openai_ckpt (with --arch)")
    if ckpt is not None:
        refuse_options(given(chosen, OPENAI_MODEL_OPTIONS), "to a --ckpt (it carries its own architecture and "
                       "training process; these options describe an --openai_ckpt)")  # fmt: skip
        from diffusion_pl.lightning import DiffusionModule
        from diffusion_pl.lightning.checkpoints import load_module

        module = load_module(DiffusionModule, ckpt, "--ckpt", OPTION_FOR_KIND).eval()
        hp = dict(module.hparams)
        return LoadedModel(
            net=module,
            diffusion=module.diffusion,
            image_size=int(hp["image_size"]),
            in_channels=int(hp["in_channels"]),
            class_cond=bool(hp["class_cond"]),
            num_classes=int(hp["num_classes"]) if hp["class_cond"] else None,
            null_class=module.null_label,
            info=hp,
            process=dict(diffusion_steps=int(hp["diffusion_steps"]), noise_schedule=hp["noise_schedule"],
                         var_type=hp["var_type"], rescale_timesteps=bool(hp["rescale_timesteps"])),  # fmt: skip
        )
    if arch is None:
        raise UserInputError("--openai_ckpt needs --arch: a released preset name or a YAML file of UNetModel arguments")
    kwargs = resolve_arch(arch, UNetModel, "arch")
    net = load_openai_file(UNetModel, kwargs, openai_ckpt, "--openai_ckpt", "openai-unet", f"--arch {arch}").eval()
    learn_sigma = bool(kwargs.get("learn_sigma", False))
    diffusion_steps, noise_schedule, rescale_timesteps = openai_process(chosen)
    var_type = chosen.var_type
    if var_type == "auto":  # guided-diffusion: learn_sigma -> learned range, else fixed large (sigma_small False)
        var_type = "learned_range" if learn_sigma else "fixed_large"
    diffusion = create_diffusion(
        diffusion_steps=diffusion_steps,
        noise_schedule=noise_schedule,
        var_type=var_type,
        loss_type="hybrid" if var_type in ("learned", "learned_range") else "simple",
        rescale_timesteps=rescale_timesteps,
    )
    num_classes = kwargs.get("num_classes")
    image_size, in_channels = int(kwargs["image_size"]), int(kwargs.get("in_channels", 3))
    info = dict(diffusion_steps=diffusion_steps, noise_schedule=noise_schedule, rescale_timesteps=rescale_timesteps,
                image_size=image_size, in_channels=in_channels, class_cond=num_classes is not None,
                num_classes=num_classes)  # fmt: skip
    return LoadedModel(
        net=_Float32Output(net),
        diffusion=diffusion,
        image_size=image_size,
        in_channels=in_channels,
        class_cond=num_classes is not None,
        num_classes=int(num_classes) if num_classes is not None else None,
        null_class=int(num_classes) if kwargs.get("null_class") and num_classes is not None else None,
        info=info,
        process=dict(diffusion_steps=diffusion_steps, noise_schedule=noise_schedule, var_type=var_type,
                     rescale_timesteps=rescale_timesteps),  # fmt: skip
    )


def load_classifier(model: LoadedModel, chosen: ClassifierSource) -> LoadedClassifier | None:
    """A NoisyClassifierModule checkpoint or a released OpenAI classifier, checked against the diffusion model."""
    from diffusion_pl.lightning.callbacks import check_classifier_compatible

    classifier_ckpt, classifier_openai_ckpt = chosen.classifier_ckpt, chosen.classifier_openai_ckpt
    classifier_arch = chosen.classifier_arch

    if classifier_ckpt is not None and classifier_openai_ckpt is not None:
        raise UserInputError("give at most one of --classifier_ckpt and --classifier_openai_ckpt")
    if classifier_openai_ckpt is None:
        refuse_options(given(chosen, ["classifier_arch"]), "without --classifier_openai_ckpt (a --classifier_ckpt "
                       "carries its own architecture)")  # fmt: skip
    if classifier_ckpt is not None:
        from diffusion_pl.lightning import NoisyClassifierModule
        from diffusion_pl.lightning.checkpoints import load_module

        module = load_module(NoisyClassifierModule, classifier_ckpt, "--classifier_ckpt", OPTION_FOR_KIND).eval()
        module.requires_grad_(False)
        info, net, source = dict(module.hparams), module, classifier_ckpt
    elif classifier_openai_ckpt is not None:
        if classifier_arch is None:
            raise UserInputError(
                "--classifier_openai_ckpt needs --classifier_arch (a released classifier preset or a YAML)"
            )
        kwargs = resolve_arch(classifier_arch, EncoderUNetModel, "classifier_arch")
        raw = load_openai_file(EncoderUNetModel, kwargs, classifier_openai_ckpt, "--classifier_openai_ckpt",
                               "openai-classifier", f"--classifier_arch {classifier_arch}")  # fmt: skip
        raw.eval().requires_grad_(False)
        net, source = _Float32Output(raw), classifier_openai_ckpt
        # Released classifiers do not record their process: it is assumed to be the one given for the model.
        info = dict(image_size=int(kwargs["image_size"]), in_channels=int(kwargs.get("in_channels", 3)),
                    out_channels=int(kwargs.get("out_channels", 1000)))  # fmt: skip
    else:
        return None
    check_classifier_compatible(info, model.info, source)
    return LoadedClassifier(net=net, num_classes=int(info["out_channels"]), info=info, source=source)


def engine_options(model: LoadedModel, classifier: LoadedClassifier | None, sampling: SamplingOptions,
                   guidance: Guidance) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments of SampleEngine (minus model/diffusion/classifier/device), after checking the options against
    the model and classifier (guidance, --steps against T; --eta is checked by SamplingOptions), before anything is
    written."""
    check_guidance(model.class_cond, model.null_class, classifier is not None, guidance.classifier_scale,
                   guidance.cfg_scale)  # fmt: skip
    check_schedule(model.diffusion, sampling.steps, sampling.method, "--steps")
    num_classes = model.num_classes if model.class_cond else (classifier.num_classes if classifier else None)
    return dict(
        image_shape=model.image_shape, respacing=sampling.steps, method=sampling.method, eta=sampling.eta,
        clip_denoised=sampling.clip_denoised, class_cond=model.class_cond, num_classes=num_classes,
        null_class=model.null_class, classifier_scale=guidance.classifier_scale, cfg_scale=guidance.cfg_scale,
        label_mode=sampling.label_mode, seed=sampling.seed, precision=sampling.precision,
    )  # fmt: skip


def build_engine(
    model: LoadedModel, classifier: LoadedClassifier | None, options: dict[str, Any], device=None, progress=True
) -> SampleEngine:
    return SampleEngine(
        model.net,
        model.diffusion,
        classifier=classifier.net if classifier is not None and options["classifier_scale"] != 0.0 else None,
        device=device,
        progress=progress,
        **options,
    )


def check_labels(labels: list[int] | None, num_samples: int, options: dict[str, Any]) -> None:
    """--labels: 1 or num_samples entries, each in 0..K-1, and only where labels are used (before any work)."""
    if labels is None:
        return
    expand_labels(labels, num_samples)
    k = options.get("num_classes")
    if not options.get("class_cond") and not options.get("classifier_scale"):
        raise UserInputError(
            "--labels has no effect: the model is unconditional and no classifier guides it; drop --labels, or add "
            "--classifier_ckpt with --classifier_scale > 0 to steer samples towards these classes"
        )
    bad = sorted({int(v) for v in labels if not 0 <= int(v) < int(k)})
    if bad:
        source = "the model" if options.get("class_cond") else "the classifier"
        raise UserInputError(f"--labels {bad[:10]} outside 0..{int(k) - 1}: {source} has {k} classes")


def check_out_dir(out_dir: str, option: str = "--out_dir") -> None:
    """Fail early (before loading anything) if ``out_dir`` cannot be a directory: it, or a parent, is a file."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        which = "is a file" if path == os.path.abspath(out_dir) else f"is inside {path}, which is a file"
        raise UserInputError(f"{option} {out_dir} {which}, not a directory: choose another {option}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} {out_dir}: {path} is not writable: choose another {option}")


def check_file(path: str | None, option: str, what: str = "file") -> None:
    """A file option names an existing file (checked before any long work)."""
    if path is not None and not os.path.isfile(path):
        kind = "a directory, not a file" if os.path.isdir(path) else "no such file"
        raise UserFileNotFoundError(f"{option} {path}: {kind} (expected {what})")


def expand_labels(labels: list[int] | None, num_samples: int) -> list[int] | None:
    """--labels: one class for every sample, or one label per sample."""
    if labels is None:
        return None
    if len(labels) == 1:
        return labels * num_samples
    if len(labels) != num_samples:
        raise UserInputError(
            f"--labels has {len(labels)} entries: give 1 (every sample) or num_samples = {num_samples}"
        )
    return list(labels)


def write_json(path: str, obj: Any) -> str:
    from diffusion_pl.utils.files import write_text

    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return write_text(path, text)
