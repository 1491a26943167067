"""docs/NOTEBOOK.md runs as written (its python blocks in order, in an empty folder), and the API it shows is the
sampler of `diffusion-pl sample`: same images for the same options, labels by name, one-line errors."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pl.commands.common import build_engine, engine_options, load_model
from diffusion_pl.commands.options import Guidance, ModelSource, SamplingOptions
from diffusion_pl.utils.images import nchw_to_nhwc, to_uint8

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


def test_the_api_is_the_engine_of_the_sample_command(page):
    """The Sampler's images equal SampleEngine's, built the way `diffusion-pl sample` builds it."""
    folder, ns = page
    sampler = ns["sampler"]
    ours = sampler.sample(num_images=3, labels=[2, 0, 1], method="ddpm", steps=7, seed=5, progress=False)
    source = ModelSource(openai_ckpt=str(folder / "tiny_diffusion.pt"), arch=str(folder / "tiny_unet.yaml"),
                         diffusion_steps=100)  # fmt: skip
    model = load_model(source)
    options = engine_options(model, None, SamplingOptions(steps="7", method="ddpm", seed=5), Guidance())
    batch = build_engine(model, None, options, device="cpu", progress=False).sample([0, 1, 2], [2, 0, 1])
    assert np.array_equal(ours, nchw_to_nhwc(to_uint8(batch.images)))
    # a different seed, method or guidance changes the images
    assert not np.array_equal(ours, sampler.sample(num_images=3, labels=[2, 0, 1], method="ddpm", steps=7, seed=6))


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
    with pytest.raises(ValueError, match="carries its own process"):
        ns["diffusion_pl"].load(str(page[0] / "run" / "last.ckpt"), diffusion_steps=10)
