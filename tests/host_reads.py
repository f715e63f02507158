"""Find host reads of tensor values (a device-to-host copy, so a GPU synchronisation) made by pyblend's own code,
on CPU tensors standing in for CUDA ones: the explicit ways (``item``, ``tolist``, ``cpu``, ``bool``, ``int``,
``float``, ``nonzero``, ``unique``) called from a file of pyblend or its kernels (``numpy`` takes CPU tensors only:
the copy was a ``cpu`` before it). Triton's interpreter
reads tensors too; its reads are not pyblend's and are not counted. Boolean-mask indexing and
``repeat_interleave`` without ``output_size`` also synchronise on a GPU and are not seen here: the gpu-marked
tests check those with ``torch.cuda.set_sync_debug_mode``."""
from __future__ import annotations

import contextlib
import os
import sys

import torch

import pyblend
import pyblend.kernels

_OWN = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep for module in (pyblend, pyblend.kernels))
_METHODS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique")


@contextlib.contextmanager
def recorded_host_reads():
    """Yields a list that collects ``"path:line function method"`` for each host read made by pyblend's code."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def spy(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1)
            path = os.path.abspath(caller.f_code.co_filename)
            if path.startswith(_OWN):
                where = os.path.relpath(path, os.path.dirname(_OWN[0]))
                reads.append(f"{where}:{caller.f_lineno} {caller.f_code.co_name} {name}")
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
