"""SampleQualityEvaluation: FID / IS / precision / recall / KID during training, logged as curves over steps.

Every ``every_n_steps`` training steps (checked at validation), ``num_samples`` samples are generated with the weights
in place at validation (the EMA weights when lightning's EMAWeightAveraging is a callback), sharded over the ranks
(sample i on the rank holding i; per-sample seeds, so the set does not depend on the number of ranks). Inception
features are gathered in rank order, rank 0 computes the metrics once against the reference and broadcasts them;
every rank runs the same collectives. Generated images and features are freed afterwards.

    trainer:
      callbacks:
        - class_path: diffusion_pl.lightning.evaluation_callback.SampleQualityEvaluation
          init_args: {every_n_steps: 5000, num_samples: 1000, steps: "100", inception_weights: /path/pt_inception.pth}
"""

from __future__ import annotations

import gc
import os
from types import SimpleNamespace
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from diffusion_pl.data.common import EVALUATION_LOADER_VERSION, evaluation_dataloader
from diffusion_pl.diffusion import DEFAULT_METHOD, SAMPLING_METHODS, check_method_options, check_schedule
from diffusion_pl.errors import UserFileNotFoundError, UserInputError
from diffusion_pl.evaluation import (
    InceptionFeatures,
    check_enough_images,
    evaluate_samples,
    reference_features,
)
from diffusion_pl.evaluation.features import (
    InceptionWeightsUnavailableError,
    default_inception_weights_cache_path,
    missing_weights_message,
)
from diffusion_pl.evaluation.reference import load_reference, read_cache, resolution_mismatch
from diffusion_pl.lightning.callbacks import (
    ValidationWeightsCallback,
    check_classifier_file,
    validation_follows_checkpoint,
)
from diffusion_pl.sampling import SampleEngine
from diffusion_pl.utils.images import to_uint8

Method = Literal[SAMPLING_METHODS]  # type: ignore[valid-type]  (the sampler registry's names)


class SampleQualityEvaluation(ValidationWeightsCallback):
    """Sample-quality metrics every ``every_n_steps`` steps, logged as ``<prefix>/fid``, ``<prefix>/isc_mean``,
    ``<prefix>/precision``, ``<prefix>/recall`` (and KID) against the global step.

    Args:
        every_n_steps: evaluate at the first validation run at least this many steps after the previous evaluation.
        num_samples: samples per evaluation (split over ranks).
        batch_size: sampling batch size per rank.
        steps: step schedule ("100", "250", "ddim50", "karras20", "" = all T; docs/SAMPLERS.md).
        method / eta / clip_denoised: sampler settings; method: a name of the sampler registry
            (diffusion_pl.diffusion.SAMPLERS, docs/SAMPLERS.md); eta: None = its default.
        reference: image folder, ADM reference npz or reference cache; None = the datamodule's ``reference_split``.
        reference_split: "val" or "train" split of the trainer's datamodule (used when ``reference`` is None): all
            its images as stored, in order, never flipped (a separate deterministic loader, not the training one).
        inception_weights: local Inception weights (offline clusters); None = torch-fidelity's cache/download.
        metrics: subset of fid, isc, prc, kid.
        classifier_path / classifier_scale: classifier guidance with a NoisyClassifierModule checkpoint.
        cfg_scale: classifier-free guidance scale (model with a null class).
        seed / label_mode / precision: as `diffusion-pl sample`.
        cache_dir: reference feature cache directory.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        batch_size: int = 16,
        steps: str = "100",
        method: Method = DEFAULT_METHOD,  # type: ignore[valid-type]
        eta: float | None = None,
        clip_denoised: bool = True,
        reference: str | None = None,
        reference_split: Literal["val", "train"] = "val",
        inception_weights: str | None = None,
        metrics: list[Literal["fid", "isc", "prc", "kid"]] = ["fid", "isc", "prc"],  # noqa: B006
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
        inception_batch_size: int = 64,
        classifier_path: str | None = None,
        classifier_scale: float = 0.0,
        cfg_scale: float = 0.0,
        seed: int = 0,
        label_mode: Literal["random", "balanced"] = "random",
        precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true",
        cache_dir: str | None = None,
        prefix: str = "eval",
    ) -> None:
        if every_n_steps < 1 or num_samples < 2:
            raise UserInputError("SampleQualityEvaluation needs every_n_steps >= 1 and num_samples >= 2")
        check_enough_images(metrics, num_samples, isc_splits=isc_splits)  # before training, not at the first eval
        check_method_options(method, eta, steps, "SampleQualityEvaluation.method", "SampleQualityEvaluation.eta",
                             "SampleQualityEvaluation.steps")  # fmt: skip
        if classifier_scale != 0.0 and classifier_path is None:
            raise UserInputError(
                "SampleQualityEvaluation.classifier_scale needs classifier_path (a NoisyClassifierModule checkpoint)"
            )
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.steps = steps
        self.method, self.eta, self.clip_denoised = method, eta, clip_denoised
        self.reference, self.reference_split = reference, reference_split
        self.inception_weights = inception_weights
        self.metrics = list(metrics)
        self.kid_subset_size, self.isc_splits = kid_subset_size, isc_splits
        self.inception_batch_size = inception_batch_size
        self.classifier_path, self.classifier_scale, self.cfg_scale = classifier_path, classifier_scale, cfg_scale
        self.seed, self.label_mode, self.precision = seed, label_mode, precision
        self.cache_dir = cache_dir
        self.prefix = prefix
        self.last_step: int | None = None
        self.last_metrics: dict[str, float] = {}
        self._inception: InceptionFeatures | None = None
        self._classifier = None
        self._reference_cache: str | None = None
        self._warned_resolution = False

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "diffusion"):
            raise TypeError(f"SampleQualityEvaluation needs a DiffusionModule, got {type(pl_module).__name__}")
        if self.cfg_scale != 0.0 and not pl_module.hparams.get("null_class", False):
            raise UserInputError("SampleQualityEvaluation.cfg_scale needs a model with null_class: true")
        # Inputs are checked now, not at the first evaluation many steps later.
        if self.classifier_path is not None and self.classifier_scale != 0.0:
            check_classifier_file(self.classifier_path, pl_module.hparams, "SampleQualityEvaluation.classifier_path")
        check_schedule(pl_module.diffusion, self.steps, self.method, "SampleQualityEvaluation.steps")
        if self.reference is not None and not os.path.exists(self.reference):
            raise UserFileNotFoundError(
                f"SampleQualityEvaluation.reference {self.reference}: no such file or directory (expected a folder "
                "of images, an ADM reference npz or a diffusion-pl reference cache; or leave it unset to use the "
                "datamodule's reference_split)"
            )
        if self.inception_weights is not None and not os.path.isfile(self.inception_weights):
            reason = f"no file at SampleQualityEvaluation.inception_weights {self.inception_weights}"
            raise InceptionWeightsUnavailableError(missing_weights_message(reason))
        if self.inception_weights is None and not os.path.isfile(default_inception_weights_cache_path()):
            rank_zero_warn(
                f"SampleQualityEvaluation: the Inception weights are not in torch-fidelity's cache "
                f"({default_inception_weights_cache_path()}); they will be downloaded at the first evaluation. On a "
                "machine without internet access set inception_weights to a local copy now."
            )
        super().setup(trainer, pl_module, stage)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = state_dict.get("last_step")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # A run resumed from this checkpoint skips the validation due after this batch, and this evaluation with it:
        # save the state after it, so the resumed run evaluates at the same later steps.
        if validation_follows_checkpoint(trainer) and self._due(trainer):
            checkpoint["callbacks"][self.state_key]["last_step"] = trainer.global_step

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return False
        return self.last_step is None or trainer.global_step - self.last_step >= self.every_n_steps

    def on_validation_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):  # global_step is the same on every rank: all ranks decide alike
            return
        self.last_step = trainer.global_step
        values = self.evaluate(trainer, pl_module)
        self.last_metrics = values
        # callback_metrics (ModelCheckpoint can monitor eval/fid); the loggers get the values at the true global step.
        for key, value in values.items():
            pl_module.log(f"{self.prefix}/{key}", value, sync_dist=False, batch_size=1, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics({f"{self.prefix}/{k}": v for k, v in values.items()}, step=trainer.global_step)

    # ------------------------------------------------------------------------------------------------ work
    def _engine(self, pl_module: L.LightningModule) -> SampleEngine:
        hp = pl_module.hparams
        classifier = None
        if self.classifier_path is not None and self.classifier_scale != 0.0:
            classifier = self.guiding_classifier(pl_module)
        num_classes = int(classifier.hparams.out_channels) if classifier else None
        if hp.class_cond:
            num_classes = int(hp.num_classes)
        return SampleEngine(
            pl_module, pl_module.diffusion, (int(hp.in_channels), int(hp.image_size), int(hp.image_size)),
            respacing=self.steps, method=self.method, eta=self.eta, clip_denoised=self.clip_denoised,
            class_cond=bool(hp.class_cond), num_classes=num_classes, null_class=pl_module.null_label,
            classifier=classifier, classifier_scale=self.classifier_scale, cfg_scale=self.cfg_scale,
            label_mode=self.label_mode, seed=self.seed, precision=self.precision, device=pl_module.device,
            progress=pl_module.global_rank == 0,
        )  # fmt: skip

    def _reference(self, trainer: L.Trainer):
        """Reference features (rank 0 only), from the on-disk cache after the first time."""
        extractor = self._inception
        if self.reference is not None:
            if os.path.isfile(self.reference) and read_cache(self.reference) is not None:
                return load_reference(self.reference)
            return reference_features(self.reference, feature_extractor=extractor, cache_dir=self.cache_dir)
        datamodule = trainer.datamodule
        if datamodule is None:
            raise UserInputError("SampleQualityEvaluation: set reference=... or train with a datamodule")
        # All images of the split as stored: in order, never flipped, the last partial batch included.
        loader = evaluation_dataloader(datamodule, self.reference_split)
        source_id = (
            f"{type(datamodule).__module__}.{type(datamodule).__qualname__}:{self.reference_split}:"
            f"{EVALUATION_LOADER_VERSION}"
        )
        hp = getattr(datamodule, "hparams", None)
        if hp:
            source_id += ":" + ",".join(f"{k}={v}" for k, v in sorted(dict(hp).items()))
        return reference_features(
            (to_uint8(x) for x, _ in loader), feature_extractor=extractor, source_id=source_id,
            num_images=len(loader.dataset), cache_dir=self.cache_dir,
        )  # fmt: skip

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate this rank's share, gather features, compute on rank 0, broadcast. Same dict on every rank."""
        rank, world = trainer.global_rank, trainer.world_size
        if self._inception is None:
            self._inception = InceptionFeatures(self.inception_weights, device=pl_module.device,
                                                batch_size=self.inception_batch_size, progress=False)  # fmt: skip
        indices = np.array_split(np.arange(self.num_samples), world)[rank].tolist()
        was_training = pl_module.training
        pl_module.eval()
        try:
            # Validation runs under inference_mode; classifier guidance needs autograd (the engine picks its mode).
            with torch.inference_mode(False):
                engine = self._engine(pl_module)
                images = [to_uint8(b.images) for b in engine.generate(indices, self.batch_size)]
                local = torch.cat(images) if images else torch.zeros(0, *engine.image_shape, dtype=torch.uint8)
                del images, engine
                ref = self._reference(trainer) if rank == 0 and any(m != "isc" for m in self.metrics) else None
                warn = ref is not None and not self._warned_resolution
                mismatch = resolution_mismatch(tuple(local.shape[1:]), ref) if warn else None
                if mismatch:
                    self._warned_resolution = True
                    rank_zero_warn(f"SampleQualityEvaluation: {mismatch}")
                launcher = SimpleNamespace(global_rank=rank, world_size=world, device=pl_module.device,
                                           broadcast=trainer.strategy.broadcast)  # the Trainer's processes
                values = evaluate_samples(
                    local, ref, feature_extractor=self._inception, metrics=self.metrics,
                    kid_subset_size=self.kid_subset_size, isc_splits=self.isc_splits, progress=False,
                    launcher=launcher,
                )  # fmt: skip
        finally:
            pl_module.train(was_training)
        del local, ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return values
