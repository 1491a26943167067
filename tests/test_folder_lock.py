"""One writer per output folder (diffusion_pl/utils/folder_lock.py): the lock's refusal, stale-lock takeover, other
hosts, ranks of one run, folders left as they were."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from diffusion_pl.utils.folder_lock import LOCK_NAME, FolderInUseError, FolderLock, holds_output_folder


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_is_refused_in_one_line(tmp_path):
    with FolderLock(tmp_path / "out", "--out_dir", "diffusion-pl sample"):
        holder = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FolderInUseError) as refused:
            FolderLock(tmp_path / "out").acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"--out_dir {tmp_path / 'out'} is in use by diffusion-pl sample (pid {os.getpid()} on "
                              f"host {socket.gethostname()}, started 20")  # fmt: skip
    assert "UTC), which is writing there now" in message and f"(lock file {tmp_path / 'out' / LOCK_NAME})" in message
    assert message.endswith("choose another --out_dir; if that run is gone, remove the lock file")
    assert not (tmp_path / "out").exists()  # the folder the lock made is removed with it


def test_released_after_an_error_and_existing_folder_kept(tmp_path):
    (tmp_path / "kept.txt").write_text("x")
    with pytest.raises(RuntimeError, match="boom"), FolderLock(tmp_path):
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["kept.txt"]
    with FolderLock(tmp_path):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "since": 1.7e9, "command": "diffusion-pl sample"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with FolderLock(tmp_path, command="diffusion-pl sample"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert err == (f"diffusion-pl sample: note: {tmp_path} was locked by diffusion-pl sample (pid {stale['pid']} on "
                   f"host {socket.gethostname()}, started 2023-11-14 22:13:20 UTC), which is no longer running; taking "
                   "the lock over\n")  # fmt: skip
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_is_refused_with_the_fix(tmp_path):
    other = {"pid": 1, "host": "node-17", "since": 1.7e9, "command": "diffusion-pl evaluate"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(FolderInUseError, match=r"is in use by diffusion-pl evaluate \(pid 1 on host node-17, started "
                                               r"2023-11-14 22:13:20 UTC\), which may still be writing there \(its "
                                               r"lock file comes from another host\) .*"
                                               r"if that run is gone, remove the lock file"):  # fmt: skip
        FolderLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other  # not taken, not removed


def test_a_linked_lock_file_is_refused(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("precious")
    (tmp_path / LOCK_NAME).symlink_to(target)
    with pytest.raises(FolderInUseError, match="is a symbolic link; diffusion-pl does not write through links"):
        FolderLock(tmp_path).acquire()
    assert target.read_text() == "precious"


@pytest.mark.parametrize(
    "env",
    # LOCAL_RANK 0 on NODE_RANK 1: the first process of the second node of a Lightning-launched run (not rank 0 of
    # the run; Lightning's rank_zero_only.rank, from LOCAL_RANK, would say 0 there)
    [{"LOCAL_RANK": "1"}, {"RANK": "3"}, {"SLURM_PROCID": "1"}, {"NODE_RANK": "1"},
     {"LOCAL_RANK": "0", "NODE_RANK": "1"}],  # fmt: skip
)
def test_only_the_first_process_of_a_run_takes_the_lock(tmp_path, monkeypatch, env):
    """Ranks > 0 (launched by the rank-0 process, or by torchrun / SLURM) write the folder of the same run."""
    with FolderLock(tmp_path, "--out_dir"):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with FolderLock(tmp_path, "--out_dir") as other_rank:
            assert other_rank.fd is None
        assert (tmp_path / LOCK_NAME).exists()  # the rank > 0 did not remove rank 0's lock


def test_decorator_locks_the_named_folder(tmp_path):
    seen = []

    @holds_output_folder("out_dir")
    def command(x: int = 0, out_dir: str | None = "unused") -> int:
        seen.append(os.path.exists(os.path.join(out_dir, LOCK_NAME)) if out_dir else None)
        return x

    assert command(1, out_dir=str(tmp_path)) == 1 and command(out_dir=None) == 0
    assert seen == [True, None] and not (tmp_path / LOCK_NAME).exists()
    assert command.__doc__ is None and list(__import__("inspect").signature(command).parameters) == ["x", "out_dir"]
