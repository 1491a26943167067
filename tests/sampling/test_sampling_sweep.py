"""`diffusion-pl sweep`: one table row per scale, CSV + JSON + PNG plot, guidance checks before sampling."""

from __future__ import annotations

import csv
import json
import os

import pytest
from PIL import Image
from sampling_helpers import run_command

from diffusion_pl.commands.sweep import sweep
from diffusion_pl.sampling import GuidanceConfigError


def test_sweep_table_and_plot(ckpts, tmp_path, random_inception_weights, monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "sweep")
    rows = run_command(sweep, ckpt=ckpts["cond"], classifier_ckpt=ckpts["classifier"], classifier_scales=[0.0, 4.0],
                 cfg_scales=[2.0], out_dir=out, num_samples=5, sample_batch_size=5, steps="3",
                 data_class="sampling_helpers.TinyDataModule", inception_weights=random_inception_weights,
                 metrics=["fid", "isc", "prc"], isc_splits=1, accelerator="cpu")  # fmt: skip
    assert [(r["guidance"], r["scale"]) for r in rows] == [("classifier", 0.0), ("classifier", 4.0), ("cfg", 2.0)]
    with open(os.path.join(out, "sweep.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {"fid", "isc_mean", "precision", "recall", "scale"} <= set(table[0])
    assert [float(r["scale"]) for r in table] == [0.0, 4.0, 2.0]
    with open(os.path.join(out, "sweep.json")) as f:
        assert [r["fid"] for r in json.load(f)] == pytest.approx([r["fid"] for r in rows])
    # different scales give different samples and so different FIDs (same seeds otherwise)
    assert len({round(r["fid"], 6) for r in rows}) == 3
    with Image.open(os.path.join(out, "sweep.png")) as im:
        assert im.size[0] > 600
    for r in rows:
        assert os.path.isfile(r["samples"])


def test_sweep_checks_every_point_first(ckpts, tmp_path):
    with pytest.raises(GuidanceConfigError, match="needs a model trained with a null class"):
        run_command(sweep, ckpt=ckpts["nonull"], classifier_ckpt=ckpts["classifier"], classifier_scales=[1.0],
                    cfg_scales=[1.0], out_dir=str(tmp_path / "s"), data_class="sampling_helpers.TinyDataModule",
                    accelerator="cpu")  # fmt: skip
    assert not os.path.exists(tmp_path / "s")
