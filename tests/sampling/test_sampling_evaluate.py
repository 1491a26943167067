"""`diffusion-pl evaluate`: metrics equal torch_fidelity.calculate_metrics on the same images, and on 2 processes equal
those of one; --nll bits/dim."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from sampling_helpers import run_command

from diffusion_pl.commands.evaluate import evaluate
from diffusion_pl.evaluation import save_samples_npz

N, KID_SUBSET, ISC_SPLITS = 10, 5, 2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smooth(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """uint8 NHWC 16x16 RGB images with structure (upsampled noise), so Inception features vary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 255, size=16, mode="bilinear")
    return (x + shift).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_folder(folder, images: np.ndarray) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{i:04d}.png"))
    return str(folder)


def test_metrics_equal_torch_fidelity(tmp_path, random_inception_weights, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    gen = np.concatenate([smooth(N // 2, 1, 20.0), smooth(N // 2, 3, -50.0)])
    npz = save_samples_npz(str(tmp_path / "gen.npz"), gen, np.arange(N) % 3)
    real_dir = write_folder(tmp_path / "real", smooth(N, 2))
    ours = run_command(evaluate, samples=npz, reference=real_dir, inception_weights=random_inception_weights,
                    kid_subset_size=KID_SUBSET, isc_splits=ISC_SPLITS, out_dir=str(tmp_path / "ev"),
                    accelerator="cpu", inception_batch_size=10)  # fmt: skip
    theirs = torch_fidelity.calculate_metrics(
        input1=write_folder(tmp_path / "gen", gen), input2=real_dir, cuda=False, fid=True, isc=True, prc=True,
        kid=True, kid_subset_size=KID_SUBSET, isc_splits=ISC_SPLITS, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=random_inception_weights, batch_size=10, cache=False, save_cpu_ram=True,
        verbose=False,
    )  # fmt: skip
    pairs = {"fid": "frechet_inception_distance", "isc_mean": "inception_score_mean", "precision": "precision",
             "recall": "recall", "kid_mean": "kernel_inception_distance_mean"}  # fmt: skip
    values = ours["metrics"]
    for ours_key, their_key in pairs.items():
        assert values[ours_key] == pytest.approx(theirs[their_key], rel=1e-5, abs=1e-9), ours_key
    assert values["fid"] > 1e-3 and values["isc_mean"] > 1.01  # informative, not degenerate
    with open(tmp_path / "ev" / "metrics.json") as f:
        assert json.load(f)["metrics"] == pytest.approx(values)
    assert "warning" not in capsys.readouterr().err  # samples and reference are both 16x16 RGB

    # a reference of another resolution: the metrics are still computed, with a warning naming both shapes
    small = write_folder(tmp_path / "real8", smooth(N, 2)[:, ::2, ::2])
    run_command(evaluate, samples=npz, reference=small, inception_weights=random_inception_weights, metrics=["fid"],
             out_dir=str(tmp_path / "ev8"), accelerator="cpu", inception_batch_size=10)  # fmt: skip
    assert ("diffusion-pl: warning: the samples are 16x16 with 3 channel(s) but the reference images are 8x8 with 3"
            in capsys.readouterr().err)  # fmt: skip
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run_command(evaluate, samples=npz, reference=real_dir, inception_weights=random_inception_weights,
                 out_dir=str(tmp_path / "ev"), accelerator="cpu")  # fmt: skip


def test_nll_bits_per_dim(ckpts, tmp_path):
    out = run_command(evaluate, ckpt=ckpts["cond"], nll=True, data_class="sampling_helpers.TinyDataModule", split="val",
                   out_dir=str(tmp_path), accelerator="cpu")  # fmt: skip
    assert out["num_images"] == 6
    assert np.isfinite(out["total_bpd"]) and out["total_bpd"] > 0
    vb = out["per_t"]["vb_bpd"]
    assert len(vb) == 10 and all(np.isfinite(vb))
    assert sum(vb) + out["prior_bpd"] == pytest.approx(out["total_bpd"], rel=1e-6)
    base = out["baselines"]
    assert base["uniform_8bit_bpd"] == 8.0 and 0 < base["per_pixel_histogram_bpd"] < 8.0 + 1.0
    with open(tmp_path / "nll.json") as f:
        assert json.load(f)["total_bpd"] == pytest.approx(out["total_bpd"])
    with open(tmp_path / "nll_terms.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["t"]) for r in rows] == list(range(10))
    assert sum(float(r["vb_bpd"]) for r in rows) == pytest.approx(sum(vb), rel=1e-6)


@pytest.mark.ddp
def test_two_processes_give_the_metrics_of_one(tmp_path, random_inception_weights):
    """`evaluate --samples --devices 2`: each process extracts the Inception features of its part of the npz (4 and 3
    images), they are gathered through the command's Fabric, rank 0 computes: the metrics of one process."""
    gen = np.concatenate([smooth(4, 5, 20.0), smooth(3, 6, -40.0)])
    npz = save_samples_npz(str(tmp_path / "gen.npz"), gen)
    real = write_folder(tmp_path / "real", smooth(6, 7))
    options = ["--samples", npz, "--reference", real, "--inception_weights", random_inception_weights, "--metrics",
               "[isc, prc, kid]", "--kid_subset_size", "3", "--isc_splits", "1", "--inception_batch_size", "8",
               "--cache_dir", str(tmp_path / "cache"), "--accelerator", "cpu"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for devices in ("1", "2"):
        proc = subprocess.run([sys.executable, "-m", "diffusion_pl.cli", "evaluate", *options, "--devices", devices,
                               "--out_dir", str(tmp_path / devices)], capture_output=True, text=True, timeout=300,
                              env=env, cwd=ROOT)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text())["metrics"] for d in ("1", "2"))
    assert set(one) >= {"isc_mean", "precision", "recall", "kid_mean"} and one.keys() == two.keys()
    for key, value in one.items():  # other batch sizes per process: float32 conv noise only
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_rerun_after_failed_metrics_reuses_the_samples(ckpts, tmp_path, monkeypatch, random_inception_weights):
    """`evaluate --ckpt` whose metrics failed after sampling finished: the rerun reuses OUT_DIR/samples/samples.npz
    (no model call) when its settings.json holds this run's settings; other settings are refused, naming them."""
    import diffusion_pl.commands.evaluate as evaluate_module
    import diffusion_pl.sampling.shards as shard_io

    options = dict(ckpt=ckpts["cond"], num_samples=6, steps="3", sample_batch_size=2, metrics=["fid"],
                   data_class="sampling_helpers.TinyDataModule", inception_weights=random_inception_weights,
                   out_dir=str(tmp_path / "ev"), accelerator="cpu")  # fmt: skip

    def weights_missing(*args, **kwargs):
        raise FileNotFoundError("simulated: Inception weights missing")

    monkeypatch.setattr(evaluate_module, "sample_metrics", weights_missing)
    with pytest.raises(FileNotFoundError, match="simulated"):
        run_command(evaluate, **options)
    npz = tmp_path / "ev" / "samples" / "samples.npz"
    made = npz.read_bytes()

    def no_model_calls(*args, **kwargs):
        raise AssertionError("the samples were made again")

    monkeypatch.setattr(shard_io, "run_shards", no_model_calls)
    monkeypatch.setattr(evaluate_module, "sample_metrics", lambda fabric, samples, evaluation: {"fid": 1.5})
    with pytest.raises(ValueError, match=r"cannot be reused: they were made with other settings \(seed 0 -> 1, "
                                         r"steps '3' -> '2'\).*pass --overwrite"):  # fmt: skip
        run_command(evaluate, **dict(options, seed=1, steps="2"))
    out = run_command(evaluate, **dict(options, sample_batch_size=3))  # the batch size does not change the images
    assert out["metrics"] == {"fid": 1.5} and out["samples"] == str(npz)
    assert npz.read_bytes() == made
