"""Fused Gaussian-basis attention bias (MoleBlend eq. 6-7; the GaussianLayer + NonLinear projection of Uni-Mol
and Transformer-M): positions and atom-pair types -> pair distance -> per-type affine -> K Gaussians ->
Linear(K, K_hidden) -> GELU -> Linear(K_hidden, H) -> a per-head attention bias, plus the per-atom sum of the
Gaussian features (Transformer-M's 3D atom feature).

Backends: Triton (CUDA tensors, or the interpreter on request) and the plain-PyTorch reference. The Triton path
never writes the ``(B, N, N, K)`` features, forward or backward: it is a torch.library custom op
(``pyblend::gaussian_basis_bias``) whose backward is another (``pyblend::gaussian_basis_bias_backward``), both
with fake implementations, so ``torch.compile`` traces it; the reference path (plain torch ops, packed: padded and
packed back by gathers sized by the shapes and ``max_seqlen``) traces too, ``fullgraph=True`` included.
Semantics: :mod:`pyblend.reference.gaussian_basis_bias`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._values import values_hidden
from ..reference.gaussian_basis_bias import gaussian_basis_bias as _reference
from ._autograd import call, refuse_double_backward
from ._checks import (
    INTEGER_DTYPES,
    as_tensor,
    check_dtype,
    check_mask,
    check_packed_form,
    check_positive_float,
    check_same_device,
    check_shape,
    describe,
    id_range,
    packed_layout,
)
from ._dispatch import choose_backend, triton_reasons

__all__ = ["gaussian_basis_bias"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_MAX_KERNELS = 256  # kernels.gaussian_basis_bias.MAX_KERNELS (K and K_hidden)
_MAX_HEADS = 128


def gaussian_basis_bias(positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, *, mask=None,
                        cu_seqlens=None, max_seqlen: int | None = None, std_eps: float = 1e-2,
                        backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-head attention bias from 3D positions through K Gaussian kernels and a two-layer MLP, and the
    per-atom sum of the Gaussian features; differentiable in positions and every parameter.

    For every real atom pair (i, j) of a molecule, the diagonal included: ``d = ||p_i - p_j||``,
    ``x = mul_ij * d + bias_ij``, ``g_k = exp(-0.5 ((x - means_k) / s_k)^2) / (sqrt(2 pi) s_k)`` with
    ``s_k = |stds_k| + std_eps``, ``attn_bias_ij = w2 @ gelu(w1 @ g + b1) + b2`` (exact erf GELU) and
    ``atom_features_i = sum over the real atoms j of g_ij``.

    Args:
        positions: float, padded ``(B, N, 3)`` or packed ``(T, 3)``. Padded atoms are never read (NaN is safe);
            a real atom must have finite coordinates (mask out molecules without a conformer).
        pair_types: integer, padded ``(B, N, N)`` / packed ``(P,)`` with one id per pair (Uni-Mol: e.g.
            ``a_i * n_types + a_j``), or ``(B, N, N, 2)`` / ``(P, 2)`` with two ids whose rows of ``mul`` and
            ``bias`` are summed (Transformer-M). Ids at real pairs must lie in ``[0, n_types)``; ids at padded
            pairs are never read.
        means, stds: ``(K,)``, the ``nn.Embedding(1, K)`` weights flattened.
        mul, bias: ``(n_types, 1)`` (``nn.Embedding(n_types, 1)`` weights) or ``(n_types,)``.
        w1: ``(K_hidden, K)``, b1: ``(K_hidden,)``, w2: ``(H, K_hidden)``, b2: ``(H,)``: the two ``nn.Linear``s.
            means, stds, mul, bias, w1, b1, w2, b2 share one float dtype, that of w1 (float16, bfloat16,
            float32; float64: reference backend only).
        mask: ``(B, N)`` bool, True = real atom (padded layout; None = all real).
        cu_seqlens: ``(B+1,)`` int32, selects the packed layout (pairs of molecule b row-major at
            ``sum_{m<b} N_m^2``, see :mod:`pyblend.layout`); ``max_seqlen``: the longest molecule (read from
            ``cu_seqlens`` when None; required under ``torch.compile``, which cannot read it, and then trusted).
        std_eps: added to ``|stds|``: 1e-2 in Transformer-M / MoleBlend, 1e-5 in Uni-Mol.
        backend: "triton" | "reference" | None (automatic: Triton for CUDA tensors; ``PYBLEND_BACKEND``).

    Returns:
        ``(attn_bias, atom_features)`` in w1's dtype: padded ``(B, H, N, N)`` and ``(B, N, K)``, packed ``(H, P)``
        and ``(T, K)`` (the layouts :func:`pyblend.ops.relation_attention` takes as ``bias``). 0 at pairs touching
        a padded atom and at padded atoms. Gaussians, MLP and sums are computed in float32 (float64 on the
        reference backend for float64 inputs).

    Outside ``torch.compile``, validation reads ``cu_seqlens`` and the range of the pair types: one small
    device-to-host copy each (none with :class:`pyblend.set_value_checks` off; packed calls then pass
    ``max_seqlen``).
    """
    (positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens, max_seqlen) = _validate(
        positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens, max_seqlen, std_eps)
    chosen = choose_backend("gaussian_basis_bias", backend, positions.device, {
        "triton": lambda: _triton_reasons(positions, w1, w2),
        "reference": lambda: [],
    }, inputs=(positions, means, stds, mul, bias, w1, b1, w2, b2))
    if chosen == "reference":
        return _reference(positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask=mask,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, std_eps=float(std_eps))
    return call(_forward_op, positions, pair_types, means, stds, mul.reshape(-1), bias.reshape(-1), w1, b1, w2, b2,
                mask, cu_seqlens, max_seqlen, float(std_eps))


def _triton_reasons(positions: Tensor, w1: Tensor, w2: Tensor) -> list[str]:
    reasons = triton_reasons(positions.device, positions.dtype, w1.dtype, w2.dtype)
    for name, x in (("positions", positions), ("w1", w1)):
        if x.dtype not in _KERNEL_DTYPES:
            reasons.append(f"the kernel computes in float16, bfloat16 or float32, got {name} {x.dtype}")
    if max(w1.shape) > _MAX_KERNELS:
        reasons.append(f"K = {w1.shape[1]}, K_hidden = {w1.shape[0]}: the kernel takes at most {_MAX_KERNELS}")
    if w2.shape[0] > _MAX_HEADS:
        reasons.append(f"H = {w2.shape[0]} heads > {_MAX_HEADS}")
    return reasons


def _validate(positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens, max_seqlen,
              std_eps):
    names = ("positions", "pair_types", "means", "stds", "mul", "bias", "w1", "b1", "w2", "b2")
    values = (positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2)
    positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2 = (as_tensor(x, n) for x, n in zip(values, names))
    mask = as_tensor(mask, "mask", optional=True)
    cu_seqlens = as_tensor(cu_seqlens, "cu_seqlens", optional=True)
    packed = cu_seqlens is not None
    check_dtype(positions, "positions", _FLOAT_DTYPES)
    check_dtype(pair_types, "pair_types", INTEGER_DTYPES)
    check_dtype(w1, "w1", _FLOAT_DTYPES)
    for name, x in zip(names[2:], (means, stds, mul, bias, w1, b1, w2, b2)):
        if x.dtype != w1.dtype:
            raise TypeError(f"{name}: expected the dtype of w1 ({w1.dtype}), as the parameters share one dtype; "
                            f"got {describe(x)}")
    check_same_device(positions, "positions", pair_types=pair_types, means=means, stds=stds, mul=mul, bias=bias,
                      w1=w1, b1=b1, w2=w2, b2=b2, mask=mask, cu_seqlens=cu_seqlens)

    if w1.dim() != 2 or 0 in w1.shape:
        raise ValueError(f"w1: expected shape (K_hidden, K) with K, K_hidden >= 1; got {describe(w1)}")
    hidden, kernels = w1.shape
    check_shape(means, "means", (kernels,), "(K,) with K = w1.shape[1]")
    check_shape(stds, "stds", (kernels,), "(K,) like means")
    check_shape(b1, "b1", (hidden,), "(K_hidden,) with K_hidden = w1.shape[0]")
    if w2.dim() != 2 or w2.shape[1] != hidden or w2.shape[0] == 0:
        raise ValueError(f"w2: expected shape (H, K_hidden) = (?, {hidden}) with H >= 1; got {describe(w2)}")
    check_shape(b2, "b2", (w2.shape[0],), "(H,) with H = w2.shape[0]")
    num_types = mul.shape[0] if mul.dim() else 0
    for x, name in ((mul, "mul"), (bias, "bias")):
        if x.dim() not in (1, 2) or x.shape[0] != num_types or num_types == 0 or (x.dim() == 2 and x.shape[1] != 1):
            raise ValueError(f"{name}: expected shape (n_types, 1) (an nn.Embedding(n_types, 1) weight) with "
                             f"n_types = mul.shape[0] >= 1; got {describe(x)}")

    if packed:
        check_mask(mask, (), cu_seqlens)
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ValueError(f"positions: expected the packed layout (T, 3), as cu_seqlens is given; "
                             f"got {describe(positions)}")
        if values_hidden(cu_seqlens):
            max_seqlen = check_packed_form(cu_seqlens, max_seqlen)  # P: pair_types' length
            pairs = pair_types.shape[0]
        else:
            _, max_seqlen, pairs = packed_layout(cu_seqlens, positions.shape[0], max_seqlen)
        if pair_types.dim() not in (1, 2) or pair_types.shape[0] != pairs or \
                (pair_types.dim() == 2 and pair_types.shape[1] != 2):
            raise ValueError(f"pair_types: expected the packed shape (P,) or (P, 2) with P = sum N_i^2 = {pairs}; "
                             f"got {describe(pair_types)}")
    else:
        if positions.dim() != 3 or positions.shape[2] != 3:
            raise ValueError(f"positions: expected the padded layout (B, N, 3) (or (T, 3) with cu_seqlens); "
                             f"got {describe(positions)}")
        batch, atoms = positions.shape[:2]
        check_mask(mask, (batch, atoms), None)
        if max_seqlen is not None and max_seqlen != atoms:
            raise ValueError(f"max_seqlen: the padded layout reads N = {atoms} from positions; got {max_seqlen!r}")
        max_seqlen = atoms
        if pair_types.dim() not in (3, 4) or tuple(pair_types.shape[:3]) != (batch, atoms, atoms) or \
                (pair_types.dim() == 4 and pair_types.shape[3] != 2):
            raise ValueError(f"pair_types: expected the padded shape (B, N, N) or (B, N, N, 2) = ({batch}, {atoms}, "
                             f"{atoms}[, 2]); got {describe(pair_types)}")
    check_positive_float(std_eps, "std_eps")
    if not values_hidden(pair_types):
        _check_type_range(pair_types, mask, num_types, packed)
    return positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens, max_seqlen


def _check_type_range(pair_types: Tensor, mask: Tensor | None, num_types: int, packed: bool) -> None:
    real = None  # ids at padded pairs are never read (0 stands in for them)
    if mask is not None and not packed:
        real = mask[:, :, None] & mask[:, None, :]
        real = real if pair_types.dim() == 3 else real[..., None]
    bounds = id_range(pair_types, real)
    if bounds is None:
        return
    low, high = bounds
    if low < 0 or high >= num_types:
        raise ValueError(f"pair_types: expected ids in [0, {num_types}) (rows of mul / bias) at real pairs; "
                         f"got ids in [{low}, {high}]")


# --------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("pyblend::gaussian_basis_bias", mutates_args=())
def _forward_op(positions: Tensor, pair_types: Tensor, means: Tensor, stds: Tensor, mul: Tensor, bias: Tensor,
                w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                max_seqlen: int, std_eps: float) -> tuple[Tensor, Tensor]:
    """(attn_bias (B, H, N, N) | (H, P), atom_features (B, N, K) | (T, K)) in w1's dtype; mul, bias: (n_types,)."""
    from ..kernels import gaussian_basis_bias as kernel

    return kernel.gaussian_basis_bias_forward(positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask,
                                              cu_seqlens, max_seqlen, std_eps)


@_forward_op.register_fake
def _(positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens, max_seqlen, std_eps):
    heads, kernels = w2.shape[0], w1.shape[1]
    if cu_seqlens is not None:
        return (w1.new_empty((heads, pair_types.shape[0])), w1.new_empty((positions.shape[0], kernels)))
    batch, atoms = positions.shape[:2]
    return w1.new_empty((batch, heads, atoms, atoms)), w1.new_empty((batch, atoms, kernels))


@torch.library.custom_op("pyblend::gaussian_basis_bias_backward", mutates_args=())
def _backward_op(dattn: Tensor, dfeat: Optional[Tensor], positions: Tensor, pair_types: Tensor, means: Tensor,
                 stds: Tensor, mul: Tensor, bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int,
                 std_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (positions, means, stds, mul, bias, w1, b1, w2, b2), each in its input's dtype."""
    from ..kernels import gaussian_basis_bias as kernel

    dpos, dmeans, dstds, dw1, db1, dw2, db2, dmul_pair, dbias_pair = kernel.gaussian_basis_bias_backward(
        dattn, dfeat, positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens, max_seqlen,
        std_eps)
    per_pair = 1 if pair_types.dim() == (1 if cu_seqlens is not None else 3) else 2
    types = pair_types.reshape(-1, per_pair).long().clamp(0, mul.shape[0] - 1)  # non-real pairs carry 0
    dmul = _segment_sum(types, dmul_pair, mul.shape[0])
    dbias = _segment_sum(types, dbias_pair, mul.shape[0])
    # Copies: the float32 sums are views of one buffer, and outputs may not alias each other.
    grads = (dpos, dmeans, dstds, dmul, dbias, dw1, db1, dw2, db2)
    inputs = (positions, means, stds, mul, bias, w1, b1, w2, b2)
    return tuple(g.to(x.dtype, copy=True).contiguous() for g, x in zip(grads, inputs))


def _segment_sum(types: Tensor, values: Tensor, size: int) -> Tensor:
    """``out[r] = sum of values[p] over the (pair p, slot s) with types[p, s] = r``, deterministically (a stable
    sort and a float64 prefix sum instead of index_add_, whose CUDA kernel adds atomically in any order)."""
    index = types.t().reshape(-1)
    values = values.repeat(types.shape[1])
    order = torch.argsort(index, stable=True)
    sums = torch.cumsum(values[order].double(), 0)
    sums = torch.cat([sums.new_zeros(1), sums])
    ends = torch.searchsorted(index[order], torch.arange(size, device=index.device), right=True)
    return torch.diff(sums[ends], prepend=sums.new_zeros(1)).float()


@_backward_op.register_fake
def _(dattn, dfeat, positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens, max_seqlen,
      std_eps):
    return tuple(torch.empty_like(x) for x in (positions, means, stds, mul, bias, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
    ctx.save_for_backward(*inputs[:12])
    ctx.max_seqlen, ctx.std_eps = inputs[12], inputs[13]


def _backward(ctx, dattn, dfeat):
    positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens = ctx.saved_tensors
    bias_unused = dattn is None
    if bias_unused:
        heads = w2.shape[0]
        if cu_seqlens is not None:
            dattn = w1.new_zeros((heads, pair_types.shape[0]))
        else:
            dattn = w1.new_zeros((positions.shape[0], heads, positions.shape[1], positions.shape[1]))
    grads = call(_backward_op, dattn, dfeat, positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask,
                 cu_seqlens, ctx.max_seqlen, ctx.std_eps)
    if bias_unused:
        # The atom features never pass through the MLP: None, as autograd gives on the reference path, so that an
        # optimizer skips w1, b1, w2, b2 (AdamW would decay them, and step on momentum, for a zero gradient).
        grads = (*grads[:5], None, None, None, None)
    return (grads[0], None, *grads[1:], None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_backward_op, "gaussian_basis_bias")
