"""`--method` / `--steps` / `--eta` of the commands (and the callbacks' method) come from the sampler registry: bad
values are refused before any file is read or network loaded; a solver's samples depend only on their seeds, also
across 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
from jsonargparse import ArgumentError, ArgumentParser
from sampling_helpers import run_command
from test_sampling_user_errors import run_user_error

from diffusion_pl.commands.demo import demo
from diffusion_pl.commands.evaluate import evaluate
from diffusion_pl.commands.parser import build_parser
from diffusion_pl.commands.sample import sample
from diffusion_pl.commands.sweep import sweep
from diffusion_pl.diffusion import SAMPLING_METHODS
from diffusion_pl.evaluation import load_samples_npz
from diffusion_pl.lightning import GuidedSampler
from diffusion_pl.lightning.evaluation_callback import SampleQualityEvaluation
from diffusion_pl.parse_errors import parse_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOLVER = dict(method="dpmpp_2m_sde", steps="karras3", num_samples=6, shard_size=2, accelerator="cpu",
              classifier_scale=1.0, cfg_scale=1.5)  # fmt: skip


def command_parser(function):
    return build_parser(function, "p", partial(ArgumentParser, exit_on_error=False))


def callback_parser(callback):  # as LightningCLI reads a callback's init_args from a config
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(callback, "callback")
    return parser


@pytest.mark.parametrize("parser, option, extra", [
    (command_parser(sample), "--method", ()),
    (command_parser(evaluate), "--method", ()),
    (command_parser(sweep), "--method", ()),
    (command_parser(demo), "--fast_method", ()),
    (callback_parser(GuidedSampler), "--callback.method", ("auto",)),
    (callback_parser(SampleQualityEvaluation), "--callback.method", ()),
], ids=["sample", "evaluate", "sweep", "demo", "GuidedSampler", "SampleQualityEvaluation"])  # fmt: skip
def test_method_choices_are_the_registry(parser, option, extra):
    """Every name of the sampler registry parses, and a name outside it is refused with exactly the registry's names
    listed (plus "auto" where the option has it): a sampler added to the registry is a choice everywhere."""
    names = (*extra, *SAMPLING_METHODS)
    assert [parser.parse_args([option, name])[option[2:]] for name in names] == list(names)
    with pytest.raises(ArgumentError) as refused:
        parser.parse_args([option, "euler"])
    choices = ", ".join(repr(name) for name in names)
    assert str(parse_error(refused.value, "p")) == f"{option[2:]}: expected one of {choices}, got 'euler'"


@pytest.mark.parametrize(
    "command, args, pattern",
    [
        ("sample", ["--method", "heun", "--steps", "1"], r"--steps '1' gives 1 step\(s\), but method heun needs at "
                                                         r"least 3 .*use e.g. --steps 3"),
        ("sample", ["--method", "dpmpp_2m", "--steps", "karras2"], r"needs at least 3 .*--steps karras3"),
        ("sample", ["--method", "dpmpp_2m_sde", "--eta", "2"], r"--eta must be in \[0, 1\] \(0: the deterministic"),
        ("sample", ["--method", "heun", "--eta", "0.5"], r"--eta 0.5 only applies to method ddim or dpmpp_2m_sde"),
        ("sample", ["--method", "euler"], r"--method: expected one of 'ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde', "
                                          r"'heun', got 'euler'"),
        ("evaluate", ["--method", "heun", "--steps", "1"], r"method heun needs at least 3"),
        ("sweep", ["--method", "dpmpp_2m", "--steps", "2"], r"method dpmpp_2m needs at least 3"),
    ],
)
def test_refused_before_the_checkpoint_is_read(capsys, tmp_path, command, args, pattern):
    # The checkpoint does not exist: the method options are checked first.
    run_user_error(capsys, [command, "--ckpt", str(tmp_path / "nope.ckpt"), "--out_dir", str(tmp_path / "o"), *args],
                   pattern)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_level_schedule_the_model_cannot_take_is_refused(ckpts, capsys, tmp_path):
    """ddim cannot put 9 Karras levels on distinct trained steps of a T = 10 model: refused with the reason."""
    out = str(tmp_path / "o")
    args = ["sample", "--ckpt", ckpts["cond"], "--method", "ddim", "--steps", "karras9", "--out_dir", out]
    run_user_error(capsys, args, r"--steps 'karras9' with method ddim: karras9 puts two")


@pytest.mark.ddp
def test_stochastic_solver_two_ranks_equal_one_rank(ckpts, tmp_path):
    """dpmpp_2m_sde with classifier + classifier-free guidance: the same images on 1 process (batch 3) and on
    2 processes (batch 2): each image depends only on the seed and its index."""
    one = str(tmp_path / "one")
    run_command(sample, out_dir=one, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier"], sample_batch_size=3,
                **SOLVER)  # fmt: skip
    two = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "diffusion_pl.cli", "sample", "--out_dir", two, "--ckpt", ckpts["cond"],
           "--classifier_ckpt", ckpts["classifier"], "--sample_batch_size", "2", "--devices", "2",
           *[f"--{k}={v}" for k, v in SOLVER.items()]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, la = load_samples_npz(os.path.join(one, "samples.npz"))
    b, lb = load_samples_npz(os.path.join(two, "samples.npz"))
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batch-size dependent float rounding only
    assert a.std() > 10
