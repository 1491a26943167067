"""`diffusion-pl fit` and its run folder (lightning/run_folder.py): one writer (another run there is refused before
anything is written), the lock released when the run ends, and logger files that are links replaced by copies so that
their targets are never written."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from lit_helpers import LockProbe, write_tiny_classifier_config

from diffusion_pl.lightning.cli import build_lightning_cli
from diffusion_pl.lightning.run_folder import RunFolderLock
from diffusion_pl.utils.folder_lock import LOCK_NAME, FolderInUseError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = """
import os, sys, time
from diffusion_pl.utils.folder_lock import FolderLock
with FolderLock(sys.argv[1], "the run folder", "diffusion-pl fit"):
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
"""


def csv_config(tmp_path, name: str = "fit", max_steps: int = 1) -> str:
    """A tiny fit logging to tmp_path/csv/lightning_logs/version_0 (a fixed CSVLogger version)."""
    init_args = f"{{save_dir: {tmp_path / 'csv'}, version: 0}}"
    logger = f"{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {init_args}}}"
    return write_tiny_classifier_config(tmp_path / f"{name}.yaml", tmp_path / "root", logger=logger,
                                        max_steps=max_steps)  # fmt: skip


def test_fit_into_a_run_folder_another_run_writes_is_refused(tmp_path):
    run = tmp_path / "csv" / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,step,train_loss\n0,0,1.5\n")  # the other run's files
    env = dict(os.environ, PYTHONPATH=ROOT)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run), str(tmp_path / "done")], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (run / LOCK_NAME).exists() or not (run / LOCK_NAME).read_text():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(FolderInUseError) as refused:
            build_lightning_cli(["fit", "--config", csv_config(tmp_path)])
    finally:
        (tmp_path / "done").touch()
        holder.wait(timeout=60)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the run folder {run} is in use by diffusion-pl fit (pid {holder.pid} on host ")
    assert "Wait for it to finish, or this directory is version 0 of the CSVLogger: give this run another " in message
    assert message.endswith("if that run is gone, remove the lock file")
    assert sorted(os.listdir(run)) == ["metrics.csv"]  # nothing written, nothing deleted
    assert (run / "metrics.csv").read_text() == "epoch,step,train_loss\n0,0,1.5\n"


def test_fit_holds_the_lock_while_it_trains_and_releases_it_when_it_ends(tmp_path):
    run = tmp_path / "csv" / "lightning_logs" / "version_0"
    probe = ["--trainer.callbacks+=lit_helpers.LockProbe", f"--trainer.callbacks.folder={run}"]
    cli = build_lightning_cli(["fit", "--config", csv_config(tmp_path), *probe])
    (lock,) = [c.lock for c in cli.trainer.callbacks if isinstance(c, RunFolderLock)]
    (seen,) = [c for c in cli.trainer.callbacks if isinstance(c, LockProbe)]
    assert lock.folder == str(run)
    # During training: the lock file names this process, and a second writer is refused.
    assert [(h["pid"], h["command"]) for h in seen.holders] == [(os.getpid(), "diffusion-pl fit")]
    assert len(seen.refusals) == 1
    assert seen.refusals[0].startswith(f"the run folder {run} is in use by diffusion-pl fit (pid {os.getpid()} ")
    assert "which is writing there now" in seen.refusals[0]
    assert not (run / LOCK_NAME).exists()
    with pytest.raises(RuntimeError, match="holds a different configuration"):  # refused in setup: released too
        build_lightning_cli(["fit", "--config", csv_config(tmp_path, "other", max_steps=2), *probe])
    assert not (run / LOCK_NAME).exists()
    build_lightning_cli(["fit", "--config", csv_config(tmp_path), *probe])  # the same config again: not refused


def test_linked_logger_files_are_replaced_and_their_targets_untouched(tmp_path, capsys):
    run = tmp_path / "csv" / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hparams.yaml").write_text("precious: 1\n")
    (shared / "metrics.csv").write_text("step,x\n0,1\n")
    (run / "hparams.yaml").symlink_to(shared / "hparams.yaml")
    (run / "metrics.csv").symlink_to(shared / "metrics.csv")
    build_lightning_cli(["fit", "--config", csv_config(tmp_path)])
    assert (shared / "hparams.yaml").read_text() == "precious: 1\n"
    assert (shared / "metrics.csv").read_text() == "step,x\n0,1\n"
    assert not (run / "hparams.yaml").is_symlink() and not (run / "metrics.csv").is_symlink()
    assert yaml.safe_load((run / "hparams.yaml").read_text())["image_size"] == 8  # this run's hyperparameters
    err = capsys.readouterr().err
    assert (f"diffusion-pl fit: note: {run / 'hparams.yaml'} was a symbolic link to {shared / 'hparams.yaml'}; it is "
            "replaced by a copy so that the logger never writes into the link's target") in err  # fmt: skip
