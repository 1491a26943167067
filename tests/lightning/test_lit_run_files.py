"""A run's files: metrics.csv survives a refused fit and a resumed run appends to it (train longer); a full disk or a
read-only folder is one line and keeps the last good checkpoint; temporary files of a killed save are removed."""

from __future__ import annotations

import csv
import errno
import glob
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from lit_helpers import write_tiny_classifier_config

from diffusion_pl.cli import main
from diffusion_pl.errors import DiskFullError, UserError
from diffusion_pl.lightning import AtomicCheckpointIO
from diffusion_pl.lightning.cli import build_lightning_cli
from diffusion_pl.lightning.loggers import AppendingCSVLogger
from diffusion_pl.utils.files import NotWritableError, atomic_write

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


def _config(tmp_path, name, max_steps, logger_class=CSV_LOGGER, logs_dir=None):
    logs_dir = logs_dir or tmp_path / "logs"
    logger = f"{{class_path: {logger_class}, init_args: {{save_dir: {logs_dir}, version: 0}}}}"
    return write_tiny_classifier_config(tmp_path / f"{name}.yaml", tmp_path / "run", logger=logger,
                                        max_steps=max_steps)  # fmt: skip


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rows_of(data: bytes):
    return list(csv.DictReader(data.decode().splitlines()))


def _fit(config, *extra):
    return build_lightning_cli(["fit", "--config", config, "--trainer.log_every_n_steps=1",
                                "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true",
                                *extra])  # fmt: skip


def test_resumed_run_appends_to_metrics_csv_and_a_refused_run_keeps_it(tmp_path):
    first = _fit(_config(tmp_path, "a", max_steps=2))
    assert isinstance(first.trainer.logger, AppendingCSVLogger)  # the config names Lightning's CSVLogger
    run_dir = tmp_path / "logs" / "lightning_logs" / "version_0"
    metrics = run_dir / "metrics.csv"
    rows = _rows(metrics)
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0", "1"]
    before = metrics.read_bytes()

    # Another config into the same folder: refused, and metrics.csv is untouched.
    with pytest.raises(RuntimeError, match="holds a different configuration"):
        _fit(_config(tmp_path, "b", max_steps=2), "--model.init_args.lr=0.5")
    assert metrics.read_bytes() == before

    # Resumed with more steps (train longer): the earlier rows are kept, the new steps appended.
    (last,) = glob.glob(str(run_dir / "checkpoints" / "last.ckpt"))
    resumed = _fit(_config(tmp_path, "a", max_steps=2), "--trainer.max_steps=4", "--ckpt_path", last)
    assert resumed.trainer.global_step == 4
    old_rows, rows = _rows_of(before), _rows(metrics)
    assert [{k: r[k] for k in old_rows[0]} for r in rows[: len(old_rows)]] == old_rows  # kept as they were
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0", "1", "2", "3"]
    # The run's config.yaml is kept; the resumed run's settings are saved next to it.
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    assert yaml.safe_load((run_dir / "config_resume.yaml").read_text())["trainer"]["max_steps"] == 4


def test_resume_refuses_a_setting_that_may_not_change(tmp_path):
    _fit(_config(tmp_path, "a", max_steps=2))
    run_dir = tmp_path / "logs" / "lightning_logs" / "version_0"
    with pytest.raises(RuntimeError, match=r"--ckpt_path resumes the run in \S+version_0, but these settings differ "
                                           r"from its config.yaml and may not change when resuming: "
                                           r"trainer.accumulate_grad_batches\. A resumed run may change only"):
        _fit(_config(tmp_path, "a", max_steps=2), "--trainer.max_steps=4", "--trainer.accumulate_grad_batches=2",
             "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))


# ------------------------------------------------------------------------------------------------ disk faults
@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()

    def mount(size: str, read_only: bool = False) -> Path:
        options = f"size={size}" if not read_only else "remount,ro"
        args = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)]
        if subprocess.run(args, capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        return mount_point

    yield mount
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def _cli_error(capsys, args) -> str:
    code = main(["fit", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("diffusion-pl fit: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _checkpointing(max_steps: int) -> list[str]:
    return ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
            f"--trainer.max_steps={max_steps}"]  # fmt: skip


def test_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_good_one(tmp_path, tmpfs, capsys):
    """A real full disk: torch reports it as RuntimeError("... unexpected pos ...") without errno."""
    logs = tmpfs("10m")  # a tiny-classifier checkpoint is ~4 MB: step 1 (its file + last.ckpt) fits, step 2 not
    line = _cli_error(capsys, ["--config", _config(tmp_path, "a", 3, logs_dir=logs), *_checkpointing(3)])
    checkpoints = logs / "lightning_logs" / "version_0" / "checkpoints"
    assert re.fullmatch(
        rf"diffusion-pl fit: error: disk full: no space left on the device while writing the checkpoint "
        rf"{checkpoints}/epoch=0-step=2.ckpt \(No space left on device\); it was not written and the checkpoints "
        rf"already in {checkpoints} are intact\. Free some space .* and resume with --ckpt_path set to the last "
        r"checkpoint \(e\.g\. …/checkpoints/last\.ckpt\)", line)  # fmt: skip
    assert sorted(os.listdir(checkpoints)) == ["epoch=0-step=1.ckpt", "last.ckpt"]  # no temporary file left
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 1


def test_read_only_run_folder_is_one_line(tmp_path, tmpfs, capsys):
    logs = tmpfs("50m")
    config = _config(tmp_path, "a", 2, logs_dir=logs)
    _fit(config)
    run_dir = logs / "lightning_logs" / "version_0"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    tmpfs("", read_only=True)
    line = _cli_error(capsys, ["--config", config, *_checkpointing(4), "--ckpt_path", "last"])
    assert re.fullmatch(rf"diffusion-pl fit: error: cannot write .*{run_dir}.*: Read-only file system \(a read-only "
                        r"or not writable folder\); the checkpoints already written are intact\. Make the folder "
                        r"writable, or write the run elsewhere .*", line)  # fmt: skip
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_checkpoint_io_finds_the_full_disk_behind_torchs_write_error(tmp_path, monkeypatch):
    """Without a tmpfs: torch's RuntimeError, then the 1 MiB probe write fails with ENOSPC."""
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, str(tmp_path / "last.ckpt"))

    def torch_save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2330304 vs 2330196")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError, match=r"disk full: no space left on the device while writing the checkpoint"):
        io.save_checkpoint({"step": 2}, str(tmp_path / "last.ckpt"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    # Any other RuntimeError of torch stays what it is.
    monkeypatch.setattr(torch, "save", torch_save)
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        io.save_checkpoint({"step": 2}, str(tmp_path / "last.ckpt"))
    assert not isinstance(raised.value, UserError)


def test_checkpoint_into_a_read_only_folder_is_a_user_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    message = (rf"cannot write the checkpoint {tmp_path}/last.ckpt: Read-only file system \(a read-only or not "
               rf"writable folder\); it was not written and the checkpoints already in {tmp_path} are intact")
    with pytest.raises(UserError, match=message):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, str(tmp_path / "last.ckpt"))


@pytest.mark.parametrize("code,kind,start", [
    (errno.ENOSPC, DiskFullError, "disk full: no space left on the device while writing the checkpoint"),
    (errno.EDQUOT, DiskFullError, "disk full: no space left on the device while writing the checkpoint"),
    (errno.EROFS, NotWritableError, "cannot write the checkpoint"),
    (errno.EACCES, NotWritableError, "cannot write the checkpoint"),
    (errno.EPERM, NotWritableError, "cannot write the checkpoint"),
    (errno.EIO, OSError, "[Errno"),
])  # fmt: skip
def test_checkpoint_saves_and_other_writes_tell_the_same_faults(tmp_path, monkeypatch, code, kind, start):
    """A checkpoint save and any other atomic write make the same kind of error of the same errno (one classifier),
    each with its own message; an error that is no disk fault stays as it is."""

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    with pytest.raises(OSError) as written:
        atomic_write(tmp_path / "settings.json", fail)
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError) as saved:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, str(tmp_path / "last.ckpt"))
    assert type(written.value) is type(saved.value) is kind and saved.value.errno == code
    assert str(saved.value).startswith(start) and isinstance(saved.value, UserError) == (kind is not OSError)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ leftovers
def test_temporary_files_of_an_interrupted_save_are_removed_at_the_next_start(tmp_path, caplog):
    config = _config(tmp_path, "a", 1)
    _fit(config)
    checkpoints = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints"
    leftover = checkpoints / ".last.ckpt.k3j2h1x0.tmp"  # what a save killed before its rename leaves
    leftover.write_bytes(b"x" * 1000)
    notes = checkpoints / ".notes.tmp"  # not a checkpoint's temporary file: kept
    notes.write_text("mine")
    with caplog.at_level(logging.INFO):
        _fit(config, "--trainer.max_steps=2", "--ckpt_path", str(checkpoints / "last.ckpt"))
    assert not leftover.exists() and notes.read_text() == "mine"
    assert f"Removed 1 temporary file(s) of an interrupted checkpoint save from {checkpoints}: " \
           ".last.ckpt.k3j2h1x0.tmp" in caplog.text  # fmt: skip


def test_finalize_flushes_the_appending_logger(tmp_path):
    """Lightning's CSVLogger.finalize flushes only the writer it created itself; the appending one must be flushed too:
    metrics logged and then finalized (no explicit save) are in metrics.csv."""
    logger = AppendingCSVLogger(save_dir=str(tmp_path), name="run", version=0)
    for step in range(3):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.finalize("success")
    with open(tmp_path / "run" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == [0.0, 1.0, 2.0]
