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


def _sweep(ckpts, out, inception, **options):
    options = {"ckpt": ckpts["cond"], "out_dir": str(out), "num_samples": 4, "sample_batch_size": 4, "steps": "2",
               "data_class": "sampling_helpers.TinyDataModule", "inception_weights": inception, "metrics": ["fid"],
               "accelerator": "cpu", **options}  # fmt: skip
    return run_command(sweep, **options)


@pytest.fixture
def count_sampling(monkeypatch, tmp_path):
    """The sweep points sampled (SampleSource.generate calls), by folder name."""
    from diffusion_pl.commands.generate import SampleSource

    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []
    real = SampleSource.generate

    def generate(self, fabric, guidance, out_dir, **kw):
        calls.append(os.path.basename(out_dir))
        return real(self, fabric, guidance, out_dir, **kw)

    monkeypatch.setattr(SampleSource, "generate", generate)
    return calls


def test_sweep_rerun_reuses_samples_of_the_same_settings(ckpts, tmp_path, random_inception_weights, count_sampling):
    out = tmp_path / "s"
    first = _sweep(ckpts, out, random_inception_weights, cfg_scales=[1.0], sample_batch_size=2)
    npz = out / "cfg_1" / "samples.npz"
    mtime = os.stat(npz).st_mtime_ns
    assert count_sampling == ["cfg_1"]
    # same settings (another batch size does not change the images): nothing sampled again, the same FID
    again = _sweep(ckpts, out, random_inception_weights, cfg_scales=[1.0])
    assert count_sampling == ["cfg_1"] and os.stat(npz).st_mtime_ns == mtime
    assert again[0]["fid"] == pytest.approx(first[0]["fid"])
    # a point added to the sweep is sampled, the finished one kept
    _sweep(ckpts, out, random_inception_weights, cfg_scales=[1.0, 2.0])
    assert count_sampling == ["cfg_1", "cfg_2"] and os.stat(npz).st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("changed", "shown"),
    [({"num_samples": 5}, "num_samples 4 -> 5"), ({"seed": 3}, "seed 0 -> 3"), ({"ckpt": "uncond"}, "uncond.ckpt")],
    ids=["num_samples", "seed", "ckpt"],
)  # fmt: skip
def test_sweep_rerun_with_other_settings_is_refused(ckpts, tmp_path, random_inception_weights, count_sampling,
                                                    changed, shown):  # fmt: skip
    from diffusion_pl.errors import UserInputError

    out = tmp_path / "s"
    _sweep(ckpts, out, random_inception_weights, cfg_scales=[0.0])
    mtime = os.stat(out / "cfg_0" / "samples.npz").st_mtime_ns
    if "ckpt" in changed:
        changed = {"ckpt": ckpts[changed["ckpt"]]}
    with pytest.raises(UserInputError) as err:
        _sweep(ckpts, out, random_inception_weights, cfg_scales=[0.0], **changed)
    message = str(err.value)
    assert f"{out / 'cfg_0' / 'samples.npz'} already exists and cannot be reused: they were made with other " \
           "settings" in message
    assert shown in message and "--overwrite" in message and "another --out_dir" in message
    assert count_sampling == ["cfg_0"] and os.stat(out / "cfg_0" / "samples.npz").st_mtime_ns == mtime
    if "ckpt" in changed:  # --overwrite samples the point again with the new settings, and a rerun reuses them
        _sweep(ckpts, out, random_inception_weights, cfg_scales=[0.0], overwrite=True, **changed)
        _sweep(ckpts, out, random_inception_weights, cfg_scales=[0.0], **changed)
        assert count_sampling == ["cfg_0", "cfg_0"]


def test_sweep_refuses_samples_without_settings(ckpts, tmp_path, random_inception_weights, count_sampling):
    from diffusion_pl.errors import UserInputError

    out = tmp_path / "s"
    _sweep(ckpts, out, random_inception_weights, cfg_scales=[1.0, 2.0])
    os.remove(out / "cfg_2" / "settings.json")
    refused = r"cfg_2/samples.npz already exists and cannot be reused: there is no readable .*cfg_2/settings.json .*" \
              r"or choose another --out_dir"
    with pytest.raises(UserInputError, match=refused):
        _sweep(ckpts, out, random_inception_weights, cfg_scales=[1.0, 2.0])
    assert count_sampling == ["cfg_1", "cfg_2"]  # refused before anything is sampled or scored


def test_sweep_scale_zero_belongs_to_its_list(ckpts, tmp_path, random_inception_weights, count_sampling):
    """cfg w = 0 is the first point of the cfg line (cfg_0), classifier s = 0 that of the classifier line."""
    out = tmp_path / "cfg"
    rows = _sweep(ckpts, out, random_inception_weights, cfg_scales=[0.0, 1.0])
    assert [(r["guidance"], r["scale"]) for r in rows] == [("cfg", 0.0), ("cfg", 1.0)]
    assert sorted(p for p in os.listdir(out) if os.path.isdir(out / p)) == ["cfg_0", "cfg_1"]
    with open(out / "sweep.json") as f:
        assert [(r["guidance"], r["scale"]) for r in json.load(f)] == [("cfg", 0.0), ("cfg", 1.0)]
    out = tmp_path / "both"
    rows = _sweep(ckpts, out, random_inception_weights, classifier_ckpt=ckpts["classifier"], classifier_scales=[0.0],
                  cfg_scales=[0.0])  # fmt: skip
    assert [(r["guidance"], r["scale"]) for r in rows] == [("classifier", 0.0), ("cfg", 0.0)]
    assert os.path.isfile(rows[0]["samples"]) and os.path.isfile(rows[1]["samples"])
    assert rows[0]["samples"] != rows[1]["samples"]
    with open(out / "cfg_0" / "settings.json") as f:
        assert json.load(f)["cfg_scale"] == 0.0
