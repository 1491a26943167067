"""Fixtures for tests/sampling: tiny diffusion-pl checkpoints and a random-weight Inception (tests only)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from sampling_helpers import make_classifier_ckpt, make_diffusion_ckpt  # noqa: E402


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("ckpts")
    return {
        "cond": make_diffusion_ckpt(d / "cond.ckpt"),
        "uncond": make_diffusion_ckpt(d / "uncond.ckpt", class_cond=False, null_class=False, p_uncond=0.0),
        "nonull": make_diffusion_ckpt(d / "nonull.ckpt", null_class=False, p_uncond=0.0),
        "classifier": make_classifier_ckpt(d / "classifier.ckpt"),
        "classifier16": make_classifier_ckpt(d / "classifier16.ckpt", image_size=16, attention_resolutions=(8,)),
    }


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> str:
    from diffusion_pl.evaluation.testing import save_random_inception_weights_for_tests

    return save_random_inception_weights_for_tests(str(tmp_path_factory.mktemp("inception") / "random_inception.pth"))
