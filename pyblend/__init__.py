"""pyblend: fused kernels and drop-in layers for multimodal molecular representation learning.

``import pyblend`` needs neither a GPU nor the compiled C++ engine, and does not import RDKit or Triton: those
load when first used. Layouts (padded / packed) are documented in :mod:`pyblend.layout`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from . import features, kernels, layout, metrics, models, nn, ops, reference
    from .chem import Failure, MolGraph, default_molecules, featurize, featurize_many, read_csv, read_sdf
    from ._values import set_value_checks, value_checks_enabled
    from .data import MolBatch, collate

# Everything loads on first use, torch included: featurize_many's worker processes import pyblend.chem, which
# then costs RDKit alone.
_LAZY = {
    "featurize": "chem", "featurize_many": "chem", "MolGraph": "chem", "Failure": "chem",
    "default_molecules": "chem", "read_csv": "chem", "read_sdf": "chem",
    "collate": "data", "MolBatch": "data",
    "set_value_checks": "_values", "value_checks_enabled": "_values",
    "chem": None, "data": None, "features": None, "layout": None, "metrics": None, "models": None, "nn": None,
    "ops": None, "reference": None, "kernels": None,
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pyblend' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value
