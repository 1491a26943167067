"""A 2-process (gloo) `diffusion-pl sample` in which rank 1 fails first: rank 1 prints its one-line user error and
rank 0, which only loses its peer, says so in one line instead of a gloo traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# `diffusion-pl sample` whose rank 1 stops with a user error at its first shard (Lightning's launcher runs this same
# script again for rank 1, with LOCAL_RANK=1).
RANK_1_FAILS = """
import os, sys
import diffusion_pl.sampling.shards as s
from diffusion_pl.errors import UserInputError
real = s.run_shards
def rank_1_fails(*args, **kwargs):
    if os.environ.get("LOCAL_RANK") == "1":
        raise UserInputError("simulated user error on rank 1")
    return real(*args, **kwargs)
s.run_shards = rank_1_fails
from diffusion_pl.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.ddp
def test_rank_0_says_in_one_line_that_rank_1_stopped_first(ckpts, tmp_path):
    script = tmp_path / "rank_1_fails.py"
    script.write_text(RANK_1_FAILS)
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSION_PL_DEBUG", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, str(script), "sample", "--ckpt", ckpts["cond"], "--out_dir", str(tmp_path / "out"),
         "--num_samples", "4", "--sample_batch_size", "2", "--shard_size", "2", "--steps", "2", "--accelerator", "cpu",
         "--devices", "2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    # (a line may start with the end of a progress bar)
    errors = [line[line.index("diffusion-pl") :] for line in proc.stderr.splitlines() if "error: " in line]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert errors[0] == "diffusion-pl sample: error: simulated user error on rank 1", errors
    assert len(errors) == 2 and errors[1].startswith(
        "diffusion-pl sample: error: [rank 0] stopped because another process of this run stopped first"
    ), errors
