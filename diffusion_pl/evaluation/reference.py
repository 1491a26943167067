"""Reference (real-data) features and FID statistics, extracted once and cached on disk.

Sources: (a) a folder of images (png/jpg/jpeg, non-recursive, sorted like torch-fidelity), (b) an ADM reference npz
(arr_0 = uint8 NHWC), (c) any iterable of uint8 NCHW batches (the caller adapts a DataModule split and names it with
`source_id`). The cache is one npz holding mu, sigma, pool and logits plus a key built from the source (path and size)
and the feature extractor's identity (weights file path/size/mtime): a cache whose key differs is re-extracted and
atomically replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from diffusion_pl.errors import UserFileNotFoundError, UserInputError
from diffusion_pl.evaluation.features import InceptionFeatures, weights_identity
from diffusion_pl.evaluation.metrics import fid_statistics
from diffusion_pl.evaluation.npz import load_samples_npz
from diffusion_pl.utils.files import atomic_write
from diffusion_pl.utils.images import nhwc_to_nchw

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
CACHE_FORMAT_VERSION = 1
FeatureExtractor = Callable[..., dict]


def default_cache_dir() -> str:
    """$DIFFUSION_PL_CACHE/reference, else ~/.cache/diffusion_pl/reference."""
    root = os.environ.get("DIFFUSION_PL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_pl")
    return os.path.join(root, "reference")


def list_image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserFileNotFoundError(f"{folder}: not a directory of reference images")
    files = sorted(
        os.path.realpath(os.path.join(folder, f))
        for f in os.listdir(folder)
        if os.path.splitext(f)[1].lower().lstrip(".") in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, f))
    )
    if not files:
        raise UserInputError(f"{folder}: no images with extensions {IMAGE_EXTENSIONS}")
    return files


def images_from_folder(folder: str, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Yield uint8 NCHW RGB batches from the images of `folder` (all images must have the same size)."""
    files = list_image_files(folder)
    first_size = None
    for i in range(0, len(files), batch_size):
        batch = []
        for path in files[i : i + batch_size]:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            if first_size is None:
                first_size = arr.shape
            elif arr.shape != first_size:
                raise UserInputError(f"{path}: image size {arr.shape[:2]} differs from {first_size[:2]} of {files[0]}")
            batch.append(arr)
        yield nhwc_to_nchw(np.stack(batch))


def images_from_npz(path: str) -> torch.Tensor:
    """uint8 NCHW images of an ADM npz (arr_0 uint8 NHWC), validated by load_samples_npz."""
    images, _ = load_samples_npz(path)
    return nhwc_to_nchw(images)


def _source_key(source, source_id: str | None, num_images: int | None) -> tuple[str, dict]:
    """(source id, size description) for the cache key."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.realpath(os.fspath(source))
        if os.path.isdir(path):
            files = list_image_files(path)
            return path, {"files": len(files), "bytes": sum(os.path.getsize(f) for f in files)}
        if os.path.isfile(path):
            return path, {"bytes": os.path.getsize(path)}
        raise UserFileNotFoundError(f"{source}: reference source is neither a folder of images nor an npz file")
    if source_id is None:
        raise ValueError(
            "a reference given as batches needs source_id= (e.g. 'cifar10-train') to key its cache, or cache=False"
        )
    return source_id, {"images": num_images}


def _iter_source(source, batch_size: int) -> tuple[Iterable, int | None]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return images_from_folder(path, batch_size), len(list_image_files(path))
        images = images_from_npz(path)
        return images, images.shape[0]
    if isinstance(source, torch.Tensor):
        return source, source.shape[0]
    return source, None


def _recording_first_shape(images, into: list):
    """``images`` (a uint8 NCHW tensor or an iterable of batches) unchanged; the [C, H, W] of the first batch is
    appended to ``into`` as the images are consumed."""
    if isinstance(images, torch.Tensor):
        into.append(tuple(images.shape[1:]))
        return images

    def batches():
        for batch in images:
            if not into:
                into.append(tuple(batch.shape[1:]))
            yield batch

    return batches()


def resolution_mismatch(sample_shape: tuple[int, ...], ref) -> str | None:
    """A warning when the samples ([C, H, W]) and the reference images differ in size or channels (Inception sees
    both resized to 299 x 299, so the metrics would compare different resolutions); None when they agree or the
    reference's image shape is unknown (statistics-only caches)."""
    ref_shape = ref.get("image_shape") if ref is not None else None
    if ref_shape is None or tuple(int(s) for s in ref_shape) == tuple(sample_shape):
        return None
    (c, h, w), (rc, rh, rw) = sample_shape, (int(s) for s in ref_shape)
    return (
        f"the samples are {h}x{w} with {c} channel(s) but the reference images are {rh}x{rw} with {rc}: Inception "
        "resizes both to 299x299, so these metrics compare different resolutions (ADM's protocol uses a reference "
        "batch at the samples' resolution)"
    )


def _from_cache_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray | torch.Tensor]:
    """The reference dict of a cache file's arrays: mu, sigma (numpy), pool, logits (torch), image_shape if present."""
    out: dict[str, np.ndarray | torch.Tensor] = {"mu": arrays["mu"], "sigma": arrays["sigma"]}
    for k in ("pool", "logits"):
        if k in arrays:
            out[k] = torch.from_numpy(arrays[k])
    if "image_shape" in arrays:
        out["image_shape"] = arrays["image_shape"]
    return out


def extractor_identity(extractor) -> str:
    ident = getattr(extractor, "identity", None)
    return ident if ident is not None else f"{type(extractor).__module__}.{type(extractor).__qualname__}"


def default_cache_path(source_id: str, cache_dir: str | None = None) -> str:
    base = os.path.basename(source_id.rstrip("/\\")) or "reference"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:64]
    digest = hashlib.sha1(source_id.encode()).hexdigest()[:12]
    return os.path.join(cache_dir or default_cache_dir(), f"{safe}-{digest}.npz")


def read_cache(path: str) -> tuple[str, dict[str, np.ndarray]] | None:
    """(key, arrays) of a cache file, or None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if "key" not in arrays:
        return None
    return str(arrays.pop("key")), arrays


def reference_features(
    source,
    feature_extractor: FeatureExtractor | None = None,
    weights_path: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    cache: bool = True,
    cache_path: str | None = None,
    cache_dir: str | None = None,
    source_id: str | None = None,
    num_images: int | None = None,
) -> dict[str, np.ndarray | torch.Tensor]:
    """Reference features and FID statistics: dict(pool, logits [torch float32], mu, sigma [numpy]), and
    image_shape ([C, H, W] of the reference images; absent in caches written before it was recorded).

    source: a folder of images, an ADM npz path, a uint8 NCHW tensor, or an iterable of uint8 NCHW batches
        (then pass source_id, and num_images if known, to key the cache).
    feature_extractor: callable images -> dict(pool, logits);
        default InceptionFeatures(weights_path, device, batch_size), built only when the cache misses.
    cache_path: the cache file; default <cache_dir>/<name>-<hash of source id>.npz, cache_dir default
        $DIFFUSION_PL_CACHE/reference or ~/.cache/diffusion_pl/reference.
    """
    ident = extractor_identity(feature_extractor) if feature_extractor is not None else weights_identity(weights_path)
    key = None
    if cache:
        sid, size = _source_key(source, source_id, num_images)
        key = json.dumps(
            {"version": CACHE_FORMAT_VERSION, "source": sid, "size": size, "extractor": ident}, sort_keys=True
        )
        cache_path = cache_path or default_cache_path(sid, cache_dir)
        hit = read_cache(cache_path)
        if hit is not None and hit[0] == key and {"pool", "logits", "mu", "sigma"} <= set(hit[1]):
            return _from_cache_arrays(hit[1])

    if feature_extractor is None:
        feature_extractor = InceptionFeatures(weights_path, device=device, batch_size=batch_size)
    images, total = _iter_source(source, batch_size)
    first_shape: list[tuple[int, ...]] = []
    images = _recording_first_shape(images, first_shape)
    if isinstance(feature_extractor, InceptionFeatures):
        feats = feature_extractor(images, total=total)
    else:
        feats = feature_extractor(images)
    if feats["pool"].shape[0] < 2:
        raise UserInputError(f"reference {source_id or source!r} gave {feats['pool'].shape[0]} images; need at least 2")
    stats = fid_statistics(feats["pool"])
    out = {"pool": feats["pool"], "logits": feats["logits"], "mu": stats["mu"], "sigma": stats["sigma"]}
    if first_shape:
        out["image_shape"] = np.asarray(first_shape[0], dtype=np.int64)
    if cache:
        arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
        atomic_write(cache_path, lambda f: np.savez(f, key=np.array(key), **arrays))
    return out


def load_reference(path: str) -> dict[str, np.ndarray | torch.Tensor]:
    """Read a reference cache file written by reference_features (no key check) -> dict(pool, logits, mu, sigma)."""
    hit = read_cache(path)
    if hit is None:
        raise UserInputError(f"{path}: not a diffusion-pl reference cache (npz with key, mu, sigma, pool, logits)")
    arrays = hit[1]
    missing = {"mu", "sigma"} - set(arrays)
    if missing:
        raise UserInputError(f"{path}: reference cache lacks {sorted(missing)}")
    return _from_cache_arrays(arrays)
