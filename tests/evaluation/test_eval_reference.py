"""Reference features: image folder / ADM npz / batches, cached once, reused, re-extracted when the key changes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from eval_helpers import TinyFeatures, smooth_images
from PIL import Image

import diffusion_pl.evaluation.reference as reference_mod
from diffusion_pl.evaluation import (
    InceptionFeatures,
    evaluate_samples,
    fid_statistics,
    reference_features,
    resolve_reference,
    save_samples_npz,
)
from diffusion_pl.utils.images import nchw_to_nhwc


def png_folder(path, images: torch.Tensor) -> str:
    os.makedirs(path, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(path, f"{i:03d}.png"))
    return str(path)


def assert_same(a, b):
    for k in ("pool", "logits"):
        torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=0, atol=0)
    for k in ("mu", "sigma"):
        np.testing.assert_array_equal(a[k], b[k])


def test_folder_reference_is_cached_and_reused(tmp_path):
    images = smooth_images(6, size=16, seed=0)
    folder = png_folder(tmp_path / "real", images)
    first = TinyFeatures()
    ref = reference_features(folder, feature_extractor=first, cache_dir=str(tmp_path / "cache"))
    assert first.calls == 1
    torch.testing.assert_close(ref["pool"], TinyFeatures()(images)["pool"])  # PNG round trip is lossless
    stats = fid_statistics(ref["pool"])
    np.testing.assert_array_equal(ref["mu"], stats["mu"])
    cache_files = os.listdir(tmp_path / "cache")
    assert len(cache_files) == 1 and cache_files[0].startswith("real-") and cache_files[0].endswith(".npz")

    second = TinyFeatures()
    again = reference_features(folder, feature_extractor=second, cache_dir=str(tmp_path / "cache"))
    assert second.calls == 0  # read from the cache, no extraction
    assert_same(ref, again)

    # the folder changes (one more image): the key changes, features are re-extracted and the cache replaced
    png_folder(tmp_path / "real", smooth_images(7, size=16, seed=0))
    third = TinyFeatures()
    grown = reference_features(folder, feature_extractor=third, cache_dir=str(tmp_path / "cache"))
    assert third.calls == 1 and grown["pool"].shape[0] == 7
    assert os.listdir(tmp_path / "cache") == cache_files  # replaced in place, no temporary left behind


def test_cache_invalidated_when_inception_weights_change(tmp_path, monkeypatch, random_inception_weights):
    built = []

    class CountingInception(InceptionFeatures):
        def __init__(self, weights_path=None, **kw):
            built.append(weights_path)
            super().__init__(weights_path, **kw)

    monkeypatch.setattr(reference_mod, "InceptionFeatures", CountingInception)
    folder = png_folder(tmp_path / "real", smooth_images(2, size=16, seed=1))
    other_weights = str(tmp_path / "copy_of_weights.pth")
    shutil.copyfile(random_inception_weights, other_weights)
    kw = dict(device="cpu", cache_dir=str(tmp_path / "cache"))

    a = reference_features(folder, weights_path=random_inception_weights, **kw)
    assert built == [random_inception_weights] and a["pool"].shape == (2, 2048) and a["logits"].shape == (2, 1008)
    b = reference_features(folder, weights_path=random_inception_weights, **kw)
    assert built == [random_inception_weights]  # cache hit: no network built, no extraction
    assert_same(a, b)
    c = reference_features(folder, weights_path=other_weights, **kw)
    assert built == [random_inception_weights, other_weights]  # other weights file: re-extracted
    torch.testing.assert_close(c["pool"], a["pool"])  # same bytes, so same features


def test_adm_npz_reference_and_batches_reference(tmp_path):
    images = smooth_images(5, size=8, seed=2)
    npz = save_samples_npz(tmp_path / "VIRTUAL_ref.npz", nchw_to_nhwc(images))
    ref = reference_features(npz, feature_extractor=TinyFeatures(), cache_dir=str(tmp_path / "cache"))
    torch.testing.assert_close(ref["pool"], TinyFeatures()(images)["pool"])

    batches = [images[:2], images[2:]]  # e.g. a DataModule split mapped to uint8
    with pytest.raises(ValueError, match="source_id="):
        reference_features(iter(batches), feature_extractor=TinyFeatures(), cache_dir=str(tmp_path / "cache"))
    kw = dict(source_id="tiny-train", num_images=5, cache_dir=str(tmp_path / "cache"))
    from_batches = reference_features(iter(batches), feature_extractor=TinyFeatures(), **kw)
    assert_same(from_batches, ref)
    unused = TinyFeatures()
    reference_features(iter(batches), feature_extractor=unused, **kw)
    assert unused.calls == 0
    changed = TinyFeatures()
    reference_features(iter(batches[:1]), feature_extractor=changed, **{**kw, "num_images": 2})
    assert changed.calls == 1


def test_corrupt_cache_is_re_extracted_and_cache_path_resolves(tmp_path):
    images = smooth_images(4, size=8, seed=3)
    cache = str(tmp_path / "ref_cache.npz")
    ref = reference_features(images, feature_extractor=TinyFeatures(), source_id="t", cache_path=cache)
    with open(cache, "r+b") as f:
        f.truncate(100)
    again = TinyFeatures()
    assert_same(reference_features(images, feature_extractor=again, source_id="t", cache_path=cache), ref)
    assert again.calls == 1
    # a cache file can be handed to evaluate_samples as the reference
    assert_same(resolve_reference(cache), ref)
    gen = smooth_images(6, size=8, seed=4)
    opts = dict(feature_extractor=TinyFeatures(), metrics=("fid", "prc"))
    assert evaluate_samples(gen, cache, **opts) == evaluate_samples(gen, ref, **opts)


def test_reference_records_its_image_shape_through_the_cache(tmp_path):
    """The [C, H, W] of the reference images is kept (also in the cache) so evaluate can tell when samples and
    reference differ in resolution; from a folder, an npz and batches."""
    from diffusion_pl.evaluation.reference import resolution_mismatch

    images = smooth_images(5, size=8, seed=3)  # [5, 3, 8, 8]
    npz = save_samples_npz(tmp_path / "ref.npz", nchw_to_nhwc(images))
    sources = {"folder": png_folder(tmp_path / "real", images), "npz": npz}
    for name, source in sources.items():
        for attempt in ("extracted", "cached"):
            ref = reference_features(source, feature_extractor=TinyFeatures(), cache_dir=str(tmp_path / "cache"))
            assert tuple(ref["image_shape"]) == (3, 8, 8), (name, attempt)
    batches = reference_features(iter([images[:2], images[2:]]), feature_extractor=TinyFeatures(),
                                 source_id="b", num_images=5, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert tuple(batches["image_shape"]) == (3, 8, 8)
    assert resolution_mismatch((3, 8, 8), batches) is None
    message = resolution_mismatch((1, 28, 28), batches)
    assert message.startswith("the samples are 28x28 with 1 channel(s) but the reference images are 8x8 with 3:")
    assert resolution_mismatch((1, 28, 28), {"mu": 0, "sigma": 1}) is None  # statistics only: unknown, no warning
