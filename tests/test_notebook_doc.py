"""docs/NOTEBOOK.md runs as written (its python blocks in order, in an empty folder), and the API it shows is the
sampler of `diffusion-pl sample`: same images for the same options, labels by name, one-line errors."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pl.cli import main
from diffusion_pl.evaluation import load_samples_npz
from diffusion_pl.sampling import SAMPLES_NAME

DOC = Path(__file__).resolve().parents[1] / "docs" / "NOTEBOOK.md"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    folder = tmp_path_factory.mktemp("notebook")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(folder)
    torch.set_num_threads(1)
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return folder, namespace


def test_page_runs_and_computes_what_it_says(page):
    folder, ns = page
    assert ns["images"].dtype == np.uint8 and ns["images"].shape == (9, 8, 8, 3)
    assert ns["guided"].shape == (4, 8, 8, 3) and ns["labels"].shape == (9,)
    assert (folder / "grid.png").is_file() and ns["picture"].size[0] > 8
    assert ns["mine"].class_names == ["circles", "squares"] and ns["mine"].null_class == 2
    assert ns["squares"].shape == (4, 8, 8, 3)


def test_the_page_draws_the_images_of_the_sample_command(page, tmp_path, capsys):
    """The page's last `images, labels` (9 random-label ddim samples, 10 steps, seed 2) are the samples.npz that
    `diffusion-pl sample` writes with the same options, run as a user runs it (batch 4, not the API's 16)."""
    folder, ns = page
    out = tmp_path / "samples"
    args = ["sample", "--openai_ckpt", str(folder / "tiny_diffusion.pt"), "--arch", str(folder / "tiny_unet.yaml"),
            "--diffusion_steps", "100", "--num_samples", "9", "--method", "ddim", "--steps", "10", "--seed", "2",
            "--sample_batch_size", "4", "--accelerator", "cpu", "--out_dir", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    images, labels = load_samples_npz(str(out / SAMPLES_NAME))
    assert labels is not None and labels.shape == (9,) and images.shape == (9, 8, 8, 3)
    assert np.array_equal(ns["images"], images) and np.array_equal(ns["labels"], labels)
    other = ns["sampler"].sample(num_images=9, steps=10, seed=3, progress=False)  # another seed: other images
    assert other.shape == images.shape and not np.array_equal(other, images)


def test_labels_by_name_and_errors(page):
    _, ns = page
    mine = ns["mine"]
    by_name = mine.sample(num_images=2, labels=["squares", "circles"], steps=5, seed=3, progress=False)
    by_id = mine.sample(num_images=2, labels=[1, 0], steps=5, seed=3, progress=False)
    assert np.array_equal(by_name, by_id)
    with pytest.raises(ValueError, match=r"label 'dogs' is not a class name of this model; known names: circles"):
        mine.sample(num_images=2, labels="dogs")
    with pytest.raises(ValueError, match="labels has 3 entries: give one"):
        mine.sample(num_images=2, labels=[0, 1, 0])
    with pytest.raises(ValueError, match=r"labels \[5\] are outside 0..1"):
        mine.sample(num_images=1, labels=5, steps=5)
    with pytest.raises(ValueError, match="cfg_scale = 1.0 .* needs a model trained with a null class"):
        ns["sampler"].sample(num_images=1, cfg_scale=1.0, steps=5)
    # Sampler options are checked before a classifier file is read (this one does not exist).
    with pytest.raises(ValueError, match="--steps 'karras2' gives 2 step"):
        mine.sample(num_images=1, method="dpmpp_2m", steps="karras2", classifier="no-such-classifier.ckpt")
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose from 32-true, bf16-mixed, 16-mixed"):
        ns["diffusion_pl"].load("no-such-file.ckpt", precision="fp16")
    with pytest.raises(ValueError, match="carries its own process"):
        ns["diffusion_pl"].load(str(page[0] / "run" / "last.ckpt"), diffusion_steps=10)


def test_labels_of_every_kind_and_grid_checks(page, tmp_path):
    """numpy / torch integer labels, WordNet IDs with an ImageNet classifier on an unconditional model, labels that
    could do nothing refused, and grid's label count."""
    from diffusion_pl.data.imagenet_classes import sorted_wnids
    from diffusion_pl.models import EncoderUNetModel, UNetModel, export_openai_state_dict

    _, ns = page
    mine, diffusion_pl = ns["mine"], ns["diffusion_pl"]
    one = mine.sample(num_images=2, labels=1, steps=3, seed=3, progress=False)
    assert np.array_equal(mine.sample(num_images=2, labels=np.int64(1), steps=3, seed=3, progress=False), one)
    assert np.array_equal(mine.sample(num_images=2, labels=torch.tensor(1), steps=3, seed=3, progress=False), one)
    unet = dict(image_size=8, in_channels=3, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
                attention_resolutions=[4], num_head_channels=32, learn_sigma=True)  # fmt: skip
    classifier = dict(image_size=8, in_channels=3, model_channels=32, out_channels=1000, num_res_blocks=1,
                      channel_mult=[1, 2], attention_resolutions=[4], num_head_channels=32, pool="attention")
    for name, net, args in [("uncond", UNetModel, unet), ("imagenet_classifier", EncoderUNetModel, classifier)]:
        torch.save(export_openai_state_dict(net(**args)), tmp_path / f"{name}.pt")
        (tmp_path / f"{name}.yaml").write_text("\n".join(f"{k}: {v}" for k, v in args.items()))
    uncond = diffusion_pl.load(str(tmp_path / "uncond.pt"), preset=str(tmp_path / "uncond.yaml"), device="cpu",
                               diffusion_steps=20)  # fmt: skip
    with pytest.raises(ValueError, match="labels have no effect: the model is unconditional and no classifier"):
        uncond.sample(num_images=1, labels=0, steps=3)
    guided = dict(num_images=2, steps=3, seed=1, progress=False, classifier=str(tmp_path / "imagenet_classifier.pt"),
                  classifier_preset=str(tmp_path / "imagenet_classifier.yaml"), return_labels=True)  # fmt: skip
    by_name, names = uncond.sample(labels=sorted_wnids()[5], **guided)
    by_id, ids = uncond.sample(labels=5, **guided)
    assert np.array_equal(by_name, by_id) and names.tolist() == ids.tolist() == [5, 5]
    with pytest.raises(ValueError, match="grid: 3 labels for 2 images"):
        diffusion_pl.grid(one, labels=[0, 1, 1])
    with pytest.raises(ValueError, match="nrow applies without labels"):
        diffusion_pl.grid(one, labels=[0, 1], nrow=2)
