"""Checkpoints fit refuses, each in one line: a file safe loading refuses (names the blocked global and why), a file
that is not a checkpoint at all, and `--ckpt_path last` when there is nothing to resume or the file is unreadable."""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch
from lit_helpers import TinyDataModule, write_tiny_classifier_config
from torch.utils.data import DataLoader

from diffusion_pl.cli import main

CSV = "lightning.pytorch.loggers.CSVLogger"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _config(tmp_path, version="0"):
    init_args = f"save_dir: {tmp_path / 'logs'}" + (f", version: {version}" if version is not None else "")
    return write_tiny_classifier_config(tmp_path / "tiny.yaml", tmp_path / "run", max_steps=1,
                                        logger=f"{{class_path: {CSV}, init_args: {{{init_args}}}}}")  # fmt: skip


def _fit(capsys, *args) -> tuple[int, str]:
    code = main(["fit", *args, "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true"])
    return code, capsys.readouterr().err


def _one_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("diffusion-pl fit: error: ")]
    return line


def test_unsafe_checkpoint_names_the_blocked_global_and_the_risk(tmp_path, capsys):
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    line = _one_line(*_fit(capsys, "--config", _config(tmp_path), "--ckpt_path", str(path)))
    assert line == (
        f"diffusion-pl fit: error: --ckpt_path {path} was refused by safe loading (torch.load with weights_only=True): "
        f"it refers to the Python object {os.system.__module__}.system, and loading it would import that object and "
        "could run any code stored in the file (a code-execution risk), so diffusion-pl only reads checkpoints made "
        "of tensors and plain values. Use a checkpoint written by diffusion-pl; if you made this file yourself and "
        "trust it, load it in Python with weights_only=False and save its tensors again"
    )


@pytest.mark.parametrize("content", [os.urandom(5000), b"\x80\x02" + os.urandom(5000)], ids=["bytes", "pickle-head"])
def test_random_bytes_are_unreadable_not_python_objects(tmp_path, capsys, content):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(content)
    line = _one_line(*_fit(capsys, "--config", _config(tmp_path), "--ckpt_path", str(path)))
    assert re.search(rf"--ckpt_path {path} \(5,00\d bytes\) cannot be read as a torch checkpoint .*: the file is "
                     "corrupt or truncated", line), line  # fmt: skip
    assert "Python object" not in line


def test_ckpt_path_last_on_an_unreadable_file_is_one_line(tmp_path, capsys):
    config = _config(tmp_path)
    assert _fit(capsys, "--config", config)[0] == 0
    last = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    last.write_bytes(os.urandom(3000))
    line = _one_line(*_fit(capsys, "--config", config, "--trainer.max_steps=2", "--ckpt_path", "last"))
    assert re.search(rf"--ckpt_path last {last} \(3,000 bytes\) cannot be read as a torch checkpoint", line), line


def test_ckpt_path_last_without_a_fixed_version_refuses_instead_of_starting_over(tmp_path, capsys):
    config = _config(tmp_path, version=None)
    assert _fit(capsys, "--config", config)[0] == 0  # version_0
    line = _one_line(*_fit(capsys, "--config", config, "--trainer.max_steps=2", "--ckpt_path", "last"))
    logs = tmp_path / "logs" / "lightning_logs"
    assert line == (
        f"diffusion-pl fit: error: --ckpt_path last: no checkpoint in {logs}/version_1/checkpoints, so training "
        "would start again from step 0 (the logger starts a new version folder for every run, so `last` cannot "
        f"find an earlier run there); resume the run you mean by its file, e.g. --ckpt_path "
        f"{logs}/version_0/checkpoints/last.ckpt (the newest)"
    )
    assert not (logs / "version_1").exists()  # refused before the run started
    # The file it names resumes the run, in its own folder (train longer: more steps, the same logs).
    code, err = _fit(capsys, "--config", config, "--trainer.max_steps=2", "--ckpt_path",
                     str(logs / "version_0" / "checkpoints" / "last.ckpt"))  # fmt: skip
    assert code == 0, err
    assert torch.load(logs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (logs / "version_1").exists()


def test_ckpt_path_last_with_a_fixed_version_starts_the_first_run_and_says_so(tmp_path, capsys, caplog):
    """A job script resubmitted with --ckpt_path last: its first submission starts at step 0, the next resumes."""
    config = _config(tmp_path, version="0")
    checkpoints = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints"
    with caplog.at_level(logging.INFO):
        assert _fit(capsys, "--config", config, "--ckpt_path", "last")[0] == 0
    assert f"--ckpt_path last: no checkpoint in {checkpoints} yet; starting at step 0" in caplog.text
    code, err = _fit(capsys, "--config", config, "--trainer.max_steps=2", "--ckpt_path", "last")
    assert code == 0, err
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2


class PlainLoaderDataModule(TinyDataModule):
    """A user's DataModule with torch's DataLoader (no position to restore)."""

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)


def test_resume_with_a_datamodule_that_cannot_take_the_data_position_is_one_line(tmp_path, capsys):
    config = _config(tmp_path)
    assert _fit(capsys, "--config", config)[0] == 0
    last = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    # Into another folder (in the run's own folder the changed data.class_path is refused first).
    line = _one_line(*_fit(capsys, "--config", config, "--trainer.max_steps=2", "--ckpt_path", str(last),
                           "--data", "test_lit_ckpt_refusals.PlainLoaderDataModule",
                           f"--trainer.logger.init_args.save_dir={tmp_path / 'other'}"))  # fmt: skip
    assert line == (
        "diffusion-pl fit: error: the checkpoint holds the position of its training data loader (diffusion-pl's "
        "DataModules save it to resume mid-epoch exactly), but this run's train_dataloader() cannot take it back "
        "(not a diffusion_pl.data.resumable.ResumableDataLoader): resume with the DataModule the run was trained with"
    )
