"""Plain-PyTorch pair distances and Gaussian-basis relation features (MoleBlend eq. 6-7).

Matches the GaussianLayer of Uni-Mol / Transformer-M: an atom pair of type ``t`` maps its distance ``d`` to
``x = mul[t] * d + bias[t]`` (summed over the pair's type indices when it has several, as Transformer-M sums the
embeddings of (a_i, a_j)), then to K Gaussians
``g_k = exp(-0.5 ((x - mean_k) / s_k)^2) / (sqrt(2 pi) s_k)`` with ``s_k = |stds_k| + 0.01``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layout import mask_from_cu_seqlens, pack_pairs, pad_atoms
from ._norm import vector_norm

__all__ = ["gaussian_basis", "pair_distances", "pair_distances_packed"]

STD_EPSILON = 0.01


def pair_distances(pos: Tensor, mask: Tensor | None = None) -> Tensor:
    """``pos (B, N, 3)`` float, ``mask (B, N)`` bool -> ``(B, N, N)`` Euclidean distances, 0 where masked.

    Masked positions are never read, so NaN padding cannot reach the output or the gradient.
    """
    if mask is not None:
        pos = torch.where(mask[..., None], pos, torch.zeros((), dtype=pos.dtype, device=pos.device))
    distances = vector_norm(pos[:, :, None, :] - pos[:, None, :, :], dim=-1)
    if mask is not None:
        distances = distances * (mask[:, :, None] & mask[:, None, :])
    return distances


def pair_distances_packed(pos: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Packed form: ``pos (T, 3)``, ``cu_seqlens (B+1,)`` int32 -> ``(P,)`` distances."""
    padded = pad_atoms(pos, cu_seqlens)
    mask = mask_from_cu_seqlens(cu_seqlens, padded.shape[1])
    return pack_pairs(pair_distances(padded, mask), mask)


def gaussian_basis(distances: Tensor, pair_types: Tensor, means: Tensor, stds: Tensor, mul: Tensor,
                   bias: Tensor) -> Tensor:
    """Gaussian-basis features of pair distances.

    Args:
        distances: ``(...)`` float, any leading shape (``(B, N, N)`` padded, ``(P,)`` packed).
        pair_types: int, shape ``distances.shape`` (one type per pair, Uni-Mol) or ``distances.shape + (t,)``
            (``t`` type indices per pair whose ``mul``/``bias`` are summed, Transformer-M).
        means, stds: ``(K,)`` kernel centres and raw widths (the width used is ``|stds| + 0.01``).
        mul, bias: ``(num_types,)`` or ``(num_types, 1)`` (an ``nn.Embedding`` weight).

    Returns:
        ``(..., K)`` in the promoted dtype of ``distances`` and ``means``, computed in at least float32.
    """
    out_dtype = torch.promote_types(distances.dtype, means.dtype)
    dtype = torch.promote_types(out_dtype, torch.float32)
    types = pair_types.long()
    if types.dim() == distances.dim():
        types = types[..., None]
    scale = mul.reshape(-1).to(dtype)[types].sum(-1)
    shift = bias.reshape(-1).to(dtype)[types].sum(-1)
    x = (scale * distances.to(dtype) + shift)[..., None]
    width = stds.to(dtype).abs() + STD_EPSILON
    gaussians = torch.exp(-0.5 * ((x - means.to(dtype)) / width) ** 2) / (math.sqrt(2 * math.pi) * width)
    return gaussians.to(out_dtype)
