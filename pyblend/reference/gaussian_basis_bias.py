"""Plain-PyTorch Gaussian-basis attention bias (MoleBlend eq. 6-7; Uni-Mol / Transformer-M ``GaussianLayer`` +
``NonLinear`` projection), padded and packed. Materialises the ``(B, N, N, K)`` Gaussian features: this is the
readable ground truth the fused kernels in :mod:`pyblend.kernels.gaussian_basis_bias` are checked against.

Semantics every backend follows, for each real atom pair ``(i, j)`` of a molecule (the diagonal included):

    d      = ||pos_i - pos_j||
    x      = mul_ij * d + bias_ij        mul_ij = mul[t] (one type id per pair, Uni-Mol) or
                                         mul[t0] + mul[t1] (two ids per pair, Transformer-M); bias_ij likewise
    g_k    = exp(-0.5 ((x - means_k) / s_k)^2) / (sqrt(2 pi) s_k),     s_k = |stds_k| + std_eps
    bias   = W2 gelu(W1 g + b1) + b2     (H values; gelu in its exact erf form, torch's default)
    atom_i = sum over the real atoms j (j = i included) of g_ij          (K values; Transformer-M's 3D feature)

Pairs touching a padded atom get 0 in the bias, padded atoms 0 in the atom features, and nothing stored at a
padded atom (NaN included) reaches an output or a gradient. The public code writes ``sqrt(2 * 3.14159)``; this
uses ``sqrt(2 pi)`` (relative difference 4e-7).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import mask_from_cu_seqlens, pad_atoms, pad_pairs, padded_width, unpad_atoms, unpad_pairs
from ._norm import vector_norm

__all__ = ["gaussian_basis_bias", "gaussian_basis_bias_features"]


def gaussian_basis_bias_features(positions: Tensor, pair_types: Tensor, means: Tensor, stds: Tensor, mul: Tensor,
                                 bias: Tensor, mask: Tensor | None = None, *, std_eps: float = 1e-2) -> Tensor:
    """The ``(B, N, N, K)`` Gaussian features of the padded layout (0 at pairs touching a padded atom), in the
    compute dtype: float64 if any input is float64, else float32."""
    compute = _compute_dtype(positions, means, stds, mul, bias)
    batch, atoms, _ = positions.shape
    if mask is None:
        mask = torch.ones(batch, atoms, dtype=torch.bool, device=positions.device)
    zero = torch.zeros((), dtype=compute, device=positions.device)
    # where, not multiplication: a NaN at a padded atom times 0 is still NaN.
    pos = torch.where(mask[..., None], positions.to(compute), zero)
    pairs = mask[:, :, None] & mask[:, None, :]
    delta = pos[:, :, None, :] - pos[:, None, :, :]
    distances = vector_norm(delta, dim=-1)
    types = pair_types.long()
    if types.dim() == 3:
        types = types[..., None]
    types = torch.where(pairs[..., None], types, 0)  # padded pairs may hold any id
    scale = mul.reshape(-1).to(compute)[types].sum(-1)
    shift = bias.reshape(-1).to(compute)[types].sum(-1)
    x = (scale * distances + shift)[..., None]
    width = stds.to(compute).abs() + std_eps
    g = torch.exp(-0.5 * ((x - means.to(compute)) / width) ** 2) / (math.sqrt(2 * math.pi) * width)
    return torch.where(pairs[..., None], g, zero)


def gaussian_basis_bias(positions: Tensor, pair_types: Tensor, means: Tensor, stds: Tensor, mul: Tensor,
                        bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, *, mask: Tensor | None = None,
                        cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                        std_eps: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Differentiable reference of :func:`pyblend.ops.gaussian_basis_bias` (inputs are not validated here).

    Args:
        positions: padded ``(B, N, 3)`` with ``mask (B, N)`` bool (None: every atom real), or packed ``(T, 3)``
            with ``cu_seqlens (B+1,)`` int32 and ``max_seqlen``.
        pair_types: integer, padded ``(B, N, N)`` / ``(B, N, N, 2)``, packed ``(P,)`` / ``(P, 2)``.
        means, stds: ``(K,)``; mul, bias: ``(n_types, 1)``; w1 ``(K_hidden, K)``, b1 ``(K_hidden,)``,
            w2 ``(H, K_hidden)``, b2 ``(H,)``.

    Returns:
        ``(attn_bias, atom_features)``: padded ``(B, H, N, N)`` and ``(B, N, K)``, packed ``(H, P)`` and
        ``(T, K)``, in ``w1``'s dtype (computed in float64 when an input is float64, else float32).
    """
    if cu_seqlens is not None:
        # Sizes from the shapes and max_seqlen (read from cu_seqlens only when None): torch.compile traces it.
        width = padded_width(cu_seqlens, max_seqlen)
        attn, atom = gaussian_basis_bias(
            pad_atoms(positions, cu_seqlens, width), pad_pairs(pair_types, cu_seqlens, width), means, stds, mul,
            bias, w1, b1, w2, b2, mask=mask_from_cu_seqlens(cu_seqlens, width), std_eps=std_eps)
        return (unpad_pairs(attn.permute(0, 2, 3, 1), cu_seqlens, pair_types.shape[0]).t(),
                unpad_atoms(atom, cu_seqlens, positions.shape[0]))
    batch, atoms, _ = positions.shape
    if mask is None:
        mask = torch.ones(batch, atoms, dtype=torch.bool, device=positions.device)
    compute = _compute_dtype(positions, means, stds, mul, bias, w1, b1, w2, b2)
    g = gaussian_basis_bias_features(positions.to(compute), pair_types, means, stds, mul, bias, mask, std_eps=std_eps)
    hidden = F.gelu(g @ w1.to(compute).t() + b1.to(compute))
    out = hidden @ w2.to(compute).t() + b2.to(compute)
    pairs = mask[:, :, None] & mask[:, None, :]
    out = torch.where(pairs[..., None], out, torch.zeros((), dtype=compute, device=out.device))
    atom_features = g.sum(2)  # g is already 0 at padded j (and at padded i)
    return out.permute(0, 3, 1, 2).to(w1.dtype), atom_features.to(w1.dtype)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
