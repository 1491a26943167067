"""The Python entry point for notebooks: ``diffusion_pl.load(checkpoint) -> Sampler``; ``Sampler.sample(...)`` ->
uint8 NHWC images; ``diffusion_pl.grid(images)`` -> one PIL image. A thin layer over
:class:`~diffusion_pl.sampling.SampleEngine` (the sampler of ``diffusion-pl sample``): the same options, seeds and
images.

    import diffusion_pl
    sampler = diffusion_pl.load("64x64_diffusion.pt", preset="adm_imagenet64")
    images = sampler.sample(labels=[207, 360], num_images=4, method="ddim", steps=50, seed=0)
    diffusion_pl.grid(images)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from diffusion_pl.commands.common import (
    LoadedClassifier,
    LoadedModel,
    build_engine,
    engine_options,
    load_classifier,
    load_model,
)
from diffusion_pl.commands.options import ClassifierSource, Guidance, ModelSource, SamplingOptions
from diffusion_pl.data.imagenet_classes import sorted_wnids
from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning.checkpoints import read_checkpoint, saved_class_names
from diffusion_pl.sampling.engine import PRECISIONS
from diffusion_pl.sampling.shards import grid_images
from diffusion_pl.utils.images import image_grid, nchw_to_nhwc, to_uint8

LabelsArg = int | str | Sequence[int | str] | None


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(checkpoint: str, preset: str | None = None, *, device: str | torch.device | None = None,
         precision: str = "32-true", diffusion_steps: int | None = None, noise_schedule: str | None = None,
         rescale_timesteps: bool | None = None) -> Sampler:  # fmt: skip
    """A :class:`Sampler` for a diffusion-pl checkpoint (``preset`` None: the file carries its settings) or a released
    OpenAI ``.pt`` (``preset``: a name of ``diffusion_pl.models.RELEASED_CONFIGS`` such as "adm_imagenet64", or a YAML
    file of UNetModel arguments). The process of a released file comes from the preset
    (``diffusion_pl.models.RELEASED_PROCESS``; ``diffusion_steps`` / ``noise_schedule`` / ``rescale_timesteps`` override
    it). ``device``: default the GPU if
    there is one; ``precision``: "32-true", "bf16-mixed" or "16-mixed" (autocast around the network)."""
    if precision not in PRECISIONS:  # before the checkpoint is read, not at the first sample()
        raise UserInputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if preset is None and any(v is not None for v in (diffusion_steps, noise_schedule, rescale_timesteps)):
        raise UserInputError("diffusion_steps / noise_schedule / rescale_timesteps apply to released .pt files (with "
                             "preset=...); a diffusion-pl checkpoint carries its own process")  # fmt: skip
    if preset is None:
        loaded = load_model(ModelSource(ckpt=checkpoint))
        class_names = saved_class_names(read_checkpoint(checkpoint, "checkpoint"))
    else:
        loaded = load_model(ModelSource(openai_ckpt=checkpoint, arch=preset, diffusion_steps=diffusion_steps,
                                        noise_schedule=noise_schedule, rescale_timesteps=rescale_timesteps))
        class_names = list(sorted_wnids()) if loaded.num_classes == 1000 else None
    return Sampler(loaded, device=device or default_device(), precision=precision, class_names=class_names)


class Sampler:
    """A loaded diffusion model ready to sample; see :func:`load`.

    Attributes: ``image_size``, ``in_channels``, ``num_classes`` (None: unconditional), ``null_class`` (the label of
    the classifier-free null class, or None), ``num_timesteps`` (T), ``class_names`` (label -> name when known: the
    class folders of an ImageFolderDataModule run, the WordNet IDs of a released 1000-class model)."""

    def __init__(self, model: LoadedModel, device: str | torch.device, precision: str = "32-true",
                 class_names: list[str] | None = None) -> None:  # fmt: skip
        self.model, self.precision, self.class_names = model, precision, class_names
        self.device = torch.device(device)
        model.net.to(self.device)
        self.image_size, self.in_channels = model.image_size, model.in_channels
        self.num_classes, self.null_class = model.num_classes, model.null_class
        self.num_timesteps = model.diffusion.num_timesteps
        self._classifiers: dict[tuple[str, str | None], LoadedClassifier] = {}

    def __repr__(self) -> str:
        return (f"Sampler({self.in_channels}x{self.image_size}x{self.image_size}, classes={self.num_classes}, "
                f"null_class={self.null_class}, T={self.num_timesteps}, device={self.device})")  # fmt: skip

    def label_ids(self, labels: LabelsArg, num_images: int, class_names: list[str] | None = None) -> list[int] | None:
        """``labels`` (one for all images or one per image; ints, numpy / torch integers or class names) as a list of
        ``num_images`` ints; names are looked up in ``class_names`` (default: the model's)."""
        if labels is None:
            return None
        items = [labels] if isinstance(labels, str) or np.ndim(labels) == 0 else list(labels)
        if len(items) not in (1, num_images):
            raise UserInputError(f"labels has {len(items)} entries: give one (for every image) or num_images = "
                                 f"{num_images}")  # fmt: skip
        ids = [self._label_id(v, class_names or self.class_names) for v in items]
        return ids * num_images if len(ids) == 1 else ids

    @staticmethod
    def _label_id(label: int | str, class_names: list[str] | None) -> int:
        if not isinstance(label, str):
            return int(label)
        if class_names is None or label not in class_names:
            known = f"; known names: {', '.join(class_names[:8])} ..." if class_names else ""
            raise UserInputError(f"label {label!r} is not a class name of this model{known}")
        return class_names.index(label)

    def classifier(self, path: str, preset: str | None = None) -> LoadedClassifier:
        """A noisy classifier (NoisyClassifierModule checkpoint, or a released .pt with its preset), loaded once."""
        key = (path, preset)
        if key not in self._classifiers:
            if preset is None:
                source = ClassifierSource(classifier_ckpt=path)
            else:
                source = ClassifierSource(classifier_openai_ckpt=path, classifier_arch=preset)
            loaded = load_classifier(self.model, source)
            loaded.net.to(self.device)
            self._classifiers[key] = loaded
        return self._classifiers[key]

    def sample(self, num_images: int = 8, labels: LabelsArg = None, *, method: str = "ddim",
               steps: int | str | None = None, eta: float | None = None, classifier: str | None = None,
               classifier_preset: str | None = None, classifier_scale: float | None = None, cfg_scale: float = 0.0,
               seed: int = 0, batch_size: int = 16, progress: bool = True,
               return_labels: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
        """``num_images`` samples as uint8 NHWC (N, H, W, C). Image i depends only on (seed, i) and the settings: the
        same image whatever ``batch_size``, and the same as ``diffusion-pl sample`` with these options.

        labels: one class (int or name) for all images, one per image, or None (random per image from the seed).
        method / steps / eta: the sampling method (docs/SAMPLERS.md: "ddim", "ddpm", ...), its step count or
        respacing ("50", "ddim25", "10,10,20"; None: 50, or all T when T < 50) and eta (None: the method's default).
        classifier (+ classifier_preset for a released .pt) and classifier_scale (default 1.0 with a classifier):
        classifier guidance; cfg_scale: classifier-free guidance w.
        return_labels: also return the int64 labels used (None for an unconditional model without guidance)."""
        if num_images < 1:
            raise UserInputError(f"num_images must be >= 1, got {num_images}")
        steps = str(min(50, self.num_timesteps)) if steps is None else str(steps)
        noise = {} if eta is None else {"eta": eta}  # None: the method's default, as the sample command's
        sampling = SamplingOptions(steps=steps, method=method, seed=seed, precision=self.precision, **noise)  # checks
        loaded = self.classifier(classifier, classifier_preset) if classifier is not None else None
        scale = (1.0 if loaded is not None else 0.0) if classifier_scale is None else float(classifier_scale)
        if labels is not None and self.num_classes is None and not scale:
            raise UserInputError(
                "labels have no effect: the model is unconditional and no classifier guides it; drop labels, or pass "
                "classifier=... (classifier_scale > 0) to steer the samples towards them"
            )
        # An unconditional released model guided by an ImageNet classifier takes WordNet IDs as names too.
        names = list(sorted_wnids()) if self.class_names is None and loaded and loaded.num_classes == 1000 else None
        ids = self.label_ids(labels, num_images, names)
        options = engine_options(self.model, loaded, sampling, Guidance(classifier_scale=scale, cfg_scale=cfg_scale))
        engine = build_engine(self.model, loaded, options, device=self.device, progress=progress)
        images, used = [], []
        for batch in engine.generate(range(num_images), batch_size, labels=ids):
            images.append(nchw_to_nhwc(to_uint8(batch.images)))  # uint8 per batch: a quarter of float32's memory
            used.append(None if batch.labels is None else batch.labels.numpy())
        images = np.concatenate(images)
        if not return_labels:
            return images
        return images, None if used[0] is None else np.concatenate(used)


def grid(images: np.ndarray, labels: Sequence[int] | np.ndarray | None = None, nrow: int | None = None,
         padding: int = 2) -> Image.Image:  # fmt: skip
    """One PIL image of uint8 NHWC ``images``: with ``labels`` a row per class (as grid.png of ``diffusion-pl
    sample``), else ``nrow`` images per row (default: a square)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserInputError(f"grid takes uint8 NHWC images, got {images.dtype} {images.shape}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise UserInputError(f"grid: {len(labels)} labels for {len(images)} images; give one label per image")
        if nrow is not None:
            raise UserInputError("grid: nrow applies without labels; with labels each class gets a row")
        cells, ncols = grid_images(images, labels)
    else:
        cells = torch.from_numpy(images).permute(0, 3, 1, 2)
        ncols = nrow or int(np.ceil(np.sqrt(len(images))))
    array = image_grid(cells, ncols, padding).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if images.shape[-1] == 1 else array)
