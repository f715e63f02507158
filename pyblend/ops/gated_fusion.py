"""Dynamic gated fusion (IBM Dynamic Fusion, eq. 1-4): intra-modal soft gating, the inter-modal weighted sum over
the present modalities and the entropy of the modality weights, fused over the modalities.

The split between the module and the op: the per-modality linear maps (the projection of each modality to the
common width C, the gate ``W_s`` of eq. 1 and the score ``Linear(C, 1)``) are ordinary GEMMs that cuBLAS runs
well, so :class:`pyblend.nn.DynamicFusion` computes them; the op takes their outputs ``h``, ``gate_logits``
``(B, M, C)`` and ``score_logits (B, M)`` and does everything elementwise and reducing in one pass: the ``(B, M,
C)`` gate ``g`` and gated features are never written (forward or backward), and each of ``h`` and
``gate_logits`` is read once per pass. The inter-modal scores are logits supplied by the caller (the module
scores each modality's projected embedding) rather than a function of the gated feature computed in-kernel: that
would need a second pass over ``(B, M, C)`` in the backward (the score gradient feeds back into every gated
feature) for a choice the paper does not specify.

Backends: Triton (CUDA tensors, or the interpreter on request) and the plain-PyTorch reference. The Triton path
is one torch.library custom op (``pyblend::gated_fusion``) whose backward is another
(``pyblend::gated_fusion_backward``), both with fake implementations, so ``torch.compile`` traces it.
Semantics: :mod:`pyblend.reference.gated_fusion`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._values import values_hidden
from .. import reference
from ._autograd import call, refuse_double_backward
from ._checks import as_tensor, check_dtype, check_positive_float, check_shape, describe, is_finite, is_real
from ._dispatch import choose_backend, triton_reasons

__all__ = ["gated_fusion"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_MAX_CHANNELS = 4096  # kernels.gated_fusion.MAX_CHANNELS: one (rows, C) register tile per modality
_MAX_MODALITIES = 64


def gated_fusion(h: Tensor, gate_logits: Tensor, score_logits: Tensor, present: Tensor | None = None, *,
                 eps: float = 1e-8, gate_scale: float = 1.0,
                 backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gated fusion of M modality embeddings of a common width C, differentiable in ``h``, ``gate_logits`` and
    ``score_logits``.

    Per sample: ``g_m = softmax_C(gate_logits_m)`` (eq. 1), ``x~_m = gate_scale * g_m * h_m`` (eq. 2),
    ``s = softmax of score_logits over the present modalities`` (0 at a missing one),
    ``fused = sum_m s_m x~_m`` (eq. 3) and ``entropy = -sum_{m present} s_m log(s_m + eps)`` (eq. 4).

    Args:
        h: ``(B, M, C)`` the modalities projected to the common width; float16, bfloat16 or float32 (float64:
            reference backend only).
        gate_logits: ``(B, M, C)``, ``W_s h`` per modality, the dtype of ``h``.
        score_logits: ``(B, M)``, the inter-modal score of each modality, the dtype of ``h``.
        present: ``(B, M)`` bool, True = the sample has this modality; None = all present. A missing modality is
            never read (it may hold NaN). Every sample needs at least one present modality: a sample without is
            a ValueError naming it (checked with one device-to-host read, skipped under torch.compile and with
            :class:`pyblend.set_value_checks` off).
        eps: the entropy's stabiliser, a float > 0.
        gate_scale: a finite float on the gated feature; 1 is the paper's eq. 2 (each ``g`` is ~1/C), C makes an
            all-equal gate the identity.
        backend: "triton" | "reference" | None (automatic: Triton for CUDA tensors; ``PYBLEND_BACKEND``).

    Returns:
        ``(fused (B, C), weights (B, M), entropy (B,))``: ``fused`` in the dtype of ``h``, the weights (summing to
        1 over the present modalities, exactly 0 at the missing ones) and the entropy in float32 (float64 for
        float64 inputs).
    """
    h, gate_logits, score_logits, present = _validate(h, gate_logits, score_logits, present, eps, gate_scale)
    chosen = choose_backend("gated_fusion", backend, h.device, {
        "triton": lambda: _triton_reasons(h),
        "reference": lambda: [],
    }, inputs=(h, gate_logits, score_logits))
    if chosen == "reference":
        return reference.gated_fusion(h, gate_logits, score_logits, present, eps=float(eps),
                                      gate_scale=float(gate_scale))
    return call(_fusion_op, h, gate_logits, score_logits, present, float(gate_scale), float(eps))


def _triton_reasons(h: Tensor) -> list[str]:
    reasons = triton_reasons(h.device, h.dtype)
    if h.dtype not in _KERNEL_DTYPES:
        reasons.append(f"the kernel computes in float16, bfloat16 or float32, got {h.dtype}")
    if h.shape[2] > _MAX_CHANNELS:
        reasons.append(f"width C = {h.shape[2]} > {_MAX_CHANNELS}")
    if h.shape[1] > _MAX_MODALITIES:
        reasons.append(f"M = {h.shape[1]} modalities > {_MAX_MODALITIES}")
    return reasons


def _validate(h, gate_logits, score_logits, present, eps, gate_scale):
    h = as_tensor(h, "h")
    gate_logits = as_tensor(gate_logits, "gate_logits")
    score_logits = as_tensor(score_logits, "score_logits")
    present = as_tensor(present, "present", optional=True)
    check_dtype(h, "h", _FLOAT_DTYPES)
    if h.dim() != 3 or h.shape[1] == 0 or h.shape[2] == 0:
        raise ValueError(f"h: expected shape (B, M, C) with M >= 1 and C >= 1; got {describe(h)}")
    batch, modalities, channels = h.shape
    for name, x, shape, meaning in (("gate_logits", gate_logits, (batch, modalities, channels), "(B, M, C)"),
                                    ("score_logits", score_logits, (batch, modalities), "(B, M)")):
        if x.dtype != h.dtype:
            raise TypeError(f"{name}: expected the dtype of h ({h.dtype}); got {describe(x)}")
        check_shape(x, name, shape, meaning + " like h")
        if x.device != h.device:
            raise ValueError(f"{name}: expected a tensor on {h.device} like h; got {describe(x)}")
    check_positive_float(eps, "eps")
    if not is_real(gate_scale) or not is_finite(gate_scale):
        raise ValueError(f"gate_scale: expected a finite float; got {gate_scale!r}")
    if present is not None:
        check_dtype(present, "present", (torch.bool,))
        check_shape(present, "present", (batch, modalities), "(B, M) like h")
        if present.device != h.device:
            raise ValueError(f"present: expected a tensor on {h.device} like h; got {describe(present)}")
        if not values_hidden(present):
            _check_every_sample_has_a_modality(present)
    return h, gate_logits, score_logits, present


def _check_every_sample_has_a_modality(present: Tensor) -> None:
    empty = (~present.any(dim=1)).nonzero().flatten()  # the one device-to-host read
    if empty.numel():
        samples = empty[:10].tolist()
        more = f" (and {empty.numel() - 10} more)" if empty.numel() > 10 else ""
        which = f"sample {samples[0]}" if empty.numel() == 1 else f"samples {samples}{more}"
        verb = "has" if empty.numel() == 1 else "have"
        raise ValueError(f"present: {which} of the batch {verb} no present modality (present[{samples[0]}] is all "
                         f"False); every sample needs at least one modality to fuse")


# --------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("pyblend::gated_fusion", mutates_args=())
def _fusion_op(h: Tensor, gate_logits: Tensor, score_logits: Tensor, present: Optional[Tensor], gate_scale: float,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(fused (B, C) in h's dtype, weights (B, M) float32, entropy (B,) float32)."""
    from ..kernels import gated_fusion as kernel

    return kernel.gated_fusion_forward(h, gate_logits, score_logits, present, gate_scale, eps)


@_fusion_op.register_fake
def _(h, gate_logits, score_logits, present, gate_scale, eps):
    batch, modalities, channels = h.shape
    return (h.new_empty(batch, channels), h.new_empty(batch, modalities, dtype=torch.float32),
            h.new_empty(batch, dtype=torch.float32))


@torch.library.custom_op("pyblend::gated_fusion_backward", mutates_args=())
def _backward_op(dfused: Tensor, dweights: Tensor, dentropy: Tensor, h: Tensor, gate_logits: Tensor,
                 score_logits: Tensor, present: Optional[Tensor], weights: Tensor, gate_scale: float,
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dgate_logits, dscore_logits) in the inputs' dtypes, exactly 0 at missing modalities."""
    from ..kernels import gated_fusion as kernel

    return kernel.gated_fusion_backward(dfused, dweights, dentropy.contiguous(), h, gate_logits, score_logits,
                                        present, weights.contiguous(), gate_scale, eps)


@_backward_op.register_fake
def _(dfused, dweights, dentropy, h, gate_logits, score_logits, present, weights, gate_scale, eps):
    return (torch.empty(h.shape, dtype=h.dtype, device=h.device),
            torch.empty(gate_logits.shape, dtype=gate_logits.dtype, device=h.device),
            torch.empty(score_logits.shape, dtype=score_logits.dtype, device=h.device))


def _setup_context(ctx, inputs, output):
    h, gate_logits, score_logits, present, gate_scale, eps = inputs
    _, weights, _ = output
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
    ctx.save_for_backward(h, gate_logits, score_logits, present, weights)
    ctx.gate_scale, ctx.eps = gate_scale, eps


def _backward(ctx, dfused, dweights, dentropy):
    h, gate_logits, score_logits, present, weights = ctx.saved_tensors
    batch, modalities, channels = h.shape
    weights_only = dfused is None
    if weights_only:
        dfused = h.new_zeros(batch, channels)
    if dweights is None:
        dweights = weights.new_zeros(batch, modalities)
    if dentropy is None:
        dentropy = weights.new_zeros(batch)
    dh, dgate, dscore = call(
        _backward_op, dfused, dweights, dentropy, h, gate_logits, score_logits, present, weights, ctx.gate_scale,
        ctx.eps)
    if weights_only:  # h and the gate reach only the fused output: None, as autograd gives the reference
        dh = dgate = None
    return dh, dgate, dscore, None, None, None


_fusion_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_backward_op, "gated_fusion")
