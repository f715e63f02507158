"""Whether tensor values can be read on the host, for the checks and sizes that read them."""
from __future__ import annotations

import threading

import torch
from torch._subclasses.fake_tensor import is_fake


class _State(threading.local):
    value_checks = True  # per thread, as torch's grad mode (no backward formula reads values)


_state = _State()


def values_hidden(*tensors) -> bool:
    """True under torch.compile (a host read would break the graph), with value checks off
    (:class:`set_value_checks`), and when any of ``tensors`` (None entries ignored) is on the meta device or a
    FakeTensor (shape inference, FLOP counting on a meta model): their values do not exist or are not to be read.
    Value checks are then skipped and sizes come from shapes and ``max_seqlen``, as in a compiled call."""
    if not _state.value_checks or torch.compiler.is_compiling():
        return True
    return any(isinstance(t, torch.Tensor) and (t.is_meta or is_fake(t)) for t in tensors)


class set_value_checks:
    """Turn pyblend's host reads of tensor values on (the default) or off in the current thread; as a function
    or, like ``torch.set_grad_enabled``, a context manager that restores the previous setting on exit.

    On, the ops check what can only be checked by reading values: ``cu_seqlens`` describing the rows, relation and
    type ids inside their tables, a sample with no modality present, ``max_seqlen`` at least the longest
    molecule, loss targets within their range. Each check is a device-to-host copy, so each op call waits for the
    GPU to catch up, and the CPU cannot queue the next kernels while the GPU runs.

    Off, the ops take the paths they take under ``torch.compile``: nothing is read, sizes come from shapes and
    ``max_seqlen`` (which packed calls must then pass), and the inputs are trusted. Ids outside a table then add no
    bias and get no gradient; a ``cu_seqlens`` or ``max_seqlen`` that does not describe the batch gives wrong
    results or reads out of bounds. For a training loop whose batches come from :func:`pyblend.collate` (checked
    there) or were checked once::

        with pyblend.set_value_checks(False):
            loss = model(batch)
            loss.backward()
    """

    def __init__(self, enabled: bool):
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled: expected a bool; got {enabled!r}")
        self.previous = _state.value_checks
        _state.value_checks = enabled

    def __enter__(self) -> "set_value_checks":
        return self

    def __exit__(self, *exc_info) -> None:
        _state.value_checks = self.previous


def value_checks_enabled() -> bool:
    """Whether the ops read tensor values on the host to check them (see :class:`set_value_checks`)."""
    return _state.value_checks


__all__ = ["set_value_checks", "value_checks_enabled", "values_hidden"]
