"""Input validation shared by the ops: every message names the argument, what was expected and what came."""
from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from ..layout import host_cu_seqlens

SIGNED_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
INTEGER_DTYPES = (*SIGNED_INTEGER_DTYPES, torch.uint8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def id_range(ids: Tensor, read: Tensor | None = None, fill: int = 0) -> tuple[int, int] | None:
    """``(lowest, highest)`` of the integer ``ids`` where ``read`` (a bool tensor broadcasting to them) is True,
    ``fill`` standing in elsewhere (entries never read may hold anything); None for no ids. One device-to-host
    copy."""
    if ids.numel() == 0:
        return None
    if read is not None:
        ids = torch.where(read, ids, torch.full((), fill, dtype=ids.dtype, device=ids.device))
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    return low, high


def is_finite(value) -> bool:
    """``math.isfinite`` that also takes torch.compile's symbolic floats (``dynamic=True`` turns float arguments
    into SymFloats, which ``math.isfinite`` refuses): ``x - x`` is 0 exactly when x is finite (inf - inf and
    anything involving NaN are NaN)."""
    return value - value == 0


def describe(x: Tensor) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"


def as_tensor(value, name: str, *, optional: bool = False) -> Tensor | None:
    """Accept a torch.Tensor or a numpy array (shared, not copied, unless it is strided or not in this machine's
    byte order, which torch cannot share); reject anything else by name."""
    if value is None:
        if optional:
            return None
        raise TypeError(f"{name}: expected a tensor, got None")
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if not value.dtype.isnative:  # e.g. big-endian data read from a file: torch.from_numpy refuses it
            value = value.astype(value.dtype.newbyteorder("="))
        # ascontiguousarray returns at least one dimension: the reshape keeps a 0-d array 0-d.
        return torch.from_numpy(np.ascontiguousarray(value).reshape(value.shape))
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def check_dtype(x: Tensor, name: str, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected dtype {names}; got {describe(x)}")


def check_shape(x: Tensor, name: str, expected: tuple, meaning: str) -> None:
    """``expected`` holds ints, or None for any size; ``meaning`` spells the shape, e.g. "(B, N, N)"."""
    if x.dim() != len(expected) or any(e is not None and s != e for s, e in zip(x.shape, expected)):
        want = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {meaning} = {want}; got {describe(x)}")


def check_pair_matrix(x: Tensor, name: str) -> None:
    """A padded per-pair tensor: ``(B, N, N)``."""
    if x.dim() != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"{name}: expected shape (B, N, N); got {describe(x)}")


def check_mask(mask: Tensor | None, batch_and_atoms: tuple, cu_seqlens: Tensor | None) -> None:
    """The padded layout takes ``mask (B, N)`` bool (or None); the packed one (``cu_seqlens`` given) has none."""
    if mask is None:
        return
    if cu_seqlens is not None:
        raise ValueError("mask: the packed layout (cu_seqlens given) has no padding; pass mask=None")
    check_dtype(mask, "mask", (torch.bool,))
    check_shape(mask, "mask", tuple(batch_and_atoms), "(B, N)")


def check_same_device(reference: Tensor, reference_name: str, **others: Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name}: expected a tensor on {reference.device} like {reference_name}; "
                             f"got {describe(x)}")


def check_packed_form(cu_seqlens: Tensor, max_seqlen) -> int:
    """What :func:`packed_layout` checks without reading ``cu_seqlens`` (under torch.compile, where a host read
    would break the graph, or with value checks off): its dtype and rank, and an int ``max_seqlen``, then
    trusted. Returns ``max_seqlen`` as a Python int."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens: expected an int32 tensor of shape (B+1,); got {describe(cu_seqlens)}")
    if not is_int(max_seqlen) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected an int where cu_seqlens is not read (torch.compile, meta or fake "
                         f"tensors, pyblend.set_value_checks(False)); got {max_seqlen!r}")
    return int(max_seqlen)


def host_sizes(cu_seqlens: Tensor, total: int | None = None) -> tuple[np.ndarray, int, int]:
    """``cu_seqlens`` checked on the host (``layout.check_cu_seqlens``, its one device-to-host copy): ``(its values,
    the longest molecule, P = sum N_i^2)``."""
    values = host_cu_seqlens(cu_seqlens, total=total)
    lengths = np.diff(values).astype(np.int64)
    return values, int(lengths.max()) if lengths.size else 0, int((lengths * lengths).sum())


def packed_layout(cu_seqlens: Tensor, atoms: int, max_seqlen) -> tuple[Tensor, int, int]:
    """Check a packed layout on the host (its one device-to-host copy): ``cu_seqlens`` describing ``atoms`` rows,
    ``max_seqlen`` None (then the longest molecule) or an int at least that. Returns ``(cu_seqlens on the CPU,
    max_seqlen, P = sum N_i^2)``."""
    values, longest, pairs = host_sizes(cu_seqlens, total=atoms)
    if max_seqlen is None:
        max_seqlen = longest
    elif not is_int(max_seqlen) or max_seqlen < longest:
        raise ValueError(f"max_seqlen: expected an int >= the longest molecule ({longest}); got {max_seqlen!r}")
    return torch.from_numpy(values), int(max_seqlen), pairs


def check_flag(value, name: str) -> bool:
    """A yes/no argument: a bool (numpy's included), never a truthy stand-in such as ``"no"`` or ``None``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool; got {value!r}")
    return bool(value)


def is_int(value) -> bool:
    """An integer argument: Python's or numpy's (sizes read from arrays and configs), never a bool, which Python
    counts as an int (numpy's bool is no ``numbers.Integral``; it is excluded all the same, for clarity)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def one_or(size, expected) -> bool:
    """Whether a dimension of ``size`` broadcasts to ``expected`` (is 1 or equal). Spelled with ``==``: under
    torch.compile, ``size in (1, expected)`` came out False for a symbolic size equal to a static one."""
    return size == 1 or size == expected


def is_real(value) -> bool:
    """A real-number argument: a Python or numpy int or float, never a bool (see :func:`is_int`)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_positive_float(value, name: str) -> None:
    """A real number > 0 and finite (numpy's included, never a bool), e.g. a temperature or an epsilon."""
    if not is_real(value) or not (is_finite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite float > 0; got {value!r}")


def check_generator(generator) -> None:
    """``generator``: None or a ``torch.Generator`` (a seed number is not one: torch.manual_seed takes those)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None; got {generator!r}")


def check_linear_input(x: Tensor, label: str, weight: Tensor, owner: str) -> None:
    """``x`` for a Linear layer with ``weight`` (``owner`` says whose), checked before the matmul, whose own
    message names no argument: on the weight's device, and of its dtype or, under autocast at ``x``'s device, of
    any float dtype but float64 (autocast casts the others to its own)."""
    if x.device != weight.device:
        raise ValueError(f"{label}: expected a tensor on {weight.device} like {owner}; got {describe(x)}")
    if x.dtype != weight.dtype and not (torch.float64 not in (x.dtype, weight.dtype) and _autocast_on(x.device)):
        raise TypeError(f"{label}: expected dtype {weight.dtype} like {owner} (under autocast, any float dtype "
                        f"but float64); got {describe(x)}")


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta): never on there
        return False


def check_sample_mask(mask, label: str, batch: int, device: torch.device) -> Tensor:
    """A per-sample presence mask: ``(B,)`` bool (a numpy array is taken) on the embeddings' ``device``."""
    mask = as_tensor(mask, label)
    check_dtype(mask, label, (torch.bool,))
    check_shape(mask, label, (batch,), "(B,)")
    if mask.device != device:
        raise ValueError(f"{label}: expected a tensor on {device} like the embeddings; got {describe(mask)}")
    return mask


def check_module_backend(backend, op: str, backends: tuple = ("triton", "reference")) -> None:
    """A module's ``backend`` option, checked when the module is built rather than at its first forward: None
    (automatic) or one of ``op``'s ``backends``."""
    if backend is not None and backend not in backends:
        raise ValueError(f"backend: expected one of {backends} ({op}'s) or None (automatic); got {backend!r}")
