"""Bad inputs to `diffusion-pl fit / validate / test` as a new user makes them, through the real CLI entry point
(diffusion_pl.cli.main): one `diffusion-pl fit: error: ...` line (or jsonargparse's short parse error) naming the
key/file and the fix, exit status 2, before any training. Also: resuming with a changed lr really uses it, a full
disk while writing a checkpoint, and callbacks that check their classifier at setup instead of many steps later."""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import TinyDataModule, tiny_diffusion_kwargs, trainer_kwargs

from diffusion_pl.cli import main
from diffusion_pl.errors import DiskFullError, UserInputError, find_in_chain, find_user_error
from diffusion_pl.lightning import AtomicCheckpointIO, DiffusionModule, GuidedSampler
from diffusion_pl.models import UNetModel, export_openai_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sampling"))
from sampling_helpers import make_classifier_ckpt, make_diffusion_ckpt  # noqa: E402

MODEL = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_diffusion_kwargs().items()}
TRAINER = dict(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit_user_errors")
    config = {"model": {"class_path": "DiffusionModule", "init_args": MODEL},
              "data": {"class_path": "lit_helpers.TinyDataModule"}, "trainer": TRAINER}  # fmt: skip
    with open(d / "fit.yaml", "w") as f:
        yaml.safe_dump(config, f)
    out = {"config": str(d / "fit.yaml"), "dir": str(d)}
    same = {k: MODEL[k] for k in ("diffusion_steps", "num_classes")}
    out["diffusion"] = make_diffusion_ckpt(d / "diffusion.ckpt", **same)
    out["classifier"] = make_classifier_ckpt(d / "classifier.ckpt")
    out["classifier_T20"] = make_classifier_ckpt(d / "classifier_T20.ckpt", diffusion_steps=20)
    with open(out["diffusion"], "rb") as f:
        (d / "truncated.ckpt").write_bytes(f.read()[:40_000])
    out["truncated"] = str(d / "truncated.ckpt")
    unet = UNetModel(image_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                     attention_resolutions=(4,), num_head_channels=32)  # fmt: skip
    torch.save(export_openai_state_dict(unet), d / "openai.pt")
    out["openai"] = str(d / "openai.pt")
    return out


def fit_error(capsys, args: list[str], pattern: str) -> str:
    code = main(["fit", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = err[err.index("diffusion-pl fit: error: ") :]
    assert re.search(pattern, message, flags=re.S), message
    return message


CKPT_PATH_CASES = [
    ("missing", ["--ckpt_path", "{dir}/nope.ckpt"], r"--ckpt_path \S+nope.ckpt: no such checkpoint file \(a run's"),
    ("directory", ["--ckpt_path", "{dir}"], r"--ckpt_path \S+ is a directory; give the checkpoint file itself"),
    ("truncated", ["--ckpt_path", "{truncated}"], r"\(40,000 bytes\) cannot be read as a torch checkpoint"),
    ("openai-state-dict", ["--ckpt_path", "{openai}"],
     r"is a bare state dict in the OpenAI .*; fit / validate / test take a diffusion-pl checkpoint"),
    ("classifier-for-diffusion-config", ["--ckpt_path", "{classifier}"],
     r"holds a NoisyClassifierModule, but the config's model is diffusion_pl.lightning.DiffusionModule"),
    ("other-architecture", ["--ckpt_path", "{diffusion}", "--model.init_args.model_channels", "64",
                            "--model.init_args.diffusion_steps", "20"],
     r"was trained with other model settings than this config:\n"
     r"  model.init_args.model_channels: checkpoint 32 vs config 64\n"
     r"  model.init_args.diffusion_steps: checkpoint 10 vs config 20"),
]  # fmt: skip


@pytest.mark.parametrize("args,pattern", [c[1:] for c in CKPT_PATH_CASES], ids=[c[0] for c in CKPT_PATH_CASES])
def test_fit_ckpt_path_user_errors(files, tmp_path, capsys, args, pattern):
    filled = [a.format(**files) for a in args]
    fit_error(capsys, ["--config", files["config"], "--trainer.default_root_dir", str(tmp_path), *filled], pattern)
    assert not os.listdir(tmp_path)  # stopped before the run started (no config.yaml, no checkpoint)


DATA_CASES = [
    ("cifar10", ["--data", "CIFAR10DataModule"],
     r"CIFAR-10: missing \['data_batch_1'.* Expected layout: \S+/cifar-10-batches-py/\{data_batch_1..data_batch_5, "
     r"test_batch, batches.meta\}"),
    ("imagenet64-npz", ["--data", "ImageNet64DataModule"],
     r"ImageNet-64 \(npz\): no directory \S+. Expected: train_data_batch_1.npz .. train_data_batch_10.npz and val"),
    ("imagenet64-folder", ["--data", "ImageNet64DataModule", "--data.source", "folder"],  # raised by __init__
     r"ImageNet-64 \(folder\): no directory \S+/train. Expected layout: data_dir/train/<class_name>/<image files>"),
]  # fmt: skip


@pytest.mark.parametrize("args,pattern", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_missing_data_dir_names_the_expected_layout(files, tmp_path, capsys, args, pattern):
    fit_error(capsys, ["--config", files["config"], "--trainer.default_root_dir", str(tmp_path), *args,
                       "--data.data_dir", str(tmp_path / "no_data")], pattern)  # fmt: skip


def test_config_errors_are_short_and_readable(files, tmp_path, capsys):
    """jsonargparse's multi-line parse reports come out as ONE line naming the key, the value, what is expected
    and the closest valid name (diffusion_pl/parse_errors.py)."""
    base = ["fit", "--config", files["config"], "--trainer.default_root_dir", str(tmp_path)]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  init_args:\n    lrr: 1\n")
    old_yaml = tmp_path / "old.yaml"  # T was called steps before it was renamed diffusion_steps
    old_yaml.write_text("model:\n  init_args:\n    steps: 10\n")
    for extra, expected in (
        (["--model.init_args.lrr", "3"], "model.init_args.lrr: DiffusionModule has no option 'lrr' (did you mean "
         "'lr'?); list its options with `diffusion-pl fit --model.help DiffusionModule`"),
        (["--config", str(bad_yaml)], "model.init_args.lrr: DiffusionModule has no option 'lrr' (did you mean 'lr'?)"),
        (["--config", str(old_yaml)], "model.init_args.steps: DiffusionModule has no option 'steps' (did you mean "
         "'diffusion_steps'? 'steps' was renamed)"),
        (["--model.init_args.lr", "abc"], "model.init_args.lr: expected float, got 'abc'"),
        (["--model.init_args.noise_schedule", "cosin"],
         "model.init_args.noise_schedule: expected one of 'linear', 'cosine', got 'cosin' (did you mean 'cosine'?)"),
        (["--model", "DiffusionModul"], "model: no LightningModule named 'DiffusionModul' (did you mean "
         "DiffusionModule?); give one of diffusion-pl's classes (DiffusionModule, NoisyClassifierModule) or a full "
         "import path"),
        (["--trainer.callbacks+=NoSuchCallback"], "trainer.callbacks: no class named 'NoSuchCallback'; give the "
         "class's full import path (package.module.ClassName)"),
        (["--optimizer", "Adam"], "unrecognized option --optimizer Adam; `diffusion-pl fit --help` lists the options"),
        (["--trainer.max_stepz", "5"], "unrecognized option --trainer.max_stepz 5 (did you mean "
         "--trainer.max_steps?); `diffusion-pl fit --help` lists the options"),
        (["--trainer.precision", "bf17"], "trainer.precision: expected one of "),
        (["--config", str(tmp_path / "nope.yaml")], f"--config {tmp_path / 'nope.yaml'}: no such file"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffusion-pl fit: error: ") and expected in err, err
        assert len(err.splitlines()) == 1, err
    # Lightning refusing a Trainer setting while the classes are built is one line too
    fit_error(capsys, [*base[1:], "--trainer.devices=abc"],
              r"^diffusion-pl fit: error: the config cannot be built: `devices` selected with `CPUAccelerator` "
              r"should be an int > 0.\n$")  # fmt: skip
    fit_error(capsys, [*base[1:], "--trainer.accelerator=gpu"],
              r"^diffusion-pl fit: error: No supported gpu backend found!\n$")  # fmt: skip
    # a constructor refusing a value (raised inside jsonargparse's instantiation) is one line too
    fit_error(
        capsys,
        [*base[1:], "--model.init_args.attention_resolutions", "[3]"],
        r"the config cannot be built: attention resolution 3 is not a feature-map size .*IMAGE resolutions",
    )


def test_resume_uses_the_configs_lr_and_refuses_another_network(tmp_path):
    """Lightning restores AdamW/LambdaLR with the old lr; a resumed run must use the lr it is given (the NaN guard
    tells users to resume with a lower lr). A different network is refused before any weight is loaded."""
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt]))
    trainer.fit(DiffusionModule(**tiny_diffusion_kwargs(lr=1e-3, warmup_steps=4)), TinyDataModule())
    last = str(tmp_path / "ckpt" / "last.ckpt")

    resumed = L.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    resumed.fit(DiffusionModule(**tiny_diffusion_kwargs(lr=2e-4, warmup_steps=4)), TinyDataModule(), ckpt_path=last)
    group = resumed.optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(2e-4)
    assert resumed.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([2e-4])
    assert group["lr"] == pytest.approx(2e-4 * 3 / 4)  # warm-up position kept: after 2 steps of 4 the factor is 3/4

    other = L.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    with pytest.raises(UserInputError, match=r"(?s)does not fit this DiffusionModule.*model_channels: checkpoint 32"):
        other.fit(DiffusionModule(**tiny_diffusion_kwargs(model_channels=64)), TinyDataModule(), ckpt_path=last)


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, str(path))

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=r"disk full: .*writing the checkpoint \S+last.ckpt .* resume with --ckpt"):
        io.save_checkpoint({"step": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


@pytest.mark.parametrize("which,pattern", [
    ("classifier_T20", r"(?s)cannot guide this diffusion model.*diffusion_steps: classifier 20 vs diffusion model 10"),
    ("diffusion", r"GuidedSampler.classifier_path \S+ is a diffusion-pl DiffusionModule checkpoint .* takes a diffus"),
])  # fmt: skip
def test_guided_sampler_checks_its_classifier_before_training(files, tmp_path, which, pattern):
    sampler = GuidedSampler(respacing="4", classifier_path=files[which], every_n_val_runs=1)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[sampler], max_steps=1))
    with pytest.raises(UserInputError, match=pattern):
        trainer.fit(DiffusionModule(**tiny_diffusion_kwargs()), TinyDataModule())
    assert trainer.global_step == 0


def test_guided_sampler_checks_its_respacing_before_training(tmp_path):
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[GuidedSampler(respacing="ddim7")], max_steps=1))
    with pytest.raises(UserInputError, match=r"GuidedSampler.respacing 'ddim7' does not fit the model's T = 10"):
        trainer.fit(DiffusionModule(**tiny_diffusion_kwargs()), TinyDataModule())
    assert trainer.global_step == 0


def test_a_type_error_while_building_the_model_keeps_its_traceback(files, tmp_path, capsys):
    """A TypeError raised by a model's constructor may be a bug: it is not turned into a one-line error (a Trainer
    setting Lightning refuses with a TypeError is: test_config_errors_are_short_and_readable)."""
    with pytest.raises(Exception) as raised:  # jsonargparse wraps it in its own ValueError (cause: the TypeError)
        main(["fit", "--config", files["config"], "--trainer.default_root_dir", str(tmp_path),
              "--model", "lit_helpers.BuggyModule"])  # fmt: skip
    assert find_user_error(raised.value) is None
    assert find_in_chain(raised.value, lambda e: isinstance(e, TypeError) and "has no len" in str(e))
