"""The two batch layouts every pyblend op uses, and conversions between them.

**Padded**: per-atom tensors are ``(B, N, ...)`` and per-pair tensors ``(B, N, N, ...)``, with ``mask (B, N)``
bool, True = real atom. Entries that touch a masked atom carry no meaning and are never read as data.

**Packed** (flash-attn's varlen convention): per-atom tensors are ``(T, ...)`` with ``T = sum N_i``, described by
``cu_seqlens (B+1,)`` int32 (molecule ``i`` owns atoms ``cu_seqlens[i]:cu_seqlens[i+1]``) and ``max_seqlen``
(an int). Per-pair tensors are ``(P, ...)`` with ``P = sum N_i^2``: molecule ``i``'s ``(N_i, N_i)`` block is
stored row-major starting at ``pair_offsets(cu_seqlens)[i] = sum_{j<i} N_j^2``.

Both layouts keep atom order: packing a padded batch keeps its real atoms in order, molecule after molecule.
The helpers given their sizes (``pad_*`` a width, ``unpad_*``, ``atom_molecules``, ``pair_index`` and
``prepend_token`` their counts) read no tensor's values, so ``torch.compile(fullgraph=True)`` traces them.
This module imports nothing from the rest of pyblend, so every layer may use it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._values import values_hidden

__all__ = [
    "atom_molecules", "check_cu_seqlens", "cu_seqlens_from_mask", "host_cu_seqlens", "mask_from_cu_seqlens",
    "pack_atoms", "pack_pairs", "pad_atoms", "pad_pairs", "padded_width", "pair_index", "pair_offsets",
    "prepend_token", "seqlens", "unpad_atoms", "unpad_pairs",
]


def check_cu_seqlens(cu_seqlens: Tensor, *, total: int | None = None, name: str = "cu_seqlens") -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` is a 1-D int32 tensor starting at 0 and non-decreasing.

    With ``total``, also require ``cu_seqlens[-1] == total``. The value checks read the tensor on the host.
    """
    host_cu_seqlens(cu_seqlens, total=total, name=name)


def host_cu_seqlens(cu_seqlens: Tensor, *, total: int | None = None, name: str = "cu_seqlens") -> np.ndarray:
    """:func:`check_cu_seqlens`, returning the values it read: an int32 numpy array (one device-to-host copy;
    the checks run in numpy, a few microseconds, not a torch call each)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"{name}: expected an int32 tensor of shape (B+1,), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    values = cu_seqlens.cpu().numpy()
    if values[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {values[0]}")
    steps = np.diff(values)
    if (steps < 0).any():
        at = int(np.flatnonzero(steps < 0)[0]) + 1
        raise ValueError(f"{name}: expected non-decreasing values, got {name}[{at}] = {values[at]} "
                         f"< {values[at - 1]}")
    if total is not None and values[-1] != total:
        raise ValueError(f"{name}: describes {values[-1]} atoms but the input holds {total}")
    return values


def seqlens(cu_seqlens: Tensor) -> Tensor:
    """Atoms per molecule, ``(B,)`` int64."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def pair_offsets(cu_seqlens: Tensor) -> Tensor:
    """Start of each molecule's pair block in a packed per-pair tensor: ``(B+1,)`` int64, last = ``P``."""
    counts = seqlens(cu_seqlens) ** 2
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def atom_molecules(cu_seqlens: Tensor, atoms: int | None = None) -> Tensor:
    """The molecule of every packed atom: ``(T,)`` int64. ``atoms``: T when known (saves a device-to-host read)."""
    lengths = seqlens(cu_seqlens)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=atoms)


def pair_index(cu_seqlens: Tensor, pairs: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Where every entry of a packed per-pair tensor sits: ``(molecule, i, j)``, each ``(P,)`` int64, with ``i``
    and ``j`` the row and column inside the molecule's ``(N_m, N_m)`` block (add ``cu_seqlens[molecule]`` to index
    the packed atoms). ``pairs``: P when known (saves a device-to-host read). No loop over molecules."""
    lengths = seqlens(cu_seqlens)
    molecule = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths**2,
                                       output_size=pairs)
    total = molecule.numel()
    local = torch.arange(total, device=cu_seqlens.device) - pair_offsets(cu_seqlens)[molecule]
    width = lengths[molecule]
    return molecule, torch.div(local, width, rounding_mode="floor"), local % width


def prepend_token(cu_seqlens: Tensor, atoms: int | None = None, pairs: int | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The packed layout after one extra token (e.g. a virtual / CLS token) is put first in every molecule.

    Returns ``(token_cu_seqlens, atom_slots, pair_slots)``: ``token_cu_seqlens (B+1,)`` int32 is
    ``cu_seqlens + arange(B+1)`` (molecule m's extra token is row ``token_cu_seqlens[m]``); ``atom_slots (T,)``
    int64 is the row of every atom among the ``T + B`` tokens; ``pair_slots (P,)`` int64 is where every atom pair
    lands among the ``sum (1 + N_m)^2 = P + 2T + B`` token pairs (the pair (i, j) of molecule m moves to
    ``(1 + i, 1 + j)`` of its ``(1 + N_m, 1 + N_m)`` block). The slots not listed hold the extra token's pairs.
    ``atoms``, ``pairs``: T and P when known (each saves a device-to-host read). No loop over molecules.
    """
    batch = cu_seqlens.numel() - 1
    token_cu_seqlens = cu_seqlens + torch.arange(batch + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    molecule_of_atom = atom_molecules(cu_seqlens, atoms)
    atom_slots = torch.arange(molecule_of_atom.numel(), device=cu_seqlens.device) + molecule_of_atom + 1
    molecule, i, j = pair_index(cu_seqlens, pairs)
    width = seqlens(token_cu_seqlens)[molecule]
    pair_slots = pair_offsets(token_cu_seqlens)[molecule] + (i + 1) * width + j + 1
    return token_cu_seqlens, atom_slots, pair_slots


def cu_seqlens_from_mask(mask: Tensor) -> tuple[Tensor, int]:
    """``mask (B, N)`` bool -> ``(cu_seqlens (B+1,) int32, max_seqlen)`` counting the real atoms per row."""
    _check_bool_mask(mask)
    counts = mask.sum(1)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(counts, 0)
    return cu, int(counts.max()) if counts.numel() else 0


def mask_from_cu_seqlens(cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """``cu_seqlens (B+1,)`` -> ``mask (B, max_seqlen)`` bool, True for each molecule's first N_i positions."""
    return torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < seqlens(cu_seqlens)[:, None]


def pack_atoms(x: Tensor, mask: Tensor) -> Tensor:
    """``x (B, N, ...)`` with ``mask (B, N)`` -> ``(T, ...)`` holding the real atoms in order."""
    _check_bool_mask(mask)
    return x[mask]


def pack_pairs(x: Tensor, mask: Tensor) -> Tensor:
    """``x (B, N, N, ...)`` with ``mask (B, N)`` -> ``(P, ...)``: each molecule's real block, row-major."""
    _check_bool_mask(mask)
    return x[mask[:, :, None] & mask[:, None, :]]


def _check_bool_mask(mask: Tensor) -> None:
    # An integer mask would index (x[mask] gathers rows 0 and 1) or count its values instead of its real atoms.
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"mask: expected a bool tensor (B, N); got {mask.dtype} {tuple(mask.shape)}")


def padded_width(cu_seqlens: Tensor, max_seqlen: int | None = None) -> int:
    """The width of a packed batch's padded layout: ``max_seqlen`` when given (not read from ``cu_seqlens``:
    torch.compile traces it), else the longest molecule (one device-to-host read)."""
    if max_seqlen is not None:
        return max_seqlen
    lengths = seqlens(cu_seqlens)
    return int(lengths.max()) if lengths.numel() else 0


def _checked_width(x: Tensor, lengths: Tensor, max_seqlen: int | None, what: str) -> int:
    """The padded width, after checking on the host (one device-to-host copy) that ``max_seqlen`` holds the
    longest molecule and that ``x`` has the rows (``what``: "atoms" or "pairs") that ``cu_seqlens`` describes.
    Under torch.compile (and for meta or fake tensors) a given ``max_seqlen`` is trusted instead: nothing is
    read."""
    if max_seqlen is not None and values_hidden(lengths):
        return max_seqlen
    host = lengths.cpu()
    longest = int(host.max()) if host.numel() else 0
    if max_seqlen is None:
        max_seqlen = longest
    elif max_seqlen < longest:
        raise ValueError(f"max_seqlen: expected >= the longest molecule ({longest} atoms), got {max_seqlen}")
    if (host < 0).any():
        raise ValueError(f"cu_seqlens: expected non-decreasing values, got molecule lengths {host.tolist()}")
    rows = int((host if what == "atoms" else host**2).sum())
    if x.shape[0] != rows:
        raise ValueError(f"x: cu_seqlens describes {rows} {what}, but x has {x.shape[0]} rows "
                         f"(shape {tuple(x.shape)})")
    return max_seqlen


def _gather_padded(x: Tensor, index: Tensor, real: Tensor, value) -> Tensor:
    """``x (rows, ...)`` read at ``index`` where ``real``, ``value`` elsewhere: one gather from ``x`` with a row
    of ``value`` appended, sized like ``index`` (so by shapes and ints, never by tensor values). Rows of ``x``
    that no index names are never read."""
    filler = torch.full((1, *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    x = torch.cat([x, filler])
    return x[torch.where(real, index, x.shape[0] - 1)]


def pad_atoms(x: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None, value=0) -> Tensor:
    """``x (T, ...)`` -> ``(B, max_seqlen, ...)``, filling padding with ``value``.

    One gather whose sizes come from the shapes and ``max_seqlen``. ``max_seqlen`` None: the longest molecule.
    Eager calls check ``max_seqlen`` and the row count on the host (one device-to-host copy); under
    torch.compile a given ``max_seqlen`` is trusted and nothing is read (``fullgraph=True`` traces it)."""
    lengths = seqlens(cu_seqlens)
    width = _checked_width(x, lengths, max_seqlen, "atoms")
    index = cu_seqlens[:-1, None].long() + torch.arange(width, device=x.device)
    return _gather_padded(x, index, mask_from_cu_seqlens(cu_seqlens, width), value)


def pad_pairs(x: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None, value=0) -> Tensor:
    """``x (P, ...)`` -> ``(B, max_seqlen, max_seqlen, ...)``, filling padding with ``value``; checks and
    tracing as :func:`pad_atoms`."""
    lengths = seqlens(cu_seqlens)
    width = _checked_width(x, lengths, max_seqlen, "pairs")
    mask = mask_from_cu_seqlens(cu_seqlens, width)
    local = torch.arange(width, device=x.device)
    index = pair_offsets(cu_seqlens)[:-1, None, None] + local[:, None] * lengths[:, None, None] + local
    return _gather_padded(x, index, mask[:, :, None] & mask[:, None, :], value)


def unpad_atoms(x: Tensor, cu_seqlens: Tensor, atoms: int | None = None) -> Tensor:
    """``x (B, N, ...)`` -> ``(T, ...)``, the inverse of :func:`pad_atoms` (what :func:`pack_atoms` gives for
    the mask of ``cu_seqlens``) by one gather. ``atoms``: T when known (saves a device-to-host read; then the
    size comes from it and torch.compile traces it)."""
    molecule = atom_molecules(cu_seqlens, atoms)
    position = torch.arange(molecule.numel(), device=x.device) - cu_seqlens.long()[molecule]
    return x[molecule, position]


def unpad_pairs(x: Tensor, cu_seqlens: Tensor, pairs: int | None = None) -> Tensor:
    """``x (B, N, N, ...)`` -> ``(P, ...)``, the inverse of :func:`pad_pairs` by one gather. ``pairs``: P when
    known (saves a device-to-host read; then the size comes from it and torch.compile traces it)."""
    molecule, i, j = pair_index(cu_seqlens, pairs)
    return x[molecule, i, j]
