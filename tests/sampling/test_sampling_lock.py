"""`diffusion-pl sample` and its output folder: a second run into one --out_dir is refused in one line and the first's
files are intact; a run killed with -9 leaves a stale lock that the next run takes over (and resumes its shards); a
linked shards folder with --overwrite loses its link only; disk faults while writing are one line."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffusion_pl.cli import main
from diffusion_pl.evaluation import load_samples_npz
from diffusion_pl.utils.folder_lock import LOCK_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--num_samples", "4", "--sample_batch_size", "2", "--shard_size", "2", "--steps", "2", "--accelerator", "cpu"]

# A real `diffusion-pl sample` that stops before its second shard until the file GO exists.
PAUSED_SAMPLE = """
import os, sys, time
import diffusion_pl.sampling.shards as s
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
    first_shard = out / "shards" / "shard_000000.npz"  # written by the killed run before it paused
    first_shard_mtime = first_shard.stat().st_mtime_ns
    assert main(["sample", *FAST, "--ckpt", ckpts["cond"], "--out_dir", str(out), "--seed", "1"]) == 0
    assert first_shard.stat().st_mtime_ns == first_shard_mtime  # resumed: the killed run's shard is kept, not redone
    err = capsys.readouterr().err
    assert f"{out} was locked by diffusion-pl sample (pid {killed.pid} on host " in err
    assert "which is no longer running; taking the lock over" in err
    assert load_samples_npz(str(out / "samples.npz"))[0].shape == (4, 8, 8, 1)
    assert not (out / LOCK_NAME).exists()


def test_overwrite_of_a_linked_shards_folder_removes_the_link_only(ckpts, tmp_path, capsys):
    """`sample --overwrite true` where OUT_DIR/shards is a link to another folder: the link is removed (a note says
    so), the files in its target are untouched, the run writes a real shards folder."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "shard_000000.npz").write_bytes(b"an earlier run's shard")
    (scratch / "settings.json").write_text('{"seed": 7}')
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").symlink_to(scratch)
    args = ["sample", *FAST, "--ckpt", ckpts["cond"], "--out_dir", str(out), "--overwrite", "true"]
    assert main(args) == 0
    note = f"note: {out / 'shards'} was a symbolic link to {scratch}; --overwrite removed the link only, the files in "
    assert note + f"{scratch} are untouched" in capsys.readouterr().err
    assert sorted(os.listdir(scratch)) == ["settings.json", "shard_000000.npz"]
    assert (scratch / "shard_000000.npz").read_bytes() == b"an earlier run's shard"
    assert not (out / "shards").is_symlink() and len(list((out / "shards").glob("shard_*.npz"))) == 2
    assert load_samples_npz(str(out / "samples.npz"))[0].shape == (4, 8, 8, 1)


@pytest.mark.parametrize("code,pattern", [
    (errno.EROFS, r"cannot write \S+samples.npz \(Read-only file system\); nothing was written under that name: make "
                  r"\S+ writable"),
    (errno.EDQUOT, r"disk full: no space left on the device while writing \S+samples.npz \(Disk quota exceeded\)"),
])  # fmt: skip
def test_disk_faults_while_writing_samples_are_one_line(ckpts, tmp_path, capsys, monkeypatch, code, pattern):
    """A read-only file system or an exceeded quota while samples.npz is written: one line naming the file; the
    finished shards are kept (and the lock is released)."""
    real_savez = np.savez

    def savez(f, **arrays):
        if "arr_0" in arrays:
            raise OSError(code, os.strerror(code))
        return real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    out = tmp_path / "out"
    assert main(["sample", *FAST, "--ckpt", ckpts["cond"], "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]  # (after the progress bar's line)
    assert len(errors) == 1 and "Traceback" not in err and re.search(pattern, errors[0]), err
    assert len(list((out / "shards").glob("shard_*.npz"))) == 2
    assert not (out / "samples.npz").exists() and not (out / LOCK_NAME).exists()
