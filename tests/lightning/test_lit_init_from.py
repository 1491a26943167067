"""init_from: a network initialised from a released-layout (OpenAI) state dict computes what the reference network
computes; class-embedding adaptations; mismatches listed; diffusion-pl checkpoints; EMA starts from the loaded
weights; a fine-tuning run on an image folder, interrupted and resumed, ends where the uninterrupted one ends."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lit_helpers import TinyDataModule, tiny_classifier_kwargs, tiny_diffusion_kwargs, trainer_kwargs
from PIL import Image

from diffusion_pl.data import ImageFolderDataModule
from diffusion_pl.lightning import DiffusionModule, NoisyClassifierModule
from diffusion_pl.models import export_openai_state_dict

ref_unet = pytest.importorskip("guided_diffusion.unet")

NET = dict(image_size=16, in_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
           attention_resolutions=(8,), num_heads=2, use_scale_shift_norm=True, resblock_updown=True)  # fmt: skip


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A class-conditional reference U-Net (4 classes, learned sigma) with random weights, saved as a released .pt."""
    ref = ref_unet.UNetModel(
        image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
        channel_mult=(1, 2), num_classes=4, num_heads=2, use_scale_shift_norm=True, resblock_updown=True,
    )  # fmt: skip
    _randomize(ref).eval()
    path = tmp_path_factory.mktemp("openai") / "ref.pt"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


def _module(path, **overrides):
    kwargs = dict(NET, class_cond=True, num_classes=4, diffusion_steps=10, init_from=path)
    kwargs.update(overrides)
    return DiffusionModule(**kwargs).eval()


def test_network_output_equals_the_reference(reference):
    ref, path = reference
    module = _module(path)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 4, 9]), torch.tensor([0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(module(x, t, y), ref(x, t, y), rtol=1e-5, atol=1e-5)
    assert module.hparams.init_from == path


def _others_equal(module, ref, skip=("label_emb.weight",)):
    exported = export_openai_state_dict(module.unet)
    return all(torch.equal(exported[k], v) for k, v in ref.state_dict().items() if k not in skip)


def test_class_embedding_adaptations(reference, caplog):
    ref, path = reference
    emb = ref.state_dict()["label_emb.weight"]
    with caplog.at_level(logging.INFO):
        null = _module(path, null_class=True, p_uncond=0.1)  # the null class added for classifier-free fine-tuning
    assert "added the null class (label 4)" in caplog.text
    assert torch.equal(null.unet.class_embed.weight[:4], emb) and _others_equal(null, ref)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([2, 7]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(null(x, t, y), ref(x, t, y), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match=r"has 4 classes in label_emb.weight, the model 7: .* initialised at random"):
        other = _module(path, num_classes=7)
    assert other.unet.class_embed.weight.shape == (7, 128) and _others_equal(other, ref)
    with pytest.warns(UserWarning, match=r"the model is unconditional; .*label_emb.weight \(4 rows\) is not used"):
        uncond = _module(path, class_cond=False)
    assert uncond.unet.class_embed is None and _others_equal(uncond, ref)
    with pytest.warns(UserWarning, match=r"has 4 classes in label_emb.weight, the model 3"):  # 3 + null: 4 rows too
        fewer = _module(path, num_classes=3, null_class=True)
    assert not torch.equal(fewer.unet.class_embed.weight, emb) and _others_equal(fewer, ref)


def test_a_network_that_does_not_fit_is_listed(reference, tmp_path):
    _, path = reference
    with pytest.raises(ValueError, match=r"(?s)init_from: .*ref.pt: .*shape mismatches .*input_blocks.0.0.weight: "
                                         r"expected \(64, 3, 3, 3\) vs found \(32, 3, 3, 3\)"):  # fmt: skip
        _module(path, model_channels=64)
    with pytest.raises(ValueError, match=r"(?s)missing keys .*out.2.weight|shape mismatches .*out.2.weight"):
        _module(path, var_type="fixed_small", loss_type="simple")  # 3 output channels instead of 6
    with pytest.raises(FileNotFoundError, match="init_from nope.pt: no such checkpoint file"):
        _module("nope.pt")
    classifier = tmp_path / "clf.pt"
    torch.save(export_openai_state_dict(NoisyClassifierModule(**tiny_classifier_kwargs()).classifier), classifier)
    with pytest.raises(
        ValueError,
        match=r"classifier layout; a DiffusionModule starts from .* or a released OpenAI U-Net",
    ):
        _module(str(classifier))


@pytest.fixture
def released_reference(monkeypatch):
    """The reference fixture's network registered as a released configuration, with the process of _module."""
    from diffusion_pl.lightning import init_weights
    from diffusion_pl.models import UNetModel

    kwargs = dict(NET, out_channels=3, learn_sigma=True, num_classes=4)
    monkeypatch.setattr(init_weights, "RELEASED_CONFIGS", {"tiny_released": (UNetModel, kwargs, 0)})
    monkeypatch.setattr(init_weights, "RELEASED_PROCESS", {"tiny_released": (10, "cosine", False)})


def test_released_settings_that_keep_the_shapes_are_checked(reference, released_reference, recwarn):
    """Settings that change what a network of the released shapes computes stop fit, each named; the released
    settings load (also with another class count), without the warning for files of no released shapes."""
    ref, path = reference
    module = _module(path)
    assert _others_equal(module, ref, skip=()) and not [w for w in recwarn if "no released" in str(w.message)]
    assert _others_equal(_module(path, num_classes=2, null_class=True), ref)
    heads = (
        r"init_from .*ref.pt has the shapes of the released tiny_released, which was trained with other "
        r"settings: num_head_channels: released -1 vs model 16; use_new_attention_order: released False vs model "
        r"True\. Build the model with the released values \(diffusion_pl.models.released_config\(.tiny_released"
    )
    with pytest.raises(ValueError, match=heads):
        _module(path, num_head_channels=16, use_new_attention_order=True)
    with pytest.raises(ValueError, match=r"settings: num_heads: released 2 vs model 1; num_heads_upsample: released 2 "
                                         r"vs model 1\. "):  # fmt: skip
        _module(path, num_heads=1)
    with pytest.raises(ValueError, match=r"num_heads_upsample: released 2 vs model 4\."):
        _module(path, num_heads_upsample=4)
    with pytest.raises(ValueError, match=r"settings: diffusion_steps: released 10 vs model 20; noise_schedule: "
                                         r"released 'cosine' vs model 'linear'; rescale_timesteps: released False vs "
                                         r"model True; var_type: released 'learned_range' vs model 'learned'\. .*"
                                         r"RELEASED_PROCESS"):  # fmt: skip
        _module(path, diffusion_steps=20, noise_schedule="linear", rescale_timesteps=True, var_type="learned")


def test_a_file_of_no_released_shapes_loads_with_a_warning(reference):
    ref, path = reference
    with pytest.warns(UserWarning, match=r"ref.pt has the shapes of no released configuration .* cannot be checked"):
        module = _module(path, num_heads=1)  # not the file's settings: nothing can tell
    assert _others_equal(module, ref, skip=())


def test_the_released_configurations_are_told_apart_by_their_shapes():
    """Every released file's shapes identify its configuration (ImageNet-256 with and without classes alike); the
    fine-tuning config has the settings of 64x64_diffusion.pt, the network of the defect report does not."""
    from pathlib import Path

    import yaml

    from diffusion_pl.lightning.init_weights import released_matches, released_setting_differences
    from diffusion_pl.models import RELEASED_CONFIGS, build_released

    for name, (cls, _, _) in RELEASED_CONFIGS.items():
        found = released_matches(export_openai_state_dict(build_released(name, device="meta")), cls)
        both = ["adm_imagenet256", "adm_imagenet256_uncond"]  # the same apart from the class embedding
        assert found == (both if name in both else [name])
    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "finetune_imagenet64.yaml").read_text())
    hparams = DiffusionModule(**config["model"]["init_args"] | {"init_from": None}).hparams
    assert released_setting_differences("adm_imagenet64", hparams) == []
    hparams.update(num_head_channels=-1, num_heads=1, use_new_attention_order=False, rescale_timesteps=True)
    assert released_setting_differences("adm_imagenet64", hparams) == [
        "num_head_channels: released 64 vs model -1", "use_new_attention_order: released True vs model False",
        "rescale_timesteps: released False vs model True"]  # fmt: skip


def _fit_tiny(tmp_path, model, max_steps=2, callbacks=()):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, enable_checkpointing=True,
                                         callbacks=[checkpoint, *callbacks]))  # fmt: skip
    trainer.fit(model, TinyDataModule())
    return str(tmp_path / "last.ckpt")


def test_from_a_diffusion_pl_checkpoint_and_ema_starts_there(tmp_path):
    L.seed_everything(0)
    source = _fit_tiny(tmp_path / "a", DiffusionModule(**tiny_diffusion_kwargs()))
    weights = torch.load(source, weights_only=True)["state_dict"]
    module = DiffusionModule(**tiny_diffusion_kwargs(init_from=source))
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())
    # EMA from the loaded weights: no EMA update in 2 steps, so the saved EMA weights are the loaded ones
    finetuned = _fit_tiny(tmp_path / "b", module, callbacks=[EMAWeightAveraging(update_starting_at_step=100)])
    saved = torch.load(finetuned, weights_only=True)
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["init_from"] == source
    assert all(torch.equal(v, weights[k]) for k, v in saved["state_dict"].items())
    assert any(not torch.equal(v, weights[k]) for k, v in saved["current_model_state"].items())  # it trained
    # loading the fine-tuned checkpoint never reads init_from again (the file may be gone)
    (tmp_path / "a" / "last.ckpt").rename(tmp_path / "moved.ckpt")
    assert DiffusionModule.load_from_checkpoint(finetuned).hparams.init_from is None
    with pytest.raises(ValueError, match=r"other network settings: num_head_channels: checkpoint 32 vs model -1"):
        DiffusionModule(**tiny_diffusion_kwargs(init_from=str(tmp_path / "moved.ckpt"), num_head_channels=-1,
                                                num_heads=1))  # fmt: skip


def test_classifier_from_a_released_layout(tmp_path):
    ref = ref_unet.EncoderUNetModel(
        image_size=8, in_channels=1, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(2,),
        channel_mult=(1, 2), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, pool="attention",
    )  # fmt: skip
    _randomize(ref).eval()
    path = tmp_path / "clf.pt"
    torch.save(ref.state_dict(), path)
    module = NoisyClassifierModule(**tiny_classifier_kwargs(init_from=str(path))).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 8])
    with torch.no_grad():
        torch.testing.assert_close(module(x, t), ref(x, t), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match=r"has 3 classes in out.2.c_proj.weight, the model 5"):
        other = NoisyClassifierModule(**tiny_classifier_kwargs(init_from=str(path), out_channels=5))
    assert torch.equal(other.classifier.input_conv.weight, module.classifier.input_conv.weight)


# ------------------------------------------------------------------------------------------------ fine-tune + resume
class Interrupt(Exception):
    pass


class InterruptAtStep(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            raise Interrupt


def _folder(root):
    rng = np.random.default_rng(0)
    for i in range(12):
        path = root / ("a" if i % 2 else "b") / f"{i}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(12, 10 + i, 3), dtype=np.uint8)).save(path)
    return root


def _finetune(tmp_path, name, init, data_dir, interrupt=False, ckpt_path=None):
    L.seed_everything(0)
    model = DiffusionModule(**tiny_diffusion_kwargs(in_channels=3, num_classes=2, init_from=init, p_uncond=0.2))
    data = ImageFolderDataModule(data_dir=str(data_dir), image_size=8, batch_size=2, num_workers=0, val_fraction=0.1,
                                 cache_dir=str(tmp_path / "cache"), random_crop=True)  # fmt: skip
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / name), save_last=True, every_n_train_steps=3)
    callbacks = [EMAWeightAveraging(decay=0.9), checkpoint] + ([InterruptAtStep()] if interrupt else [])
    trainer = L.Trainer(**trainer_kwargs(tmp_path / name, max_steps=10, enable_checkpointing=True, callbacks=callbacks))
    try:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    except Interrupt:
        pass
    return model, trainer


def test_finetuning_on_a_folder_resumed_equals_uninterrupted(tmp_path):
    """From a released-layout file with 3 classes to a folder of 2 classes plus the null class, with random crops and
    flips; interrupted after step 3, in the middle of the first epoch (10 training images, batch 2: 5 steps per
    epoch), and resumed from that step's checkpoint."""
    data_dir = _folder(tmp_path / "images")
    source = DiffusionModule(**tiny_diffusion_kwargs(in_channels=3, num_classes=3, null_class=False, p_uncond=0.0))
    init = tmp_path / "released.pt"
    torch.save(export_openai_state_dict(_randomize(source.unet)), init)
    full, full_trainer = _finetune(tmp_path, "full", str(init), data_dir)
    assert full_trainer.global_step == 10
    _, cut = _finetune(tmp_path, "cut", str(init), data_dir, interrupt=True)
    assert cut.global_step == 3
    resumed, resumed_trainer = _finetune(tmp_path, "resumed", str(init), data_dir,
                                         ckpt_path=str(tmp_path / "cut" / "last.ckpt"))  # fmt: skip
    assert resumed_trainer.global_step == 10
    for key, value in full.state_dict().items():  # the EMA weights, copied in at the end of fit
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    start = copy.deepcopy(source.unet.state_dict())
    assert any(not torch.equal(full.unet.state_dict()[k], v) for k, v in start.items() if k != "class_embed.weight")


def test_finetune_config_fits_the_released_imagenet64_model():
    """configs/finetune_imagenet64.yaml builds the network of 64x64_diffusion.pt (the adm_imagenet64 preset): every
    reference-layout key and shape equal, except the class embedding (2 classes + the null class there)."""
    from pathlib import Path

    import yaml

    from diffusion_pl.models import build_released

    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "finetune_imagenet64.yaml").read_text())
    assert config["model"]["init_args"]["init_from"] == "64x64_diffusion.pt"
    with torch.device("meta"):
        module = DiffusionModule(**config["model"]["init_args"])  # built on meta: init_from is not read
    ours = {k: v.shape for k, v in export_openai_state_dict(module.unet).items()}
    released = {
        k: v.shape for k, v in export_openai_state_dict(build_released("adm_imagenet64", device="meta")).items()
    }
    assert ours.pop("label_emb.weight") == (3, 768) and released.pop("label_emb.weight") == (1000, 768)
    assert ours == released


def test_validate_a_finetuned_checkpoint_without_its_init_file(tmp_path):
    """validate / test --ckpt_path of a run that started from init_from do not read that file again (it may be gone):
    the checkpoint holds the weights."""
    from lit_helpers import write_tiny_classifier_config

    from diffusion_pl.lightning.cli import build_lightning_cli

    init = tmp_path / "released_classifier.pt"
    network = NoisyClassifierModule(**tiny_classifier_kwargs(use_scale_shift_norm=False, resblock_updown=False))
    torch.save(export_openai_state_dict(network.classifier), init)  # the network of the tiny config
    config = write_tiny_classifier_config(tmp_path / "fit.yaml", tmp_path / "run",
                                          "lit_helpers.CheckpointedTinyDataModule")  # fmt: skip
    build_lightning_cli(["fit", "--config", config, f"--model.init_args.init_from={init}"])
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["init_from"] == str(init)
    init.unlink()
    trainer = ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
               f"--trainer.default_root_dir={tmp_path / 'eval'}"]  # fmt: skip
    for args in (["validate", "--ckpt_path", str(ckpt)], ["test", "--config", config, "--ckpt_path", str(ckpt),
                                                          f"--model.init_args.init_from={init}"]):  # fmt: skip
        cli = build_lightning_cli([*args, *trainer])
        assert cli.model.hparams.init_from is None and cli.trainer.callback_metrics


@pytest.mark.parametrize("module_kind", ["DiffusionModule", "NoisyClassifierModule"])
def test_class_rows_follow_the_class_names(tmp_path, module_kind):
    """A checkpoint trained on [ants, bees, cats] fine-tuned on [bees, cats, dogs]: bees and cats keep their rows
    (moved to labels 0 and 1), dogs gets the fresh row; with the same names in the same order nothing moves."""
    cls, kwargs, key = {
        "DiffusionModule": (DiffusionModule, tiny_diffusion_kwargs, "class_embed.weight"),
        "NoisyClassifierModule": (NoisyClassifierModule, tiny_classifier_kwargs, "head.proj.weight"),
    }[module_kind]
    source = cls(**kwargs())
    network = source.unet if module_kind == "DiffusionModule" else source.classifier
    key = key if key in network.state_dict() else "head.weight"
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": source.state_dict(), "ImageFolderDataModule": {"class_names": ["ants", "bees", "cats"]},
                "hyper_parameters": {**source.hparams, "_class_path": f"diffusion_pl.lightning.{module_kind}"}}, path)
    saved = network.state_dict()[key]
    module = cls(**kwargs(init_from=str(path)))
    mine = module.unet if module_kind == "DiffusionModule" else module.classifier
    fresh = module._init_class_rows.fresh[key]
    assert torch.equal(mine.state_dict()[key][:3], saved[:3])  # loaded by position first
    assert not torch.equal(fresh[2], saved[2])  # so "dogs" below tells the fresh row from the checkpoint's
    trainer = SimpleNamespace(datamodule=SimpleNamespace(class_names=["bees", "cats", "dogs"], image_size=8,
                                                         in_channels=1, num_classes=3),
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))  # fmt: skip
    module.trainer = trainer  # the setup hook reads only these
    with pytest.warns(UserWarning, match=r"class embeddings follow the class names \(2 matched by name; 1 new, "
                                         r"initialised at random: dogs\)"):  # fmt: skip
        module.setup("fit")
    rows = mine.state_dict()[key]
    assert torch.equal(rows[0], saved[1]) and torch.equal(rows[1], saved[2]) and torch.equal(rows[2], fresh[2])
    if module_kind == "DiffusionModule":
        assert torch.equal(rows[3], saved[3])  # the null class row stays
    same = cls(**kwargs(init_from=str(path)))
    same.trainer = SimpleNamespace(datamodule=SimpleNamespace(class_names=["ants", "bees", "cats"], image_size=8,
                                                              in_channels=1, num_classes=3), strategy=trainer.strategy)
    same.setup("fit")
    assert torch.equal((same.unet if module_kind == "DiffusionModule" else same.classifier).state_dict()[key], saved)
