"""Pair distances and Gaussian-basis relation features (MoleBlend eq. 6-7) for data pipelines.

Backends: the C++ engine (CPU, float32/float64, no gradient needed: data pipelines) and the plain-PyTorch
reference (any device and dtype, differentiable in every argument). The fused GPU kernel that never writes the
``(..., K)`` features belongs to the MoleBlend bias op; on CUDA tensors these ops run the reference.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import reference
from .._extension import load_extension
from .._values import values_hidden
from ..layout import check_cu_seqlens
from ._checks import (FLOAT_DTYPES, INTEGER_DTYPES, as_tensor, check_dtype, check_mask, check_same_device,
                      check_shape, describe)
from ._dispatch import choose_backend, cpp_reasons

__all__ = ["gaussian_basis", "pair_distances"]

_CPP_DTYPES = (torch.float32, torch.float64)


def _cpp_reasons(tensors: list[Tensor]) -> list[str]:
    reasons = cpp_reasons(tensors[0].device)
    if any(t.requires_grad for t in tensors) and torch.is_grad_enabled():
        reasons.append("an input requires grad; the C++ engine computes no gradient")
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if not dtypes <= set(_CPP_DTYPES) or len(dtypes) > 1:
        reasons.append(f"the C++ engine needs one dtype, float32 or float64, got {sorted(map(str, dtypes))}")
    return reasons


def pair_distances(pos, mask=None, *, cu_seqlens=None, backend: str | None = None):
    """Euclidean distance of every atom pair.

    Args:
        pos: float. Padded ``(B, N, 3)``; packed ``(T, 3)`` with ``cu_seqlens``.
        mask: ``(B, N)`` bool, True = real atom (padded only). Masked positions are never read (NaN padding is
            safe) and their pairs are 0.
        cu_seqlens: ``(B+1,)`` int32, selects the packed layout.
        backend: "cpp" | "reference" | None (automatic: C++ for CPU inputs that need no gradient).

    Returns:
        ``(B, N, N)`` padded or ``(P,)`` packed (pyblend.layout), in ``pos``'s dtype. numpy in, numpy out.
    """
    numpy_in = isinstance(pos, np.ndarray)
    pos = as_tensor(pos, "pos")
    mask = as_tensor(mask, "mask", optional=True)
    cu_seqlens = as_tensor(cu_seqlens, "cu_seqlens", optional=True)
    check_dtype(pos, "pos", FLOAT_DTYPES)
    check_same_device(pos, "pos", mask=mask, cu_seqlens=cu_seqlens)
    if cu_seqlens is None:
        check_shape(pos, "pos", (None, None, 3), "(B, N, 3)")
    else:
        check_shape(pos, "pos", (None, 3), "(T, 3)")
        check_cu_seqlens(cu_seqlens, total=pos.shape[0])
    check_mask(mask, pos.shape[:2], cu_seqlens)
    chosen = choose_backend("pair_distances", backend, pos.device,
                            {"cpp": lambda: _cpp_reasons([pos]), "reference": lambda: []}, inputs=pos)
    if chosen == "cpp":
        out = torch.ops.pyblend.pair_distances_cpp(pos, mask, cu_seqlens)
    elif cu_seqlens is None:
        out = reference.pair_distances(pos, mask)
    else:
        out = reference.pair_distances_packed(pos, cu_seqlens)
    return out.numpy() if numpy_in else out


def gaussian_basis(distances, pair_types, means, stds, mul, bias, *, backend: str | None = None):
    """Gaussian-basis features of pair distances (Uni-Mol / Transformer-M GaussianLayer semantics).

    ``x = sum_t mul[types_t] * d + sum_t bias[types_t]`` then
    ``g_k = exp(-0.5 ((x - means_k) / s_k)^2) / (sqrt(2 pi) s_k)`` with ``s_k = |stds_k| + 0.01``.

    Args:
        distances: ``(...)`` float: ``(B, N, N)`` padded or ``(P,)`` packed.
        pair_types: integer, ``distances.shape`` (one type per pair) or ``distances.shape + (t,)`` (``t``
            indices per pair, summed, e.g. the two atoms' types as Transformer-M does).
        means, stds: ``(K,)`` float. mul, bias: ``(num_types,)`` or ``(num_types, 1)`` float.
        backend: "cpp" | "reference" | None (automatic: C++ for CPU float32/float64 inputs needing no grad).

    Returns:
        ``distances.shape + (K,)``, dtype promoted from ``distances`` and ``means``. numpy in, numpy out.
    """
    numpy_in = isinstance(distances, np.ndarray)
    names = ("distances", "pair_types", "means", "stds", "mul", "bias")
    tensors = [as_tensor(x, name) for x, name in zip((distances, pair_types, means, stds, mul, bias), names)]
    distances, pair_types, means, stds, mul, bias = tensors
    check_dtype(distances, "distances", FLOAT_DTYPES)
    check_dtype(pair_types, "pair_types", INTEGER_DTYPES)
    for x, name in zip((means, stds, mul, bias), names[2:]):
        check_dtype(x, name, FLOAT_DTYPES)
    check_same_device(distances, "distances", pair_types=pair_types, means=means, stds=stds, mul=mul, bias=bias)
    if tuple(pair_types.shape[:distances.dim()]) != tuple(distances.shape) or \
            pair_types.dim() not in (distances.dim(), distances.dim() + 1):
        raise ValueError(f"pair_types: expected shape {tuple(distances.shape)} or {tuple(distances.shape)} + (t,) "
                         f"like distances; got {describe(pair_types)}")
    check_shape(means, "means", (None,), "(K,)")
    check_shape(stds, "stds", (means.shape[0],), "(K,) like means")
    num_types = mul.shape[0] if mul.dim() else 0
    for x, name in ((mul, "mul"), (bias, "bias")):
        if x.dim() not in (1, 2) or x.shape[0] != num_types or (x.dim() == 2 and x.shape[1] != 1):
            raise ValueError(f"{name}: expected shape (num_types,) or (num_types, 1) with num_types = "
                             f"{num_types}; got {describe(x)}")
    # The range is read on the host, which meta or fake tensors and torch.compile do not allow: trusted there.
    if pair_types.numel() and not values_hidden(pair_types):
        low, high = int(pair_types.min()), int(pair_types.max())
        if low < 0 or high >= num_types:
            raise ValueError(f"pair_types: expected values in [0, {num_types}) (rows of mul/bias); "
                             f"got values in [{low}, {high}]")
    chosen = choose_backend("gaussian_basis", backend, distances.device,
                            {"cpp": lambda: _cpp_reasons([distances, means, stds, mul, bias]),
                             "reference": lambda: []}, inputs=(distances, means, stds, mul, bias))
    if chosen == "cpp":
        out = torch.ops.pyblend.gaussian_basis_cpp(distances, pair_types, means, stds, mul.reshape(-1),
                                                   bias.reshape(-1))
    else:
        out = reference.gaussian_basis(distances, pair_types, means, stds, mul, bias)
    return out.numpy() if numpy_in else out


@torch.library.custom_op("pyblend::pair_distances_cpp", mutates_args=(), device_types="cpu")
def _pair_distances_cpp(pos: Tensor, mask: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> Tensor:
    engine = load_extension()
    if cu_seqlens is None:
        out = engine.pair_distances_padded(pos.contiguous().numpy(), None if mask is None else mask.numpy())
    else:
        out = engine.pair_distances_packed(pos.contiguous().numpy(), cu_seqlens.numpy())
    return torch.from_numpy(out)


@_pair_distances_cpp.register_fake
def _(pos, mask, cu_seqlens):
    if cu_seqlens is None:
        return pos.new_empty((pos.shape[0], pos.shape[1], pos.shape[1]))
    pairs = torch.library.get_ctx().new_dynamic_size()
    return pos.new_empty((pairs,))


@torch.library.custom_op("pyblend::gaussian_basis_cpp", mutates_args=(), device_types="cpu")
def _gaussian_basis_cpp(distances: Tensor, pair_types: Tensor, means: Tensor, stds: Tensor, mul: Tensor,
                        bias: Tensor) -> Tensor:
    types = pair_types.long()
    if types.dim() == distances.dim():
        types = types[..., None]
    # The width t is spelled out: reshape cannot infer a -1 next to a zero (an empty batch has no pairs).
    flat = load_extension().gaussian_basis(
        distances.contiguous().reshape(-1).numpy(),
        types.contiguous().reshape(distances.numel(), types.shape[-1]).numpy(),
        means.contiguous().numpy(), stds.contiguous().numpy(), mul.contiguous().numpy(), bias.contiguous().numpy())
    return torch.from_numpy(flat).reshape(*distances.shape, means.shape[0])


@_gaussian_basis_cpp.register_fake
def _(distances, pair_types, means, stds, mul, bias):
    return distances.new_empty((*distances.shape, means.shape[0]))
