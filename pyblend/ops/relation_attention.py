"""Relation-biased attention: ``O = softmax(Q K^T * scale + Bias + key_mask) V`` with the gradient of the bias.

Backends: Triton (CUDA tensors, or the interpreter on request) and the plain-PyTorch reference. The Triton
path is a torch.library custom op (``pyblend::relation_attention``, its backward another, both with fake
implementations) so ``torch.compile`` traces it; the reference path is plain differentiable torch ops. Both
trace with ``fullgraph=True`` in either layout (packed: with ``max_seqlen``, as the reference then pads and packs
by gathers sized by the shapes and ``max_seqlen``). Semantics: :mod:`pyblend.reference.relation_attention`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._values import values_hidden
from .. import reference
from ._autograd import call, refuse_double_backward
from ._checks import (
    INTEGER_DTYPES,
    as_tensor,
    check_dtype,
    check_flag,
    check_generator,
    check_mask,
    check_packed_form,
    check_same_device,
    describe,
    id_range,
    is_finite,
    is_real,
    one_or,
    packed_layout,
)
from ._dispatch import choose_backend, triton_reasons

__all__ = ["relation_attention"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_MAX_HEAD_DIM = 256


def relation_attention(q, k, v, bias=None, *, mask=None, cu_seqlens=None, max_seqlen: int | None = None,
                       scale: float | None = None, dropout_p: float = 0.0, return_logits: bool = False,
                       rel_index=None, rel_table=None, generator: torch.Generator | None = None,
                       backend: str | None = None):
    """Multi-head attention over each molecule with an additive per-head pair bias, differentiable in every
    floating-point input (q, k, v, bias, rel_table).

    Args:
        q, k, v: padded ``(B, N, H, D)`` or packed ``(T, H, D)`` (flash-attn's layouts), float16, bfloat16 or
            float32 (float64: reference backend only), one dtype. Any D (8, 16, 24, ... up to 256); no padding.
        bias: float, padded ``(B|1, H|1, N, N)``; packed ``(H|1, P)`` with ``P = sum N_i^2`` and molecule i's
            ``(N_i, N_i)`` block row-major at ``sum_{j<i} N_j^2``. A size-1 dimension is broadcast in place and
            its gradient summed without materialising the broadcast; a stride-0 (expanded) dimension is read in
            place too, but gets the full-shape gradient autograd expects of it.
        mask: ``(B, N)`` bool, True = real atom (padded layout). Default: every atom is real.
        cu_seqlens: ``(B+1,)`` int32, selects the packed layout; ``max_seqlen``: the longest molecule (read from
            ``cu_seqlens`` when None; required under ``torch.compile``, which cannot read it, and then trusted).
        scale: default ``1 / sqrt(D)``.
        dropout_p: dropout on the attention probabilities, with a seed drawn from ``generator`` (default: torch's
            global generator), so ``torch.manual_seed`` makes it reproducible. Backends draw different patterns.
        return_logits: also return ``S = Q K^T * scale + Bias`` (padded ``(B, H, N, N)``, packed ``(H, P)``,
            0 at pairs touching a padded atom), differentiable: a Uni-Mol-style pair update may feed on it.
        rel_index, rel_table: integer ``(B, N, N)`` (packed ``(P,)``) relation ids, int8/int16/int32/int64, and a
            float ``(R, H)`` table; adds ``rel_table[rel_index]`` to the bias inside the kernel, never
            allocating a ``(B, H, N, N)`` tensor. Combines with ``bias``.
        backend: "triton" | "reference" | None (automatic: Triton for CUDA tensors; ``PYBLEND_BACKEND``).

    Returns:
        ``out`` shaped like ``q`` (zeros at padded atoms and rows with no live key), or ``(out, logits)``.

    Outside ``torch.compile``, validation reads ``cu_seqlens`` and the relation ids' range: one small
    device-to-host copy each (none with :class:`pyblend.set_value_checks` off; packed calls then pass
    ``max_seqlen``).
    """
    q, k, v = (as_tensor(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    bias = as_tensor(bias, "bias", optional=True)
    mask = as_tensor(mask, "mask", optional=True)
    cu_seqlens = as_tensor(cu_seqlens, "cu_seqlens", optional=True)
    rel_index = as_tensor(rel_index, "rel_index", optional=True)
    rel_table = as_tensor(rel_table, "rel_table", optional=True)
    packed = cu_seqlens is not None
    check_dtype(q, "q", _FLOAT_DTYPES)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}); got {describe(x)}")
        if x.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}; got {describe(x)}")
    check_same_device(q, "q", k=k, v=v, bias=bias, mask=mask, cu_seqlens=cu_seqlens, rel_index=rel_index,
                      rel_table=rel_table)
    if q.dim() != (3 if packed else 4):
        layout = "packed layout (T, H, D), as cu_seqlens is given" if packed else "padded layout (B, N, H, D)"
        raise ValueError(f"q: expected the {layout}; got {describe(q)}")
    heads, head_dim = q.shape[-2], q.shape[-1]
    if head_dim == 0:
        raise ValueError(f"q: expected a head width D >= 1; got {describe(q)}")
    if packed:
        check_mask(mask, (), cu_seqlens)
        if values_hidden(cu_seqlens):
            max_seqlen = check_packed_form(cu_seqlens, max_seqlen)  # P: the pair length of the bias or the relation ids
            pairs = bias.shape[-1] if bias is not None else rel_index.shape[0] if rel_index is not None else None
        else:
            _, max_seqlen, pairs = packed_layout(cu_seqlens, q.shape[0], max_seqlen)
        batch = cu_seqlens.numel() - 1
    else:
        batch, atoms = q.shape[0], q.shape[1]
        check_mask(mask, (batch, atoms), None)
        if max_seqlen is not None and max_seqlen != atoms:
            raise ValueError(f"max_seqlen: the padded layout's width is q.shape[1] = {atoms}; got {max_seqlen!r} "
                             f"(pass None, or cu_seqlens for the packed layout)")
        max_seqlen = atoms
    _check_bias(bias, packed, batch, heads, max_seqlen, pairs if packed else None)
    _check_relations(rel_index, rel_table, mask, packed, batch, heads, max_seqlen, pairs if packed else None)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not is_real(scale) or not is_finite(scale):
        raise ValueError(f"scale: expected a finite float; got {scale!r}")
    if not is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1); got {dropout_p!r}")
    scale, dropout_p = float(scale), float(dropout_p)
    return_logits = check_flag(return_logits, "return_logits")
    check_generator(generator)

    chosen = choose_backend("relation_attention", backend, q.device, {
        "triton": lambda: _triton_reasons(q),
        "reference": lambda: [],
    }, inputs=(q, k, v, bias, rel_table))
    if chosen == "reference":
        # Plain differentiable torch ops: autograd and torch.compile see straight through them.
        return reference.relation_attention(q, k, v, bias, mask=mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                            scale=scale, dropout_p=dropout_p, return_logits=return_logits,
                                            rel_index=rel_index, rel_table=rel_table, generator=generator)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    seed = _dropout_seed(generator) if dropout_p > 0.0 else 0
    out, _, logits = call(
        _forward_op, q, k, v, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, float(scale),
        float(dropout_p), seed, bool(return_logits))
    return (out, logits) if return_logits else out


def _dropout_seed(generator: torch.Generator | None) -> int:
    """The kernel's dropout seed, drawn from ``generator`` (default: torch's global CPU generator): a host read of
    a CPU tensor, which waits for no GPU work (a CUDA generator's draw would)."""
    where = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=where).item())


def _triton_reasons(q: Tensor) -> list[str]:
    reasons = triton_reasons(q.device, q.dtype)
    if q.dtype not in _KERNEL_DTYPES:
        reasons.append(f"the kernel computes in float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}")
    return reasons


def _check_bias(bias, packed, batch, heads, atoms, pairs):
    if bias is None:
        return
    check_dtype(bias, "bias", _FLOAT_DTYPES)
    # The message is formatted only on failure: under torch.compile, formatting a symbolic size fixes it (one
    # recompilation per molecule size).
    if packed:
        if not (bias.dim() == 2 and one_or(bias.shape[0], heads) and bias.shape[1] == pairs):
            raise ValueError(f"bias: expected shape (H|1, P) = ({heads} or 1, {pairs}); got {describe(bias)}")
    elif not (bias.dim() == 4 and one_or(bias.shape[0], batch) and one_or(bias.shape[1], heads)
              and tuple(bias.shape[2:]) == (atoms, atoms)):
        raise ValueError(f"bias: expected shape (B|1, H|1, N, N) = ({batch} or 1, {heads} or 1, {atoms}, {atoms}); "
                         f"got {describe(bias)}")


def _check_relations(rel_index, rel_table, mask, packed, batch, heads, atoms, pairs):
    if (rel_index is None) != (rel_table is None):
        missing = "rel_table" if rel_table is None else "rel_index"
        raise ValueError(f"{missing}: rel_index and rel_table come together; got only one of them")
    if rel_index is None:
        return
    check_dtype(rel_index, "rel_index", INTEGER_DTYPES)
    check_dtype(rel_table, "rel_table", _FLOAT_DTYPES)
    if rel_table.dim() != 2 or rel_table.shape[1] != heads or rel_table.shape[0] < 1:
        raise ValueError(f"rel_table: expected shape (R, H) = (R >= 1, {heads}); got {describe(rel_table)}")
    want = (pairs,) if packed else (batch, atoms, atoms)
    if tuple(rel_index.shape) != want:
        meaning = "(P,)" if packed else "(B, N, N)"
        raise ValueError(f"rel_index: expected shape {meaning} = {want}; got {describe(rel_index)}")
    if values_hidden(rel_index):  # reading values would break the graph; the kernel masks bad ids
        return
    # Padded pairs may hold any id: they are never read (0 is always valid).
    bounds = id_range(rel_index, None if mask is None else mask[:, :, None] & mask[:, None, :])
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= rel_table.shape[0]):
        raise ValueError(f"rel_index: expected ids in [0, {rel_table.shape[0]}) (rows of rel_table); "
                         f"got ids from {bounds[0]} to {bounds[1]}")


# --------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("pyblend::relation_attention", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], rel_index: Optional[Tensor],
                rel_table: Optional[Tensor], mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int,
                scale: float, dropout_p: float, seed: int, return_logits: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton forward: (out, lse float32 ``(2, *q.shape[:-1])``, logits or an empty tensor)."""
    from ..kernels import relation_attention as kernel

    return kernel.relation_attention_forward(q, k, v, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen,
                                             scale, dropout_p, seed, return_logits)


@_forward_op.register_fake
def _(q, k, v, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed, return_logits):
    if not return_logits:
        logits_shape = (0,)
    elif cu_seqlens is None:
        logits_shape = (q.shape[0], q.shape[2], q.shape[1], q.shape[1])
    elif bias is not None:
        logits_shape = (q.shape[1], bias.shape[1])
    elif rel_index is not None:
        logits_shape = (q.shape[1], rel_index.shape[0])
    else:
        logits_shape = (q.shape[1], torch.library.get_ctx().new_dynamic_size())
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            q.new_empty((2, *q.shape[:-1]), dtype=torch.float32), q.new_empty(logits_shape))


@torch.library.custom_op("pyblend::relation_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, grad_logits: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                 lse: Tensor, bias: Optional[Tensor], rel_index: Optional[Tensor], rel_table: Optional[Tensor],
                 mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int, scale: float,
                 dropout_p: float, seed: int, bias_grad: bool,
                 table_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton backward: (dq, dk, dv, dbias, dtable); dbias and dtable are empty when not asked for."""
    from ..kernels import relation_attention as kernel

    dq, dk, dv, dbias, dtable = kernel.relation_attention_backward(
        grad_out, grad_logits, q, k, v, out, lse, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale,
        dropout_p, seed, bias_grad, table_grad)
    return (dq, dk, dv, q.new_empty(0) if dbias is None else dbias.to(bias.dtype),
            q.new_empty(0) if dtable is None else dtable.to(rel_table.dtype))


@_backward_op.register_fake
def _(grad_out, grad_logits, q, k, v, out, lse, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale,
      dropout_p, seed, bias_grad, table_grad):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device),
            bias.new_empty(bias.shape) if bias_grad else q.new_empty(0),
            rel_table.new_empty(rel_table.shape) if table_grad else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed, return_logits = inputs
    out, lse, _ = output
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
    ctx.save_for_backward(q, k, v, out, lse, bias, rel_index, rel_table, mask, cu_seqlens)
    ctx.settings = (max_seqlen, scale, dropout_p, seed, return_logits)


def _backward(ctx, grad_out, grad_lse, grad_logits):
    q, k, v, out, lse, bias, rel_index, rel_table, mask, cu_seqlens = ctx.saved_tensors
    max_seqlen, scale, dropout_p, seed, return_logits = ctx.settings
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    table_grad = rel_table is not None and ctx.needs_input_grad[5]
    only_logits = grad_out is None
    if only_logits:
        grad_out = torch.zeros_like(out)
    if not return_logits:
        grad_logits = None
    dq, dk, dv, dbias, dtable = call(
        _backward_op, grad_out, grad_logits, q, k, v, out, lse, bias, rel_index, rel_table, mask, cu_seqlens,
        max_seqlen, scale, dropout_p, seed, bias_grad, table_grad)
    # v takes no part in the logits: no gradient (None) when only they are used, as autograd gives the reference.
    return (dq, dk, None if only_logits else dv, dbias if bias_grad else None, None, dtable if table_grad else None,
            None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_backward_op, "relation_attention")
