"""Outer-product relation heads (MoleBlend eq. 10-11) fused with their losses.

MoleBlend turns atom representations into pair relations: two per-atom projections (``Linear -> GELU ->
LayerNorm``, to d1 = d2 = 32; cheap, done by the module in torch), the flattened outer product of the row
feature of atom i and the col feature of atom j (1024 per pair), and a head ``nn.Linear(d1 * d2, C)``: the SPD
head (C = 11, cross-entropy), the edge head (5 hops x 24 classes: C = 120 as G = 5 independent softmaxes) and
the 3D head (C = 3, ``1 - cos`` against ``pos_j - pos_i``). The ops start from the projections' outputs.

Three entries:

- :func:`outer_product_logits`: the ``(B, N, N, C)`` / ``(P, C)`` logits (inference; differentiable too).
- :func:`outer_product_loss`: the cross-entropy, mean over the non-ignored (pair, group) targets.
- :func:`outer_product_cosine_loss`: the 3D head's ``1 - cos`` loss, mean over real pairs of distinct positions.

On the Triton backend the losses never materialise the ``(pairs, d1 * d2)`` outer products or the
``(pairs, C)`` logits, forward or backward: each tile of logits is computed in registers
(:mod:`pyblend.kernels.outer_product`), and the backward recomputes them. What is kept for the backward is one
float32 per (pair, group) (the log-sum-exp; the cosine keeps two per pair). Each entry is a torch.library
custom op (``pyblend::outer_product_logits``, ``pyblend::outer_product_loss``, one backward op
``pyblend::outer_product_backward``), with fake implementations, so ``torch.compile`` traces it.
Semantics: :mod:`pyblend.reference.outer_product`.

Layouts (DESIGN.md): padded ``row (B, N, d1)``, ``col (B, N, d2)`` with ``mask (B, N)`` bool (True = real atom;
default all real), per-pair tensors ``(B, N, N, ...)``; or packed ``row (T, d1)``, ``col (T, d2)`` with
``cu_seqlens (B+1,)`` int32 and ``max_seqlen``, per-pair tensors ``(P, ...)``, molecule i's ``(N_i, N_i)`` block
row-major at ``sum_{j<i} N_j^2``. Padded entries of per-atom inputs are never read (NaN there is harmless).

Under ``torch.compile`` the checks read no tensor's values: every entry traces with ``fullgraph=True``
(``dynamic=True`` too) on both backends, padded and packed, forward and backward. A packed call needs an int
``max_seqlen`` there and trusts ``cu_seqlens`` (rows past ``cu_seqlens[-1]`` are then never read and get zero
gradients). Sizes come from shapes: the cross-entropy takes ``P = sum N_i^2`` from its packed target's length,
the Triton cosine loss sizes its per-pair statistics by the bound ``T * max_seqlen``. Only the packed logits have
a length that no input's shape gives: a data-dependent size (the Triton op reads ``P`` inside itself, one
device-to-host copy as in an eager call; the reference selects the real pairs by a boolean mask), which
torch.compile accepts under ``fullgraph=True`` and otherwise treats as a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._values import values_hidden
from .. import reference
from ..layout import pair_offsets
from ._autograd import call, refuse_double_backward
from ._checks import (
    INTEGER_DTYPES,
    as_tensor,
    check_dtype,
    check_mask,
    check_packed_form,
    check_same_device,
    check_shape,
    describe,
    is_int,
    packed_layout,
)
from ._dispatch import choose_backend, triton_reasons

__all__ = ["outer_product_cosine_loss", "outer_product_logits", "outer_product_loss"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_MAX_FEATURES = 64  # kernels.outer_product.MAX_FEATURES
_MAX_CLASSES = 128  # kernels.outer_product.MAX_CLASSES
_MODE_LOGITS, _MODE_CROSS_ENTROPY, _MODE_COSINE = 0, 1, 2
_INT32 = (-(2**31), 2**31 - 1)
_UNKNOWN_PAIRS = -1  # the logits op's ``pairs`` where the caller cannot read P (packed, values hidden)


def outer_product_logits(row: Tensor, col: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                         mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                         max_seqlen: int | None = None, backend: str | None = None) -> Tensor:
    """Pair logits of the outer-product head: ``logits[i, j] = weight @ flatten(row_i outer col_j) + bias``.

    Args:
        row: padded ``(B, N, d1)`` or packed ``(T, d1)``; float16, bfloat16 or float32 (float64: reference
            backend only).
        col: ``(B, N, d2)`` / ``(T, d2)``, the dtype of ``row``.
        weight: ``(C, d1 * d2)``, an ``nn.Linear(d1 * d2, C)`` weight: input index ``a * d2 + b`` multiplies row
            feature a times col feature b. The dtype of ``row``.
        bias: ``(C,)`` or None, the dtype of ``row``.
        mask: ``(B, N)`` bool, True = real atom (padded layout only; default all real).
        cu_seqlens: ``(B+1,)`` int32, selects the packed layout; ``max_seqlen``: the longest molecule (read
            from ``cu_seqlens`` when None; required under ``torch.compile``, which cannot read it, and then
            trusted).
        backend: "triton" | "reference" | None (automatic: Triton for CUDA tensors; ``PYBLEND_BACKEND``).

    Returns:
        ``(B, N, N, C)`` (0 at pairs touching a padded atom) or ``(P, C)``, in ``row``'s dtype (float32
        accumulation). This materialises its output by definition: for inference, or for a head whose logits
        are needed; the losses below never form it. Differentiable in row, col, weight and bias.
    """
    layout = _validate(row, col, weight, bias, mask, cu_seqlens, max_seqlen)
    row, col, weight, bias, mask, cu_seqlens = layout.tensors
    if layout.packed and layout.pairs is None and cu_seqlens.is_meta:
        raise ValueError("cu_seqlens: packed outer_product_logits returns (P, C) with P = sum N_i^2, read from "
                         "cu_seqlens' values, which a meta tensor does not hold; call it on tensors with values")
    if _backend("outer_product_logits", backend, layout) == "reference":
        return reference.outer_product_logits(row, col, weight, bias, mask=mask, cu_seqlens=cu_seqlens,
                                               max_seqlen=layout.max_seqlen)
    start, length, pair_start = layout.indices()
    bias = None if bias is None else bias.contiguous()  # the kernels index it by class alone
    logits = call(_logits_op, layout.row2d, layout.col2d, weight, bias, layout.mask1d, start,
                  length, pair_start, layout.max_seqlen,
                  _UNKNOWN_PAIRS if layout.pairs is None else layout.pairs)
    if layout.packed:
        return logits
    return logits.view(layout.batch, layout.max_seqlen, layout.max_seqlen, layout.classes)


def outer_product_loss(row: Tensor, col: Tensor, weight: Tensor, bias: Tensor | None = None,
                       target: Tensor | None = None, *, groups: int = 1, ignore_index: int = -100,
                       mask: Tensor | None = None, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                       backend: str | None = None) -> Tensor:
    """Cross-entropy of the outer-product head's pair logits (SPD / edge-type classes), without materialising
    the ``(pairs, d1 * d2)`` outer products or the ``(pairs, C)`` logits.

    The ``C = G * K`` logits of a pair are G independent softmaxes over consecutive blocks of K classes (G = 1:
    one softmax over C; MoleBlend's edge head: G = 5 hops x K = 24). The loss is the mean of
    ``-log softmax(logits_g)[target_g]`` over the non-ignored (pair, group) targets; with none, 0 and zero
    gradients (never NaN).

    Args:
        row, col, weight, bias, mask, cu_seqlens, max_seqlen, backend: as :func:`outer_product_logits`.
        target: integer (int8/16/32/64, uint8); padded ``(B, N, N)`` / ``(B, N, N, G)``, packed ``(P,)`` /
            ``(P, G)``; each in ``[0, C / G)`` or ``ignore_index``. Pairs touching padding are ignored whatever
            they hold; mark the diagonal, unreachable pairs (SPD) and hops past the path (edge) with
            ``ignore_index``. Outside ``torch.compile`` the range is checked on real pairs (one device-to-host
            read); under it an out-of-range target silently contributes the pair's log-sum-exp.
        groups: G, dividing C.
        ignore_index: an int32 value.

    Returns:
        A float32 scalar (float64 for float64 inputs on the reference backend), differentiable in row, col,
        weight and bias.
    """
    layout = _validate(row, col, weight, bias, mask, cu_seqlens, max_seqlen)
    row, col, weight, bias, mask, cu_seqlens = layout.tensors
    target = _validate_target(target, layout, groups, ignore_index)
    groups, ignore_index = int(groups), int(ignore_index)  # numpy's ints too, as the custom op takes int
    if _backend("outer_product_loss", backend, layout) == "reference":
        return reference.outer_product_loss(row, col, weight, bias, target, groups=groups,
                                             ignore_index=ignore_index, mask=mask, cu_seqlens=cu_seqlens,
                                             max_seqlen=layout.max_seqlen)
    start, length, pair_start = layout.indices()
    bias = None if bias is None else bias.contiguous()  # the kernels index it by class alone
    loss, _, _ = call(
        _loss_op, layout.row2d, layout.col2d, weight, bias, target.reshape(layout.pairs, groups), layout.mask1d, start,
        length, pair_start, layout.max_seqlen, layout.pairs, _MODE_CROSS_ENTROPY, groups, ignore_index, False)
    return loss


def outer_product_cosine_loss(row: Tensor, col: Tensor, weight: Tensor, bias: Tensor | None = None,
                              positions: Tensor | None = None, *, mask: Tensor | None = None,
                              cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                              reduction: str = "pairs", backend: str | None = None) -> Tensor:
    """MoleBlend's 3D head loss: mean over real pairs of ``1 - cos(pred_ij, pos_j - pos_i)``, with
    ``pred_ij`` the 3 logits of the pair (C = 3), without materialising the outer products or the predictions.
    ``reduction="molecules"`` takes each molecule's mean first, then their mean over the molecules with a pair
    (the public MoleBlend code's ``compute_3d_blending_loss``: a small molecule weighs as much as a large one).

    A pair counts only where ``pos_j != pos_i``: the pairs ``i == j`` and those of coincident atoms have no
    direction to predict and are left out of the mean, as the public code leaves out its zero targets. ``cos`` is
    defined as 0 where the prediction is exactly zero: such a pair contributes 1 and no gradient. Without any pair
    (single-atom molecules) the loss is 0.

    Args:
        row, col, weight, bias, mask, cu_seqlens, max_seqlen, backend: as :func:`outer_product_logits`, with
            ``weight (3, d1 * d2)``.
        positions: float, padded ``(B, N, 3)`` / packed ``(T, 3)``, any float dtype (the kernels read float32).
            A constant: no gradient flows to ``positions`` (even when it requires one).

    Returns:
        A float32 scalar (float64 for float64 inputs on the reference backend), differentiable in row, col,
        weight and bias.
    """
    if reduction not in ("pairs", "molecules"):
        raise ValueError(f"reduction: expected 'pairs' or 'molecules'; got {reduction!r}")
    layout = _validate(row, col, weight, bias, mask, cu_seqlens, max_seqlen)
    row, col, weight, bias, mask, cu_seqlens = layout.tensors
    if layout.classes != 3:
        raise ValueError(f"weight: the cosine loss predicts a 3-vector per pair, expected shape (3, d1 * d2); "
                         f"got {describe(weight)}")
    positions = as_tensor(positions, "positions")
    check_dtype(positions, "positions", _FLOAT_DTYPES)
    check_same_device(row, "row", positions=positions)
    check_shape(positions, "positions", (layout.atoms, 3) if layout.packed else (layout.batch, layout.max_seqlen, 3),
                "(T, 3)" if layout.packed else "(B, N, 3)")
    positions = positions.detach()
    if _backend("outer_product_cosine_loss", backend, layout) == "reference":
        return reference.outer_product_cosine_loss(row, col, weight, bias, positions, mask=mask,
                                                    cu_seqlens=cu_seqlens, max_seqlen=layout.max_seqlen,
                                                    reduction=reduction)
    start, length, pair_start = layout.indices()
    bias = None if bias is None else bias.contiguous()  # the kernels index it by class alone
    # The rows of the per-pair statistics: P, or where values are hidden (P unknown) its bound from the shapes,
    # sum N_i^2 <= max_seqlen * sum N_i <= max_seqlen * T (rows past P are never written or read).
    stats_rows = layout.atoms * layout.max_seqlen if layout.pairs is None else layout.pairs
    loss, _, _ = call(
        _loss_op, layout.row2d, layout.col2d, weight, bias, positions.reshape(-1, 3).float(), layout.mask1d, start,
        length, pair_start, layout.max_seqlen, stats_rows, _MODE_COSINE, 1, 0, reduction == "molecules")
    return loss


# ------------------------------------------------------------------------------------------- validation


class _Layout:
    """The validated inputs and the kernels' per-molecule view of them. ``pairs`` (P) is None for a packed call
    where values are hidden (torch.compile, meta or fake tensors: ``values_hidden``), so it cannot be read from
    ``cu_seqlens``, until a per-pair input gives it."""

    def __init__(self, tensors, packed, batch, max_seqlen, atoms, pairs, host_cu_seqlens):
        self.tensors = tensors
        row, col, weight, bias, mask, cu_seqlens = tensors
        self.packed, self.batch, self.max_seqlen, self.atoms, self.pairs = packed, batch, max_seqlen, atoms, pairs
        self.host_cu_seqlens = host_cu_seqlens
        self.dtype, self.device = row.dtype, row.device
        self.d1, self.d2, self.classes = row.shape[-1], col.shape[-1], weight.shape[0]
        self.row2d = row.reshape(-1, self.d1)
        self.col2d = col.reshape(-1, self.d2)
        self.mask1d = None if mask is None else mask.reshape(-1).contiguous()

    def pair_mask(self) -> Tensor:
        """Real pairs, padded ``(B, N, N)`` or packed ``(P,)`` (all True)."""
        if self.packed:
            return torch.ones(self.pairs, dtype=torch.bool, device=self.device)
        mask = self.tensors[4]
        if mask is None:
            return torch.ones(self.batch, self.max_seqlen, self.max_seqlen, dtype=torch.bool, device=self.device)
        return mask[:, :, None] & mask[:, None, :]

    def indices(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(start int32 (B,), length int32 (B,), pair_start int64 (B,))`` on the inputs' device."""
        cu_seqlens = self.tensors[5]
        if self.packed:
            return (cu_seqlens[:-1].contiguous(), (cu_seqlens[1:] - cu_seqlens[:-1]).contiguous(),
                    pair_offsets(cu_seqlens)[:-1].contiguous())
        index = torch.arange(self.batch, dtype=torch.int64, device=self.device)
        width = self.max_seqlen
        return ((index * width).to(torch.int32), torch.full_like(index, width, dtype=torch.int32),
                index * width * width)


def _validate(row, col, weight, bias, mask, cu_seqlens, max_seqlen) -> _Layout:
    row = as_tensor(row, "row")
    col = as_tensor(col, "col")
    weight = as_tensor(weight, "weight")
    bias = as_tensor(bias, "bias", optional=True)
    mask = as_tensor(mask, "mask", optional=True)
    cu_seqlens = as_tensor(cu_seqlens, "cu_seqlens", optional=True)
    packed = cu_seqlens is not None
    check_dtype(row, "row", _FLOAT_DTYPES)
    for name, x in (("col", col), ("weight", weight), ("bias", bias)):
        if x is not None and x.dtype != row.dtype:
            raise TypeError(f"{name}: expected the dtype of row ({row.dtype}); got {describe(x)}")
    check_same_device(row, "row", col=col, weight=weight, bias=bias, mask=mask, cu_seqlens=cu_seqlens)
    if row.dim() != (2 if packed else 3) or row.shape[-1] == 0:
        expected = "the packed layout (T, d1), as cu_seqlens is given" if packed else "the padded layout (B, N, d1)"
        raise ValueError(f"row: expected {expected} with d1 >= 1; got {describe(row)}")
    if col.dim() != row.dim() or col.shape[:-1] != row.shape[:-1] or col.shape[-1] == 0:
        meaning = "(T, d2)" if packed else "(B, N, d2)"
        raise ValueError(f"col: expected shape {meaning} with the atoms of row {tuple(row.shape[:-1])} and d2 >= 1; "
                         f"got {describe(col)}")
    d1, d2 = row.shape[-1], col.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d1 * d2 or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape (C, d1 * d2) = (?, {d1 * d2}) with C >= 1 (an nn.Linear(d1 * d2, "
                         f"C) weight, d1 = {d1}, d2 = {d2}); got {describe(weight)}")
    if bias is not None:
        check_shape(bias, "bias", (weight.shape[0],), "(C,)")
    host = None
    if packed:
        check_mask(mask, (), cu_seqlens)
        if values_hidden(cu_seqlens):
            # P: from a per-pair input, or read by the kernel's op
            max_seqlen = check_packed_form(cu_seqlens, max_seqlen)
            pairs = None
        else:
            host, max_seqlen, pairs = packed_layout(cu_seqlens, row.shape[0], max_seqlen)
        batch, atoms = cu_seqlens.numel() - 1, row.shape[0]
    else:
        if max_seqlen is not None and max_seqlen != row.shape[1]:
            raise ValueError(f"max_seqlen: the padded layout's width is row.shape[1] = {row.shape[1]}; got "
                             f"{max_seqlen!r} (pass None)")
        batch, max_seqlen = row.shape[0], row.shape[1]
        check_mask(mask, (batch, max_seqlen), None)
        pairs = batch * max_seqlen * max_seqlen
        atoms = batch * max_seqlen
    return _Layout((row, col, weight, bias, mask, cu_seqlens), packed, batch, max_seqlen, atoms, pairs, host)


def _validate_target(target, layout: _Layout, groups, ignore_index) -> Tensor:
    if not is_int(groups) or groups < 1 or layout.classes % groups:
        raise ValueError(f"groups: expected a positive int dividing C = {layout.classes} (weight.shape[0]); "
                         f"got {groups!r}")
    if not is_int(ignore_index) or not _INT32[0] <= ignore_index <= _INT32[1]:
        raise ValueError(f"ignore_index: expected an int32 value; got {ignore_index!r}")
    target = as_tensor(target, "target")
    check_dtype(target, "target", INTEGER_DTYPES)
    check_same_device(layout.tensors[0], "row", target=target)
    pairs_shape = (layout.pairs,) if layout.packed else (layout.batch, layout.max_seqlen, layout.max_seqlen)
    meaning = "(P" if layout.packed else "(B, N, N"
    if groups == 1 and target.dim() == len(pairs_shape):
        check_shape(target, "target", pairs_shape, meaning + ")")
    else:
        check_shape(target, "target", (*pairs_shape, groups), meaning + ", G)")
    if layout.pairs is None:  # packed, values hidden (torch.compile, meta): the target's length gives P
        layout.pairs = target.shape[0]
    if not values_hidden(target):
        _check_target_range(target, layout, groups, ignore_index)
    return target


def _check_target_range(target, layout, groups, ignore_index) -> None:
    classes = layout.classes // groups
    # In int64: compared in a narrow target's own dtype, ignore_index would wrap (-100 reads as 156 in uint8).
    values = target.reshape(*layout.pair_mask().shape, groups).long()
    bad = layout.pair_mask()[..., None] & (values != ignore_index) & ((values < 0) | (values >= classes))
    where = bad.nonzero()  # the one device-to-host read
    if where.numel():
        first = tuple(where[0].tolist())
        index = first if groups > 1 or target.dim() == where.shape[1] else first[:-1]
        raise ValueError(f"target: expected values in [0, {classes}) (C / G = {layout.classes} / {groups}) or "
                         f"ignore_index = {ignore_index} at real pairs; target[{', '.join(map(str, index))}] = "
                         f"{int(values[first])} ({where.shape[0]} such entries)")


def _backend(op: str, requested: str | None, layout: _Layout) -> str:
    return choose_backend(op, requested, layout.device, {
        "triton": lambda: _triton_reasons(layout),
        "reference": lambda: [],
    }, inputs=layout.tensors)


def _triton_reasons(layout: _Layout) -> list[str]:
    reasons = triton_reasons(layout.device, layout.dtype)
    if layout.dtype not in _KERNEL_DTYPES:
        reasons.append(f"the kernel computes in float16, bfloat16 or float32, got {layout.dtype}")
    if max(layout.d1, layout.d2) > _MAX_FEATURES:
        reasons.append(f"d1 = {layout.d1}, d2 = {layout.d2}: the kernel takes at most {_MAX_FEATURES} features a side")
    if layout.classes > _MAX_CLASSES:
        reasons.append(f"C = {layout.classes} classes > {_MAX_CLASSES}")
    return reasons


# --------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("pyblend::outer_product_logits", mutates_args=())
def _logits_op(row: Tensor, col: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
               start: Tensor, length: Tensor, pair_start: Tensor, max_n: int, pairs: int) -> Tensor:
    """Logits ``(Q, C)`` in row's dtype; row ``(A, d1)``, col ``(A, d2)``, mask ``(A,)``, the molecules' atom
    starts, widths (int32) and pair starts (int64) ``(B,)``; ``pairs``: Q, or ``_UNKNOWN_PAIRS`` for the packed
    layout under torch.compile: then Q is the end of the last molecule's pair block, read here (one
    device-to-host copy, as the eager call's validation makes), and the fake gives a data-dependent size."""
    from ..kernels import outer_product as kernel

    if pairs == _UNKNOWN_PAIRS:
        pairs = int(pair_start[-1] + length[-1].long() ** 2) if length.numel() else 0
    return kernel.outer_product_forward(row, col, weight, bias, None, mask, start, length, pair_start, max_n, pairs,
                                        kernel.MODE_LOGITS, 1, 0)


@_logits_op.register_fake
def _(row, col, weight, bias, mask, start, length, pair_start, max_n, pairs):
    if pairs == _UNKNOWN_PAIRS:
        pairs = torch.library.get_ctx().new_dynamic_size()
    return row.new_empty((pairs, weight.shape[0]))


@torch.library.custom_op("pyblend::outer_product_loss", mutates_args=())
def _loss_op(row: Tensor, col: Tensor, weight: Tensor, bias: Optional[Tensor], aux: Tensor, mask: Optional[Tensor],
             start: Tensor, length: Tensor, pair_start: Tensor, max_n: int, pairs: int, mode: int, groups: int,
             ignore_index: int, per_molecule: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss () float32, stats (pairs, G | 2) float32, counts (B,) float64)``; ``aux``: the target ``(Q, G)``
    (mode 1, cross-entropy) or float32 positions ``(A, 3)`` (mode 2, cosine). ``pairs``: Q, or for the cosine
    a bound of it (the statistics' rows past Q are never written or read). The loss is the mean over every
    counted pair, or with ``per_molecule`` the mean of each molecule's mean over the molecules that count one."""
    from ..kernels import outer_product as kernel

    stats, totals, counts = kernel.outer_product_forward(row, col, weight, bias, aux, mask, start, length,
                                                         pair_start, max_n, pairs, mode, groups, ignore_index)
    return _reduced(totals.double(), counts, per_molecule).float(), stats, counts


@_loss_op.register_fake
def _(row, col, weight, bias, aux, mask, start, length, pair_start, max_n, pairs, mode, groups, ignore_index,
      per_molecule):
    width = groups if mode == _MODE_CROSS_ENTROPY else 2
    return (row.new_empty((), dtype=torch.float32), row.new_empty((pairs, width), dtype=torch.float32),
            row.new_empty((start.shape[0],), dtype=torch.float64))


def _reduced(values: Tensor, counts: Tensor, per_molecule: bool) -> Tensor:
    """The loss from per-molecule loss sums ``values (B,)`` and the counts ``(B,)`` they sum over
    (:func:`_molecule_scales` is its derivative)."""
    if not per_molecule:
        return values.sum() / counts.sum().clamp(min=1)
    counted = counts > 0
    return (values / counts.clamp(min=1)).sum() / counted.sum().clamp(min=1)


def _molecule_scales(grad: Tensor, counts: Tensor, per_molecule: bool) -> Tensor:
    """``(B,)`` float32: d loss / d (molecule b's loss sum) for the upstream gradient ``grad``."""
    if not per_molecule:
        return (grad.double() / counts.sum().clamp(min=1)).float().reshape(1).expand(counts.shape[0])
    counted = counts > 0
    return torch.where(counted, grad.double() / (counts.clamp(min=1) * counted.sum().clamp(min=1)), 0.0).float()


@torch.library.custom_op("pyblend::outer_product_backward", mutates_args=())
def _backward_op(grad: Tensor, row: Tensor, col: Tensor, weight: Tensor, bias: Optional[Tensor],
                 aux: Optional[Tensor], mask: Optional[Tensor], start: Tensor, length: Tensor, pair_start: Tensor,
                 stats: Optional[Tensor], max_n: int, mode: int, groups: int,
                 ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(drow, dcol, dweight, dbias (C,))``; ``grad``: the logits' gradient ``(Q, C)`` (mode 0) or a float32
    ``(B,)`` tensor, the loss gradient with respect to each molecule's loss sum (modes 1, 2)."""
    from ..kernels import outer_product as kernel

    return kernel.outer_product_backward(grad, row, col, weight, bias, aux, mask, start, length, pair_start, stats,
                                         max_n, mode, groups, ignore_index)


@_backward_op.register_fake
def _(grad, row, col, weight, bias, aux, mask, start, length, pair_start, stats, max_n, mode, groups, ignore_index):
    return (row.new_empty(row.shape), col.new_empty(col.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],)))


def _bias_gradient(ctx, bias, dbias):
    return dbias if bias is not None and ctx.needs_input_grad[3] else None


def _logits_setup(ctx, inputs, output):
    row, col, weight, bias, mask, start, length, pair_start, max_n, pairs = inputs
    ctx.save_for_backward(row, col, weight, bias, mask, start, length, pair_start)
    ctx.max_n = max_n


def _logits_backward(ctx, grad):
    row, col, weight, bias, mask, start, length, pair_start = ctx.saved_tensors
    drow, dcol, dweight, dbias = call(
        _backward_op, grad, row, col, weight, bias, None, mask, start, length, pair_start, None, ctx.max_n,
        _MODE_LOGITS, 1, 0)
    return drow, dcol, dweight, _bias_gradient(ctx, bias, dbias), None, None, None, None, None, None


def _loss_setup(ctx, inputs, output):
    (row, col, weight, bias, aux, mask, start, length, pair_start, max_n, pairs, mode, groups, ignore_index,
     per_molecule) = inputs
    _, stats, counts = output
    ctx.save_for_backward(row, col, weight, bias, aux, mask, start, length, pair_start, stats, counts)
    ctx.settings = (max_n, mode, groups, ignore_index, per_molecule)
    ctx.mark_non_differentiable(stats, counts)


def _loss_backward(ctx, grad, grad_stats, grad_counts):
    row, col, weight, bias, aux, mask, start, length, pair_start, stats, counts = ctx.saved_tensors
    max_n, mode, groups, ignore_index, per_molecule = ctx.settings
    scales = _molecule_scales(grad, counts, per_molecule)
    drow, dcol, dweight, dbias = call(
        _backward_op, scales, row, col, weight, bias, aux, mask, start, length, pair_start, stats, max_n, mode,
        groups, ignore_index)
    return (drow, dcol, dweight, _bias_gradient(ctx, bias, dbias), *([None] * 11))


_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)
_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)
refuse_double_backward(_backward_op, "outer_product_logits / outer_product_loss / outer_product_cosine_loss")
