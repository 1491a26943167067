"""Bad inputs to `diffusion-pl sample / evaluate` as a new user makes them, through the real CLI entry point
(diffusion_pl.cli.main): one `diffusion-pl <command>: error: ...` line naming the option/file and the fix, exit status
2, nothing written. Also: a full disk while writing samples, and shard directories left by a failed start."""

from __future__ import annotations

import errno
import json
import os
import re

import numpy as np
import pytest
import torch
import yaml
from sampling_helpers import make_classifier_ckpt

from diffusion_pl.cli import main
from diffusion_pl.evaluation import load_samples_npz
from diffusion_pl.models import UNetModel, export_openai_state_dict
from diffusion_pl.sampling import prepare_shard_dir

ARCH = dict(image_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
            attention_resolutions=[4], num_head_channels=32, learn_sigma=True)  # fmt: skip
FAST = ["--num_samples", "4", "--sample_batch_size", "2", "--shard_size", "2", "--steps", "2", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def files(ckpts, tmp_path_factory):
    """The session's tiny checkpoints plus: a 3-channel classifier, a released-layout (OpenAI) U-Net state dict with
    its arch YAML and a wrong one, a truncated checkpoint, a plain file, and sample npz files good and bad."""
    d = tmp_path_factory.mktemp("user_errors")
    out = dict(ckpts)
    out["classifier_rgb"] = make_classifier_ckpt(d / "classifier_rgb.ckpt", in_channels=3)
    kwargs = {**ARCH, "channel_mult": tuple(ARCH["channel_mult"]), "attention_resolutions": (4,)}
    torch.save(export_openai_state_dict(UNetModel(**kwargs)), d / "openai.pt")
    out["openai"] = str(d / "openai.pt")
    arch_typo = {**{k: v for k, v in ARCH.items() if k != "model_channels"}, "model_chanels": 32}
    for name, arch in (("arch", ARCH), ("arch_wrong", {**ARCH, "model_channels": 64}), ("arch_typo", arch_typo)):
        with open(d / f"{name}.yaml", "w") as f:
            yaml.safe_dump(arch, f)
        out[name] = str(d / f"{name}.yaml")
    with open(ckpts["cond"], "rb") as f:
        (d / "truncated.ckpt").write_bytes(f.read()[:50_000])
    out["truncated"] = str(d / "truncated.ckpt")
    (d / "a_file").write_text("not a directory")
    out["file"] = str(d / "a_file")
    good = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(d / "good.npz", arr_0=good)
    np.savez(d / "wrong_keys.npz", images=good)
    np.savez(d / "wrong_dtype.npz", arr_0=good.astype(np.float32))
    np.savez(d / "nchw.npz", arr_0=good.transpose(0, 3, 1, 2))
    (d / "truncated.npz").write_bytes((d / "good.npz").read_bytes()[:200])
    for name in ("good", "wrong_keys", "wrong_dtype", "nchw", "truncated"):
        out[f"{name}_npz"] = str(d / f"{name}.npz")
    return out


def run_user_error(capsys, args: list[str], pattern: str) -> str:
    """Run the CLI, expect exit status 2 and ONE error line (plus indented detail lines) matching ``pattern``."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    start = err.index(f"diffusion-pl {args[0]}: error: ")
    message = err[start:]
    assert re.search(pattern, message, flags=re.S), message
    return message


# (id, command-line after `sample --out_dir OUT`, expected message)
SAMPLE_CASES = [
    ("missing-ckpt", ["--ckpt", "{tmp}/nope.ckpt"], r"--ckpt \S+nope.ckpt: no such checkpoint file"),
    ("missing-classifier", ["--ckpt", "{cond}", "--classifier_ckpt", "{tmp}/nope.ckpt", "--classifier_scale", "1"],
     r"--classifier_ckpt \S+nope.ckpt: no such checkpoint file"),
    ("classifier-as-ckpt", ["--ckpt", "{classifier}"],
     r"--ckpt \S+ is a diffusion-pl NoisyClassifierModule checkpoint .* pass this file as --classifier_ckpt"),
    ("ckpt-as-classifier", ["--ckpt", "{cond}", "--classifier_ckpt", "{cond}", "--classifier_scale", "1"],
     r"--classifier_ckpt \S+ is a diffusion-pl DiffusionModule checkpoint .* pass this file as --ckpt$"),
    ("truncated-ckpt", ["--ckpt", "{truncated}"],
     r"--ckpt \S+truncated.ckpt \(50,000 bytes\) cannot be read as a torch checkpoint .*corrupt or truncated"),
    ("truncated-classifier", ["--ckpt", "{cond}", "--classifier_ckpt", "{truncated}", "--classifier_scale", "1"],
     r"--classifier_ckpt \S+truncated.ckpt .*corrupt or truncated"),
    ("openai-as-ckpt", ["--ckpt", "{openai}"],
     r"is a bare state dict in the OpenAI .* pass this file as --openai_ckpt \(with --arch\)"),
    ("lightning-as-openai", ["--openai_ckpt", "{cond}", "--arch", "{arch}", "--diffusion_steps", "10"],
     r"--openai_ckpt \S+ is a diffusion-pl DiffusionModule checkpoint .* pass this file as --ckpt"),
    ("unknown-arch", ["--openai_ckpt", "{openai}", "--arch", "adm_imagenet65"],
     r"--arch 'adm_imagenet65' is neither a released preset \(adm_imagenet64, .*\) nor a YAML file of UNetModel"),
    ("arch-does-not-build", ["--openai_ckpt", "{openai}", "--arch", "{arch_typo}"],
     r"--arch \S+arch_typo.yaml: these UNetModel arguments do not build a network: .*'model_chanels'"),
    ("truncated-openai", ["--openai_ckpt", "{truncated}", "--arch", "{arch}"], r"--openai_ckpt \S+ .*corrupt or trunc"),
    ("openai-wrong-arch", ["--openai_ckpt", "{openai}", "--arch", "{arch_wrong}", "--diffusion_steps", "10"],
     r"--openai_ckpt \S+ does not fit --arch \S+arch_wrong.yaml .*shape mismatches \(\d+\):\n"
     r"    time_embed.0.weight: expected \(256, 64\) vs found \(128, 32\)\n.*    \.\.\. and \d+ more\n"
     r"The checkpoint looks like: model_channels=32, in_channels=1, out_channels=2 \(learn_sigma\)"),
    ("out-dir-is-a-file", ["--ckpt", "{cond}", "--out_dir", "{file}"], r"--out_dir \S+a_file is a file, not a dir"),
    ("classifier-channels", ["--ckpt", "{cond}", "--classifier_ckpt", "{classifier_rgb}", "--classifier_scale", "1"],
     r"cannot guide this diffusion model; train it with the same settings:\n  in_channels: classifier 3 vs diff"),
    ("labels-out-of-range", ["--ckpt", "{cond}", "--labels", "[7]"],
     r"--labels \[7\] outside 0..2: the model has 3 classes"),
    ("labels-unconditional", ["--ckpt", "{uncond}", "--labels", "[1]"], r"--labels has no effect: .*unconditional"),
    ("steps-ddim7", ["--ckpt", "{cond}", "--steps", "ddim7"],
     r"--steps 'ddim7' does not fit the model's T = 10 training steps .*ddimN with N one of ddim10, ddim5, ddim4"),
    ("steps-over-T", ["--ckpt", "{cond}", "--steps", "2000"],
     r"--steps '2000' does not fit the model's T = 10 .*asks for 2000.*Use a step count 1..10"),
    ("eta-with-ddpm", ["--ckpt", "{cond}", "--eta", "0.5"], r"--eta 0.5 only applies to method ddim"),
    ("eta-negative", ["--ckpt", "{cond}", "--method", "ddim", "--eta", "-1"], r"--eta must be >= 0 \(0: deterministic"),
    ("openai-options-with-ckpt", ["--ckpt", "{cond}", "--diffusion_steps", "100", "--var_type", "fixed_small"],
     r"--diffusion_steps, --var_type do not apply to a --ckpt \(it carries its own architecture and training "
     r"process; these options describe an --openai_ckpt\); leave them out$"),
    ("classifier-arch-with-ckpt", ["--ckpt", "{cond}", "--classifier_ckpt", "{classifier}", "--classifier_arch",
                                   "adm_imagenet64_classifier", "--classifier_scale", "1"],
     r"--classifier_arch does not apply without --classifier_openai_ckpt \(a --classifier_ckpt carries its own "
     r"architecture\); leave it out$"),
]  # fmt: skip


@pytest.mark.parametrize("args,pattern", [c[1:] for c in SAMPLE_CASES], ids=[c[0] for c in SAMPLE_CASES])
def test_sample_user_errors(files, tmp_path, capsys, args, pattern):
    check_refused_before_writing(capsys, tmp_path, files, ["sample", *FAST], args, pattern)


def check_refused_before_writing(capsys, tmp_path, files, command, args, pattern):
    """``command --out_dir OUT args`` (``{name}`` in args filled from ``files`` and ``tmp``) fails with a one-line
    message matching ``pattern`` and OUT is not created: inputs are checked before anything is written."""
    out = tmp_path / "out"
    filled = [a.format(tmp=tmp_path, **files) for a in args]
    run_user_error(capsys, [*command, "--out_dir", str(out), *filled], pattern)
    assert not out.exists()


def test_openai_checkpoint_with_its_arch_samples(files, tmp_path):
    """Control for the --openai_ckpt / --arch cases: the right pair works."""
    out = tmp_path / "out"
    args = ["--openai_ckpt", files["openai"], "--arch", files["arch"], "--diffusion_steps", "10", "--out_dir", str(out)]
    assert main(["sample", *FAST, *args]) == 0
    assert load_samples_npz(str(out / "samples.npz"))[0].shape == (4, 8, 8, 1)


# (id, command-line after `evaluate --out_dir OUT`, expected message); inputs are checked in this order: samples,
# reference, Inception weights (before any sampling or feature extraction).
EVALUATE_CASES = [
    ("missing-samples", ["--samples", "{tmp}/nope.npz"], r"--samples \S+nope.npz: no such file"),
    ("truncated-npz", ["--samples", "{truncated_npz}"], r"truncated.npz: not a readable npz file .*corrupt or trunc"),
    ("npz-wrong-keys", ["--samples", "{wrong_keys_npz}"], r"no 'arr_0' array \(found \['images'\]\)"),
    ("npz-wrong-dtype", ["--samples", "{wrong_dtype_npz}"], r"arr_0 has dtype float32, expected uint8 NHWC"),
    ("npz-nchw", ["--samples", "{nchw_npz}"], r"arr_0 has shape \(4, 3, 8, 8\), expected uint8 NHWC"),
    ("missing-reference", ["--samples", "{good_npz}", "--reference", "{tmp}/real_images"],
     r"--reference \S+real_images: no such file or directory \(expected a folder of images, an ADM reference npz"),
    ("no-reference", ["--samples", "{good_npz}"], r"give exactly one reference: --reference .* or --data_class"),
    ("missing-inception-weights", ["--samples", "{good_npz}", "--reference", "{good_npz}", "--inception_weights",
                                   "{tmp}/pt_inception.pth"],
     r"Inception-v3 weights are not available \(no file at --inception_weights \S+pt_inception.pth\)"),
    ("out-dir-is-a-file", ["--samples", "{good_npz}", "--reference", "{good_npz}", "--out_dir", "{file}"],
     r"--out_dir \S+ is a file, not a directory"),
    ("samples-and-ckpt", ["--samples", "{good_npz}", "--ckpt", "{cond}"], r"give --samples or a model .*not both"),
    ("nll-without-data", ["--ckpt", "{cond}", "--nll", "true"], r"--nll needs --data_class \(and --data_args\)"),
    ("sampling-options-with-samples", ["--samples", "{good_npz}", "--steps", "50", "--num_samples", "8"],
     r"--steps, --num_samples do not apply to evaluate --samples \(the images of the npz are evaluated as they are; "
     r"these options are for sampling from --ckpt / --openai_ckpt\); leave them out$"),
    ("metric-options-with-nll", ["--ckpt", "{cond}", "--nll", "true", "--data_class", "MNIST5kDataModule",
                                 "--metrics", "[fid]", "--cfg_scale", "2"],
     r"--cfg_scale, --metrics do not apply to evaluate --nll true \(bits/dim of the model on --data_class "
     r"--split\); leave them out$"),
    ("data-options-without-data-class", ["--samples", "{good_npz}", "--reference", "{good_npz}", "--split", "train"],
     r"--split does not apply without --data_class \(they choose its data\); leave it out$"),
    ("nll-batches-without-nll", ["--samples", "{good_npz}", "--nll_batches", "1"],
     r"--nll_batches does not apply without --nll true; leave it out$"),
]  # fmt: skip


@pytest.mark.parametrize("args,pattern", [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_user_errors(files, tmp_path, capsys, args, pattern):
    check_refused_before_writing(capsys, tmp_path, files, ["evaluate", "--accelerator", "cpu"], args, pattern)


def test_sweep_refuses_a_classifier_it_would_not_use(files, tmp_path, capsys):
    """Only --classifier_scales points use a classifier: with --cfg_scales alone it would be loaded and ignored."""
    args = ["--ckpt", "{cond}", "--cfg_scales", "[0, 1]", "--classifier_ckpt", "{classifier}", "--metrics", "[isc]"]
    check_refused_before_writing(capsys, tmp_path, files, ["sweep", "--accelerator", "cpu"], args,
                                 r"--classifier_ckpt does not apply without --classifier_scales \(only classifier "
                                 r"guidance uses a classifier\); leave it out$")  # fmt: skip


@pytest.mark.parametrize("fail_on", ["second-shard", "samples.npz"])
def test_full_disk_keeps_finished_shards_and_resumes(files, tmp_path, capsys, monkeypatch, fail_on):
    """ENOSPC while writing: the message says disk full, names the file, keeps finished shards and says how to
    resume; no partial file under a final name; rerunning the same command finishes the run."""
    out = tmp_path / "out"
    args = ["sample", *FAST, "--ckpt", files["cond"], "--out_dir", str(out)]
    real_savez = np.savez
    calls = []

    def savez_on_full_disk(f, **arrays):
        calls.append(sorted(arrays))
        failing = (fail_on == "second-shard" and len(calls) == 2) or (fail_on == "samples.npz" and "arr_0" in arrays)
        if failing:
            f.write(b"PK\x03\x04 partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", savez_on_full_disk)
    target = "shards/shard_000001.npz" if fail_on == "second-shard" else "samples.npz"
    message = run_user_error(capsys, args, rf"disk full: no space left on the device while writing \S+{target} .*"
                                           r"Finished shards are kept .*rerun the same command to resume")  # fmt: skip
    assert not (out / target).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left behind
    kept = sorted(p.name for p in (out / "shards").glob("shard_*.npz"))
    assert kept == (["shard_000000.npz"] if fail_on == "second-shard" else ["shard_000000.npz", "shard_000001.npz"])
    assert f"({len(kept)} shard file" in message
    first_mtime = (out / "shards" / "shard_000000.npz").stat().st_mtime_ns

    monkeypatch.setattr(np, "savez", real_savez)
    assert main(args) == 0
    images, labels = load_samples_npz(str(out / "samples.npz"))
    assert images.shape == (4, 8, 8, 1) and labels.shape == (4,)
    assert (out / "shards" / "shard_000000.npz").stat().st_mtime_ns == first_mtime  # resumed, not redone


def test_shard_dir_without_finished_shards_takes_new_settings(tmp_path):
    """A run that stopped before its first shard (e.g. on a bad option) does not block the corrected command; a
    directory with finished shards of other settings is still refused."""
    shard_dir = str(tmp_path / "shards")
    prepare_shard_dir(shard_dir, {"steps": "ddim7"}, overwrite=False)
    prepare_shard_dir(shard_dir, {"steps": "5"}, overwrite=False)
    with open(os.path.join(shard_dir, "settings.json")) as f:
        assert json.load(f) == {"steps": "5"}
    np.savez(os.path.join(shard_dir, "shard_000000.npz"), images=np.zeros((1, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match=r"holds 1 finished shard\(s\) of a run with different settings \(steps"):
        prepare_shard_dir(shard_dir, {"steps": "2"}, overwrite=False)
