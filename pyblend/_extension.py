"""Lazy access to the optional C++ engine ``pyblend._C``.

``import pyblend`` never needs the extension; an op that does calls :func:`load_extension`, which raises an
actionable error when it was not built.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

_MODULE: ModuleType | None = None
_ERROR: ImportError | None = None


def load_extension() -> ModuleType:
    """Return ``pyblend._C``; raise ``RuntimeError`` saying how to build it when it is missing."""
    global _MODULE, _ERROR
    if _MODULE is None and _ERROR is None:
        try:
            _MODULE = importlib.import_module("pyblend._C")
        except ImportError as error:
            _ERROR = error
    if _MODULE is None:
        raise RuntimeError(
            "pyblend's C++ engine (pyblend._C) is not built: "
            f"{_ERROR}. Build it with `make` targets (`make test` builds it into .venv), or "
            "`pip install --no-build-isolation -e .` (needs cmake, ninja, pybind11 and a C++17 compiler); "
            "or pass backend='reference' to use the plain-PyTorch path."
        )
    return _MODULE


@torch.compiler.assume_constant_result
def extension_available() -> bool:
    """Whether ``pyblend._C`` loads. Under torch.compile the answer is a constant taken at trace time: Dynamo
    refuses to trace ``importlib.import_module``, so the first call of a C++-engine op inside a compiled region
    (before any eager call had loaded the engine) broke the graph, and failed with ``fullgraph=True``."""
    try:
        load_extension()
    except RuntimeError:
        return False
    return True
