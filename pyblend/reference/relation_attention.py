"""Plain-PyTorch relation-biased attention: ``O = softmax(Q K^T * scale + Bias + key_mask) V`` per head.

Semantics every backend follows (the kernel in :mod:`pyblend.kernels.relation_attention` matches them):

- Layouts as flash-attn: padded ``q, k, v (B, N, H, D)`` + ``mask (B, N)`` (True = real atom); packed
  ``(T, H, D)`` + ``cu_seqlens (B+1,)`` with per-pair tensors ``(H, P)`` (:mod:`pyblend.layout`).
- Keys of padded atoms are excluded. Rows of padded atoms output zeros and pass no gradient, so a padded batch
  and its packed twin give the same numbers. A row whose every key is excluded (a -inf bias everywhere) outputs
  zeros, never NaN.
- The bias is the sum of a float ``bias`` (broadcast over batch and/or heads) and ``rel_table[rel_index]``. An
  id outside ``[0, R)`` adds nothing and gets no gradient (the op refuses such ids, except under torch.compile,
  where reading them would break the graph).
- ``return_logits`` also gives ``S = Q K^T * scale + Bias``, 0 at pairs touching a padded atom.
- Dropout zeroes probabilities where ``dropout_keep`` is False and scales the rest by ``1 / (1 - dropout_p)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layout import mask_from_cu_seqlens, pad_atoms, pad_pairs, padded_width, pair_index, unpad_atoms

__all__ = ["bias_from_relations", "relation_attention"]


def bias_from_relations(rel_index: Tensor, rel_table: Tensor) -> Tensor:
    """Gather a dense bias: ``rel_index (B, N, N)`` (packed ``(P,)``), ``rel_table (R, H)`` ->
    ``(B, H, N, N)`` (packed ``(H, P)``), in ``rel_table``'s dtype; 0 for an id outside ``[0, R)``."""
    ids = rel_index.long()
    known = ((ids >= 0) & (ids < rel_table.shape[0]))[..., None]
    gathered = torch.where(known, rel_table[torch.where(known[..., 0], ids, 0)], 0.0)  # (..., H)
    return gathered.movedim(-1, 1 if rel_index.dim() == 3 else 0)


def relation_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, *, mask: Tensor | None = None,
                       cu_seqlens: Tensor | None = None, max_seqlen: int | None = None, scale: float | None = None,
                       dropout_p: float = 0.0, dropout_keep: Tensor | None = None, return_logits: bool = False,
                       rel_index: Tensor | None = None, rel_table: Tensor | None = None,
                       generator: torch.Generator | None = None):
    """Differentiable reference of :func:`pyblend.ops.relation_attention`. Computes in the inputs' dtype, and in
    float32 for 16-bit inputs (as the kernels and fairseq's softmax do: in float16 a -1e9 bias would become -inf and
    empty its row); ``out`` and ``S`` come back in the inputs' dtype.

    Args:
        q, k, v: padded ``(B, N, H, D)`` or packed ``(T, H, D)``.
        bias: padded ``(B|1, H|1, N, N)``; packed ``(H|1, P)``. Any float dtype.
        mask: padded ``(B, N)`` bool. cu_seqlens, max_seqlen: the packed layout.
        dropout_keep: bool, the padded ``(B, H, N, N)`` (packed ``(H, P)``) keep pattern; drawn from
            ``generator`` when None and ``dropout_p > 0``.
        rel_index, rel_table: integer ``(B, N, N)`` (packed ``(P,)``) relation ids and a ``(R, H)`` table.

    Returns:
        ``out`` shaped like ``q``; with ``return_logits`` also ``S`` (padded ``(B, H, N, N)``, packed ``(H, P)``).
    """
    if cu_seqlens is not None:
        return _packed(q, k, v, bias, cu_seqlens, max_seqlen, scale, dropout_p, dropout_keep, return_logits,
                       rel_index, rel_table, generator)
    batch, atoms, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if mask is None:
        mask = torch.ones(batch, atoms, dtype=torch.bool, device=q.device)
    # Padded atoms are never read: whatever they hold (NaN included) cannot reach the output or a gradient.
    real_atom = mask[:, :, None, None]
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = (torch.where(real_atom, x.to(work), torch.zeros((), dtype=work, device=x.device)) for x in (q, k, v))
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    pair_real = (mask[:, :, None] & mask[:, None, :])[:, None]  # (B, 1, N, N)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    if bias is not None:
        logits = logits + torch.where(pair_real, bias.to(logits.dtype), zero)
    if rel_table is not None:
        gathered = bias_from_relations(torch.where(pair_real[:, 0], rel_index, 0), rel_table)
        logits = logits + torch.where(pair_real, gathered.to(logits.dtype), zero)
    scores = torch.where(mask[:, None, None, :], logits, float("-inf"))
    # A row whose scores are all -inf gets zeros: softmax runs on a finite stand-in so no NaN reaches the gradient.
    # A NaN or +inf score keeps its row live: the NaN that softmax makes of it reaches the output, as in torch.
    # (amax refuses an empty key axis; with N = 0 there is no row either.)
    peak = scores.amax(-1, keepdim=True) if atoms else scores.sum(-1, keepdim=True)
    row_live = (peak != float("-inf")) & mask[:, None, :, None]
    probs = torch.where(row_live, torch.softmax(torch.where(row_live, scores, zero), dim=-1), zero)
    if dropout_p > 0.0:
        if dropout_keep is None:
            # generator=None left out: torch.compile traces that overload with concrete sizes only (as sample_blend).
            drawn = {} if generator is None else {"generator": generator}
            dropout_keep = torch.rand(probs.shape, device=probs.device, **drawn) >= dropout_p
        probs = torch.where(dropout_keep, probs / (1.0 - dropout_p), zero)
    out = torch.einsum("bhij,bjhd->bihd", probs, v).to(dtype)
    if not return_logits:
        return out
    return out, torch.where(pair_real, logits, zero).to(dtype)


def _packed(q, k, v, bias, cu_seqlens, max_seqlen, scale, dropout_p, dropout_keep, return_logits, rel_index,
            rel_table, generator):
    """The packed layout through the padded one: pad, attend, pack back (a reference, not a fast path). Every
    size comes from the shapes and ``max_seqlen`` (read from ``cu_seqlens`` only when None), so torch.compile
    traces it with ``fullgraph=True``."""
    width = padded_width(cu_seqlens, max_seqlen)
    mask = mask_from_cu_seqlens(cu_seqlens, width)

    def pad_per_pair(x):  # (H|1, P) -> (B, H|1, N, N)
        return pad_pairs(x.transpose(0, 1), cu_seqlens, width).permute(0, 3, 1, 2)

    padded = relation_attention(
        pad_atoms(q, cu_seqlens, width), pad_atoms(k, cu_seqlens, width), pad_atoms(v, cu_seqlens, width),
        None if bias is None else pad_per_pair(bias), mask=mask, scale=scale, dropout_p=dropout_p,
        dropout_keep=None if dropout_keep is None else pad_per_pair(dropout_keep), return_logits=return_logits,
        rel_index=None if rel_index is None else pad_pairs(rel_index, cu_seqlens, width),
        rel_table=rel_table, generator=generator)
    if not return_logits:
        return unpad_atoms(padded, cu_seqlens, q.shape[0])
    out, logits = padded
    # P from a per-pair input's length; without one, read from cu_seqlens (under torch.compile: a data-dependent size).
    per_pair = next((x for x in (bias, rel_index, dropout_keep) if x is not None), None)
    molecule, i, j = pair_index(cu_seqlens, None if per_pair is None else per_pair.shape[-1])
    return unpad_atoms(out, cu_seqlens, q.shape[0]), logits.permute(1, 0, 2, 3)[:, molecule, i, j]
