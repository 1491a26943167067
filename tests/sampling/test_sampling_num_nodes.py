"""--num_nodes of `diffusion-pl sample / evaluate / sweep` reaches the Lightning Fabric that starts the processes
 (recorded by a stand-in: no multi-node run here), through the real command line."""

from __future__ import annotations

import lightning
import lightning.fabric
import numpy as np
import pytest

from diffusion_pl.cli import main
from diffusion_pl.evaluation import save_samples_npz


class Launched(Exception):
    """Raised by the stand-ins once they have recorded their arguments."""


def recorder(calls: list[dict]):
    class Recorder:
        def __init__(self, **kwargs) -> None:
            calls.append(kwargs)
            raise Launched

    return Recorder


def test_sample_passes_num_nodes_to_fabric(ckpts, tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(lightning.fabric, "Fabric", recorder(calls))
    with pytest.raises(Launched):
        main(["sample", "--ckpt", ckpts["cond"], "--out_dir", str(tmp_path / "s"), "--num_samples", "4",
              "--steps", "2", "--accelerator", "cpu", "--devices", "8", "--num_nodes", "4"])  # fmt: skip
    (kwargs,) = calls
    assert (kwargs["devices"], kwargs["num_nodes"], kwargs["strategy"]) == (8, 4, "ddp")


def test_sample_one_device_per_node_on_two_nodes_is_ddp(ckpts, tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(lightning.fabric, "Fabric", recorder(calls))
    with pytest.raises(Launched):
        main(["sample", "--ckpt", ckpts["cond"], "--out_dir", str(tmp_path / "s"), "--num_samples", "4",
              "--steps", "2", "--accelerator", "cpu", "--num_nodes", "2"])  # fmt: skip
    assert (calls[0]["devices"], calls[0]["num_nodes"], calls[0]["strategy"]) == (1, 2, "ddp")


def test_evaluate_and_sweep_pass_num_nodes_to_fabric(ckpts, tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(lightning.fabric, "Fabric", recorder(calls))
    images = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    npz = save_samples_npz(str(tmp_path / "gen.npz"), images)
    with pytest.raises(Launched):
        main(["evaluate", "--samples", npz, "--metrics", "[isc]", "--out_dir", str(tmp_path / "e"),
              "--accelerator", "cpu", "--devices", "8", "--num_nodes", "4"])  # fmt: skip
    with pytest.raises(Launched):
        main(["sweep", "--ckpt", ckpts["cond"], "--cfg_scales", "[0, 1]", "--metrics", "[isc]",
              "--out_dir", str(tmp_path / "w"), "--accelerator", "cpu", "--devices", "2",
              "--num_nodes", "3"])  # fmt: skip
    assert [(c["devices"], c["num_nodes"], c["strategy"]) for c in calls] == [(8, 4, "ddp"), (2, 3, "ddp")]


def test_num_nodes_must_be_positive(ckpts, tmp_path, capsys):
    code = main(["sample", "--ckpt", ckpts["cond"], "--out_dir", str(tmp_path / "s"), "--accelerator", "cpu",
                 "--num_nodes", "0"])  # fmt: skip
    assert code == 2
    assert "diffusion-pl sample: error: --num_nodes must be >= 1, got 0" in capsys.readouterr().err
