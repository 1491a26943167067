"""Generation engine: a network + a Gaussian diffusion -> images for a list of SAMPLE INDICES, with per-sample seeds.

Sample ``i`` owns two torch.Generators seeded from ``(seed, i)``: one for its label (when labels are drawn at random)
and one for its initial noise x_T followed by the noise of every stochastic step. A batch stacks per-sample draws and
passes them to the method's step (``noise=`` of :func:`~diffusion_pl.diffusion.p_sample` /
:func:`~diffusion_pl.diffusion.ddim_step`, ``noise(x)`` of the SDE solvers), so image ``i`` is the same whatever the
batch size, the batch it lands in, or the number of processes that share the work. Every method of the sampler
registry (diffusion/registry.py) runs here.

This module knows networks and the diffusion maths, not Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from diffusion_pl.diffusion import (
    DiscreteTimeDenoiser,
    GaussianDiffusion,
    check_schedule,
    classifier_cond_fn,
    classifier_free_model,
    discrete_loop,
    get_sampler,
    resolve_eta,
    schedule_process,
    schedule_sigmas,
    solve,
)
from diffusion_pl.errors import UserInputError
from diffusion_pl.sampling.weights import frozen, sampling_weights
from diffusion_pl.utils.device import prepare_device
from diffusion_pl.utils.seeds import derive_seed

# Precisions as Lightning spells them -> the autocast dtype of the networks (None: float32, no autocast).
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
LABEL_MODES = ("random", "balanced")
_NOISE_STREAM, _LABEL_STREAM = 0, 1


class GuidanceConfigError(UserInputError):
    """Guidance options that cannot work with the given model / classifier."""


def sample_seed(seed: int, index: int, stream: int = _NOISE_STREAM) -> int:
    """The seed of sample ``index``'s ``stream`` in a run seeded ``seed`` (all 64 bits of ``seed`` count)."""
    return derive_seed(seed, int(seed) >> 32, index, stream)


@dataclass(frozen=True)
class SampleBatch:
    indices: list[int]
    images: torch.Tensor  # float [-1, 1] NCHW on the CPU
    labels: torch.Tensor | None  # int64 [N] on the CPU


class SampleEngine:
    """Draw samples of ``model`` (``model(x, t, y=None) -> [N, C or 2C, H, W]``) under ``diffusion``.

    Args:
        model: the U-Net (any callable module); evaluated in eval mode.
        diffusion: the FULL training process (respaced here with ``respacing``); an already respaced one only for
            the discrete methods (ddpm, ddim).
        image_shape: (C, H, W) of a sample.
        respacing: the step schedule: "" (all T steps), a count like 250 / "250", a section string "10,10,20",
            "ddimN", or a noise-level schedule "uniformN" / "logsnrN" / "karrasN" (diffusion/step_schedules.py).
        method: a name of the sampler registry (diffusion/registry.py, SAMPLERS).
        eta: the method's stochasticity (its registry entry gives the range); None = the method's default.
        timestep_mode: how the ODE/SDE solvers call the model between trained steps: "interpolate" or "nearest"
            (diffusion/continuous.py).
        clip_denoised: clamp the x_0 prediction to [-1, 1].
        class_cond: the model takes labels ``y``.
        num_classes: K, the label range of random / balanced labels (model classes, else classifier classes).
        null_class: label index of the null class (classifier-free guidance), None if the model has none.
        classifier: noisy classifier ``classifier(x_t, t) -> logits`` for classifier guidance with ``classifier_scale``.
        cfg_scale: classifier-free guidance scale w (eps = (1 + w) eps(x, y) - w eps(x, null)); one batched forward.
        label_mode: "random" (uniform, per-sample seeded) or "balanced" (label of sample i = i mod K), when labels are
            not passed explicitly.
        seed: run seed; sample i depends only on (seed, i) and the settings.
        precision: "32-true", "bf16-mixed" or "16-mixed" (fp16, for GPUs without bf16): autocast around the network and
            classifier forwards; the diffusion maths in float32.
        device: where to sample (default: the model's device).
        progress: show a tqdm bar of denoising steps (steps/s, ETA); pass False on all ranks but rank 0.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        diffusion: GaussianDiffusion,
        image_shape: Sequence[int],
        respacing: str | int | None = "",
        method: str = "ddpm",
        eta: float | None = None,
        clip_denoised: bool = True,
        class_cond: bool = False,
        num_classes: int | None = None,
        null_class: int | None = None,
        classifier: Callable[..., torch.Tensor] | None = None,
        classifier_scale: float = 0.0,
        cfg_scale: float = 0.0,
        label_mode: str = "random",
        seed: int = 0,
        precision: str = "32-true",
        device: torch.device | str | None = None,
        progress: bool = True,
        timestep_mode: str = "interpolate",
    ) -> None:
        self.spec = get_sampler(method, "sampling method")
        eta = resolve_eta(method, eta)
        if precision not in PRECISIONS:
            raise UserInputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if label_mode not in LABEL_MODES:
            raise UserInputError(f"unknown label_mode {label_mode!r}; choose from {', '.join(LABEL_MODES)}")
        check_guidance(class_cond, null_class, classifier is not None, classifier_scale, cfg_scale)
        check_schedule(diffusion, respacing, method, "respacing")
        self.model = model
        self.timestep_mode = timestep_mode
        if self.spec.kind == "discrete":
            self.process, self.sigmas = schedule_process(diffusion, respacing), None
        else:  # the solvers visit noise levels of the full process (possibly between its trained steps)
            self.process = diffusion
            self.sigmas = schedule_sigmas(DiscreteTimeDenoiser(diffusion, model, timestep_mode=timestep_mode),
                                          respacing)  # fmt: skip
        self.image_shape = tuple(int(s) for s in image_shape)
        self.method = method
        self.eta = float(eta)
        self.clip_denoised = clip_denoised
        self.class_cond = class_cond
        self.classifier = classifier
        self.classifier_scale = float(classifier_scale)
        self.cfg_scale = float(cfg_scale)
        self.null_class = null_class
        self.label_mode = label_mode
        self.seed = int(seed)
        self.precision = precision
        self.needs_labels = class_cond or classifier is not None
        if self.needs_labels and (num_classes is None or num_classes < 1):
            raise UserInputError(
                "class labels are needed (class-conditional model or classifier guidance): set num_classes"
            )
        self.num_classes = int(num_classes) if num_classes is not None else None
        if device is None:
            params = getattr(model, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        prepare_device(self.device)
        self.progress = progress
        # Built once: the model function (autocast, float32 output, optional CFG) and the classifier gradient.
        # While sample() runs, both networks read weights cast once per call (see sampling_weights).
        self._weights: dict[int, dict[str, torch.Tensor]] = {}
        self._model_fn = self._build_model_fn()
        self._cond_fn = None
        if classifier is not None and self.classifier_scale != 0.0:
            self._cond_fn = classifier_cond_fn(self._autocast(self._cached(classifier)), self.classifier_scale)
        # Ancestral steps and ddim / dpmpp_2m_sde with eta > 0 add noise; the deterministic methods need none.
        self._stochastic = self.spec.draws_noise(self.eta)

    # ------------------------------------------------------------------------------------------------ setup
    def _cached(self, module: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``module`` called with the weights prepared for the current sample() call, when there are any."""

        def call(*args, **kwargs):
            weights = self._weights.get(id(module))
            if weights is None:
                return module(*args, **kwargs)
            return functional_call(module, weights, args, kwargs, strict=False)

        return call

    @contextmanager
    def _prepared_weights(self):
        """Cast the networks' weights once for a whole sampling loop (instead of once per network call)."""
        dtype = PRECISIONS[self.precision] or torch.float32
        nets = [
            m
            for m in (self.model, self.classifier)
            if isinstance(m, nn.Module) and next(m.parameters(), None) is not None
        ]
        with torch.no_grad():
            self._weights = {id(m): sampling_weights(m, dtype) for m in nets}
        try:
            with frozen(*nets):
                yield
        finally:
            self._weights = {}

    def _autocast(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        dtype, device_type = PRECISIONS[self.precision], self.device.type
        if dtype is None:

            def call_fp32(*args, **kwargs):
                return fn(*args, **kwargs).float()

            return call_fp32

        def call_mixed(*args, **kwargs):
            with torch.autocast(device_type=device_type, dtype=dtype):
                out = fn(*args, **kwargs)
            return out.float()

        return call_mixed

    def _build_model_fn(self) -> Callable[..., torch.Tensor]:
        net = self._autocast(self._cached(self.model))
        class_cond = self.class_cond

        def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return net(x, t, y=y if class_cond else None)

        if self.cfg_scale != 0.0:
            return classifier_free_model(model_fn, self.cfg_scale, null_class=int(self.null_class))
        return model_fn

    @property
    def num_steps(self) -> int:
        """Steps of one sampling loop (the progress bar's unit); network evaluations: registry.schedule_nfe."""
        return self.process.num_timesteps if self.sigmas is None else len(self.sigmas) - 1

    # ------------------------------------------------------------------------------------------------ labels / seeds
    def labels_for(self, indices: Sequence[int], labels: Sequence[int] | torch.Tensor | None = None):
        """int64 labels of the samples (given, balanced i mod K, or per-sample random), or None when not needed."""
        if not self.needs_labels:
            return None
        k = self.num_classes
        if labels is not None:
            out = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).cpu()
            if out.numel() != len(indices):
                raise ValueError(f"got {out.numel()} labels for {len(indices)} samples")
            bad = out[(out < 0) | (out >= k)]
            if bad.numel():
                raise UserInputError(f"labels {sorted(set(bad.tolist()))[:10]} are outside 0..{k - 1}")
            return out
        if self.label_mode == "balanced":
            return torch.tensor([int(i) % k for i in indices], dtype=torch.int64)
        draws = []
        for i in indices:
            g = torch.Generator().manual_seed(sample_seed(self.seed, i, _LABEL_STREAM))
            draws.append(int(torch.randint(0, k, (1,), generator=g)))
        return torch.tensor(draws, dtype=torch.int64)

    def _generators(self, indices: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, i)) for i in indices]

    def _draw(self, generators: list[torch.Generator]) -> torch.Tensor:
        return torch.stack(
            [torch.randn(self.image_shape, generator=g, device=self.device, dtype=torch.float32) for g in generators]
        )

    # ------------------------------------------------------------------------------------------------ sampling
    def _grad_context(self):
        # The classifier gradient needs autograd (inference tensors cannot require grad): no_grad then, which
        # classifier_cond_fn overrides locally; inference_mode otherwise.
        if self._cond_fn is not None:
            return torch.no_grad()
        return torch.inference_mode()

    def sample(
        self,
        indices: Sequence[int],
        labels: Sequence[int] | torch.Tensor | None = None,
        bar: tqdm | None = None,
    ) -> SampleBatch:
        """Samples for ``indices`` in ONE batch: float [-1, 1] NCHW images on the CPU, and their labels."""
        indices = [int(i) for i in indices]
        y = self.labels_for(indices, labels)
        model_kwargs = {"y": y.to(self.device)} if y is not None else {}
        generators = self._generators(indices)
        was_training = getattr(self.model, "training", False)
        if hasattr(self.model, "eval"):
            self.model.eval()
        try:
            with self._prepared_weights(), self._grad_context():
                x = self._draw(generators)
                if self.sigmas is None:
                    x = self._discrete_loop(x, model_kwargs, generators, bar)
                else:
                    denoiser = DiscreteTimeDenoiser(self.process, self._model_fn, model_kwargs, self._cond_fn,
                                                    self.clip_denoised, self.timestep_mode)  # fmt: skip
                    x = solve(self.spec, denoiser, x, self.sigmas, self.eta, lambda like: self._draw(generators),
                              callback=lambda i, denoised: bar.update(1) if bar is not None else None)  # fmt: skip
                images = x.clamp(-1.0, 1.0).float().cpu().clone()
        finally:
            if was_training and hasattr(self.model, "train"):
                self.model.train(True)
        return SampleBatch(indices=indices, images=images, labels=y)

    def _discrete_loop(self, x, model_kwargs, generators, bar):
        """The ddpm / ddim steps of the respaced process with per-sample noise (none where the step adds none)."""
        zeros = torch.zeros_like(x)

        def step_noise(like: torch.Tensor, last: bool) -> torch.Tensor:
            return self._draw(generators) if self._stochastic and not last else zeros

        return discrete_loop(self.spec, self.process, self._model_fn, x, self.eta, self.clip_denoised, model_kwargs,
                             self._cond_fn, step_noise, lambda out: bar.update(1) if bar is not None else None)

    def progress_bar(self, num_batches: int, desc: str = "sampling") -> tqdm:
        """A tqdm bar over ``num_batches * steps`` denoising steps (steps/s and ETA), disabled off rank 0."""
        return tqdm(total=num_batches * self.num_steps, unit="step", desc=desc, disable=not self.progress,
                    dynamic_ncols=True, smoothing=0.05)  # fmt: skip

    def generate(
        self,
        indices: Sequence[int],
        batch_size: int,
        labels: Sequence[int] | torch.Tensor | None = None,
        bar: tqdm | None = None,
    ) -> Iterator[SampleBatch]:
        """Yield :class:`SampleBatch` es of at most ``batch_size`` samples, in the order of ``indices``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        indices = [int(i) for i in indices]
        label_t = None if labels is None else torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if label_t is not None and label_t.numel() != len(indices):
            raise ValueError(f"got {label_t.numel()} labels for {len(indices)} samples")
        own_bar = bar is None
        if own_bar:
            bar = self.progress_bar((len(indices) + batch_size - 1) // batch_size)
        try:
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                chunk_labels = None if label_t is None else label_t[start : start + batch_size]
                yield self.sample(chunk, chunk_labels, bar=bar)
        finally:
            if own_bar:
                bar.close()


def check_guidance(
    class_cond: bool, null_class: int | None, has_classifier: bool, classifier_scale: float, cfg_scale: float
) -> None:
    """Refuse guidance settings that cannot work, with a message that names the fix."""
    if classifier_scale != 0.0 and not has_classifier:
        kind = "a class-conditional" if class_cond else "an unconditional"
        raise GuidanceConfigError(
            f"classifier_scale = {classifier_scale} needs a noisy classifier, but none was given for {kind} model: "
            f"pass --classifier_ckpt (a NoisyClassifierModule checkpoint) or --classifier_openai_ckpt with "
            f"--classifier_arch, or set --classifier_scale 0"
        )
    if cfg_scale != 0.0:
        if not class_cond:
            raise GuidanceConfigError(
                f"cfg_scale = {cfg_scale} (classifier-free guidance) needs a class-conditional model with a null "
                "class; this model is unconditional: set --cfg_scale 0"
            )
        if null_class is None:
            raise GuidanceConfigError(
                f"cfg_scale = {cfg_scale} (classifier-free guidance) needs a model trained with a null class "
                f"(model.init_args.null_class: true and p_uncond > 0); this model has no null class: set --cfg_scale 0"
            )
