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

Across ranks (:func:`pyblend.ops.multi_infonce` gathers; this module never communicates), the global batch is
every rank's local batch in rank order, and rank ``r`` holding samples ``offset .. offset + M - 1`` computes only
its rows of both directions (:func:`local_multi_infonce`): row ``i``'s cross-entropy of its local ``x_i``
against every gathered ``y`` and of its local ``y_i`` against every gathered ``x``, the positive at column
``offset + i`` (MolBind's labels offset by rank), summed and divided by ``2 n``, ``n`` the pair's GLOBAL count
of present samples. These shares add up over the ranks to the single-process loss of the global batch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._norm import vector_norm

__all__ = ["local_multi_infonce", "local_pair_infonce", "multi_infonce", "pair_infonce"]


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
        x, y = _normalize(x), _normalize(y)
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


def local_multi_infonce(local: Mapping[str, Tensor], gathered: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]],
                        *, offset: int, weights: Sequence[float] | None = None, temperature: float | Tensor = 0.1,
                        gathered_masks: Mapping[str, Tensor] | None = None, normalize: bool = True) -> Tensor:
    """One rank's share of :func:`multi_infonce` over the global batch (inputs are not validated here).

    Args:
        local: modality -> ``(M, d)``, this rank's samples (rows ``offset .. offset + M - 1`` of the global batch).
        gathered: modality -> ``(N, d)``, every rank's samples in rank order (with or without autograd history:
            a detached copy gives the public code's gradient, only through the local rows).
        gathered_masks: modality -> ``(N,)`` bool, as :func:`multi_infonce`'s masks, over the global batch.

    Returns the weighted sum over pairs of :func:`local_pair_infonce`, a 0-dim float32 (float64) tensor; the sum
    of every rank's share is :func:`multi_infonce` of the global batch.
    """
    gathered_masks = gathered_masks or {}
    if weights is None:
        weights = [1.0 / len(pairs)] * len(pairs)
    total = None
    for (a, b), weight in zip(pairs, weights):
        loss = weight * local_pair_infonce(local[a], local[b], gathered[a], gathered[b], offset=offset,
                                           temperature=temperature, normalize=normalize,
                                           present=_both(gathered_masks.get(a), gathered_masks.get(b)))
        total = loss if total is None else total + loss
    return total


def local_pair_infonce(x: Tensor, y: Tensor, x_all: Tensor, y_all: Tensor, *, offset: int,
                       temperature: float | Tensor = 0.1, present: Tensor | None = None,
                       normalize: bool = True) -> Tensor:
    """One rank's share of :func:`pair_infonce` over the global batch: ``x, y (M, d)`` local, ``x_all, y_all
    (N, d)`` gathered, ``present (N,)`` bool over the global batch or None. Materialises two ``(M, N)`` logit
    matrices: ``x y_all^T / t`` and ``y x_all^T / t``, each row's positive at column ``offset + i``."""
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    rows = x.shape[0]
    if present is None:
        present = torch.ones(x_all.shape[0], dtype=torch.bool, device=x.device)
    local_present = present[offset:offset + rows]

    def prepare(e, keep):
        e = torch.where(keep[:, None], e.to(dtype), torch.zeros((), dtype=dtype, device=e.device))
        return _normalize(e) if normalize else e

    x, y = prepare(x, local_present), prepare(y, local_present)
    x_all, y_all = prepare(x_all, present), prepare(y_all, present)
    pair_present = local_present[:, None] & present[None, :]
    labels = torch.arange(rows, device=x.device) + offset

    def row_cross_entropy(first, second_all):
        logits = (first @ second_all.T / temperature).masked_fill(~pair_present, float("-inf"))
        lse = torch.where(local_present[:, None], logits, 0.0).logsumexp(1)
        positive = torch.where(local_present, logits.gather(1, labels[:, None]).squeeze(1), 0.0)
        return torch.where(local_present, lse - positive, 0.0).sum()

    count = present.sum().clamp(min=1).to(dtype)  # the GLOBAL count
    return (row_cross_entropy(x, y_all) + row_cross_entropy(y, x_all)) / (2 * count)


def _normalize(e: Tensor) -> Tensor:
    """``F.normalize(e, dim=-1)`` (eps 1e-12), twice differentiable at a zero row."""
    return e / vector_norm(e, dim=-1, keepdim=True).clamp_min(1e-12)


def _both(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if first is None:
        return second
    if second is None:
        return first
    return first & second
