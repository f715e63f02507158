"""Whether tensor values can be read on the host, for the checks and sizes that read them."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def values_hidden(*tensors) -> bool:
    """True under torch.compile (a host read would break the graph) and when any of ``tensors`` (None entries
    ignored) is on the meta device or a FakeTensor (shape inference, FLOP counting on a meta model): their
    values do not exist. Value checks are then skipped and sizes come from shapes and ``max_seqlen``, as in a
    compiled call."""
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(t, torch.Tensor) and (t.is_meta or is_fake(t)) for t in tensors)


__all__ = ["values_hidden"]
