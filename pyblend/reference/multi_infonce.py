"""Plain-PyTorch multi-pair InfoNCE (MolBind): a weighted sum of symmetric contrastive losses over modality pairs.

Semantics every backend follows (the kernels in :mod:`pyblend.kernels.multi_infonce` match them):

- For a pair ``(a, b)`` only samples present in both count: ``present = masks[a] & masks[b]`` (a missing mask
  means every sample is present). With ``x = a``, ``y = b``, L2-normalised along ``d`` when ``normalize``,
  ``logits = x y^T / temperature`` restricted to present rows and present columns, and
  ``loss_ab = (CE(logits, diag) + CE(logits^T, diag)) / 2``, each cross-entropy averaged over the present
  samples.
- A pair with no present sample in common contributes exactly 0 (value and gradient).
- The total is ``sum_pairs weight * loss_pair``; weights default to ``1 / len(pairs)`` each.
- Absent samples are never read: whatever they hold (NaN included) reaches neither the loss nor a gradient.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["multi_infonce"]


def multi_infonce(embeddings: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]], *,
                  weights: Sequence[float] | None = None, temperature: float | Tensor = 0.1,
                  masks: Mapping[str, Tensor] | None = None, normalize: bool = True) -> Tensor:
    """Differentiable reference of :func:`pyblend.ops.multi_infonce` (inputs are not validated here).

    Computes in float64 for float64 embeddings and in float32 otherwise, materialising each ``(B, B)`` logit
    matrix. Returns a 0-dim tensor in that dtype.
    """
    masks = masks or {}
    if weights is None:
        weights = [1.0 / len(pairs)] * len(pairs)
    total = None
    for (a, b), weight in zip(pairs, weights):
        loss = weight * pair_infonce(embeddings[a], embeddings[b], temperature=temperature,
                                     present=_both(masks.get(a), masks.get(b)), normalize=normalize)
        total = loss if total is None else total + loss
    return total


def pair_infonce(x: Tensor, y: Tensor, *, temperature: float | Tensor = 0.1, present: Tensor | None = None,
                 normalize: bool = True) -> Tensor:
    """Symmetric InfoNCE of one pair: ``x, y (B, d)``, ``present (B,)`` bool or None (all present)."""
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    if present is None:
        present = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    # Absent samples become zeros before anything reads them.
    x, y = (torch.where(present[:, None], e.to(dtype), torch.zeros((), dtype=dtype, device=e.device)) for e in (x, y))
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = x @ y.T / temperature
    pair_present = present[:, None] & present[None, :]
    logits = logits.masked_fill(~pair_present, float("-inf"))
    # Rows and columns of absent samples are all -inf; a finite stand-in keeps their (unused) LSE finite, so
    # no NaN appears in the backward either.
    row_lse = torch.where(present[:, None], logits, 0.0).logsumexp(1)
    col_lse = torch.where(present[None, :], logits, 0.0).logsumexp(0)
    diagonal = torch.where(present, logits.diagonal(), 0.0)
    row_ce = torch.where(present, row_lse - diagonal, 0.0)  # CE(logits, diag) per present row
    col_ce = torch.where(present, col_lse - diagonal, 0.0)  # CE(logits^T, diag) per present column
    count = present.sum().clamp(min=1).to(dtype)  # a pair with nothing in common: 0 / 1 = 0
    return (row_ce.sum() / count + col_ce.sum() / count) / 2


def _both(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if first is None:
        return second
    if second is None:
        return first
    return first & second
