"""Plain-PyTorch outer-product relation heads (MoleBlend eq. 10-11) and their losses.

Semantics every backend follows (the kernels in :mod:`pyblend.kernels.outer_product` match them). The inputs
are the outputs of the per-atom row/col projections (``Linear -> GELU -> LayerNorm``, done by the module):
``row (B, N, d1)``, ``col (B, N, d2)`` (packed ``(T, d1)``, ``(T, d2)``), and an ``nn.Linear(d1 * d2, C)``:
``weight (C, d1 * d2)``, ``bias (C,)`` or None.

- Logits: ``logits[b, i, j] = weight @ flatten(row[b, i][:, None] * col[b, j][None, :]) + bias``, i.e. the input
  index of ``weight`` is ``a * d2 + b`` for row feature ``a`` and col feature ``b``. Pairs touching a padded
  atom hold 0 (padded layout; the packed layout has no padding).
- Cross-entropy (``groups = G``): the ``C = G * K`` logits of a pair are G independent softmaxes over the
  consecutive blocks ``[g K, (g + 1) K)``; ``target[..., g]`` in ``[0, K)`` or ``ignore_index``. The loss is the
  mean over the non-ignored (pair, group) targets of real pairs (pairs touching padding are ignored whatever
  their target); with none, 0 (value and gradients), never NaN.
- Cosine (C = 3): ``pred_ij = logits[i, j]``, ``delta_ij = pos_j - pos_i``; the loss is the mean over the real
  pairs with ``delta_ij != 0`` (``i != j``, atoms not coincident: the public MoleBlend code leaves out the same
  zero targets) of ``1 - cos(pred_ij, delta_ij)``, where ``cos`` is defined as 0 when the prediction is exactly
  zero, with zero gradient there. No such pair (single-atom molecules only) gives 0.
  ``positions`` are constants: no gradient flows to them.
- Padded entries of ``row``/``col``/``positions`` are never read as data: NaN there reaches nothing.

Under ``torch.compile`` (packed: with an int ``max_seqlen``) packed inputs are padded by gathers whose sizes are
``(B, max_seqlen)``, never read from ``cu_seqlens`` (:func:`pyblend.layout.pad_atoms`, ``pad_pairs``), so the
losses and the padded logits trace without a data-dependent size. The packed logits select the real pairs by a
boolean mask: a tensor of data-dependent length ``P = sum N_i^2``, which torch.compile traces with
``fullgraph=True`` (otherwise a graph break).

Everything materialises ``(B, N, N, d1 * d2)`` and ``(B, N, N, C)``: this is the ground truth and the baseline,
not a way to train. Computes in float64 for float64 inputs and in float32 otherwise; losses are returned in the
compute dtype, logits in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import mask_from_cu_seqlens, pack_pairs, pad_atoms, pad_pairs, padded_width

__all__ = ["cosine_loss_of_logits", "outer_product_cosine_loss", "outer_product_logits", "outer_product_loss"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _padded(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, max_seqlen: int | None):
    """Per-atom ``x`` in the padded layout with its mask, padded entries zeroed (never read as data)."""
    if cu_seqlens is not None:
        width = padded_width(cu_seqlens, max_seqlen)
        x, mask = pad_atoms(x, cu_seqlens, width), mask_from_cu_seqlens(cu_seqlens, width)
    elif mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(mask[..., None], x, zero), mask


def _padded_logits(row, col, weight, bias, mask, cu_seqlens, max_seqlen):
    """float32/64 logits ``(B, N, N, C)`` (pairs at padding hold the bias: callers mask them) and the mask."""
    compute = _compute_dtype(row)
    row, mask = _padded(row.to(compute), mask, cu_seqlens, max_seqlen)
    col, _ = _padded(col.to(compute), mask if cu_seqlens is None else None, cu_seqlens, max_seqlen)
    # The public MoleBlend head: the flattened outer product through nn.Linear.
    outer = row[:, :, None, :, None] * col[:, None, :, None, :]
    outer = outer.flatten(-2)
    logits = F.linear(outer, weight.to(compute), None if bias is None else bias.to(compute))
    return logits, mask


def outer_product_logits(row: Tensor, col: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                         mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                         max_seqlen: int | None = None) -> Tensor:
    """Pair logits, padded ``(B, N, N, C)`` (0 at pairs touching padding) or packed ``(P, C)``, in ``row``'s
    dtype. Differentiable; inputs are not validated here (see :func:`pyblend.ops.outer_product_logits`)."""
    logits, mask = _padded_logits(row, col, weight, bias, mask, cu_seqlens, max_seqlen)
    pairs = mask[:, :, None] & mask[:, None, :]
    if cu_seqlens is not None:
        return pack_pairs(logits, mask).to(row.dtype)
    return torch.where(pairs[..., None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device)
                       ).to(row.dtype)


def outer_product_loss(row: Tensor, col: Tensor, weight: Tensor, bias: Tensor | None = None,
                       target: Tensor | None = None, *, groups: int = 1, ignore_index: int = -100,
                       mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                       max_seqlen: int | None = None) -> Tensor:
    """Mean cross-entropy of the pair logits over the non-ignored (pair, group) targets: a scalar in the compute
    dtype (float32, or float64 for float64 inputs). ``target``: integer padded ``(B, N, N)`` / ``(B, N, N, G)``,
    packed ``(P,)`` / ``(P, G)``."""
    logits, mask = _padded_logits(row, col, weight, bias, mask, cu_seqlens, max_seqlen)
    batch, width = mask.shape
    classes = logits.shape[-1] // groups
    target = target.long()
    if cu_seqlens is not None:
        target = pad_pairs(target, cu_seqlens, width, value=ignore_index)
    target = target.reshape(batch, width, width, groups)
    pairs = mask[:, :, None] & mask[:, None, :]
    target = torch.where(pairs[..., None], target, torch.full_like(target, ignore_index))
    total = F.cross_entropy(logits.reshape(-1, classes), target.reshape(-1), ignore_index=ignore_index,
                            reduction="sum")
    count = (target != ignore_index).sum()
    return total / count.clamp(min=1).to(total.dtype)


def outer_product_cosine_loss(row: Tensor, col: Tensor, weight: Tensor, bias: Tensor | None = None,
                              positions: Tensor | None = None, *, mask: Tensor | None = None,
                              cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                              reduction: str = "pairs") -> Tensor:
    """Mean over real pairs with ``pos_j != pos_i`` of ``1 - cos(logits_ij, pos_j - pos_i)`` (C = 3), ``cos = 0``
    where the prediction is zero: a scalar in the compute dtype (``reduction="molecules"``: each molecule's mean,
    then their mean over the molecules with a pair). ``positions``: padded ``(B, N, 3)`` / packed ``(T, 3)``, not
    differentiated."""
    logits, mask = _padded_logits(row, col, weight, bias, mask, cu_seqlens, max_seqlen)
    pos, _ = _padded(positions.detach().to(logits.dtype), mask if cu_seqlens is None else None, cu_seqlens,
                     max_seqlen)
    return cosine_loss_of_logits(logits, pos, mask, reduction)


def cosine_loss_of_logits(logits: Tensor, positions: Tensor, mask: Tensor, reduction: str = "pairs") -> Tensor:
    """The cosine loss of padded ``logits (B, N, N, 3)`` against padded ``positions (B, N, 3)`` (constants) over
    the real pairs of ``mask (B, N)`` with ``pos_j != pos_i``: a scalar in the logits' dtype, the mean over the
    pairs of the batch (``reduction="pairs"``) or over the molecules of each molecule's mean (``"molecules"``,
    molecules without a pair left out)."""
    pos = positions.detach()
    delta = pos[:, None, :, :] - pos[:, :, None, :]  # [b, i, j] = pos_j - pos_i
    pp = (logits * logits).sum(-1)
    dd = (delta * delta).sum(-1)
    # delta = 0 (i == j, coincident atoms): no direction. NaN counts (dd != 0): the loss is NaN, no atom left out.
    pairs = mask[:, :, None] & mask[:, None, :] & (dd != 0)
    nonzero = pairs & (pp > 0)
    # where() inside the square roots too: the gradient of the unused branch must not be NaN at a zero vector.
    # Two roots, not rsqrt(pp * dd): the product overflows float32 once |p| |d| > 1.8e19.
    one = torch.ones_like(pp)
    norms = torch.where(nonzero, pp, one).sqrt() * torch.where(nonzero, dd, one).sqrt()
    inverse = torch.where(nonzero, 1 / norms, torch.zeros_like(pp))
    cosine = (logits * delta).sum(-1) * inverse
    per_pair = torch.where(pairs, 1 - cosine, torch.zeros_like(cosine))
    if reduction == "pairs":
        return per_pair.sum() / pairs.sum().clamp(min=1).to(per_pair.dtype)
    counts = pairs.sum((1, 2))
    per_molecule = per_pair.sum((1, 2)) / counts.clamp(min=1).to(per_pair.dtype)
    return per_molecule.sum() / (counts > 0).sum().clamp(min=1).to(per_pair.dtype)
