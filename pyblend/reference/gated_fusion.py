"""Plain-PyTorch dynamic gated fusion (IBM Dynamic Fusion, eq. 1-4).

Semantics every backend follows (the kernels in :mod:`pyblend.kernels.gated_fusion` match them), per sample,
for M modalities already projected to a common width C (``h (B, M, C)``), their intra-modal gate logits
``gate_logits (B, M, C)`` (``W_s h``) and inter-modal score logits ``score_logits (B, M)``:

- eq. 1-2, intra-modal soft gating: ``g_m = softmax over the C features of gate_logits_m`` (C weights summing to
  1), ``x~_m = gate_scale * g_m * h_m`` (``gate_scale = 1`` is the paper's; ``C`` makes an all-equal gate the
  identity).
- eq. 3, inter-modal gated sum: ``s = softmax of score_logits over the PRESENT modalities`` (exactly 0 at a
  missing one), ``fused = sum_m s_m x~_m``.
- eq. 4: ``entropy = -sum_{m present} s_m log(s_m + eps)``.
- A missing modality is never read: whatever its ``h``, ``gate_logits`` and ``score_logits`` hold (NaN
  included) reaches no output and no gradient. A sample with no present modality gets ``fused = 0``, weights 0
  and entropy 0 here (:func:`pyblend.ops.gated_fusion` refuses it).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gated_fusion"]


def gated_fusion(h: Tensor, gate_logits: Tensor, score_logits: Tensor, present: Tensor | None = None, *,
                 eps: float = 1e-8, gate_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable reference of :func:`pyblend.ops.gated_fusion` (inputs are not validated here).

    Computes in float64 for float64 inputs and in float32 otherwise. Returns ``(fused (B, C), weights (B, M),
    entropy (B,))``: ``fused`` in ``h``'s dtype, the weights and the entropy in the compute dtype.
    """
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    out_dtype = h.dtype
    batch, modalities, _ = h.shape
    if present is None:
        present = torch.ones(batch, modalities, dtype=torch.bool, device=h.device)
    zero = torch.zeros((), dtype=compute, device=h.device)
    # Missing modalities become zeros before anything reads them (where, not multiplication: NaN * 0 is NaN).
    h = torch.where(present[..., None], h.to(compute), zero)
    gate_logits = torch.where(present[..., None], gate_logits.to(compute), zero)
    gated = gate_scale * torch.softmax(gate_logits, dim=-1) * h                      # eq. 1-2

    any_present = present.any(dim=1, keepdim=True)
    scores = torch.where(present, score_logits.to(compute), float("-inf"))
    scores = torch.where(any_present, scores, zero)  # a row with nothing present: finite, then zeroed below
    weights = torch.where(present, torch.softmax(scores, dim=-1), zero)             # eq. 3 weights
    fused = (weights[..., None] * gated).sum(dim=1)                                  # eq. 3
    entropy = -torch.where(present, weights * torch.log(weights + eps), zero).sum(dim=1)  # eq. 4
    return fused.to(out_dtype), weights, entropy
