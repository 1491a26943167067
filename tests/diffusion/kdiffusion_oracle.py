"""k-diffusion (crowsonkb, PyPI ``k-diffusion`` 0.1.1.post1) as the oracle of the solver tests.

Its package ``__init__`` imports its whole training stack (scikit-image, CLIP, clean-fid, dctorch, jsonmerge, kornia),
none of which the samplers use. The tests need only ``k_diffusion.sampling`` (scipy, torchdiffeq, torchsde) and
``k_diffusion.external``, and those import ``k_diffusion.utils`` (PIL, safetensors, torchvision): this module registers
an empty ``k_diffusion`` package pointing at the installed folder, so importing those submodules skips the __init__.
Install with: pip install --no-deps --require-hashes -r tests/oracle-requirements.txt (make test does)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def load_kdiffusion():
    """(k_diffusion.sampling, k_diffusion.external); ImportError with the install command when it is missing."""
    if "k_diffusion.sampling" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "the solver tests need k-diffusion: pip install --no-deps k-diffusion==0.1.1.post1 "
                "torchdiffeq torchsde trampoline safetensors (see tests/oracle-requirements.txt)"
            )
        if "k_diffusion" not in sys.modules:
            package = types.ModuleType("k_diffusion")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")
