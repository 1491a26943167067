"""Objects named by a dotted path, as configs and command lines name classes."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any | None:
    """``"package.module.Name"`` -> that object, or None when the module or the name cannot be imported."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None
