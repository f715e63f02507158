"""The two batch layouts every pyblend op uses, and conversions between them.

**Padded**: per-atom tensors are ``(B, N, ...)`` and per-pair tensors ``(B, N, N, ...)``, with ``mask (B, N)``
bool, True = real atom. Entries that touch a masked atom carry no meaning and are never read as data.

**Packed** (flash-attn's varlen convention): per-atom tensors are ``(T, ...)`` with ``T = sum N_i``, described by
``cu_seqlens (B+1,)`` int32 (molecule ``i`` owns atoms ``cu_seqlens[i]:cu_seqlens[i+1]``) and ``max_seqlen``
(an int). Per-pair tensors are ``(P, ...)`` with ``P = sum N_i^2``: molecule ``i``'s ``(N_i, N_i)`` block is
stored row-major starting at ``pair_offsets(cu_seqlens)[i] = sum_{j<i} N_j^2``.

Both layouts keep atom order: packing a padded batch keeps its real atoms in order, molecule after molecule.
This module imports nothing from the rest of pyblend, so every layer may use it.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "atom_molecules", "check_cu_seqlens", "cu_seqlens_from_mask", "mask_from_cu_seqlens", "pack_atoms", "pack_pairs",
    "pad_atoms", "pad_pairs", "pair_index", "pair_offsets", "prepend_token", "seqlens",
]


def check_cu_seqlens(cu_seqlens: Tensor, *, total: int | None = None, name: str = "cu_seqlens") -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` is a 1-D int32 tensor starting at 0 and non-decreasing.

    With ``total``, also require ``cu_seqlens[-1] == total``. The value checks read the tensor on the host.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"{name}: expected an int32 tensor of shape (B+1,), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    values = cu_seqlens.cpu()
    if values[0].item() != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {values[0].item()}")
    steps = values[1:] - values[:-1]
    if (steps < 0).any():
        at = int(torch.nonzero(steps < 0)[0, 0]) + 1
        raise ValueError(f"{name}: expected non-decreasing values, got {name}[{at}] = {values[at].item()} "
                         f"< {values[at - 1].item()}")
    if total is not None and values[-1].item() != total:
        raise ValueError(f"{name}: describes {values[-1].item()} atoms but the input holds {total}")


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


def _molecule_index(cu_seqlens: Tensor, counts: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device), counts)


def _check_rows(x: Tensor, molecule: Tensor, what: str) -> None:
    if x.shape[0] != molecule.shape[0]:
        raise ValueError(f"x: cu_seqlens describes {molecule.shape[0]} {what}, but x has {x.shape[0]} rows "
                         f"(shape {tuple(x.shape)})")


def _padded_width(lengths: Tensor, max_seqlen: int | None) -> int:
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen: expected >= the longest molecule ({longest} atoms), got {max_seqlen}")
    return max_seqlen


def pad_atoms(x: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None, value=0) -> Tensor:
    """``x (T, ...)`` -> ``(B, max_seqlen, ...)``, filling padding with ``value``."""
    lengths = seqlens(cu_seqlens)
    width = _padded_width(lengths, max_seqlen)
    out = x.new_full((lengths.numel(), width, *x.shape[1:]), value)
    molecule = _molecule_index(cu_seqlens, lengths)
    _check_rows(x, molecule, "atoms")
    position = torch.arange(x.shape[0], device=x.device) - cu_seqlens.long()[molecule]
    out[molecule, position] = x
    return out


def pad_pairs(x: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None, value=0) -> Tensor:
    """``x (P, ...)`` -> ``(B, max_seqlen, max_seqlen, ...)``, filling padding with ``value``."""
    lengths = seqlens(cu_seqlens)
    width = _padded_width(lengths, max_seqlen)
    out = x.new_full((lengths.numel(), width, width, *x.shape[1:]), value)
    molecule = _molecule_index(cu_seqlens, lengths**2)
    _check_rows(x, molecule, "pairs")
    local = torch.arange(x.shape[0], device=x.device) - pair_offsets(cu_seqlens)[molecule]
    n = lengths[molecule]
    out[molecule, local // n, local % n] = x
    return out
