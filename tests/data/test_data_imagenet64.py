"""ImageNet64DataModule on official-format npz batches and an image folder written by the test: pixels, labels in
both class orders, the prepared cache (atomic, shared by concurrent writers), prepare_data_per_node."""

import fnmatch
import json
import pickle
import re
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
from PIL import Image

from diffusion_pl.data import CIFAR10DataModule, ImageNet64DataModule, imagenet64
from diffusion_pl.data.folder import center_crop_arr
from diffusion_pl.data.imagenet_classes import (
    DEVKIT_SYNSETS_FILE,
    check_devkit_table,
    devkit_to_sorted,
    devkit_wnids,
    sorted_wnids,
)
from diffusion_pl.utils.images import to_uint8

ROOT = Path(__file__).resolve().parents[2]

S = 64
PLANE = S * S


def _write_npz(root, n_per_batch=3, seed=0):
    """Official layout: Imagenet64_train_part1_npz/train_data_batch_1..5, part2/6..10, Imagenet64_val/val_data."""
    rng = np.random.default_rng(seed)
    batches = {}
    for i in range(1, 11):
        folder = root / ("Imagenet64_train_part1_npz" if i <= 5 else "Imagenet64_train_part2_npz")
        batches[f"train_data_batch_{i}"] = folder
    batches["val_data"] = root / "Imagenet64_val"
    written = {}
    for name, folder in batches.items():
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.integers(0, 256, size=(n_per_batch, 3 * PLANE), dtype=np.uint8)
        labels = rng.integers(1, 1001, size=n_per_batch).tolist()  # 1-based, as released
        labels[0] = 1000 if name == "val_data" else labels[0]
        np.savez(folder / f"{name}.npz", data=data, labels=labels, mean=data.mean(0))
        written[name] = (data, np.asarray(labels))
    return written


@pytest.fixture
def npz_root(tmp_path):
    return tmp_path, _write_npz(tmp_path)


def test_attributes_after_init():
    dm = ImageNet64DataModule(data_dir="nowhere")
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (64, 3, 1000)
    assert ImageNet64DataModule(data_dir="nowhere", class_cond=False).num_classes == 0


def test_npz_planar_to_hwc_and_labels(npz_root):
    root, written = npz_root
    dm = ImageNet64DataModule(data_dir=str(root), batch_size=4, num_workers=0, random_flip=False, label_order="devkit")
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 3
    assert isinstance(dm.train_dataset.images, np.memmap)
    # batch order is numeric: batch 10 comes last, so item 27 is row 0 of train_data_batch_10
    for index, (name, row) in {
        0: ("train_data_batch_1", 0),
        5: ("train_data_batch_2", 2),
        27: ("train_data_batch_10", 0),
        29: ("train_data_batch_10", 2),
    }.items():
        data, labels = written[name]
        x, y = dm.train_dataset[index]
        assert x.shape == (3, S, S) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.item() == labels[row] - 1
        pixels = to_uint8(x[None])[0]
        assert torch.equal(pixels, torch.from_numpy(data[row].reshape(3, S, S)))
        hwc = dm.train_dataset.images[index]
        r, c = 5, 17
        at = r * S + c  # offset inside each plane
        assert tuple(hwc[r, c]) == (data[row][at], data[row][PLANE + at], data[row][2 * PLANE + at])
    vdata, vlabels = written["val_data"]
    xs, ys = next(iter(dm.val_dataloader()))
    assert torch.equal(to_uint8(xs), torch.from_numpy(vdata.reshape(-1, 3, S, S)))
    assert ys.tolist() == (vlabels - 1).tolist() and ys[0].item() == 999
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, S, S) and -1 <= x.min() and x.max() <= 1
    assert len(dm.train_dataloader()) == 30 // 4


def test_cache_written_once_atomically(npz_root):
    root, _ = npz_root
    cache = root / "cache"
    dm = ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0)
    dm.prepare_data()
    files = sorted(p.name for p in cache.iterdir())
    assert files == [
        "npz64_train_images.npy",
        "npz64_train_labels.npy",
        "npz64_train_labels_sorted_wnid.json",
        "npz64_train_labels_sorted_wnid.npy",
        "npz64_train_manifest.json",
        "npz64_val_images.npy",
        "npz64_val_labels.npy",
        "npz64_val_labels_sorted_wnid.json",
        "npz64_val_labels_sorted_wnid.npy",
        "npz64_val_manifest.json",
    ]  # no temp leftovers
    manifest = json.loads((cache / "npz64_train_manifest.json").read_text())
    assert manifest["count"] == 30 and manifest["source"] == "npz" and manifest["counts"] == [3] * 10
    assert manifest["inputs"][-1] == "Imagenet64_train_part2_npz/train_data_batch_10.npz"
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0).prepare_data()
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    # an incomplete cache (no manifest: interrupted run) is rebuilt
    (cache / "npz64_val_manifest.json").unlink()
    dm.prepare_data()
    assert (cache / "npz64_val_manifest.json").exists()
    assert (cache / "npz64_train_images.npy").stat().st_mtime_ns == mtimes[cache / "npz64_train_images.npy"]


def test_default_cache_dir_and_workers_share_memmap(npz_root):
    root, written = npz_root
    dm = ImageNet64DataModule(data_dir=str(root), batch_size=10, num_workers=2, random_flip=False)
    dm.prepare_data()
    assert (root / "prepared" / "npz64_train_images.npy").is_file()
    dm.setup("fit")
    assert len(pickle.dumps(dm.train_dataset)) < 10_000  # the memmap is reopened in workers, not copied
    xs = torch.cat([x for x, _ in dm.val_dataloader()])
    assert torch.equal(to_uint8(xs), torch.from_numpy(written["val_data"][0].reshape(-1, 3, S, S)))


def test_class_cond_false_gives_zero_labels(npz_root):
    root, _ = npz_root
    dm = ImageNet64DataModule(data_dir=str(root), num_workers=0, class_cond=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 0 and all(dm.train_dataset[i][1].item() == 0 for i in range(30))


def test_missing_and_corrupt_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data_batch_1.npz"):
        ImageNet64DataModule(data_dir=str(tmp_path / "absent")).prepare_data()
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing train_data_batch_\*\.npz val_data\.npz"):
        ImageNet64DataModule(data_dir=str(tmp_path / "empty")).prepare_data()
    with pytest.raises(RuntimeError, match="prepare_data"):
        ImageNet64DataModule(data_dir=str(tmp_path / "empty")).setup("fit")

    root = tmp_path / "corrupt"
    _write_npz(root)
    bad = root / "Imagenet64_train_part1_npz" / "train_data_batch_3.npz"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated download
    with pytest.raises(ValueError, match="train_data_batch_3.npz"):
        ImageNet64DataModule(data_dir=str(root), num_workers=0).prepare_data()
    assert not list((root / "prepared").glob("*train*"))  # nothing half-written left behind

    np.savez(bad, data=np.zeros((3, 3 * 32 * 32), np.uint8), labels=[1, 2, 3])  # a 32x32 batch
    with pytest.raises(ValueError, match=r"'data' must be uint8 \(3, 12288\)"):
        ImageNet64DataModule(data_dir=str(root), num_workers=0).prepare_data()
    np.savez(bad, data=np.zeros((3, 3 * PLANE), np.uint8), labels=[0, 1, 2])  # 0-based labels
    with pytest.raises(ValueError, match="1-based"):
        ImageNet64DataModule(data_dir=str(root), num_workers=0).prepare_data()
    np.savez(bad, images=np.zeros((3, 3 * PLANE), np.uint8), labels=[1, 2, 3])  # wrong key
    with pytest.raises(ValueError, match="'data'"):
        ImageNet64DataModule(data_dir=str(root), num_workers=0).prepare_data()


# ---------------------------------------------------------------- image folder


def _write_folder(root):
    """train/{b_zebra,a_ant}, val/{a_ant}; non-square sizes and non-RGB modes."""
    rng = np.random.default_rng(0)
    specs = {
        ("train", "b_zebra"): [
            ("wide.png", (128, 64), "RGB"),
            ("tall.png", (70, 300), "L"),
            ("big.jpg", (517, 260), "RGB"),
        ],
        ("train", "a_ant"): [("rgba.png", (90, 65), "RGBA"), ("p.gif", (64, 64), "P")],
        ("val", "a_ant"): [("v.png", (200, 100), "RGB")],
    }
    arrays = {}
    for (split, cls), files in specs.items():
        folder = root / split / cls
        folder.mkdir(parents=True)
        for name, (w, h), mode in files:
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            image = Image.fromarray(arr).convert(mode)
            image.save(folder / name)
            arrays[(split, cls, name)] = arr
    (root / "train" / "b_zebra" / "notes.txt").write_text("not an image")
    return arrays


def test_center_crop_arr_adm_preprocessing():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(64, 128, 3), dtype=np.uint8)  # min side == size: no resampling, crop only
    assert np.array_equal(center_crop_arr(Image.fromarray(arr), 64), arr[:, 32:96])
    # 260x517 -> BOX halving to 130x258 (130 >= 128), then BICUBIC to 64x127, crop columns 31..95
    left_right = np.zeros((260, 517, 3), np.uint8)
    left_right[:, 258:] = 255
    out = center_crop_arr(Image.fromarray(left_right), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:, :28] == 0).all() and (out[:, 36:] == 255).all()  # the edge lands in the middle of the crop
    assert center_crop_arr(Image.fromarray(arr[:, :, 0]), 32).shape == (32, 32)  # the image's own mode


def test_folder_source(tmp_path):
    arrays = _write_folder(tmp_path)
    dm = ImageNet64DataModule(data_dir=str(tmp_path), source="folder", batch_size=2, num_workers=0, random_flip=False)
    assert dm.class_names == ["a_ant", "b_zebra"] and dm.num_classes == 2  # known right after __init__
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 5 and len(dm.val_dataset) == 1
    labels = [dm.train_dataset[i][1].item() for i in range(5)]
    assert labels == [0, 0, 1, 1, 1]  # classes in sorted order, files sorted within a class: p.gif, rgba.png, ...
    images = np.asarray(dm.train_dataset.images)
    assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8
    # b_zebra/wide.png is 128x64: exactly the centre 64 columns
    assert np.array_equal(images[4], arrays[("train", "b_zebra", "wide.png")][:, 32:96])
    x, y = dm.val_dataset[0]
    assert x.shape == (3, 64, 64) and y.item() == 0
    manifest = json.loads((tmp_path / "prepared" / "folder64_train_manifest.json").read_text())
    assert manifest["class_names"] == ["a_ant", "b_zebra"] and manifest["count"] == 5
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64) and y.dtype == torch.int64


def test_folder_cache_follows_the_files(tmp_path):
    """Images added to (or replaced in) a class folder after the cache was made are prepared anew."""
    _write_folder(tmp_path)
    dm = ImageNet64DataModule(data_dir=str(tmp_path), source="folder", num_workers=0, random_flip=False)
    dm.prepare_data()
    manifest = tmp_path / "prepared" / "folder64_train_manifest.json"
    first = json.loads(manifest.read_text())["fingerprint"]
    dm.prepare_data()  # nothing changed: the cache stays
    assert json.loads(manifest.read_text())["fingerprint"] == first
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(tmp_path / "train" / "a_ant" / "new.png")
    dm = ImageNet64DataModule(data_dir=str(tmp_path), source="folder", num_workers=0, random_flip=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 1
    assert (np.asarray(dm.train_dataset.images) == 7).all(axis=(1, 2, 3)).sum() == 1


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class_name>"):
        ImageNet64DataModule(data_dir=str(tmp_path), source="folder")
    _write_folder(tmp_path)
    (tmp_path / "val" / "c_unknown").mkdir()
    dm = ImageNet64DataModule(data_dir=str(tmp_path), source="folder", num_workers=0)
    with pytest.raises(ValueError, match="c_unknown"):
        dm.prepare_data()
    (tmp_path / "val" / "c_unknown").rmdir()
    # train was prepared before val failed and is kept; val is still missing
    assert (tmp_path / "prepared" / "folder64_train_manifest.json").exists()
    assert not (tmp_path / "prepared" / "folder64_val_manifest.json").exists()
    (tmp_path / "val" / "a_ant" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken.png.*Replace or remove it$"):
        dm.prepare_data()
    assert not list((tmp_path / "prepared").glob("*val*"))  # no partial files left


# ---------------------------------------------------------------- class order (label_order)

KIT_FOX, TENCH, GOLDFISH, GOLDEN_RETRIEVER = "n02119789", "n01440764", "n01443537", "n02099601"
DEVKIT_ID = {KIT_FOX: 1, GOLDEN_RETRIEVER: 125, TENCH: 449, GOLDFISH: 450}  # 1-based npz labels (map_clsloc.txt)


def test_devkit_table_is_packaged_and_valid():
    wnids = devkit_wnids()
    assert len(wnids) == 1000 == len(set(wnids))
    assert all(wnids[k - 1] == w for w, k in DEVKIT_ID.items())
    ordered = sorted_wnids()
    assert (ordered[0], ordered[1], ordered[207]) == (TENCH, GOLDFISH, GOLDEN_RETRIEVER)
    table = devkit_to_sorted()
    assert sorted(table.tolist()) == list(range(1000))  # a permutation
    assert (table[448], table[449], table[124]) == (0, 1, 207) and table[0] == ordered.index(KIT_FOX)
    # found as package data (importlib.resources) and declared as such in pyproject.toml
    assert resources.files("diffusion_pl.data").joinpath(DEVKIT_SYNSETS_FILE).is_file()
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    patterns = re.findall(r'"([^"]+)"', re.search(r"^diffusion_pl\s*=\s*\[([^\]]*)\]", section, re.M).group(1))
    assert any(fnmatch.fnmatch(f"data/{DEVKIT_SYNSETS_FILE}", p) for p in patterns)


def test_damaged_table_is_refused():
    rows = [(w, k) for k, w in enumerate(devkit_wnids(), start=1)]
    assert check_devkit_table(rows) == devkit_wnids()
    swapped = [(rows[1][0], 1), (rows[0][0], 2)] + rows[2:]
    with pytest.raises(RuntimeError, match="devkit id 1 is n02100735, expected n02119789"):
        check_devkit_table(swapped)
    with pytest.raises(RuntimeError, match="repeat"):
        check_devkit_table([rows[0]] + [(rows[0][0], 2)] + rows[2:])
    with pytest.raises(RuntimeError, match="1..1000"):
        check_devkit_table(rows[:-1])
    shifted = [(w, k) for (w, _), k in zip(rows, range(2, 1002), strict=True)]
    with pytest.raises(RuntimeError, match="1..1000"):
        check_devkit_table(shifted)


def _write_npz_labels(root, train_labels, val_labels, seed=0):
    """One train batch and val_data with the given 1-based labels; returns the data rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for name, labels in (("train_data_batch_1", train_labels), ("val_data", val_labels)):
        rows = rng.integers(0, 256, size=(len(labels), 3 * PLANE), dtype=np.uint8)
        np.savez(root / f"{name}.npz", data=rows, labels=list(labels))
        data[name] = rows
    return data


def _labels(dataset):
    return [dataset[i][1].item() for i in range(len(dataset))]


def test_npz_labels_remap_to_sorted_wnid_order(tmp_path):
    train = [DEVKIT_ID[w] for w in (KIT_FOX, TENCH, GOLDFISH, GOLDEN_RETRIEVER)]
    _write_npz_labels(tmp_path, train, [DEVKIT_ID[GOLDFISH], 1000])
    dm = ImageNet64DataModule(data_dir=str(tmp_path), num_workers=0)  # label_order="sorted_wnid" by default
    dm.prepare_data()
    dm.setup("fit")
    assert _labels(dm.train_dataset) == [sorted_wnids().index(KIT_FOX), 0, 1, 207]
    assert _labels(dm.val_dataset) == [1, sorted_wnids().index(devkit_wnids()[999])]
    assert dm.class_names[207] == GOLDEN_RETRIEVER and dm.num_classes == 1000
    devkit = ImageNet64DataModule(data_dir=str(tmp_path), num_workers=0, label_order="devkit")
    devkit.prepare_data()
    devkit.setup("fit")
    assert _labels(devkit.train_dataset) == [0, 448, 449, 124]  # the release's label - 1
    assert devkit.class_names[0] == KIT_FOX
    with pytest.raises(ValueError, match="label_order must be"):
        ImageNet64DataModule(data_dir=str(tmp_path), label_order="wnid")


def test_folder_and_npz_sources_agree_on_the_label_of_a_wnid(tmp_path):
    folder = tmp_path / "folder"
    for wnid in devkit_wnids():  # ImageNet's layout: one folder per WordNet ID (images only in a few here)
        (folder / "train" / wnid).mkdir(parents=True)
    rng = np.random.default_rng(0)
    present = [KIT_FOX, TENCH, GOLDEN_RETRIEVER, GOLDFISH]
    for wnid in present:
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(folder / "train" / wnid / "a.png")
    (folder / "val" / GOLDFISH).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(folder / "val" / GOLDFISH / "v.png")
    from_folder = ImageNet64DataModule(data_dir=str(folder), source="folder", num_workers=0)
    from_folder.prepare_data()
    from_folder.setup("fit")
    folder_label = {}
    for i, y in enumerate(_labels(from_folder.train_dataset)):
        folder_label[from_folder.class_names[y]] = y
        assert from_folder.class_names[y] in present and i < len(present)

    npz = tmp_path / "npz"
    _write_npz_labels(npz, [DEVKIT_ID[w] for w in present], [DEVKIT_ID[GOLDFISH]])
    from_npz = ImageNet64DataModule(data_dir=str(npz), num_workers=0)
    from_npz.prepare_data()
    from_npz.setup("fit")
    npz_label = dict(zip(present, _labels(from_npz.train_dataset), strict=True))
    assert npz_label == folder_label == {KIT_FOX: sorted_wnids().index(KIT_FOX), TENCH: 0, GOLDFISH: 1,
                                         GOLDEN_RETRIEVER: 207}  # fmt: skip
    assert _labels(from_npz.val_dataset) == _labels(from_folder.val_dataset) == [1]
    assert from_npz.class_names == from_folder.class_names
    with pytest.raises(ValueError, match="applies to source 'npz' only"):
        ImageNet64DataModule(data_dir=str(folder), source="folder", label_order="devkit")


def test_label_order_is_part_of_the_cache_key(npz_root):
    root, written = npz_root
    cache = root / "cache"
    own = ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0, label_order="devkit")
    own.prepare_data()
    own.setup("fit")
    devkit_labels = np.concatenate([written[f"train_data_batch_{i}"][1] for i in range(1, 11)]) - 1
    assert _labels(own.train_dataset) == devkit_labels.tolist()
    assert not list(cache.glob("*sorted_wnid*"))  # the devkit order is the cache's own
    images_mtime = (cache / "npz64_train_images.npy").stat().st_mtime_ns

    relabelled = ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0)
    relabelled.prepare_data()
    relabelled.setup("fit")
    assert _labels(relabelled.train_dataset) == devkit_to_sorted()[devkit_labels].tolist()
    assert (cache / "npz64_train_images.npy").stat().st_mtime_ns == images_mtime  # images shared, not rebuilt
    manifest = json.loads((cache / "npz64_train_labels_sorted_wnid.json").read_text())
    assert manifest["label_order"] == "sorted_wnid" and manifest["count"] == 30

    # The cache is rebuilt from other npz files (other labels): the derived labels are stale and never read.
    written = _write_npz(root, seed=1)
    for manifest_file in cache.glob("npz64_*_manifest.json"):
        manifest_file.unlink()
    ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0, label_order="devkit").prepare_data()
    stale = ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0)
    with pytest.raises(RuntimeError, match="prepare_data"):
        stale.setup("fit")
    stale.prepare_data()  # re-derives them
    stale.setup("fit")
    devkit_labels = np.concatenate([written[f"train_data_batch_{i}"][1] for i in range(1, 11)]) - 1
    assert _labels(stale.train_dataset) == devkit_to_sorted()[devkit_labels].tolist()


# ---------------------------------------------------------------- several nodes preparing the same cache


@pytest.mark.parametrize("cls", [ImageNet64DataModule, CIFAR10DataModule])
def test_prepare_data_per_node(cls):
    assert cls().prepare_data_per_node is True
    for per_node, node_rank, expected in [(True, 1, 1), (False, 1, 0), (False, 0, 1)]:
        datamodule = cls(prepare_data_per_node=per_node)
        assert datamodule.prepare_data_per_node is per_node
        calls = []
        datamodule.prepare_data = lambda calls=calls: calls.append(1)
        # Lightning's rule, as the Trainer applies it on the first process of node `node_rank`
        trainer = SimpleNamespace(local_rank=0, node_rank=node_rank, datamodule=datamodule, lightning_module=None,
                                  profiler=PassThroughProfiler())  # fmt: skip
        _DataConnector(trainer).prepare_data()
        assert len(calls) == expected, (per_node, node_rank)


def test_concurrent_prepare_cannot_leave_a_truncated_cache(npz_root, monkeypatch):
    """Node A is half-way through writing the cache when node B prepares the same one from start to end; then A
    finishes. Readers only ever see no cache or a complete one, and no temporary file is left."""
    root, written = npz_root
    cache = root / "shared"
    real = imagenet64.planar_to_hwc
    seen = {}

    def node_b_runs_meanwhile(data, image_size):
        if not seen:
            seen["a_midway"] = {s: ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache)).split_files(s)
                                .read_manifest() for s in ("train", "val")}  # fmt: skip
            seen["final_names_midway"] = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
            ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0).prepare_data()
            seen["b_done"] = sorted(p.name for p in cache.iterdir())
        return real(data, image_size)

    monkeypatch.setattr(imagenet64, "planar_to_hwc", node_b_runs_meanwhile)
    node_a = ImageNet64DataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0, random_flip=False)
    node_a.prepare_data()
    assert seen["a_midway"] == {"train": None, "val": None}  # nothing complete visible while A writes
    assert seen["final_names_midway"] == []  # A's partial data is only under temporary names
    assert len(seen["b_done"]) == 10 + 1  # B's complete cache + A's temporary file still being written
    assert sorted(p.name for p in cache.iterdir()) == [n for n in seen["b_done"] if not n.startswith(".")]
    node_a.setup("fit")
    first = written["train_data_batch_1"][0]
    assert len(node_a.train_dataset) == 30
    np.testing.assert_array_equal(node_a.train_dataset.images[0], first[0].reshape(3, S, S).transpose(1, 2, 0))
