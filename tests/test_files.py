"""diffusion_pl.utils.files: the one atomic write (user's umask, links replaced not written through, disk faults as
one-line user errors naming the path)."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from diffusion_pl.errors import DiskFullError, UserError, UserFileExistsError
from diffusion_pl.lightning.checkpoint_io import AtomicCheckpointIO
from diffusion_pl.utils.files import (
    NotWritableError,
    atomic_write,
    creation_mode,
    current_umask,
    remove_folder,
    replace_link_with_copy,
    write_text,
)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_of_the_users_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask and creation_mode() == expected
    new = write_text(tmp_path / "new.json", "{}")
    replaced = tmp_path / "old.json"
    replaced.write_text("old")
    os.chmod(replaced, 0o600)
    write_text(replaced, "new")
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, ckpt)
    assert (mode(new), mode(replaced), mode(ckpt)) == (expected, expected, expected)
    assert replaced.read_text() == "new" and torch.load(ckpt)["state_dict"]["w"].tolist() == [1.0, 1.0]
    # the same mode as a plain open() under that umask (what Lightning's own files get)
    with open(tmp_path / "plain.txt", "w"):
        pass
    assert mode(tmp_path / "plain.txt") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "new.json", "old.json", "plain.txt"]


def test_a_link_is_replaced_and_its_target_untouched(tmp_path):
    target = tmp_path / "elsewhere.yaml"
    target.write_text("precious")
    link = tmp_path / "run" / "config.yaml"
    link.parent.mkdir()
    link.symlink_to(target)
    write_text(link, "new: 1")
    assert target.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new: 1"


def test_overwrite_false_refuses_an_existing_file_or_link(tmp_path):
    path = tmp_path / "samples.npz"
    path.symlink_to(tmp_path / "missing")  # a dangling link counts too
    with pytest.raises(UserFileExistsError, match=r"samples.npz already exists; pass overwrite=True"):
        write_text(path, "x", overwrite=False)
    assert path.is_symlink()


@pytest.mark.parametrize("code,kind,pattern", [
    (errno.ENOSPC, DiskFullError, r"no space left on the device while writing \S+out.bin \(.*\); nothing was written"),
    (errno.EDQUOT, DiskFullError, r"no space left on the device while writing \S+out.bin \(.*quota.*\); nothing"),
    (errno.EROFS, NotWritableError, r"cannot write \S+out.bin \(Read-only file system\); nothing was written .*"
                                    r"make \S+ writable .* or write elsewhere"),
    (errno.EACCES, NotWritableError, r"cannot write \S+out.bin \(Permission denied\)"),
])  # fmt: skip
def test_disk_faults_are_one_line_user_errors_naming_the_path(tmp_path, code, kind, pattern):
    (tmp_path / "out.bin").write_bytes(b"previous")

    def fail(f):
        f.write(b"partial")
        raise OSError(code, os.strerror(code))

    with pytest.raises(kind, match=pattern) as caught:
        atomic_write(tmp_path / "out.bin", fail)
    assert isinstance(caught.value, UserError) and caught.value.errno == code and "\n" not in str(caught.value)
    assert (tmp_path / "out.bin").read_bytes() == b"previous"  # the old file is kept
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left


def test_other_errors_propagate_and_leave_nothing(tmp_path):
    def fail(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.npz", fail)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_user_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(NotWritableError, match=rf"cannot write {folder}/a.json \(Permission denied\)"):
            write_text(folder / "a.json", "{}")
    finally:
        folder.chmod(0o755)


def test_replace_link_with_copy_keeps_the_content_and_frees_the_target(tmp_path):
    target = tmp_path / "shared.csv"
    target.write_text("step,x\n0,1\n")
    link = tmp_path / "metrics.csv"
    link.symlink_to(target)
    assert replace_link_with_copy(link) == str(target)
    with open(link, "a") as f:  # what a logger does next
        f.write("1,2\n")
    assert target.read_text() == "step,x\n0,1\n" and link.read_text() == "step,x\n0,1\n1,2\n"
    assert replace_link_with_copy(link) is None  # a regular file: nothing to do
    dangling = tmp_path / "hparams.yaml"
    dangling.symlink_to(tmp_path / "missing.yaml")
    assert replace_link_with_copy(dangling) == str(tmp_path / "missing.yaml")
    assert not os.path.lexists(dangling) and not (tmp_path / "missing.yaml").exists()


def test_remove_folder_removes_a_link_never_its_targets_files(tmp_path, capsys):
    target = tmp_path / "scratch"
    target.mkdir()
    (target / "shard_000000.npz").write_bytes(b"kept")
    link = tmp_path / "out" / "shards"
    link.parent.mkdir()
    link.symlink_to(target)
    remove_folder(link, "--overwrite")
    assert not os.path.lexists(link) and (target / "shard_000000.npz").read_bytes() == b"kept"
    assert capsys.readouterr().err == (f"diffusion-pl: note: {link} was a symbolic link to {target}; --overwrite "
                                       f"removed the link only, the files in {target} are untouched\n")  # fmt: skip
    remove_folder(target, "--overwrite")  # a real folder: removed with its files
    assert not target.exists()
