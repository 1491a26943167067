"""`diffusion-pl sample`: output format, refusing to overwrite, resume after interruption, 2-rank DDP, compatibility
errors, CLI help."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sampling_helpers import run_command

import diffusion_pl.sampling.shards as shard_io
from diffusion_pl.commands.sample import sample
from diffusion_pl.evaluation import load_samples_npz
from diffusion_pl.sampling import GuidanceConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = dict(num_samples=6, sample_batch_size=2, shard_size=2, steps="3", accelerator="cpu")


@pytest.fixture(scope="module")
def reference_run(ckpts, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_command(sample, out_dir=out, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier"], classifier_scale=1.0,
                **COMMON)  # fmt: skip
    return out


def test_npz_grid_settings(reference_run, ckpts):
    images, labels = load_samples_npz(os.path.join(reference_run, "samples.npz"))
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert labels.dtype == np.int64 and labels.shape == (6,) and set(labels.tolist()) <= {0, 1, 2}
    assert images.std() > 10
    with Image.open(os.path.join(reference_run, "grid.png")) as grid:
        # one row per class present, as many columns as the largest class has samples (8 px + 2 px padding)
        rows, cols = len(set(labels.tolist())), max(np.bincount(labels))
        assert grid.size == (cols * 10 + 2, rows * 10 + 2)
    with open(os.path.join(reference_run, "settings.json")) as f:
        settings = json.load(f)
    assert settings["classifier_scale"] == 1.0 and settings["num_samples"] == 6 and settings["steps"] == "3"
    assert settings["ckpt"] == os.path.abspath(ckpts["cond"])
    # the model's real training process (the tiny model has T = 10), not the --diffusion_steps default
    assert (settings["diffusion_steps"], settings["noise_schedule"], settings["var_type"]) == (10, "cosine",
                                                                                              "learned_range")
    assert "sample_batch_size" not in settings  # does not change the images, so a resume may change it


def test_refuses_to_overwrite(reference_run, ckpts):
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        run_command(sample, out_dir=reference_run, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier"],
                    classifier_scale=1.0, **COMMON)  # fmt: skip


def interrupt_at_shard(monkeypatch, shard_id: int, message: str):
    """Make sampling raise RuntimeError(message) when it reaches shard ``shard_id`` (an interruption after the shards
    before it were written); returns the real run_shards."""
    real_run_shards = shard_io.run_shards

    def run_until(engine, shards, *args, **kw):
        if shards[0].shard_id == shard_id:
            raise RuntimeError(message)
        return real_run_shards(engine, shards, *args, **kw)

    monkeypatch.setattr(shard_io, "run_shards", run_until)
    return real_run_shards


def test_resume_after_interruption(reference_run, ckpts, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    kwargs = dict(out_dir=out, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier"], classifier_scale=1.0, **COMMON)
    real_run_shards = interrupt_at_shard(monkeypatch, 1, "simulated interruption")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_command(sample, **kwargs)
    assert not os.path.exists(os.path.join(out, "samples.npz"))
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["settings.json", "shard_000000.npz"]
    first_shard_mtime = os.stat(os.path.join(out, "shards", "shard_000000.npz")).st_mtime_ns

    calls = []
    monkeypatch.setattr(shard_io, "run_shards", lambda *a, **k: (calls.append(1), real_run_shards(*a, **k))[1])
    run_command(sample, **kwargs)
    assert len(calls) == 2  # shard 0 skipped, shards 1 and 2 generated
    assert os.stat(os.path.join(out, "shards", "shard_000000.npz")).st_mtime_ns == first_shard_mtime
    for a, b in zip(load_samples_npz(os.path.join(out, "samples.npz")),
                    load_samples_npz(os.path.join(reference_run, "samples.npz")), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_resume_with_other_settings_refused(reference_run, ckpts):
    os.rename(os.path.join(reference_run, "samples.npz"), os.path.join(reference_run, "kept.npz"))
    try:
        with pytest.raises(ValueError, match="different settings.*seed"):
            run_command(sample, out_dir=reference_run, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier"],
                   classifier_scale=1.0, seed=1, **COMMON)  # fmt: skip
    finally:
        os.rename(os.path.join(reference_run, "kept.npz"), os.path.join(reference_run, "samples.npz"))


def run_two_ranks(out: str, ckpts) -> subprocess.CompletedProcess:
    """`diffusion-pl sample` with COMMON's settings (and guidance) on 2 CPU processes."""
    cmd = [sys.executable, "-m", "diffusion_pl.cli", "sample", "--out_dir", out, "--ckpt", ckpts["cond"],
           "--classifier_ckpt", ckpts["classifier"], "--classifier_scale", "1.0", "--num_samples", "6",
           "--sample_batch_size", "2", "--shard_size", "2", "--steps", "3", "--accelerator", "cpu",
           "--devices", "2"]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.ddp
def test_two_ranks_equal_one_rank(reference_run, ckpts, tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_two_ranks(out, ckpts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images/s" in proc.stdout
    # what the user needs (the bar, the result, where files went), not Lightning's start-up banners
    for banner in ("Initializing distributed", "distributed_backend", "GPU available", "LOCAL_RANK"):
        assert banner not in proc.stdout + proc.stderr, banner
    for a, b in zip(load_samples_npz(os.path.join(out, "samples.npz")),
                    load_samples_npz(os.path.join(reference_run, "samples.npz")), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_compatibility_errors(ckpts, tmp_path):
    out = str(tmp_path / "x")
    message = "(?s)cannot guide this diffusion model.*image_size: classifier 16 vs diffusion model 8"
    with pytest.raises(ValueError, match=message):
        run_command(sample, out_dir=out, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier16"],
                    classifier_scale=1.0, **COMMON)  # fmt: skip
    with pytest.raises(GuidanceConfigError, match="needs a noisy classifier, but none was given for an unconditional"):
        run_command(sample, out_dir=out, ckpt=ckpts["uncond"], classifier_scale=1.0, **COMMON)
    with pytest.raises(GuidanceConfigError, match="needs a model trained with a null class"):
        run_command(sample, out_dir=out, ckpt=ckpts["nonull"], cfg_scale=2.0, **COMMON)
    with pytest.raises(GuidanceConfigError, match="this model is unconditional"):
        run_command(sample, out_dir=out, ckpt=ckpts["uncond"], cfg_scale=2.0, **COMMON)
    with pytest.raises(ValueError, match="exactly one of --ckpt"):
        run_command(sample, out_dir=out, **COMMON)
    assert not os.path.exists(out)


@pytest.mark.parametrize("command,options", [
    ("sample", ["--ckpt", "--openai_ckpt", "--arch", "--classifier_scale", "--cfg_scale", "--devices", "--num_nodes",
                "--overwrite", "--sample_batch_size", "finished shards (OUT_DIR/shards) are skipped."]),
    ("evaluate", ["--samples", "--reference", "--inception_weights", "--nll", "--data_class", "--num_nodes",
                  "--sample_batch_size", "--inception_batch_size", "nll_terms.csv."]),
    ("sweep", ["--classifier_scales", "--cfg_scales", "--wandb", "--num_nodes", "names the differences)."]),
])  # fmt: skip
def test_cli_help(command, options):
    """Each command's options, its whole description (the last words of its docstring's text) and -c/--config."""
    proc = subprocess.run([sys.executable, "-m", "diffusion_pl.cli", command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())  # argparse wraps the description
    for option in [*options, "-c CONFIG, --config CONFIG"]:
        assert option in text, option


@pytest.mark.ddp
def test_rank_without_work_waits_for_the_others(reference_run, ckpts, tmp_path, monkeypatch):
    """A rank with nothing to do (its shards finished by an earlier run, or fewer shards than ranks) takes part
    without error: here shards 0 and 1 are done, so on 2 ranks rank 0 has shard 2 and rank 1 nothing."""
    out = str(tmp_path / "resume_ddp")
    kwargs = dict(out_dir=out, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier"], classifier_scale=1.0, **COMMON)
    interrupt_at_shard(monkeypatch, 2, "simulated interruption")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_command(sample, **kwargs)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["settings.json", "shard_000000.npz", "shard_000001.npz"]
    proc = run_two_ranks(out, ckpts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(load_samples_npz(os.path.join(out, "samples.npz")),
                    load_samples_npz(os.path.join(reference_run, "samples.npz")), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_interrupted_overwrite_leaves_no_old_samples_and_resumes(reference_run, ckpts, tmp_path, monkeypatch):
    """--overwrite removes the previous samples.npz, grid.png and settings.json before its first shard: an interrupted
    overwrite leaves no complete-looking old result, and its rerun without --overwrite resumes the new run."""
    out = str(tmp_path / "out")
    old = dict(out_dir=out, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier"], classifier_scale=1.0, **COMMON)
    run_command(sample, **dict(old, seed=1))  # the previous run, other settings
    new = dict(old, overwrite=True)
    real_run_shards = interrupt_at_shard(monkeypatch, 1, "simulated interruption")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_command(sample, **new)
    assert sorted(os.listdir(out)) == ["shards"]  # no old samples.npz, grid.png or settings.json
    assert sorted(os.listdir(os.path.join(out, "shards"))) == ["settings.json", "shard_000000.npz"]

    calls = []
    monkeypatch.setattr(shard_io, "run_shards", lambda *a, **k: (calls.append(1), real_run_shards(*a, **k))[1])
    run_command(sample, **old)  # without --overwrite: resumes the new run (seed 0)
    assert len(calls) == 2  # shard 0 kept, shards 1 and 2 generated
    for a, b in zip(load_samples_npz(os.path.join(out, "samples.npz")),
                    load_samples_npz(os.path.join(reference_run, "samples.npz")), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(out, "settings.json")) as f:
        assert json.load(f)["seed"] == 0


def test_resume_with_another_batch_size(ckpts, tmp_path, monkeypatch):
    """After a crash (e.g. out of memory) a rerun with another --sample_batch_size and no --shard_size resumes with the
    recorded shard size and gives the bytes of an uninterrupted run; an explicit other --shard_size is refused."""
    kwargs = dict(ckpt=ckpts["cond"], num_samples=10, steps="3", accelerator="cpu")
    whole = str(tmp_path / "whole")
    run_command(sample, out_dir=whole, sample_batch_size=2, **kwargs)  # shard size 4 * 2 = 8
    out = str(tmp_path / "out")
    real_run_shards = interrupt_at_shard(monkeypatch, 1, "simulated out of memory")
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        run_command(sample, out_dir=out, sample_batch_size=1, **kwargs)  # shard size 4: shard 0 finished
    monkeypatch.setattr(shard_io, "run_shards", real_run_shards)
    with pytest.raises(ValueError, match=r"different settings \(shard_size differ\)"):
        run_command(sample, out_dir=out, sample_batch_size=3, shard_size=3, **kwargs)
    run_command(sample, out_dir=out, sample_batch_size=3, **kwargs)  # resumes with the recorded shard size 4
    with open(os.path.join(out, "settings.json")) as f:
        assert json.load(f)["shard_size"] == 4
    with open(os.path.join(whole, "samples.npz"), "rb") as a, open(os.path.join(out, "samples.npz"), "rb") as b:
        assert a.read() == b.read()
