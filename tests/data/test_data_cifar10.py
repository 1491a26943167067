"""CIFAR10DataModule on tiny batches written by the test in the real pickle format (read by torchvision's CIFAR10,
whose MD5 checksums are set to those of the written files)."""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pl.data import CIFAR10DataModule
from diffusion_pl.utils.images import to_uint8

N_PER_BATCH = 20
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar(root, seed=0):
    """Write cifar-10-batches-py like the real archive: dicts, data uint8 (N, 3072) R|G|B planes. The archive was
    pickled by Python 2, whose str keys and names torchvision reads back (encoding="latin1") as str: written as str."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(N_PER_BATCH, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=N_PER_BATCH).tolist()
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": data,
            "filenames": [f"{name}_{i}.png" for i in range(N_PER_BATCH)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": N_PER_BATCH, "label_names": NAMES, "num_vis": 3072}, f)
    return written


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _use_checksums_of(folder, monkeypatch):
    """torchvision's CIFAR10 verifies each file's MD5: make it expect those of the files in ``folder`` (None: any)."""
    from torchvision.datasets import CIFAR10

    def md5(name):
        return None if folder is None else _md5(folder / name)

    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=md5("batches.meta")))


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    written = _write_cifar(tmp_path)
    _use_checksums_of(tmp_path / "cifar-10-batches-py", monkeypatch)
    return tmp_path, written


def test_attributes_after_init():
    dm = CIFAR10DataModule()
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (32, 3, 10)
    assert dm.random_flip is True and dm.download is False and dm.data_dir == "data/cifar10"


def test_round_trip_pixels_and_channel_order(cifar_root):
    root, written = cifar_root
    dm = CIFAR10DataModule(data_dir=str(root), batch_size=7, num_workers=0, random_flip=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == NAMES
    assert len(dm.train_dataset) == 5 * N_PER_BATCH and len(dm.val_dataset) == N_PER_BATCH
    data, labels = written["data_batch_2"]
    for k in (0, 7, 19):
        x, y = dm.train_dataset[N_PER_BATCH + k]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        assert y.dtype == torch.int64 and y.item() == labels[k]
        pixels = to_uint8(x[None])[0]
        # planar layout: bytes 0..1023 red, 1024..2047 green, 2048..3071 blue, each row-major 32x32
        assert torch.equal(pixels, torch.from_numpy(data[k].reshape(3, 32, 32)))
        assert pixels[1, 0, 5].item() == data[k][1024 + 5]  # green, row 0, column 5
        assert pixels[2, 3, 0].item() == data[k][2048 + 3 * 32]  # blue, row 3, column 0
    xt, yt = dm.val_dataset[4]
    tdata, tlabels = written["test_batch"]
    assert torch.equal(to_uint8(xt[None])[0], torch.from_numpy(tdata[4].reshape(3, 32, 32)))
    assert yt.item() == tlabels[4]


def test_loaders(cifar_root):
    root, written = cifar_root
    dm = CIFAR10DataModule(data_dir=str(root), batch_size=8, num_workers=0)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == (5 * N_PER_BATCH) // 8 and train.drop_last
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    val = dm.val_dataloader()
    assert not val.drop_last and len(val) == -(-N_PER_BATCH // 8)
    xs = torch.cat([b[0] for b in val])
    ys = torch.cat([b[1] for b in val])
    tdata, tlabels = written["test_batch"]
    assert torch.equal(to_uint8(xs), torch.from_numpy(tdata.reshape(-1, 3, 32, 32)))  # val: unshuffled, unflipped
    assert ys.tolist() == tlabels
    assert not train.persistent_workers and not train.pin_memory
    dm4 = CIFAR10DataModule(data_dir=str(root), batch_size=8, num_workers=2)
    dm4.setup("fit")
    assert dm4.train_dataloader().persistent_workers  # not iterated: no worker processes started


def test_random_flip(cifar_root):
    root, written = cifar_root
    dm = CIFAR10DataModule(data_dir=str(root), random_flip=True, num_workers=0)
    dm.setup("fit")
    data = written["data_batch_1"][0]
    original = torch.from_numpy(data[3].reshape(3, 32, 32))
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        got = to_uint8(dm.train_dataset[3][0][None])[0]
        if torch.equal(got, original):
            seen.add("same")
        elif torch.equal(got, original.flip(-1)):
            seen.add("flipped")
        else:
            raise AssertionError("item is neither the image nor its mirror")
    assert seen == {"same", "flipped"}
    # evaluation split never flips
    test0 = torch.from_numpy(written["test_batch"][0][0].reshape(3, 32, 32))
    assert all(torch.equal(to_uint8(dm.val_dataset[0][0][None])[0], test0) for _ in range(20))


def test_missing_dir_error(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "cifar"), download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "data_batch_1" in message and "test_batch" in message
    assert "download=True" in message and str(tmp_path / "cifar") in message
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")


def test_partial_and_corrupt_files(cifar_root):
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['data_batch_3'\]"):
        CIFAR10DataModule(data_dir=str(root)).setup("fit")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"\['data_batch_3'\] in .* are not the files of cifar-10-python.tar.gz"):
        CIFAR10DataModule(data_dir=str(root)).setup("fit")


def test_download_lands_atomically_even_when_nodes_race(tmp_path, monkeypatch):
    """download=True: torchvision's download goes to a temporary folder renamed into place when complete. Two nodes
    downloading into the same (shared) data_dir: B finishes while A is still downloading; A's copy is discarded;
    data_dir never holds a partial cifar-10-batches-py and no temporary folder is left."""
    from torchvision.datasets import CIFAR10

    data_dir = tmp_path / "shared"
    events = []

    def fake_download(self):  # CIFAR10.download without network: writes the archive's extracted files
        node = "A" if not events else "B"
        events.append(f"{node} downloading")
        if node == "A":
            assert not (data_dir / "cifar-10-batches-py").exists()  # nothing visible while A downloads
            CIFAR10DataModule(data_dir=str(data_dir), download=True).prepare_data()  # node B meanwhile
            events.append("B done")
        _write_cifar(Path(self.root), seed=0 if node == "B" else 1)
        events.append(f"{node} extracted")

    monkeypatch.setattr(CIFAR10, "download", fake_download)
    _use_checksums_of(None, monkeypatch)  # the two nodes' copies differ
    dm = CIFAR10DataModule(data_dir=str(data_dir), download=True, num_workers=0)
    dm.prepare_data()
    assert events == ["A downloading", "B downloading", "B extracted", "B done", "A extracted"]
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-batches-py"]  # no temporary folders
    dm.setup("fit")
    b_data = _write_cifar(tmp_path / "expected", seed=0)["data_batch_1"][0]  # B's copy won
    assert torch.equal(to_uint8(dm.train_dataset[0][0][None])[0], torch.from_numpy(b_data[0].reshape(3, 32, 32)))

    # a partial folder of the user's is not overwritten: the message says what to do
    partial = tmp_path / "partial"
    (partial / "cifar-10-batches-py").mkdir(parents=True)
    (partial / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
    events.append("x")  # the fake acts as a single downloader from now on
    with pytest.raises(ValueError, match="already exists without .*move that folder away"):
        CIFAR10DataModule(data_dir=str(partial), download=True).prepare_data()
    assert sorted(p.name for p in partial.iterdir()) == ["cifar-10-batches-py"]
