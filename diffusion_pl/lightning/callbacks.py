"""Callbacks: GuidedSampler (fixed-seed sample grids during training) and NonFiniteGuard (stop on NaN/inf)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from diffusion_pl.diffusion import (
    SAMPLING_METHODS,
    auto_method,
    check_method_options,
    check_schedule,
    classifier_cond_fn,
    classifier_free_model,
    sample_loop,
)
from diffusion_pl.errors import UserFileNotFoundError, UserInputError, UserRuntimeError
from diffusion_pl.lightning.checkpoints import load_module, read_module_checkpoint
from diffusion_pl.utils.files import atomic_write
from diffusion_pl.utils.images import image_grid, to_uint8

# "auto" or a name of the sampler registry (a sampler added there is a choice here).
GridMethod = Literal[("auto", *SAMPLING_METHODS)]  # type: ignore[valid-type]


class NonFiniteError(UserRuntimeError):
    """Training produced a NaN/inf loss or gradient."""


class NonFiniteGuard(Callback):
    """Stop training at the first non-finite gradient or loss, before the bad update reaches the weights/checkpoints.

    * Gradients are checked after backward and before the optimizer step (``on_before_optimizer_step``): a NaN/inf
      gradient norm raises before AdamW writes NaN into the weights.
    * The loss is checked in ``on_train_batch_end``, which runs before ModelCheckpoint's hook (Lightning orders
      checkpoint callbacks last), so no checkpoint is written for the failing step; ``last.ckpt`` and the top-k files
      from earlier steps stay intact and training can resume from them.
    With a gradient scaler ("16-mixed") an overflow merely skips the step, so only the weights are checked then.
    """

    def __init__(self, check_gradients: bool = True, check_loss: bool = True) -> None:
        self.check_gradients = check_gradients
        self.check_loss = check_loss

    @staticmethod
    def _uses_scaler(trainer: L.Trainer) -> bool:
        return getattr(trainer.precision_plugin, "scaler", None) is not None

    def _fail(self, trainer: L.Trainer, what: str) -> None:
        raise NonFiniteError(
            f"{what} at training step {trainer.global_step} (epoch {trainer.current_epoch}): training stopped before "
            f"this step's update was applied or checkpointed. The last checkpoint written before it is intact; resume "
            f"from it (--ckpt_path) with a lower model.init_args.lr, warm-up, trainer.gradient_clip_val or a different "
            f"precision."
        )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.check_gradients or self._uses_scaler(trainer):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            if not bool(torch.isfinite(norm)):
                self._fail(trainer, f"non-finite gradient norm ({float(norm)})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self._uses_scaler(trainer):
            finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
            if not trainer.strategy.reduce_boolean_decision(finite, all=True):
                self._fail(trainer, "non-finite weights")
            return
        if not self.check_loss or outputs is None:
            return
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        finite = bool(torch.isfinite(loss.detach()).all())
        # Every rank takes the same decision, so all of them stop together.
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            value = float(loss.detach().float().mean())
            self._fail(trainer, f"non-finite loss ({value} on rank {trainer.global_rank})")


class ValidationWeightsCallback(Callback, ABC):
    """Base of the callbacks that sample once per validation run with the weights validation uses, optionally guided
    by a noisy classifier checkpoint (``classifier_path``).

    EMAWeightAveraging (any WeightAveraging) swaps the averaged weights in at on_validation_epoch_start and out at
    on_validation_epoch_end, and callbacks run in list order: a callback after it in the list finds them in place at
    both hooks, one before it only at on_validation_epoch_end. ``on_validation_weights`` is called at the hook where
    they are in place. Subclasses that override ``setup`` call ``super().setup``.
    """

    at_start = False  # call at on_validation_epoch_start (else at on_validation_epoch_end); set by setup
    classifier_path: str | None = None
    _classifier: L.LightningModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        callbacks = trainer.callbacks
        averaging = [i for i, c in enumerate(callbacks) if isinstance(c, WeightAveraging)]
        mine = callbacks.index(self) if self in callbacks else len(callbacks)
        self.at_start = bool(averaging) and min(averaging) < mine

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start:
            self.on_validation_weights(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_start:
            self.on_validation_weights(trainer, pl_module)

    @abstractmethod
    def on_validation_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample / evaluate with the validation weights in place (the subclass's job)."""

    def guiding_classifier(self, pl_module: L.LightningModule) -> L.LightningModule:
        """The NoisyClassifierModule checkpoint at ``self.classifier_path`` on the module's device: loaded and checked
        against the diffusion model on first use, then held by the callback (outside the LightningModule, so weight
        averaging never touches it)."""
        from diffusion_pl.lightning.classifier_module import NoisyClassifierModule

        if self._classifier is None:
            option = f"{type(self).__name__}.classifier_path"
            classifier = load_module(NoisyClassifierModule, self.classifier_path, option, map_location=pl_module.device)
            check_classifier_compatible(classifier.hparams, pl_module.hparams, self.classifier_path)
            self._classifier = classifier.eval().requires_grad_(False)
        return self._classifier.to(pl_module.device)


class GuidedSampler(ValidationWeightsCallback):
    """Draw a fixed-seed sample grid every ``every_n_val_runs`` validation runs and at the end of fit.

    The grid has a row per class (``classes``, default the first ``max_classes``) and ``samples_per_class`` columns
    when the model is class-conditional or classifier-guided, else ``num_rows`` x ``samples_per_class`` samples.
    The starting noise and every step's noise come from ``torch.Generator().manual_seed(seed)``, so grids of different
    epochs are comparable. Sampling uses the module's current weights: the EMA weights during validation when
    lightning's EMAWeightAveraging is a callback (the grid is drawn while they are swapped in, whichever order the
    callbacks are listed in) and after fit (EMAWeightAveraging copies them into the module).

    Process: ``respacing`` is the step schedule ("100", "250", "ddim50", "karras20", "" = all T steps;
    docs/SAMPLERS.md); ``method`` a name of the sampler registry (diffusion_pl.diffusion.SAMPLERS) or "auto"
    (:func:`~diffusion_pl.diffusion.auto_method`: ddim for "ddimN", dpmpp_2m for a noise-level schedule, else
    ancestral); ``eta`` None = the method's default. Guidance: ``classifier_path`` (a NoisyClassifierModule
    checkpoint, loaded on first use and held by this callback, outside the LightningModule so weight averaging never
    touches it) with scale ``classifier_scale``; classifier-free guidance with ``cfg_scale`` w > 0 (needs a model
    with null_class).

    Only global rank 0 draws and logs, with no collective calls, so other ranks never wait on it. Output: W&B image
    (WandbLogger), TensorBoard image (TensorBoardLogger), else a PNG under ``<log_dir>/samples/``.
    """

    def __init__(
        self,
        every_n_val_runs: int = 1,
        at_fit_end: bool = True,
        respacing: str = "100",
        method: GridMethod = "auto",  # type: ignore[valid-type]
        eta: float | None = None,
        classes: list[int] | None = None,
        max_classes: int = 10,
        samples_per_class: int = 8,
        num_rows: int = 4,
        classifier_path: str | None = None,
        classifier_scale: float = 1.0,
        cfg_scale: float = 0.0,
        seed: int = 0,
        clip_denoised: bool = True,
        key: str = "samples",
    ) -> None:
        if every_n_val_runs < 1:
            raise UserInputError(f"GuidedSampler.every_n_val_runs must be >= 1, got {every_n_val_runs}")
        if classifier_path is not None and not os.path.isfile(classifier_path):
            raise UserFileNotFoundError(f"GuidedSampler.classifier_path: no file at {classifier_path!r}")
        # ``method`` stays as written ("auto" too); ``sampling_method`` is the registry name every grid is drawn with.
        self.sampling_method = auto_method(respacing) if method == "auto" else method
        check_method_options(self.sampling_method, eta, respacing, "GuidedSampler.method", "GuidedSampler.eta",
                             "GuidedSampler.respacing")  # fmt: skip
        self.every_n_val_runs = every_n_val_runs
        self.at_fit_end = at_fit_end
        self.respacing = respacing
        self.method = method
        self.eta = eta
        self.classes = list(classes) if classes is not None else None
        self.max_classes = max_classes
        self.samples_per_class = samples_per_class
        self.num_rows = num_rows
        self.classifier_path = classifier_path
        self.classifier_scale = classifier_scale
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.clip_denoised = clip_denoised
        self.key = key
        self._classifier: L.LightningModule | None = None
        self._val_runs = 0
        self._last_step: int | None = None
        self._out_dir: str | None = None
        self.last_grid: torch.Tensor | None = None  # uint8 [C, H, W] of the last drawn grid (rank 0)
        self.last_path: str | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in ("diffusion", "hparams"):
            if not hasattr(pl_module, name):
                raise TypeError(f"GuidedSampler needs a DiffusionModule, got {type(pl_module).__name__}")
        hp = pl_module.hparams
        if self.cfg_scale > 0 and not hp.get("null_class", False):
            raise UserInputError(
                f"GuidedSampler.cfg_scale = {self.cfg_scale} needs a model trained with a null class "
                f"(model.init_args.null_class: true and p_uncond > 0)"
            )
        # Checked now, not at the first grid many steps later.
        if self.classifier_path is not None:
            check_classifier_file(self.classifier_path, hp, "GuidedSampler.classifier_path")
        check_schedule(pl_module.diffusion, self.respacing, self.sampling_method, "GuidedSampler.respacing")
        super().setup(trainer, pl_module, stage)
        # trainer.log_dir broadcasts: read it here, where every rank calls it, never from rank 0 alone.
        self._out_dir = os.path.join(trainer.log_dir or trainer.default_root_dir, "samples")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and self._last_step != trainer.global_step:
            self._draw_and_log(trainer, pl_module)

    def on_validation_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._val_runs += 1
        if self._val_runs % self.every_n_val_runs == 0:
            self._draw_and_log(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"val_runs": self._val_runs}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A run resumed from this checkpoint skips the validation due after this batch: count it here.
        if validation_follows_checkpoint(trainer):
            checkpoint["callbacks"][self.state_key]["val_runs"] = self._val_runs + 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._val_runs = int(state_dict.get("val_runs", 0))

    # ------------------------------------------------------------------------------------------------ drawing
    def _draw_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            # Validation hooks run under inference_mode; classifier guidance needs autograd for grad_x log p(y|x_t).
            with torch.inference_mode(False), trainer.precision_plugin.forward_context():
                images = self.draw(pl_module)
        finally:
            pl_module.train(was_training)
        grid = self.make_grid(images)
        self.last_grid = grid
        self._log_grid(trainer, grid)

    def labels(self, pl_module: L.LightningModule) -> torch.Tensor | None:
        """The class of each grid cell (row-major), or None for an unconditional, unguided model."""
        hp = pl_module.hparams
        if hp.get("class_cond", False):
            num_classes = int(hp.num_classes)
        elif self.classifier_path is not None:
            num_classes = int(self.guiding_classifier(pl_module).hparams.out_channels)
        else:
            return None
        classes = self.classes if self.classes is not None else list(range(min(num_classes, self.max_classes)))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UserInputError(f"GuidedSampler.classes {bad} are outside 0..{num_classes - 1}")
        return torch.tensor(classes, dtype=torch.int64).repeat_interleave(self.samples_per_class)

    def draw(self, pl_module: L.LightningModule) -> torch.Tensor:
        """Samples in [-1, 1], [rows * samples_per_class, C, H, W], from the fixed seed."""
        hp = pl_module.hparams
        device = pl_module.device
        labels = self.labels(pl_module)
        n = labels.numel() if labels is not None else self.num_rows * self.samples_per_class
        class_cond = bool(hp.get("class_cond", False))

        def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return pl_module(x, t, y if class_cond else None)

        model = model_fn
        if self.cfg_scale > 0:
            model = classifier_free_model(model_fn, self.cfg_scale, null_class=int(hp.num_classes))
        cond_fn = None
        if self.classifier_path is not None:
            cond_fn = classifier_cond_fn(self.guiding_classifier(pl_module), self.classifier_scale)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        shape = (n, int(hp.in_channels), int(hp.image_size), int(hp.image_size))
        return sample_loop(
            pl_module.diffusion,
            model,
            shape=shape,
            method=self.sampling_method,
            eta=self.eta,
            steps=self.respacing,
            clip_denoised=self.clip_denoised,
            model_kwargs={"y": labels.to(device)} if labels is not None else None,
            cond_fn=cond_fn,
            generator=generator,
            device=device,
        )

    def make_grid(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 grid [C, rows * H, samples_per_class * W] (row r = class r when conditional)."""
        return image_grid(to_uint8(images).cpu(), self.samples_per_class)

    def _log_grid(self, trainer: L.Trainer, grid: torch.Tensor) -> None:
        step = trainer.global_step
        logged = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                hwc = grid.permute(1, 2, 0).numpy()
                logger.log_image(key=self.key, images=[hwc[..., 0] if hwc.shape[-1] == 1 else hwc], step=step)
                logged = True
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.key, grid, global_step=step)
                logged = True
        if not logged:
            path = os.path.join(self._out_dir or trainer.default_root_dir, f"{self.key}_step{step:08d}.png")
            save_png(grid, path)
            self.last_path = path


def validation_follows_checkpoint(trainer: L.Trainer) -> bool:
    """True while a checkpoint is written at the end of a training batch after which Lightning validates
    (ModelCheckpoint every_n_train_steps on a validation step). A run resumed from that checkpoint does not repeat that
    validation (Lightning counts it as done), so callbacks that count validation runs save the count after it.
    The test is Lightning 2.6's for step- and epoch-based val_check_interval (public loop attributes only)."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress.current
    if not trainer.training or progress.completed >= progress.ready or not trainer.enable_validation:
        return False  # not in on_train_batch_end
    every_n_epochs = trainer.check_val_every_n_epoch
    if every_n_epochs is not None and (trainer.current_epoch + 1) % every_n_epochs != 0:
        return False
    val_check_batch = trainer.val_check_batch
    if val_check_batch is None or val_check_batch == float("inf"):
        return bool(loop.batch_progress.is_last_batch)
    index = loop.total_batch_idx if every_n_epochs is None else loop.batch_idx
    return (index + 1) % int(val_check_batch) == 0


def check_classifier_file(path: str, model_hp: Mapping, option: str) -> None:
    """Check, before training starts, that ``path`` is a readable NoisyClassifierModule checkpoint that can guide a
    model with hyperparameters ``model_hp`` (reads the hyperparameters only; the weights are loaded when used)."""
    checkpoint = read_module_checkpoint(path, "NoisyClassifierModule", option)
    check_classifier_compatible(checkpoint.get("hyper_parameters") or {}, model_hp, path)


def check_classifier_compatible(classifier_hp: Mapping, model_hp: Mapping, path: str | None = None) -> None:
    """Raise ValueError unless the classifier was trained on the guided model's process and image shape."""
    where = f" ({path})" if path else ""
    problems = []
    for key in ("diffusion_steps", "noise_schedule", "rescale_timesteps", "image_size", "in_channels"):
        if key in classifier_hp and key in model_hp and classifier_hp[key] != model_hp[key]:
            problems.append(f"{key}: classifier {classifier_hp[key]!r} vs diffusion model {model_hp[key]!r}")
    if model_hp.get("class_cond", False) and int(classifier_hp["out_channels"]) != int(model_hp["num_classes"]):
        problems.append(
            f"classes: classifier out_channels {classifier_hp['out_channels']} vs model num_classes "
            f"{model_hp['num_classes']}"
        )
    if problems:
        raise UserInputError(
            f"the classifier{where} cannot guide this diffusion model; train it with the same settings:\n  "
            + "\n  ".join(problems)
        )


def save_png(grid: torch.Tensor, path: str) -> None:
    """Write a uint8 [C, H, W] grid (C = 1 or 3) as PNG (atomic_write)."""
    from PIL import Image

    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array))
    atomic_write(path, lambda f: image.save(f, format="PNG"))
