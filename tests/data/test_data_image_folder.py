"""ImageFolderDataModule on folders of PNG / JPEG / WebP files the tests write: ADM's resize (equal to
guided-diffusion's image_datasets.py), labels from class folders, channels, the seeded split, the cache keyed by the
files and settings, the errors for bad folders and files, and a real `diffusion-pl fit` on a folder."""

import json
import os
import random
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pl.data import ImageFolderDataModule
from diffusion_pl.data.common import evaluation_dataloader
from diffusion_pl.data.folder import center_crop_arr, random_crop_arr
from diffusion_pl.utils.images import to_uint8

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference():
    """guided_diffusion.image_datasets (the oracle package); its mpi4py and blobfile imports are not needed by the
    resize functions (and not installed: `make test` installs the oracle without its dependencies)."""
    stubs = {"mpi4py": types.SimpleNamespace(MPI=None), "blobfile": types.SimpleNamespace()}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        from guided_diffusion import image_datasets
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
    return image_datasets


def _image(rng, w, h, mode="RGB"):
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).convert(mode)


def _write(root, specs, seed=0):
    """specs: {relative path: (w, h, mode)}; the format follows the extension."""
    rng = np.random.default_rng(seed)
    for rel, (w, h, mode) in specs.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _image(rng, w, h, mode).save(path)
    return root


FOLDER = {
    "zebra/wide.png": (128, 64, "RGB"),
    "zebra/deep/nested/tall.jpg": (70, 300, "RGB"),
    "zebra/big.webp": (517, 260, "RGB"),
    "ant/rgba.png": (90, 65, "RGBA"),
    "ant/grey.png": (64, 80, "L"),
    "ant/x.jpeg": (200, 100, "RGB"),
    "ant/y.png": (66, 66, "RGB"),
    "bee/b1.png": (64, 64, "RGB"),
    "bee/b2.jpg": (99, 140, "RGB"),
    "bee/b3.png": (120, 64, "RGB"),
}


def _dm(root, **kwargs):
    kwargs = {"image_size": 32, "batch_size": 2, "num_workers": 0, "random_flip": False, "val_fraction": 0.3,
              **kwargs}  # fmt: skip
    return ImageFolderDataModule(data_dir=str(root), **kwargs)


def _ready(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _all(dataset):
    return np.stack([np.asarray(dataset.images[i]) for i in range(len(dataset))]), [
        int(dataset.labels[i]) for i in range(len(dataset))
    ]


@pytest.mark.parametrize("size", [32, 64])
def test_resize_equals_guided_diffusion(reference, size):
    rng = np.random.default_rng(size)
    for w, h in [(517, 260), (64, 300), (128, 128), (33, 90), (1000, 999)]:
        image = _image(rng, w, h)
        np.testing.assert_array_equal(center_crop_arr(image, size), reference.center_crop_arr(image, size))
        for seed in range(3):
            random.seed(seed)
            expected = reference.random_crop_arr(image, size)
            np.testing.assert_array_equal(random_crop_arr(image, size, random.Random(seed)), expected)


def test_folder_labels_pixels_and_split(tmp_path, reference):
    data = _write(tmp_path / "images", FOLDER)
    dm = _dm(data)
    assert dm.class_names == ["ant", "bee", "zebra"] and dm.num_classes == 3 and dm.in_channels == 3
    _ready(dm)
    files = sorted(FOLDER)
    train, train_labels = _all(dm.train_dataset)
    val, val_labels = _all(dm.val_dataset)
    split = {k: [dm.listing().files[i] for i in v] for k, v in dm.split_indices(dm.listing().files).items()}
    assert len(train) == len(split["train"]) and len(val) == len(split["val"]) and len(train) + len(val) == 10
    assert sorted(split["train"] + split["val"]) == sorted(FOLDER)
    # every file is in exactly one split, with the label of its first-level folder and the reference's pixels
    expected = {}
    for rel in files:
        with Image.open(data / rel) as image:
            expected[rel] = (
                reference.center_crop_arr(image.convert("RGB"), 32),
                dm.class_names.index(rel.split("/")[0]),
            )
    got = [(a, y) for a, y in zip(train, train_labels, strict=True)] + list(zip(val, val_labels, strict=True))
    matched = [rel for rel in files if any(np.array_equal(a, expected[rel][0]) and y == expected[rel][1]
                                           for a, y in got)]  # fmt: skip
    assert matched == files
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(to_uint8(x[:1])[0], torch.from_numpy(train[_first_index(dm, x[0])].transpose(2, 0, 1)))
    # the same seed gives the same split, another seed another one
    again = _ready(_dm(data, cache_dir=str(tmp_path / "c2")))
    assert np.array_equal(_all(again.val_dataset)[0], val)
    other = _ready(_dm(data, split_seed=1))
    assert not np.array_equal(_all(other.val_dataset)[0], val)
    mapping = json.loads(next((data / ".diffusion_pl_cache").glob("*/classes.json")).read_text())
    assert mapping["class_names"] == ["ant", "bee", "zebra"]
    assert dm.state_dict()["class_names"] == ["ant", "bee", "zebra"]


def _first_index(dm, x):
    pixels = to_uint8(x[None])[0].permute(1, 2, 0).numpy()
    return next(i for i in range(len(dm.train_dataset)) if np.array_equal(dm.train_dataset.images[i], pixels))


def test_unconditional_channels_and_modes(tmp_path, reference):
    _write(tmp_path, {"a.png": (64, 64, "L"), "sub/b.png": (80, 70, "RGBA"), "sub/deeper/c.jpg": (90, 64, "RGB")})
    grey = _ready(_dm(tmp_path, class_cond=False, channels=1, val_fraction=0.4))
    assert grey.num_classes == 0 and grey.class_names is None and grey.in_channels == 1
    images, labels = _all(grey.train_dataset)
    assert images.shape[1:] == (32, 32, 1) and set(labels) == {0}
    with Image.open(tmp_path / "a.png") as image:  # a greyscale file: R = G = B in the reference
        ref = reference.center_crop_arr(image.convert("RGB"), 32)
    everything = np.concatenate([images, _all(grey.val_dataset)[0]])
    assert any(np.array_equal(a[..., 0], ref[..., 0]) for a in everything)
    rgb = _ready(_dm(tmp_path, class_cond=False, val_fraction=0.4))
    with Image.open(tmp_path / "sub" / "b.png") as image:  # RGBA -> RGB drops alpha, as the reference
        ref = reference.center_crop_arr(image.convert("RGB"), 32)
    everything = np.concatenate([_all(rgb.train_dataset)[0], _all(rgb.val_dataset)[0]])
    assert everything.shape[1:] == (32, 32, 3) and any(np.array_equal(a, ref) for a in everything)
    rgba = _ready(_dm(tmp_path, class_cond=False, channels=4, val_fraction=0.4))
    assert np.asarray(rgba.train_dataset.images).shape[1:] == (32, 32, 4)


def test_cache_keyed_by_files_and_settings(tmp_path):
    _write(tmp_path, FOLDER)
    cache = tmp_path / ".diffusion_pl_cache"
    dm = _ready(_dm(tmp_path))
    (first,) = cache.iterdir()
    mtimes = {p: p.stat().st_mtime_ns for p in first.iterdir()}
    assert not [p for p in first.iterdir() if ".tmp" in p.name]
    _dm(tmp_path).prepare_data()  # nothing changed: nothing written
    assert {p: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes and len(list(cache.iterdir())) == 1
    # a file replaced by another image of the same name: a new cache with the new pixels, the old one never read
    before = _all(dm.train_dataset)[0]
    rng = np.random.default_rng(7)
    for rel in FOLDER:
        if rel.endswith(".png"):
            _image(rng, 64, 64).save(tmp_path / rel)
            os.utime(tmp_path / rel, ns=(1, 1))  # even with an old mtime: the size or mtime changed
    fresh = _dm(tmp_path)
    with pytest.raises(RuntimeError, match="prepare_data"):
        fresh.setup("fit")
    _ready(fresh)
    assert len(list(cache.iterdir())) == 2 and not np.array_equal(_all(fresh.train_dataset)[0], before)
    # a changed setting prepares again too
    _ready(_dm(tmp_path, image_size=16))
    assert len(list(cache.iterdir())) == 3


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory"):
        _dm(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        _dm(tmp_path / "empty", class_cond=False).prepare_data()
    with pytest.raises(ValueError, match="has no sub-folders"):
        _dm(tmp_path / "empty")
    (tmp_path / "text" / "a").mkdir(parents=True)
    (tmp_path / "text" / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images of the known kinds .*notes.txt"):
        _dm(tmp_path / "text").prepare_data()
    root = _write(
        tmp_path / "f", {"a/1.png": (64, 64, "RGB"), "b/2.png": (64, 64, "RGB"), "loose.png": (64, 64, "RGB")}
    )
    with pytest.raises(ValueError, match=r"lie directly in it: loose.png"):
        _dm(root).prepare_data()
    (root / "loose.png").unlink()
    (root / "c_empty").mkdir()
    with pytest.raises(ValueError, match="class folders without images .*c_empty"):
        _dm(root).prepare_data()
    (root / "c_empty").rmdir()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"cannot create the cache folder .*a_file/.*set cache_dir to a writable"):
        _dm(root, cache_dir=str(tmp_path / "a_file")).prepare_data()
    for bad, match in [(dict(channels=2), "channels must be 1"), (dict(val_fraction=1.0), "val_fraction")]:
        with pytest.raises(ValueError, match=match):
            _dm(root, **bad)


def test_bad_and_small_images(tmp_path):
    root = _write(tmp_path, {"a/1.png": (64, 64, "RGB"), "a/2.jpg": (80, 64, "RGB"), "b/3.png": (64, 70, "RGB"),
                             "b/4.png": (64, 64, "RGB"), "b/small.png": (20, 40, "RGB")})  # fmt: skip
    with pytest.raises(
        ValueError, match=r"1 images are smaller than image_size 32 .*small.png \(20x40\).*allow_upscale"
    ):
        _dm(root).prepare_data()
    assert len(_all(_ready(_dm(root, allow_upscale=True, val_fraction=0.2)).train_dataset)[0]) == 4
    (root / "b" / "small.png").unlink()
    data = (root / "a" / "2.jpg").read_bytes()
    (root / "a" / "2.jpg").write_bytes(data[: len(data) // 2])  # a truncated download: the header reads fine
    (root / "b" / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"junk.png.*skip_bad_images"):
        _dm(root).prepare_data()
    (root / "b" / "junk.png").unlink()
    with pytest.raises(ValueError, match=r"cannot decode image .*2.jpg.*truncated"):
        _dm(root).prepare_data()
    (root / "b" / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="left out"):
        dm = _ready(_dm(root, skip_bad_images=True, val_fraction=0.2))
    assert len(dm.train_dataset) + len(dm.val_dataset) == 3
    manifests = [json.loads(p.read_text()) for p in (root / ".diffusion_pl_cache").glob("*/*manifest.json")]
    assert sorted(Path(s.split(" ")[0]).name for m in manifests for s in m["skipped"]) == ["2.jpg", "junk.png"]


def test_classes_are_checkpointed_and_checked(tmp_path):
    root = _write(tmp_path, {"a/1.png": (64, 64, "RGB"), "b/2.png": (64, 64, "RGB")})
    dm = _dm(root)
    state = dm.state_dict()
    dm.load_state_dict(state)  # same folders: fine
    with pytest.raises(ValueError, match=r"trained with classes 3 \[a, b, c\].*has 2 \[a, b\]"):
        dm.load_state_dict({**state, "class_names": ["a", "b", "c"]})
    assert _dm(root, prepare_data_per_node=False).prepare_data_per_node is False


def _split_by_path(dm):
    files = dm.listing().files
    return {split: {files[i] for i in indices} for split, indices in dm.split_indices(files).items()}


def test_adding_files_moves_no_file_between_the_splits(tmp_path):
    """The split of a file depends only on split_seed and its path: after adding files (a new class folder sorting
    first among them) every old file stays in its split, in split_indices and in the prepared cache; removing a file
    moves none either."""
    specs = {f"{c}/{i}.png": (16, 16, "RGB") for c in ("a", "b") for i in range(15)}
    root = _write(tmp_path / "images", specs)
    before = _ready(_dm(root, image_size=8, val_fraction=0.3))
    split = _split_by_path(before)
    _write(root, {f"{c}/new{i}.png": (16, 16, "RGB") for c in ("a", "b", "0first") for i in range(4)}, seed=1)
    after = _ready(_dm(root, image_size=8, val_fraction=0.3))
    added = _split_by_path(after)
    assert split["val"] <= added["val"] and split["train"] <= added["train"]
    assert added["val"] - split["val"] and added["train"] - split["train"]  # the new files fall in both splits
    for name in ("val_dataset", "train_dataset"):  # the prepared images: every old one is in the same split
        old, new = _all(getattr(before, name))[0], _all(getattr(after, name))[0]
        assert len(new) > len(old) and all(any(np.array_equal(a, b) for b in new) for a in old), name
    (root / "a" / "3.png").unlink()
    removed = _split_by_path(_dm(root, image_size=8, val_fraction=0.3))
    assert removed["val"] == added["val"] - {"a/3.png"} and removed["train"] == added["train"] - {"a/3.png"}


def test_split_is_deterministic_per_seed(tmp_path):
    files = [f"c{i % 3}/img_{i:03d}.png" for i in range(60)]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()  # split_indices reads the listing only
    first = _split_by_path(_dm(tmp_path, val_fraction=0.2))
    assert first == _split_by_path(_dm(tmp_path, val_fraction=0.2, split_seed=0))
    assert first["val"] | first["train"] == set(files) and not first["val"] & first["train"]
    other = _split_by_path(_dm(tmp_path, val_fraction=0.2, split_seed=1))
    assert other["val"] != first["val"]


def test_split_fraction_is_binomial_and_each_split_is_non_empty(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        (folder / f"photo_{i}.jpg").touch()  # split_indices reads the listing only
    for fraction in (0.05, 0.25, 0.5):
        for seed in (0, 1, 2):
            n_val = len(_split_by_path(_dm(folder, class_cond=False, val_fraction=fraction, split_seed=seed))["val"])
            mean, sd = 400 * fraction, (400 * fraction * (1 - fraction)) ** 0.5
            assert abs(n_val - mean) <= 4 * sd, (fraction, seed, n_val)
    tiny = ["a.png", "b.png"]
    for fraction in (0.01, 0.99):
        for seed in range(20):  # with 0.01 both files usually hash above it, with 0.99 both below
            split = _dm(folder, class_cond=False, val_fraction=fraction, split_seed=seed).split_indices(tiny)
            assert sorted(map(len, split.values())) == [1, 1], (fraction, seed)
    with pytest.raises(ValueError, match="need >= 2"):
        _dm(folder, class_cond=False).split_indices(["a.png"])


def test_old_checkpoint_split_warns_but_resumes(tmp_path):
    root = _write(tmp_path, {"a/1.png": (64, 64, "RGB"), "b/2.png": (64, 64, "RGB")})
    dm = _dm(root)
    state = dm.state_dict()
    assert state["split"] == "path-hash-v1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.load_state_dict(state)  # the current rule: no warning
    old = {k: v for k, v in state.items() if k != "split"}  # saved by the positional rule
    with pytest.warns(UserWarning, match=r"chosen by an older rule .*validation images .* may now be in the training"):
        dm.load_state_dict(old)
    with pytest.raises(ValueError, match="trained with classes"):  # the class check still comes first
        dm.load_state_dict({**old, "class_names": ["a"]})


def test_cli_fit_on_a_folder_of_png_and_jpeg(tmp_path):
    """`diffusion-pl fit` with configs/folder_example.yaml (model shrunk) on a folder the test writes."""
    data = _write(tmp_path / "images", {f"{c}/{i}.{ext}": (40 + i, 36, "RGB") for c in ("cat", "dog")
                                        for i, ext in enumerate(["png", "jpg", "jpeg", "png"])})  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "diffusion_pl.cli", "fit", "--config", str(ROOT / "configs" / "folder_example.yaml"),
        f"--data.init_args.data_dir={data}", "--data.init_args.image_size=16", "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0", "--data.init_args.val_fraction=0.25", "--model.init_args.image_size=16",
        "--model.init_args.model_channels=32", "--model.init_args.channel_mult=[1,2]",
        "--model.init_args.num_res_blocks=1", "--model.init_args.attention_resolutions=[8]",
        "--model.init_args.num_head_channels=32", "--model.init_args.diffusion_steps=50", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    (ckpt,) = (tmp_path / "lightning_logs" / "folder_example" / "version_0" / "checkpoints").glob("last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 2 and saved["ImageFolderDataModule"]["class_names"] == ["cat", "dog"]
    assert next((data / ".diffusion_pl_cache").glob("*/classes.json")).is_file()


def test_label_count_must_match_the_model(tmp_path):
    import lightning as L

    from diffusion_pl.lightning import DiffusionModule

    root = _write(tmp_path, {"a/1.png": (64, 64, "RGB"), "b/2.png": (64, 64, "RGB")})
    model = DiffusionModule(image_size=32, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                            attention_resolutions=(), class_cond=True, num_classes=5, diffusion_steps=10)  # fmt: skip
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"data.num_classes = 2 \(ImageFolderDataModule\) .*num_classes = 5"):
        trainer.fit(model, datamodule=_dm(root))


def test_random_crop_equals_guided_diffusion(tmp_path, reference):
    """random_crop: each training item is the reference's random_crop_arr of the original file, for the draws the
    item takes from torch's RNG; the cache holds the images reduced by the halvings every draw shares."""
    data = _write(tmp_path / "images", {"a/big.png": (517, 260, "RGB"), "a/tall.jpg": (70, 300, "RGB"),
                                        "b/grey.png": (64, 90, "L"), "b/sq.png": (40, 40, "RGB"),
                                        "b/wide.webp": (1000, 330, "RGB")})  # fmt: skip
    dm = _ready(_dm(data, image_size=16, random_crop=True, val_fraction=0.2))
    listing = dm.listing()
    train = [listing.files[i] for i in dm.split_indices(listing.files)["train"]]
    assert len(dm.train_dataset) == len(train) == 4 and not hasattr(dm.val_dataset, "index")
    assert type(dm.train_dataset).__name__ == "RandomCropDataset"
    crops = {tuple(to_uint8(dm.train_dataset[0][0][None]).flatten()[:64].tolist()) for _ in range(4)}
    assert len(crops) > 1  # random: another crop each time
    for i, rel in enumerate(train):
        for draw in range(3):
            torch.manual_seed(draw)
            x, y = dm.train_dataset[i]
            torch.manual_seed(draw)
            random.seed(int(torch.randint(0, 2**62, ())))
            with Image.open(data / rel) as image:
                expected = reference.random_crop_arr(image.convert("RGB"), 16)
            assert np.array_equal(to_uint8(x[None])[0].permute(1, 2, 0).numpy(), expected), (rel, draw)
            assert y.item() == dm.class_names.index(rel.split("/")[0])
    # Evaluation (FID reference of the train split): the centre crops of the original files, the same every time.
    batches = [torch.cat([x for x, _ in evaluation_dataloader(dm, "train")]) for _ in range(2)]
    assert torch.equal(*batches) and dm.train_dataset.random_crop  # the training dataset keeps its random crops
    for i, rel in enumerate(train):
        with Image.open(data / rel) as image:
            assert np.array_equal(to_uint8(batches[0][i : i + 1])[0].permute(1, 2, 0).numpy(),
                                  reference.center_crop_arr(image.convert("RGB"), 16)), rel  # fmt: skip
    # another setting, another cache; the reduced images are stored smaller than the files
    (cache,) = [p for p in (data / ".diffusion_pl_cache").iterdir()]
    assert (cache / "folder16_reduced_train_pixels.bin").stat().st_size < 517 * 260 * 3
    _ready(_dm(data, image_size=16, val_fraction=0.2))
    assert len(list((data / ".diffusion_pl_cache").iterdir())) == 2


@pytest.mark.ddp
def test_ddp_prepares_once_and_every_rank_reads_the_cache(tmp_path):
    """2 processes: prepare_data runs on one (Lightning's per-node rule), both ranks read the same prepared cache."""
    data = _write(tmp_path / "images", {f"{c}/{i}.png": (20, 16, "RGB") for c in ("a", "b") for i in range(5)})
    (tmp_path / "log").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).with_name("ddp_folder_script.py")
    result = subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "log")], capture_output=True,
                            text=True, timeout=240, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    prepared = [p.read_text() for p in (tmp_path / "log").glob("prepare_*")]
    assert prepared == ["0"]
    setups = {p.name: p.read_text() for p in (tmp_path / "log").glob("setup_*")}
    assert sorted(setups) == ["setup_0", "setup_1"] and setups["setup_0"] == setups["setup_1"]
    assert setups["setup_0"].startswith("8 ") and ".diffusion_pl_cache" in setups["setup_0"]
