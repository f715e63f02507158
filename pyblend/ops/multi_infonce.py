"""Multi-pair InfoNCE (MolBind): a weighted sum of symmetric contrastive losses over modality pairs, computed
blockwise so that no ``(B, B)`` similarity matrix is ever materialised.

Backends: Triton (CUDA tensors, or the interpreter on request) and the plain-PyTorch reference. The Triton path
splits each pair's loss into

    loss_ab = sum_{i present} (row_lse_i + col_lse_i - 2 S_ii) / (2 n),   S_ij = (a_i . b_j) * sa_i * sb_j,

with ``sa = 1 / (||a|| * temperature)`` and ``sb = 1 / ||b||`` (``1 / temperature`` and 1 without
normalisation). The scales, the diagonal ``S_ii`` and the sum are differentiable torch ops on ``(B,)`` /
``(B, d)`` tensors, so the gradients of the normalisation and of a learnable temperature come from autograd;
the row and column log-sum-exps, the only ``O(B^2 d)`` part, are one torch.library custom op
(``pyblend::multi_infonce_lse``, its backward another, both with fake implementations) so ``torch.compile``
traces it. Normalisation is fused that way: the embeddings are never rewritten normalised (their norms are one
float32 ``(B,)`` reduction); the kernels read them in their own dtype and scale each float32 tile. With a mask,
a zero-filled copy of the modality feeds the torch-side terms (norms, diagonal) so that NaN in an absent row
cannot reach a gradient; the kernels read the original, masked.
Semantics: :mod:`pyblend.reference.multi_infonce`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ._checks import as_tensor, check_dtype, check_shape, describe
from ._dispatch import choose_backend, triton_reasons

__all__ = ["multi_infonce"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_MAX_DIM = 512  # wider: a (16, D) tile spills registers on sm_90 (see the compile test)
_NORM_EPS = 1e-12  # F.normalize's


def multi_infonce(embeddings: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]], *,
                  weights: Sequence[float] | None = None, temperature: float | Tensor = 0.1,
                  masks: Mapping[str, Tensor] | None = None, normalize: bool = True,
                  backend: str | None = None) -> Tensor:
    """Weighted sum over modality pairs of the symmetric InfoNCE loss, differentiable in every embedding and in
    a tensor temperature.

    For a pair ``(a, b)``, over the samples present in both (``masks``): with ``x = a``, ``y = b`` (L2-normalised
    along ``d`` when ``normalize``), ``logits = x y^T / temperature`` restricted to the present rows and columns,
    ``loss_ab = (CE(logits, diag) + CE(logits^T, diag)) / 2``, each cross-entropy a mean over the present samples.
    **A pair with no present sample in common contributes 0** (value and gradient), never NaN.

    Args:
        embeddings: modality name -> ``(B, d)`` float tensor; float16, bfloat16 or float32 (float64: reference
            backend only), one dtype, one ``B`` and one device for all; ``d`` may differ between modalities
            that are not paired together.
        pairs: ``(a, b)`` modality names; each pair's two embeddings must have the same ``d``.
        weights: one float per pair, used as given. Default: ``1 / len(pairs)`` each.
        temperature: a float > 0, or a 0-dim float tensor (learnable: it gets a gradient). A tensor's value is
            checked only when it is on the CPU and outside torch.compile (no device-to-host copy).
        masks: modality name -> ``(B,)`` bool, True = the sample has this modality. A modality without a mask is
            present everywhere. Absent samples are never read (they may hold NaN).
        normalize: L2-normalise the embeddings along ``d`` first (as MolBind does).
        backend: "triton" | "reference" | None (automatic: Triton for CUDA tensors; ``PYBLEND_BACKEND``).

    Returns:
        a 0-dim tensor, float32 (float64 for float64 embeddings).
    """
    embeddings, pairs, weights, masks = _validate(embeddings, pairs, weights, temperature, masks, normalize)
    first = next(iter(embeddings.values()))
    chosen = choose_backend("multi_infonce", backend, first.device, {
        "triton": lambda: _triton_reasons(embeddings, pairs),
        "reference": lambda: [],
    })
    if chosen == "reference":
        return reference.multi_infonce(embeddings, pairs, weights=weights, temperature=temperature, masks=masks,
                                       normalize=normalize)

    # Per modality, once: absent rows zeroed for the torch-side terms (the kernels read the raw tensor, masked)
    # and the float32 inverse norms.
    used = sorted({name for pair in pairs for name in pair})
    safe, inverse_norm = {}, {}
    for name in used:
        x = embeddings[name]
        mask = masks.get(name)
        safe[name] = x if mask is None else torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype,
                                                                                          device=x.device))
        if normalize:
            norm = torch.linalg.vector_norm(safe[name], dim=-1, dtype=torch.float32)
            inverse_norm[name] = 1.0 / norm.clamp(min=_NORM_EPS)
        else:
            inverse_norm[name] = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    total = None
    for (a, b), weight in zip(pairs, weights):
        loss = weight * _pair_loss(embeddings[a], embeddings[b], safe[a], safe[b], inverse_norm[a] / temperature,
                                   inverse_norm[b], _both(masks.get(a), masks.get(b)))
        total = loss if total is None else total + loss
    return total


def _pair_loss(x, y, x_safe, y_safe, x_scale, y_scale, present):
    x_scale = x_scale.to(torch.float32).contiguous()
    y_scale = y_scale.to(torch.float32).contiguous()
    row_lse, col_lse = torch.ops.pyblend.multi_infonce_lse(x, y, x_scale, y_scale, present)
    diagonal = (x_safe.float() * y_safe.float()).sum(-1) * x_scale * y_scale
    terms = row_lse + col_lse - 2.0 * diagonal
    if present is None:
        return terms.sum() / (2 * max(x.shape[0], 1))
    terms = torch.where(present, terms, 0.0)
    return terms.sum() / (2 * present.sum().clamp(min=1))  # nothing in common: 0 / 2


def _both(first, second):
    if first is None:
        return second
    if second is None:
        return first
    return first & second


def _triton_reasons(embeddings, pairs) -> list[str]:
    first = next(iter(embeddings.values()))
    reasons = triton_reasons(first.device)
    if first.dtype not in _KERNEL_DTYPES:
        reasons.append(f"the kernel computes in float16, bfloat16 or float32, got {first.dtype}")
    widest = max(embeddings[name].shape[1] for pair in pairs for name in pair)
    if widest > _MAX_DIM:
        reasons.append(f"embedding dim {widest} > {_MAX_DIM}")
    return reasons


def _validate(embeddings, pairs, weights, temperature, masks, normalize):
    if not isinstance(embeddings, Mapping) or not embeddings:
        raise TypeError(f"embeddings: expected a non-empty dict of modality name -> (B, d) tensor; "
                        f"got {type(embeddings).__name__ if not isinstance(embeddings, Mapping) else 'an empty dict'}")
    embeddings = {name: as_tensor(x, f"embeddings[{name!r}]") for name, x in embeddings.items()}
    first_name, first = next(iter(embeddings.items()))
    for name, x in embeddings.items():
        label = f"embeddings[{name!r}]"
        check_dtype(x, label, _FLOAT_DTYPES)
        if x.dim() != 2:
            raise ValueError(f"{label}: expected shape (B, d); got {describe(x)}")
        if x.dtype != first.dtype:
            raise TypeError(f"{label}: expected the dtype of embeddings[{first_name!r}] ({first.dtype}); "
                            f"got {describe(x)}")
        if x.shape[0] != first.shape[0]:
            raise ValueError(f"{label}: expected batch size B = {first.shape[0]} like embeddings[{first_name!r}]; "
                             f"got {describe(x)}")
        if x.device != first.device:
            raise ValueError(f"{label}: expected a tensor on {first.device} like embeddings[{first_name!r}]; "
                             f"got {describe(x)}")

    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"pairs: expected a non-empty list of (modality, modality) tuples; got {pairs!r}")
    pairs = list(pairs)
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"pairs: expected (modality, modality) tuples; got {pair!r}")
        for name in pair:
            if name not in embeddings:
                raise ValueError(f"pairs: modality {name!r} in pair {tuple(pair)!r} is not in embeddings "
                                 f"(which has {sorted(embeddings)})")
        a, b = pair
        if embeddings[a].shape[1] != embeddings[b].shape[1]:
            raise ValueError(f"pairs: pair {tuple(pair)!r} needs one embedding dim; embeddings[{a!r}] has "
                             f"d = {embeddings[a].shape[1]} and embeddings[{b!r}] has d = {embeddings[b].shape[1]}")
    pairs = [tuple(pair) for pair in pairs]

    if weights is None:
        weights = [1.0 / len(pairs)] * len(pairs)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights: expected a list or tuple of floats, one per pair; got "
                            f"{type(weights).__name__}")
        if len(weights) != len(pairs):
            raise ValueError(f"weights: expected one weight per pair ({len(pairs)}); got {len(weights)}")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise TypeError(f"weights: expected finite floats; got {w!r}")
        weights = [float(w) for w in weights]

    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point() or temperature.dim() != 0:
            raise TypeError(f"temperature: expected a float or a 0-dim float tensor; got {describe(temperature)}")
        if temperature.device != first.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature: expected a tensor on {first.device} (or the CPU); "
                             f"got {describe(temperature)}")
        if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(temperature.detach())
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"temperature: expected a finite value > 0; got {value!r}")
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite float > 0 or a 0-dim tensor; got {temperature!r}")

    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool; got {normalize!r}")

    masks = dict(masks or {})
    for name, mask in list(masks.items()):
        if name not in embeddings:
            raise ValueError(f"masks: modality {name!r} is not in embeddings (which has {sorted(embeddings)})")
        label = f"masks[{name!r}]"
        mask = as_tensor(mask, label)
        check_dtype(mask, label, (torch.bool,))
        check_shape(mask, label, (first.shape[0],), "(B,)")
        if mask.device != first.device:
            raise ValueError(f"{label}: expected a tensor on {first.device} like the embeddings; got {describe(mask)}")
        masks[name] = mask.contiguous()
    return embeddings, pairs, weights, masks


# --------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("pyblend::multi_infonce_lse", mutates_args=())
def _lse_op(x: Tensor, y: Tensor, x_scale: Tensor, y_scale: Tensor,
            present: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exps (float32 ``(B,)``, 0 at absent samples) of
    ``S = (x y^T) * x_scale[:, None] * y_scale[None, :]`` over present pairs."""
    from ..kernels import multi_infonce as kernel

    return kernel.multi_infonce_lse_forward(x, y, x_scale.contiguous(), y_scale.contiguous(),
                                            None if present is None else present.contiguous())


@_lse_op.register_fake
def _(x, y, x_scale, y_scale, present):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("pyblend::multi_infonce_lse_backward", mutates_args=())
def _backward_op(grad_row: Tensor, grad_col: Tensor, x: Tensor, y: Tensor, x_scale: Tensor, y_scale: Tensor,
                 present: Optional[Tensor], row_lse: Tensor, col_lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dx_scale, dy_scale), 0 at absent samples."""
    from ..kernels import multi_infonce as kernel

    return kernel.multi_infonce_lse_backward(grad_row, grad_col, x, y, x_scale.contiguous(), y_scale.contiguous(),
                                             None if present is None else present.contiguous(), row_lse.contiguous(),
                                             col_lse.contiguous())


@_backward_op.register_fake
def _(grad_row, grad_col, x, y, x_scale, y_scale, present, row_lse, col_lse):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(y.shape, dtype=y.dtype, device=y.device),
            x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, y, x_scale, y_scale, present = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(x, y, x_scale, y_scale, present, row_lse, col_lse)


def _backward(ctx, grad_row, grad_col):
    x, y, x_scale, y_scale, present, row_lse, col_lse = ctx.saved_tensors
    if grad_row is None:
        grad_row = torch.zeros_like(row_lse)
    if grad_col is None:
        grad_col = torch.zeros_like(col_lse)
    dx, dy, dx_scale, dy_scale = torch.ops.pyblend.multi_infonce_lse_backward(
        grad_row, grad_col, x, y, x_scale, y_scale, present, row_lse, col_lse)
    return dx, dy, dx_scale.to(x_scale.dtype), dy_scale.to(y_scale.dtype), None


_lse_op.register_autograd(_backward, setup_context=_setup_context)
