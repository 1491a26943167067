"""`diffusion-pl demo` end to end at toy size: every step runs, writes its outputs, and a rerun keeps them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_pl.cli import main
from diffusion_pl.commands import demo as demo_command
from diffusion_pl.commands.demo import SAMPLE_MODES, knn_digit_accuracy

REPO = Path(__file__).resolve().parents[1]


def tiny_configs(tmp_path: Path) -> Path:
    """The quickstart configs with T = 100 (bits/dim costs T network calls) and a cheaper GuidedSampler grid."""
    out = tmp_path / "configs"
    out.mkdir()
    for name in ("quickstart.yaml", "quickstart_classifier.yaml"):
        config = yaml.safe_load((REPO / "configs" / name).read_text())
        config["model"]["init_args"]["diffusion_steps"] = 100
        for callback in config["trainer"]["callbacks"]:
            if callback["class_path"].endswith("GuidedSampler"):
                callback["init_args"].update(respacing="ddim2", samples_per_class=1)
        (out / name).write_text(yaml.safe_dump(config))
    return out


@pytest.mark.slow
def test_demo_runs_every_step_and_a_rerun_keeps_them(tmp_path, capsys):
    out = tmp_path / "demo"
    configs = tiny_configs(tmp_path)

    def args(max_steps: int) -> list[str]:
        return ["demo", "--out_dir", str(out), "--config_dir", str(configs), "--accelerator", "cpu",
                "--max_steps", str(max_steps), "--classifier_max_steps", "2", "--steps", "2",
                "--samples_per_class", "2", "--nll_examples", "2", "--fast_steps", "karras3"]  # fmt: skip

    assert main(args(2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["done"] * (3 + len(SAMPLE_MODES))
    assert summary["steps"][0]["command"].startswith("diffusion-pl fit --config ")
    for mode in SAMPLE_MODES:
        with np.load(out / "samples" / mode / "samples.npz") as data:
            assert data["arr_0"].shape == (20, 32, 32, 1) and data["arr_0"].dtype == np.uint8
            assert data["arr_1"].tolist() == [i % 10 for i in range(20)]  # balanced: a row per digit
        assert 0.0 <= summary["samples"][mode]["knn_digit_accuracy"] <= 1.0
        assert Image.open(out / "samples" / mode / "grid.png").size[0] > 0
    # The fast solver next to ancestral sampling, with its network evaluations.
    assert summary["samples"]["classifier_free"]["sampler"] == "ddpm 2 (2 NFE)"
    assert summary["samples"]["classifier_free_fast"]["sampler"] == "dpmpp_2m_sde karras3 (3 NFE)"
    fast = next(s for s in summary["steps"] if s["name"] == "sample classifier_free_fast")
    assert "--method dpmpp_2m_sde --steps karras3 --cfg_scale 3.0" in fast["command"]
    assert summary["bits_per_dim"]["num_images"] == 2 and summary["bits_per_dim"]["total_bpd"] > 0
    assert summary["inception_metrics"].startswith("skipped") or "computed" in summary["inception_metrics"]
    assert (out / "diffusion" / "checkpoints" / "last.ckpt").is_file()
    assert (out / "classifier" / "checkpoints" / "last.ckpt").is_file()
    assert "diffusion-pl demo finished" in capsys.readouterr().out

    # A rerun skips every finished step and changes none of its files.
    ckpt = out / "diffusion" / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    assert main(args(2)) == 0
    rerun = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in rerun["steps"]] == ["kept (finished earlier)"] * (3 + len(SAMPLE_MODES))
    assert ckpt.stat().st_mtime_ns == before

    # An interrupted fit (no completion marker) is continued from its last.ckpt, not started again.
    os.remove(out / "diffusion" / "fit_done.json")
    assert main(args(2)) == 0
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["steps"][0]["status"] == "done" and "--ckpt_path=" in rerun["steps"][0]["command"]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2


def test_knn_accuracy_scores_real_digits_and_rejects_wrong_labels():
    train_x = torch.full((4, 32 * 32), -1.0)
    train_x[2:, :512] = 1.0  # two "ones" (top half lit) and two "zeros" (dark)
    train_y = torch.tensor([0, 0, 1, 1])
    images = np.zeros((2, 32, 32, 1), np.uint8)
    images[1, :16] = 255
    assert knn_digit_accuracy(images, np.array([0, 1]), train_x, train_y) == 1.0
    assert knn_digit_accuracy(images, np.array([1, 0]), train_x, train_y) == 0.0


def test_knn_tie_goes_to_the_nearest_digit_not_the_smallest_label():
    image = np.zeros((1, 32, 32, 1), np.uint8)  # all pixels -1 after scaling
    train_x = torch.full((3, 32 * 32), -1.0)
    train_x[0, :10], train_x[1, :20], train_x[2, :30] = 1.0, 1.0, 1.0  # increasingly far from the image
    train_y = torch.tensor([7, 2, 5])  # three different labels: a three-way tie
    assert knn_digit_accuracy(image, np.array([7]), train_x, train_y) == 1.0
    train_y = torch.tensor([7, 5, 5])  # a majority wins over the nearest digit
    assert knn_digit_accuracy(image, np.array([5]), train_x, train_y) == 1.0


def test_demo_outside_a_checkout_names_the_config_dir(tmp_path, capsys):
    assert main(["demo", "--out_dir", str(tmp_path / "o"), "--config_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no quickstart.yaml" in err and "--config_dir" in err


@pytest.mark.parametrize(
    "cuda,bf16,accelerator,precision,expected",
    [
        (False, False, "auto", "auto", ("cpu", "bf16-mixed", None)),  # a laptop (a Mac too: never MPS)
        (True, True, "auto", "auto", ("gpu", "bf16-mixed", None)),  # Ampere or newer
        (True, False, "auto", "auto", ("gpu", "32-true", "16-mixed")),  # a GPU without bfloat16 (V100, T4)
        (True, False, "cpu", "auto", ("cpu", "bf16-mixed", None)),  # the CPU asked for explicitly
        (True, False, "auto", "bf16-mixed", ("gpu", "bf16-mixed", "16-mixed")),  # an explicit precision is kept
    ],
)
def test_hardware_is_resolved_for_the_machine(monkeypatch, cuda, bf16, accelerator, precision, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert demo_command.resolve_hardware(accelerator, precision) == expected


@pytest.mark.parametrize("args,message", [
    (["--steps", "200"], r"--steps '200' does not fit the model's T = 100 training steps"),
    (["--fast_steps", "karras2"], r"--fast_steps 'karras2' gives 2 step.*method dpmpp_2m_sde needs at least 3"),
    (["--max_steps", "0"], r"demo: --max_steps must be >= 1, got 0"),
    (["--classifier_max_steps", "-1"], r"demo: --classifier_max_steps must be >= 1, got -1"),
    (["--samples_per_class", "0"], r"demo: --samples_per_class must be >= 1, got 0"),
    (["--nll_examples", "0"], r"demo: --nll_examples must be >= 1, got 0"),
], ids=["steps-over-T", "fast-steps-too-few", "max-steps", "classifier-max-steps", "samples-per-class",
        "nll-examples"])  # fmt: skip
def test_bad_demo_options_are_refused_before_training(args, message, tmp_path, capsys, monkeypatch):
    """Checked against the config's T before anything runs: a bad --steps would otherwise fail after minutes of
    training, when the first sampling step starts."""
    import re

    monkeypatch.delenv("DIFFUSION_PL_DEBUG", raising=False)
    out = tmp_path / "demo"
    assert main(["demo", "--out_dir", str(out), "--config_dir", str(tiny_configs(tmp_path)), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
