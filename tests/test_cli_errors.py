"""`diffusion-pl` prints a user error as one line (`diffusion-pl <command>: error: <message>`, exit status 2), keeps
the traceback of every other exception, and shows the traceback of user errors too with DIFFUSION_PL_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import diffusion_pl.cli as cli
from diffusion_pl.errors import (
    DiskFullError,
    UserError,
    UserFileNotFoundError,
    UserInputError,
    find_user_error,
    is_disk_full,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raising(error: BaseException):
    def run(command, args):
        raise error

    return run


def test_user_error_is_one_line_with_status_2(monkeypatch, capsys):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(cli, "run_command", _raising(UserFileNotFoundError("--ckpt x.ckpt: no such checkpoint file")))
    assert cli.main(["sample", "--ckpt", "x.ckpt"]) == 2
    err = capsys.readouterr().err
    assert err == "diffusion-pl sample: error: --ckpt x.ckpt: no such checkpoint file\n"


def test_user_error_wrapped_by_a_library_is_found_through_its_causes(monkeypatch, capsys):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    inner = UserInputError("ImageNet-64 (folder): no directory data/train")
    try:
        try:
            raise inner
        except UserInputError as e:
            raise ValueError("Does not validate against any of the Union subtypes ...") from e
    except ValueError as wrapped:
        outer = wrapped
    assert find_user_error(outer) is inner
    monkeypatch.setattr(cli, "run_command", _raising(outer))
    assert cli.main(["fit"]) == 2
    assert capsys.readouterr().err == "diffusion-pl fit: error: ImageNet-64 (folder): no directory data/train\n"


def test_other_errors_keep_their_traceback(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(cli, "run_command", _raising(ValueError("a bug, not a user error")))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["sample"])
    # only explicit causes count: a bug raised while handling a user error is still a bug
    try:
        try:
            raise UserInputError("bad option")
        except UserInputError:
            raise RuntimeError("bug in the handler")  # noqa: B904
    except RuntimeError as e:
        assert find_user_error(e) is None


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    monkeypatch.setattr(cli, "run_command", _raising(UserInputError("bad option")))
    with pytest.raises(UserInputError, match="bad option"):
        cli.main(["evaluate"])


def test_error_classes_are_the_builtins_callers_catch():
    assert issubclass(UserInputError, ValueError) and issubclass(UserFileNotFoundError, FileNotFoundError)
    full = DiskFullError("no space left while writing x", 28)
    assert isinstance(full, OSError) and isinstance(full, UserError) and str(full) == "no space left while writing x"
    assert is_disk_full(full) and is_disk_full(OSError(28, "No space left on device"))
    assert not is_disk_full(OSError(2, "No such file"))


SAMPLE_PARSE_ERRORS = [
    (["--num_samples", "three"], "--num_samples: expected int, got 'three'"),
    (["--num_sampels", "3"], "unrecognized option --num_sampels 3 (did you mean --num_samples?); "
     "`diffusion-pl sample --help` lists the options"),
    (["--precision", "bf16"], "--precision: expected one of '32-true', 'bf16-mixed', '16-mixed', got 'bf16' "
     "(did you mean 'bf16-mixed'?)"),
]  # fmt: skip


@pytest.mark.parametrize("args,expected", SAMPLE_PARSE_ERRORS, ids=["type", "misspelt-option", "choice"])
def test_parse_errors_are_one_line(args, expected, monkeypatch, capsys):
    """jsonargparse's parse errors (wrong type, unknown option, a value outside a choice) as one line with exit
    status 2, like every other user error; DIFFUSION_PL_DEBUG=1 shows jsonargparse's full report. The message's
    option list comes from the parser that failed: the command's parser is built once."""
    import diffusion_pl.commands.parser as command_parser

    built = []
    build_parser = command_parser.build_parser
    monkeypatch.setattr(command_parser, "build_parser", lambda *a, **k: built.append(a) or build_parser(*a, **k))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["sample", *args]) == 2
    assert capsys.readouterr().err == f"diffusion-pl sample: error: {expected}\n"
    assert len(built) == 1
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(SystemExit):
        cli.main(["sample", *args])
    err = capsys.readouterr().err
    assert err.startswith("usage: diffusion-pl sample [options]\n") and "error: " in err


def test_real_entry_point_prints_one_line(tmp_path):
    """The installed console script, as a new user runs it (a missing checkpoint)."""
    exe = os.path.join(os.path.dirname(sys.executable), "diffusion-pl")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "diffusion_pl.cli"]
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    proc = subprocess.run([*cmd, "sample", "--ckpt", str(tmp_path / "nope.ckpt"), "--out_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"diffusion-pl sample: error: --ckpt {tmp_path / 'nope.ckpt'}: no such checkpoint file"
    ]
    assert not (tmp_path / "out").exists()


LOST_PEER = RuntimeError("[/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:37613. This is ...")


@pytest.mark.parametrize("rank_env", [{"RANK": "1"}, {"LOCAL_RANK": "1"}, {"SLURM_PROCID": "3"}])
def test_rank_that_lost_its_peer_says_so_in_one_line(rank_env, monkeypatch, capsys):
    """On a rank > 0, a distributed error saying the other end went away (another rank failed first and printed its
    own message) is one line with status 1, not a gloo traceback."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", cli.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in rank_env.items():
        monkeypatch.setenv(name, value)
    try:
        raise ValueError("wrapper") from LOST_PEER
    except ValueError as wrapped:
        monkeypatch.setattr(cli, "run_command", _raising(wrapped))
    assert cli.main(["fit"]) == 1
    rank = next(iter(rank_env.values()))
    assert capsys.readouterr().err == (
        f"diffusion-pl fit: error: [rank {rank}] stopped because another process of this run stopped first (see its "
        "message above; DIFFUSION_PL_DEBUG=1 shows this traceback): Connection closed by peer [127.0.0.1]:37613. "
        "This is ...\n"
    )


def test_lost_peer_keeps_its_traceback_on_rank_0_and_in_debug(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS", cli.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "run_command", _raising(LOST_PEER))
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        cli.main(["fit"])  # rank 0 (not distributed): nobody else printed the cause
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        cli.main(["fit"])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        cli.main(["fit"])


@pytest.mark.parametrize("size_env", [{"WORLD_SIZE": "2"}, {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}])
def test_rank_0_that_lost_its_peer_says_so_in_one_line(size_env, monkeypatch, capsys):
    """Rank 0 of a distributed run whose rank 1 failed first: one line too (the real 2-process case:
    sampling/test_sampling_ddp_errors.py)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS", cli.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in size_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "run_command", _raising(LOST_PEER))
    assert cli.main(["sample"]) == 1
    assert capsys.readouterr().err.startswith(
        "diffusion-pl sample: error: [rank 0] stopped because another process of this run stopped first (see its "
        "message above; DIFFUSION_PL_DEBUG=1 shows this traceback): Connection closed by peer"
    )


def test_lightning_misconfiguration_is_a_user_error(monkeypatch, capsys):
    """A setting Lightning refuses (e.g. --accelerator gpu without a GPU) is reported with Lightning's own message in
    one line, like the project's user errors."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    try:
        raise RuntimeError("building the trainer") from MisconfigurationException("No supported gpu backend found!")
    except RuntimeError as wrapped:
        monkeypatch.setattr(cli, "run_command", _raising(wrapped))
    assert cli.main(["sample"]) == 2
    assert capsys.readouterr().err == "diffusion-pl sample: error: No supported gpu backend found!\n"


def test_rank_stopped_by_rank_0s_evaluation_error_says_so_in_one_line(monkeypatch, capsys):
    """The metrics are computed on rank 0 and broadcast; when that fails, the other ranks raise OtherRankError
    quoting it (evaluation/distributed.py) and print one line pointing at rank 0's message."""
    from diffusion_pl.errors import OtherRankError

    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", cli.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "2")
    message = "evaluation failed on rank 0: UserInputError: " + "x" * 200
    monkeypatch.setattr(cli, "run_command", _raising(OtherRankError(message)))
    assert cli.main(["evaluate"]) == 1
    assert capsys.readouterr().err == (
        "diffusion-pl evaluate: error: [rank 2] stopped because another process of this run stopped first (see its "
        f"message above; DIFFUSION_PL_DEBUG=1 shows this traceback): {message[:160]}…\n"
    )
