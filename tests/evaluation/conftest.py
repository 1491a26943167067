"""Shared fixtures for the evaluation tests: a random-weight Inception (tests only)."""

from __future__ import annotations

import pytest

from diffusion_pl.evaluation.testing import save_random_inception_weights_for_tests


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> str:
    """Path of a random-weight torch-fidelity Inception state dict (NOT the real FID network)."""
    return save_random_inception_weights_for_tests(str(tmp_path_factory.mktemp("inception") / "random_inception.pth"))


@pytest.fixture(scope="session")
def inception(random_inception_weights):
    from diffusion_pl.evaluation import InceptionFeatures

    return InceptionFeatures(random_inception_weights, device="cpu", batch_size=16, progress=False)
