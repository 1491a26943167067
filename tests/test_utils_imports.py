"""import_object: a dotted path to the object, None for anything that cannot be imported (never raises)."""

from __future__ import annotations

import pytest

from diffusion_pl.lightning import DiffusionModule
from diffusion_pl.utils.imports import import_object


def test_dotted_path_gives_the_object():
    assert import_object("diffusion_pl.lightning.DiffusionModule") is DiffusionModule


@pytest.mark.parametrize("path", ["diffusion_pl.lightning.DiffusionModul", "no_such_package.Thing", "DiffusionModule",
                                  ""])  # fmt: skip
def test_unimportable_path_gives_none(path):
    assert import_object(path) is None
