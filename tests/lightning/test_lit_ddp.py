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


@pytest.mark.ddp
def test_ddp_user_error_is_one_line_per_rank(tmp_path):
    """A user error on rank 0 of a 2-process run (data missing, found in prepare_data while rank 1 waits at the
    barrier): rank 0 prints its one-line message; rank 1, which only loses its peer, says so in one line instead of
    a gloo traceback."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    exe = os.path.join(os.path.dirname(sys.executable), "diffusion-pl")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "diffusion_pl.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSION_PL_DEBUG", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [*cmd, "fit", "--config", os.path.join(root, "configs", "iddpm_cifar10.yaml"),
         "--data.init_args.data_dir", str(tmp_path / "nodata"), "--trainer.accelerator=cpu", "--trainer.devices=2",
         "--trainer.strategy=ddp", "--trainer.logger=false", "--trainer.default_root_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert errors[0].startswith("diffusion-pl fit: error: CIFAR-10: missing ['data_batch_1'"), errors
    assert len(errors) == 2 and errors[1].startswith(
        "diffusion-pl fit: error: [rank 1] stopped because another process of this run stopped first (see its "
        "message above; DIFFUSION_PL_DEBUG=1 shows this traceback): Connection closed by peer"
    ), errors
