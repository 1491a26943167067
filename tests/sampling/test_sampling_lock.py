"""Two `diffusion-pl sample` runs into one --out_dir: the second is refused in one line and the first's files are
intact; a run killed with -9 leaves a stale lock that the next run takes over (and resumes its shards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffusion_pl.cli import main
from diffusion_pl.evaluation import load_samples_npz
from diffusion_pl.utils.folder_lock import LOCK_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--num_samples", "4", "--batch_size", "2", "--shard_size", "2", "--steps", "2", "--accelerator", "cpu"]

# A real `diffusion-pl sample` that stops before its second shard until the file GO exists.
PAUSED_SAMPLE = """
import os, sys, time
import diffusion_pl.commands.sample as s
real = s.run_shards
def paused(engine, shards, *args, **kwargs):
    if shards[0].shard_id == 1:
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.05)
    return real(engine, shards, *args, **kwargs)
s.run_shards = paused
from diffusion_pl.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start_paused(ckpt: str, out, seed: int) -> subprocess.Popen:
    args = [sys.executable, "-c", PAUSED_SAMPLE, str(out / "GO"), "sample", *FAST, "--ckpt", ckpt, "--out_dir",
            str(out), "--seed", str(seed)]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "shards" / "shard_000000.npz").exists():  # it holds the lock and has written its first shard
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.1)
    return proc


def test_second_writer_refused_first_run_intact(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    first = start_paused(ckpts["cond"], out, seed=1)
    try:
        assert main(["sample", *FAST, "--ckpt", ckpts["cond"], "--out_dir", str(out), "--seed", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"diffusion-pl sample: error: --out_dir {out} is in use by ")
        assert f"(pid {first.pid} on host " in err and f"lock file {out / LOCK_NAME}" in err
        (out / "GO").touch()
        _, first_err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, first_err[-3000:]
    images, labels = load_samples_npz(str(out / "samples.npz"))
    assert images.shape == (4, 8, 8, 1) and labels.shape == (4,)
    for name in ("settings.json", "shards/settings.json"):
        assert json.loads((out / name).read_text())["seed"] == 1  # nothing of the refused seed-2 run
    assert not (out / LOCK_NAME).exists()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")
def test_lock_of_a_killed_run_is_taken_over(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    killed = start_paused(ckpts["cond"], out, seed=1)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == killed.pid  # left behind by kill -9
    assert main(["sample", *FAST, "--ckpt", ckpts["cond"], "--out_dir", str(out), "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert f"{out} was locked by diffusion-pl sample (pid {killed.pid} on host " in err
    assert "which is no longer running; taking the lock over" in err
    assert load_samples_npz(str(out / "samples.npz"))[0].shape == (4, 8, 8, 1)
    assert not (out / LOCK_NAME).exists()
