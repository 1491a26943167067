"""DDP on 2 CPU processes: training runs, and the loss-second-moment histories are identical on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_fit_script.py")


@pytest.mark.ddp
def test_ddp_fit_keeps_sampler_histories_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=240,
                            env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == 2
    # Every rank recorded the losses of both ranks: 8 steps x 3 examples x 2 ranks (T = 50, at most 10 per timestep:
    # no slot is full yet, so nothing was dropped).
    assert int(rank0["counts"].max()) < 10
    assert int(rank0["counts"].sum()) == 8 * 3 * 2
    assert torch.equal(rank0["counts"], rank1["counts"])
    assert torch.equal(rank0["history"], rank1["history"])
    for name, value in rank0["weights"].items():
        torch.testing.assert_close(rank1["weights"][name], value, msg=name)
    # Only rank 0 drew the sample grids (validation at steps 4 and 8), without stalling rank 1.
    assert sorted(os.listdir(tmp_path / "samples")) == ["samples_step00000004.png", "samples_step00000008.png"]
