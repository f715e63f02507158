"""The two batch layouts every pyblend op uses, and conversions between them.

**Padded**: per-atom tensors are ``(B, N, ...)`` and per-pair tensors ``(B, N, N, ...)``, with ``mask (B, N)``
bool, True = real atom. Entries that touch a masked atom carry no meaning and are never read as data.

**Packed** (flash-attn's varlen convention): per-atom tensors are ``(T, ...)`` with ``T = sum N_i``, described by
``cu_seqlens (B+1,)`` int32 (molecule ``i`` owns atoms ``cu_seqlens[i]:cu_seqlens[i+1]``) and ``max_seqlen``
(an int). Per-pair tensors are ``(P, ...)`` with ``P = sum N_i^2``: molecule ``i``'s ``(N_i, N_i)`` block is
stored row-major starting at ``pair_offsets(cu_seqlens)[i] = sum_{j<i} N_j^2``.

Both layouts keep atom order: packing a padded batch keeps its real atoms in order, molecule after molecule.

**Checks.** Every helper checks what shapes and types tell, always: ``cu_seqlens`` a 1-D int32 or int64 tensor
(int32 only for :func:`check_cu_seqlens`, the ops' contract), sizes ints >= 0, tensors whose shapes and devices
agree with it. What only ``cu_seqlens``' values tell (it starts at 0 and never decreases, a row count, a
``max_seqlen`` or a padded width at least the longest molecule, an ``atoms`` / ``pairs`` count) costs a
device-to-host read, so it is checked only where values may be read (``pyblend._values.values_hidden`` False): not
under torch.compile, not for meta or fake tensors, not with ``pyblend.set_value_checks(False)``; there the values
are trusted, and a wrong ``cu_seqlens`` gives wrong results or reads out of bounds.

The values are read at most once per tensor and version: a ``cu_seqlens`` that passed is remembered (weakly, with
its version counter), and later calls on it, unchanged, check against the values already read. So an op that
checked its ``cu_seqlens`` and then calls these helpers on it pays no second read. An in-place change through
torch bumps the version (the next call reads again); one behind torch's back (a numpy array sharing the memory,
``.data``) is not seen. Inference tensors have no version counter: :func:`check_cu_seqlens` and
:func:`host_cu_seqlens` (which the ops call) read them every time, the other helpers trust the latest such read.

Given their sizes (``pad_*`` a width, ``unpad_*``, ``atom_molecules``, ``pair_index`` and ``prepend_token`` their
counts), the helpers size every output by shapes and ints, never by ``cu_seqlens``' values, so
``torch.compile(fullgraph=True)`` traces them. The ``_``-prefixed variants do the same work without any check,
for callers that checked already.
This module imports nothing from the rest of pyblend but :mod:`pyblend._values`, so every layer may use it.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

from ._values import values_hidden

__all__ = [
    "atom_molecules", "check_cu_seqlens", "cu_seqlens_from_mask", "host_cu_seqlens", "mask_from_cu_seqlens",
    "pack_atoms", "pack_pairs", "pad_atoms", "pad_pairs", "padded_width", "pair_index", "pair_offsets",
    "prepend_token", "seqlens", "unpad_atoms", "unpad_pairs",
]

_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------- checks
class _Known(NamedTuple):
    """A ``cu_seqlens`` whose values passed the checks, as read on the host."""

    version: int | None     # the tensor's version counter then; None for an inference tensor (it has none)
    values: np.ndarray      # (B+1,) int64, read-only: shared by every later call
    atoms: int              # T = values[-1]
    longest: int            # the longest molecule, 0 for none
    pairs: int              # P = sum N_i^2


# Weak keys: an entry leaves with its tensor, and a new tensor at a freed address is a new key (ids, not __eq__,
# which would compare values).
_known: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _describe(x: Tensor) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"


def _check_form(cu_seqlens, name: str = "cu_seqlens", dtypes: tuple = _INDEX_DTYPES) -> None:
    """What ``cu_seqlens`` must be by its type, dtype and shape (nothing read)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor; got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in dtypes or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        kinds = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected an {kinds} tensor of shape (B+1,); got {_describe(cu_seqlens)}")


def _size(value, name: str, optional: bool = False):
    """An int >= 0 (numpy's taken, as a Python int; never a bool), or None where ``optional``. torch.compile's
    symbolic ints pass as they are: their sign is the tracer's to know, not a value to read here."""
    if value is None and optional or isinstance(value, torch.SymInt):
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int >= 0{' or None' if optional else ''}; got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0; got {value!r}")
    return int(value)


def _check_tensor(x, name: str, dims: int, meaning: str, cu_seqlens: Tensor) -> None:
    """``x`` a tensor of at least ``dims`` dimensions (``meaning`` spells them) on ``cu_seqlens``' device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor; got {type(x).__name__}")
    if x.dim() < dims:
        raise ValueError(f"{name}: expected shape {meaning}; got {_describe(x)}")
    if x.device != cu_seqlens.device:
        raise ValueError(f"{name}: expected a tensor on {cu_seqlens.device} like cu_seqlens; got {_describe(x)}")


def _check_padded(x, cu_seqlens: Tensor, pairs: bool) -> None:
    """A padded ``x``: ``(B, N, ...)``, or ``(B, N, N, ...)`` where ``pairs``, with B from ``cu_seqlens``."""
    meaning = "(B, N, N, ...)" if pairs else "(B, N, ...)"
    _check_tensor(x, "x", 3 if pairs else 2, meaning, cu_seqlens)
    batch = cu_seqlens.shape[0] - 1
    if x.shape[0] != batch or pairs and x.shape[1] != x.shape[2]:
        raise ValueError(f"x: expected shape {meaning} with B = {batch} (from cu_seqlens); got {_describe(x)}")


def _version(x: Tensor) -> int | None:
    return None if x.is_inference() else x._version


def _remember(cu_seqlens: Tensor, values: np.ndarray) -> _Known:
    values = values.astype(np.int64)  # a copy: no later write to the tensor (or its numpy alias) reaches it
    values.flags.writeable = False
    lengths = np.diff(values)
    known = _Known(_version(cu_seqlens), values, int(values[-1]), int(lengths.max()) if lengths.size else 0,
                   int((lengths * lengths).sum()))
    _known[cu_seqlens] = known
    return known


def _read(cu_seqlens: Tensor, name: str = "cu_seqlens", *, again: bool = False) -> _Known:
    """``cu_seqlens``' values, checked (starting at 0, non-decreasing): from an earlier read of the same tensor at
    the same version, else read (one device-to-host copy) and remembered. ``again``: read an inference tensor
    (no version counter, so no way to tell it unchanged) even when remembered."""
    known = _known.get(cu_seqlens)
    if known is not None and known.version == _version(cu_seqlens) and not (again and known.version is None):
        return known
    if cu_seqlens.is_meta or is_fake(cu_seqlens):
        raise ValueError(f"{name}: expected a tensor whose values can be read; got a meta or fake "
                         f"{_describe(cu_seqlens)}")
    _known.pop(cu_seqlens, None)  # values that fail below must not stand in for them later
    values = cu_seqlens.cpu().numpy()
    if values[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0; got {values[0]}")
    steps = np.diff(values)
    if (steps < 0).any():
        at = int(np.flatnonzero(steps < 0)[0]) + 1
        raise ValueError(f"{name}: expected non-decreasing values; got {name}[{at}] = {values[at]} "
                         f"< {values[at - 1]}")
    return _remember(cu_seqlens, values)


def _values_if_shown(cu_seqlens: Tensor, missing: str | None = None) -> _Known | None:
    """The checked values where they may be read, else None (trusted). ``missing``: the size the caller was not
    given, so must take from the values (or from a device computation, under torch.compile, as a data-dependent
    size): a meta or fake ``cu_seqlens`` has none to give."""
    if not values_hidden(cu_seqlens):
        return _read(cu_seqlens)
    if missing is not None and not torch.compiler.is_compiling() and (cu_seqlens.is_meta or is_fake(cu_seqlens)):
        raise ValueError(f"{missing}: expected an int where cu_seqlens is not read (torch.compile, meta or fake "
                         f"tensors, pyblend.set_value_checks(False)); got None")
    return None


def _check_count(count, known: _Known, name: str) -> int:
    """``count`` (``name``: "atoms" or "pairs") as ``cu_seqlens`` describes it; None takes the described one."""
    described, what = (known.atoms, "T = cu_seqlens[-1]") if name == "atoms" else (known.pairs, "P = sum N_i^2")
    if count is not None and count != described:
        raise ValueError(f"{name}: expected {what} = {described} (from cu_seqlens); got {count}")
    return described


def _counted(cu_seqlens: Tensor, count, name: str) -> tuple[int | None, _Known | None]:
    """A helper's ``atoms`` or ``pairs`` (``name``): an int >= 0 or None, checked against ``cu_seqlens`` where its
    values may be read (and then taken from them when None); with the values, or None where they are hidden."""
    count = _size(count, name, optional=True)
    known = _values_if_shown(cu_seqlens, None if count is not None else name)
    return (count, None) if known is None else (_check_count(count, known, name), known)


def _check_width(width, known: _Known, name: str = "max_seqlen") -> int:
    """A padded width (``max_seqlen``, or the N of an ``x``): None takes the longest molecule."""
    if width is None:
        return known.longest
    if width < known.longest:
        raise ValueError(f"{name}: expected at least the longest molecule ({known.longest} atoms); got {width}")
    return width


def _check_rows(x: Tensor, known: _Known, what: str) -> None:
    rows = known.atoms if what == "atoms" else known.pairs
    if x.shape[0] != rows:
        raise ValueError(f"x: cu_seqlens describes {rows} {what}, but x has {x.shape[0]} rows "
                         f"(shape {tuple(x.shape)})")


def check_cu_seqlens(cu_seqlens: Tensor, *, total: int | None = None, name: str = "cu_seqlens") -> None:
    """Raise unless ``cu_seqlens`` is a 1-D int32 tensor starting at 0 and non-decreasing (``TypeError`` for a
    non-tensor or a ``total`` that is no int, else ``ValueError``).

    With ``total`` (an int >= 0), also require ``cu_seqlens[-1] == total``. The value checks read the tensor on
    the host, whatever :func:`pyblend.set_value_checks` says (this is the explicit check): once per tensor and
    version (see the module's notes), every time for an inference tensor; a meta or fake tensor is refused."""
    host_cu_seqlens(cu_seqlens, total=total, name=name)


def host_cu_seqlens(cu_seqlens: Tensor, *, total: int | None = None, name: str = "cu_seqlens") -> np.ndarray:
    """:func:`check_cu_seqlens`, returning the values it read: an int32 numpy array of the caller's own (one
    device-to-host copy, none when the same unchanged tensor was read before; the checks run in numpy, a few
    microseconds, not a torch call each)."""
    _check_form(cu_seqlens, name, (torch.int32,))
    total = _size(total, "total", optional=True)
    known = _read(cu_seqlens, name, again=True)
    if total is not None and known.atoms != total:
        raise ValueError(f"{name}: describes {known.atoms} atoms but the input holds {total}")
    return known.values.astype(np.int32)


# ------------------------------------------------------------------------------------------ public helpers
def seqlens(cu_seqlens: Tensor) -> Tensor:
    """Atoms per molecule, ``(B,)`` int64. ``cu_seqlens``: int32 or int64, checked as the module says."""
    _check_form(cu_seqlens)
    _values_if_shown(cu_seqlens)
    return _seqlens(cu_seqlens)


def pair_offsets(cu_seqlens: Tensor) -> Tensor:
    """Start of each molecule's pair block in a packed per-pair tensor: ``(B+1,)`` int64, last = ``P``. Checks as
    :func:`seqlens`."""
    _check_form(cu_seqlens)
    _values_if_shown(cu_seqlens)
    return _pair_offsets(cu_seqlens)


def atom_molecules(cu_seqlens: Tensor, atoms: int | None = None) -> Tensor:
    """The molecule of every packed atom: ``(T,)`` int64. ``atoms``: T when known (then sized by it, so
    torch.compile traces it). Where values may be read, ``atoms`` must be ``cu_seqlens[-1]``; elsewhere it is
    trusted (None there: a data-dependent size, refused for meta or fake tensors)."""
    _check_form(cu_seqlens)
    atoms, _ = _counted(cu_seqlens, atoms, "atoms")
    return _atom_molecules(cu_seqlens, atoms)


def pair_index(cu_seqlens: Tensor, pairs: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Where every entry of a packed per-pair tensor sits: ``(molecule, i, j)``, each ``(P,)`` int64, with ``i``
    and ``j`` the row and column inside the molecule's ``(N_m, N_m)`` block (add ``cu_seqlens[molecule]`` to index
    the packed atoms). ``pairs``: P when known (then sized by it). No loop over molecules. Checks as
    :func:`atom_molecules`, ``pairs`` against ``sum N_i^2``."""
    _check_form(cu_seqlens)
    pairs, _ = _counted(cu_seqlens, pairs, "pairs")
    return _pair_index(cu_seqlens, pairs)


def prepend_token(cu_seqlens: Tensor, atoms: int | None = None, pairs: int | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The packed layout after one extra token (e.g. a virtual / CLS token) is put first in every molecule.

    Returns ``(token_cu_seqlens, atom_slots, pair_slots)``: ``token_cu_seqlens (B+1,)`` (``cu_seqlens``' dtype) is
    ``cu_seqlens + arange(B+1)`` (molecule m's extra token is row ``token_cu_seqlens[m]``); ``atom_slots (T,)``
    int64 is the row of every atom among the ``T + B`` tokens; ``pair_slots (P,)`` int64 is where every atom pair
    lands among the ``sum (1 + N_m)^2 = P + 2T + B`` token pairs (the pair (i, j) of molecule m moves to
    ``(1 + i, 1 + j)`` of its ``(1 + N_m, 1 + N_m)`` block). The slots not listed hold the extra token's pairs.
    ``atoms``, ``pairs``: T and P when known (then sized by them), checked as in :func:`atom_molecules` and
    :func:`pair_index`. No loop over molecules. Where ``cu_seqlens``' values were read, ``token_cu_seqlens``' are
    known from them: later helpers read it no more.
    """
    _check_form(cu_seqlens)
    atoms = _size(atoms, "atoms", optional=True)
    pairs = _size(pairs, "pairs", optional=True)
    known = _values_if_shown(cu_seqlens, "atoms" if atoms is None else "pairs" if pairs is None else None)
    if known is not None:
        atoms, pairs = _check_count(atoms, known, "atoms"), _check_count(pairs, known, "pairs")
    batch = cu_seqlens.numel() - 1
    token_cu_seqlens = cu_seqlens + torch.arange(batch + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    if known is not None:
        _remember(token_cu_seqlens, known.values + np.arange(batch + 1))
    molecule_of_atom = _atom_molecules(cu_seqlens, atoms)
    atom_slots = torch.arange(molecule_of_atom.numel(), device=cu_seqlens.device) + molecule_of_atom + 1
    molecule, i, j = _pair_index(cu_seqlens, pairs)
    width = _seqlens(token_cu_seqlens)[molecule]
    pair_slots = _pair_offsets(token_cu_seqlens)[molecule] + (i + 1) * width + j + 1
    return token_cu_seqlens, atom_slots, pair_slots


def cu_seqlens_from_mask(mask: Tensor) -> tuple[Tensor, int]:
    """``mask (B, N)`` bool -> ``(cu_seqlens (B+1,) int32, max_seqlen)`` counting the real atoms per row. The
    longest molecule is read on the host (one device-to-host copy); the ``cu_seqlens`` read for it is remembered,
    so the helpers given it read it no more."""
    _check_bool_mask(mask)
    counts = mask.sum(1)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(counts, 0)
    if not counts.numel():
        return cu, 0
    if torch.compiler.is_compiling() or mask.is_meta or is_fake(mask):
        return cu, int(counts.max())  # a graph break; for meta or fake tensors torch's own error
    return cu, _read(cu, "mask").longest


def mask_from_cu_seqlens(cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """``cu_seqlens (B+1,)`` -> ``mask (B, max_seqlen)`` bool, True for each molecule's first N_i positions.
    ``max_seqlen``: an int >= 0, and (where values may be read) at least the longest molecule, whose atoms would
    be cut off."""
    _check_form(cu_seqlens)
    max_seqlen = _size(max_seqlen, "max_seqlen")
    known = _values_if_shown(cu_seqlens)
    if known is not None:
        _check_width(max_seqlen, known)
    return _mask(cu_seqlens, max_seqlen)


def pack_atoms(x: Tensor, mask: Tensor) -> Tensor:
    """``x (B, N, ...)`` with ``mask (B, N)`` bool -> ``(T, ...)`` holding the real atoms in order."""
    _check_bool_mask(mask)
    _check_masked(x, mask, 2, "(B, N, ...)")
    return x[mask]


def pack_pairs(x: Tensor, mask: Tensor) -> Tensor:
    """``x (B, N, N, ...)`` with ``mask (B, N)`` bool -> ``(P, ...)``: each molecule's real block, row-major."""
    _check_bool_mask(mask)
    _check_masked(x, mask, 3, "(B, N, N, ...)")
    return x[mask[:, :, None] & mask[:, None, :]]


def _check_bool_mask(mask: Tensor) -> None:
    # An integer mask would index (x[mask] gathers rows 0 and 1) or count its values instead of its real atoms.
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool tensor (B, N); got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"mask: expected a bool tensor (B, N); got {mask.dtype} {tuple(mask.shape)}")


def _check_masked(x, mask: Tensor, dims: int, meaning: str) -> None:
    # Boolean indexing would name neither argument (or, for a wider x, silently take the first columns).
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor; got {type(x).__name__}")
    expected = (*mask.shape, mask.shape[1])[:dims]
    if x.dim() < dims or tuple(x.shape[:dims]) != expected:
        spelled = "(" + ", ".join(map(str, expected)) + ", ...)"
        raise ValueError(f"x: expected shape {meaning} = {spelled} like mask {tuple(mask.shape)}; got {_describe(x)}")
    if x.device != mask.device:
        raise ValueError(f"x: expected a tensor on {mask.device} like mask; got {_describe(x)}")


def padded_width(cu_seqlens: Tensor, max_seqlen: int | None = None) -> int:
    """The width of a packed batch's padded layout: ``max_seqlen`` when given (where values may be read, checked
    to hold the longest molecule; elsewhere trusted, and torch.compile traces it), else the longest molecule
    (one device-to-host read, none for a ``cu_seqlens`` read before; a meta or fake one is refused)."""
    _check_form(cu_seqlens)
    max_seqlen = _size(max_seqlen, "max_seqlen", optional=True)
    known = _values_if_shown(cu_seqlens, "max_seqlen" if max_seqlen is None else None)
    if known is not None:
        return _check_width(max_seqlen, known)
    return _longest(cu_seqlens) if max_seqlen is None else max_seqlen


def pad_atoms(x: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None, value=0) -> Tensor:
    """``x (T, ...)`` -> ``(B, max_seqlen, ...)``, filling padding with ``value``.

    One gather whose sizes come from the shapes and ``max_seqlen``. ``max_seqlen`` None: the longest molecule.
    Where values may be read, ``cu_seqlens`` is checked, with ``max_seqlen`` and ``x``'s row count against it
    (one device-to-host copy, none for a ``cu_seqlens`` read before); under torch.compile, for meta or fake
    tensors and with value checks off, a given ``max_seqlen`` is trusted and nothing is read
    (``fullgraph=True`` traces it)."""
    width, known = _pad_width(x, cu_seqlens, max_seqlen, "(T, ...)")
    if known is not None:
        _check_rows(x, known, "atoms")
    return _pad_atoms(x, cu_seqlens, width, value)


def pad_pairs(x: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None, value=0) -> Tensor:
    """``x (P, ...)`` -> ``(B, max_seqlen, max_seqlen, ...)``, filling padding with ``value``; checks and
    tracing as :func:`pad_atoms` (``x``'s rows against ``P = sum N_i^2``)."""
    width, known = _pad_width(x, cu_seqlens, max_seqlen, "(P, ...)")
    if known is not None:
        _check_rows(x, known, "pairs")
    return _pad_pairs(x, cu_seqlens, width, value)


def _pad_width(x, cu_seqlens, max_seqlen, meaning: str) -> tuple[int, _Known | None]:
    _check_form(cu_seqlens)
    _check_tensor(x, "x", 1, meaning, cu_seqlens)
    max_seqlen = _size(max_seqlen, "max_seqlen", optional=True)
    known = _values_if_shown(cu_seqlens, "max_seqlen" if max_seqlen is None else None)
    if known is not None:
        return _check_width(max_seqlen, known), known
    return (_longest(cu_seqlens) if max_seqlen is None else max_seqlen), None


def unpad_atoms(x: Tensor, cu_seqlens: Tensor, atoms: int | None = None) -> Tensor:
    """``x (B, N, ...)`` -> ``(T, ...)``, the inverse of :func:`pad_atoms` (what :func:`pack_atoms` gives for
    the mask of ``cu_seqlens``) by one gather. ``atoms``: T when known (then the size comes from it and
    torch.compile traces it). Always checked: ``x``'s B against ``cu_seqlens``; where values may be read also
    ``cu_seqlens``, ``atoms`` and ``x``'s width N (at least the longest molecule)."""
    return _unpad_atoms(x, cu_seqlens, _unpad_count(x, cu_seqlens, atoms, "atoms"))


def unpad_pairs(x: Tensor, cu_seqlens: Tensor, pairs: int | None = None) -> Tensor:
    """``x (B, N, N, ...)`` -> ``(P, ...)``, the inverse of :func:`pad_pairs` by one gather. ``pairs``: P when
    known (then the size comes from it and torch.compile traces it). Checks as :func:`unpad_atoms`, ``pairs``
    against ``sum N_i^2``."""
    return _unpad_pairs(x, cu_seqlens, _unpad_count(x, cu_seqlens, pairs, "pairs"))


def _unpad_count(x, cu_seqlens, count, name: str) -> int | None:
    """The checks of :func:`unpad_atoms` / :func:`unpad_pairs` (``name``: "atoms" / "pairs"); the count to size
    the gather by."""
    _check_form(cu_seqlens)
    _check_padded(x, cu_seqlens, pairs=name == "pairs")
    count, known = _counted(cu_seqlens, count, name)
    if known is not None:
        _check_width(x.shape[1], known, "x.shape[1]")
    return count


# ------------------------------------------------------------------------------ unchecked implementations
def _seqlens(cu_seqlens: Tensor) -> Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def _pair_offsets(cu_seqlens: Tensor) -> Tensor:
    counts = _seqlens(cu_seqlens) ** 2
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _longest(cu_seqlens: Tensor) -> int:
    """The longest molecule computed on the device and read (under torch.compile: a graph break)."""
    lengths = _seqlens(cu_seqlens)
    return int(lengths.max()) if lengths.numel() else 0


def _atom_molecules(cu_seqlens: Tensor, atoms: int | None) -> Tensor:
    lengths = _seqlens(cu_seqlens)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=atoms)


def _pair_index(cu_seqlens: Tensor, pairs: int | None) -> tuple[Tensor, Tensor, Tensor]:
    lengths = _seqlens(cu_seqlens)
    molecule = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths**2,
                                       output_size=pairs)
    total = molecule.numel()
    local = torch.arange(total, device=cu_seqlens.device) - _pair_offsets(cu_seqlens)[molecule]
    # A pair's molecule has at least one atom, so the clamp changes no result. It is for inductor's vectorised CPU
    # code, which also takes the remainder of the zero-filled lanes past the end of a loop's last partial vector
    # and raised ZeroDivisionError there (torch 2.13, likely pytorch/pytorch#191968).
    width = lengths[molecule].clamp(min=1)
    return molecule, torch.div(local, width, rounding_mode="floor"), local % width


def _mask(cu_seqlens: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=cu_seqlens.device)[None, :] < _seqlens(cu_seqlens)[:, None]


def _gather_padded(x: Tensor, index: Tensor, real: Tensor, value) -> Tensor:
    """``x (rows, ...)`` read at ``index`` where ``real``, ``value`` elsewhere: one gather from ``x`` with a row
    of ``value`` appended, sized like ``index`` (so by shapes and ints, never by tensor values). Rows of ``x``
    that no index names are never read."""
    filler = torch.full((1, *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    x = torch.cat([x, filler])
    return x[torch.where(real, index, x.shape[0] - 1)]


def _pad_atoms(x: Tensor, cu_seqlens: Tensor, width: int, value=0) -> Tensor:
    index = cu_seqlens[:-1, None].long() + torch.arange(width, device=x.device)
    return _gather_padded(x, index, _mask(cu_seqlens, width), value)


def _pad_pairs(x: Tensor, cu_seqlens: Tensor, width: int, value=0) -> Tensor:
    lengths = _seqlens(cu_seqlens)
    mask = _mask(cu_seqlens, width)
    local = torch.arange(width, device=x.device)
    index = _pair_offsets(cu_seqlens)[:-1, None, None] + local[:, None] * lengths[:, None, None] + local
    return _gather_padded(x, index, mask[:, :, None] & mask[:, None, :], value)


def _unpad_atoms(x: Tensor, cu_seqlens: Tensor, atoms: int | None) -> Tensor:
    molecule = _atom_molecules(cu_seqlens, atoms)
    position = torch.arange(molecule.numel(), device=x.device) - cu_seqlens.long()[molecule]
    return x[molecule, position]


def _unpad_pairs(x: Tensor, cu_seqlens: Tensor, pairs: int | None) -> Tensor:
    molecule, i, j = _pair_index(cu_seqlens, pairs)
    return x[molecule, i, j]
