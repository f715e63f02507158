"""Fourier-domain cross-attention: one MM-Lego LegoBlock step (seed 004, eq. 2-3).

Semantics: :mod:`pyblend.reference.fourier_cross_attention`.

The split on the Triton path:

* token side, in torch: the real FFT of the tokens along N (torch.fft / cuFFT: lengths up to 10^4, per sample
  over its real tokens only), the context LayerNorm and the K/V projection. These are computed once per token
  and the projection is one large GEMM (F.linear / cuBLAS), which a fused kernel could only match; autograd
  differentiates them.
* latent side and attention, in Triton (:mod:`pyblend.kernels.fourier_cross_attention`): the column norms, the
  DFT rows of the latent (small matrix products, twiddles generated in-kernel), LayerNorm, the query projection,
  a flash-style cross-attention over token blocks (the (B, H, C, N) scores are never materialised, forward or
  backward), the output projection, LeakyReLU, residual, the optional feed-forward, and the recombination with
  the kept imaginary part and inverse DFT. The backward runs the flash-attention backward kernels for the
  attention core; the latent-side parts (DFT transposes, LayerNorms, feed-forward, projections, weight
  gradients as reductions over B*C rows) are recomputed in torch from the (B, C, D)-sized saved tensors.

The Triton path is the torch.library custom op ``pyblend::fourier_cross_attention`` whose backward is
``pyblend::fourier_cross_attention_backward``, both with fake implementations, so ``torch.compile`` traces them.
Complex tensors cross the op boundary as ``torch.view_as_real`` float32 views.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._values import values_hidden
from .. import reference
from ..reference.fourier_cross_attention import fft, pack_tokens, token_spectrum
from ._autograd import call, refuse_double_backward
from ._checks import as_tensor, check_dtype, check_flag, check_positive_float, check_shape, describe, is_int
from ._dispatch import choose_backend, triton_reasons

__all__ = ["fourier_cross_attention"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_LATENT_DTYPES = (*_FLOAT_DTYPES, torch.complex64, torch.complex128)
_MAX_LATENT = 256  # kernels.fourier_cross_attention.MAX_LATENT
_MAX_HEAD_DIM = 128  # the kernels' float32 attention tiles spill beyond (ptxas, sm_90)
_FF_NAMES = ("ff_in_weight", "ff_out_weight")
_FLAGS = ("token_fft", "normalize", "inverse", "latent_norm", "context_norm", "ff_norm")
# The tensors each LayerNorm switch leaves unused when off.
_NORM_WEIGHTS = {"latent_norm": ("latent_norm_weight", "latent_norm_bias"),
                 "context_norm": ("context_norm_weight", "context_norm_bias"),
                 "ff_norm": ("ff_norm_weight", "ff_norm_bias")}


def fourier_cross_attention(
        latent: Tensor, tokens: Tensor, q_weight: Tensor, kv_weight: Tensor, out_weight: Tensor,
        out_bias: Tensor | None = None, *, heads: int,
        latent_norm_weight: Tensor | None = None, latent_norm_bias: Tensor | None = None,
        context_norm_weight: Tensor | None = None, context_norm_bias: Tensor | None = None,
        ff_norm_weight: Tensor | None = None, ff_norm_bias: Tensor | None = None,
        ff_in_weight: Tensor | None = None, ff_in_bias: Tensor | None = None,
        ff_out_weight: Tensor | None = None, ff_out_bias: Tensor | None = None,
        token_mask: Tensor | None = None, temperature: float = 0.5, fft_dims: int = 2, token_fft: bool = True,
        normalize: bool = True, inverse: bool = True, latent_norm: bool = True, context_norm: bool = True,
        ff_norm: bool = True, eps: float = 1e-5, backend: str | None = None) -> Tensor:
    """One LegoBlock update of a latent by one modality's tokens, differentiable in every tensor argument.

    Args:
        latent: ``(B, C, D)`` real (float16 / bfloat16 / float32) or complex64 (an earlier step's output);
            float64 / complex128 run on the reference backend only. C, D <= 256 and Dh <= 128 on the Triton
            path.
        tokens: ``(B, N, E)`` a float dtype (float64: reference only), on the latent's device.
        q_weight: ``(H*Dh, D)``; kv_weight: ``(2*H*Dh, E)`` (k rows first); out_weight: ``(D, H*Dh)``;
            out_bias: ``(D,)`` or None.
        heads: H, a positive int dividing the query width ``q_weight.shape[0]``.
        latent_norm_weight / latent_norm_bias: ``(D,)`` or None; context_norm_*: ``(E,)`` or None;
            ff_norm_*: ``(D,)`` or None. Each only with its LayerNorm on (``latent_norm``, ``context_norm``,
            ``ff_norm``), and ``ff_norm_*`` only with the feed-forward: a tensor that would go unused is a
            ValueError, not silently ignored.
        ff_in_weight ``(2F, D)``, ff_in_bias ``(2F,)``, ff_out_weight ``(D, F)``, ff_out_bias ``(D,)``: the
            gated-SELU feed-forward; ``ff_in_weight`` and ``ff_out_weight`` both or neither.
        token_mask: ``(B, N)`` bool, True = real token; masked tokens are never read (they may hold NaN).
        temperature: > 0, divides the attention logits (after ``Dh^-0.5``).
        fft_dims: 2 (FFT over (C, D), the paper) or 1 (over C, the public code).
        token_fft, normalize, inverse, latent_norm, context_norm, ff_norm: bools (numpy's included), as the
            reference.
        eps: the LayerNorms' eps, a finite float > 0.
        backend: "triton" | "reference" | None (automatic: Triton for CUDA tensors; ``PYBLEND_BACKEND``).

    Returns:
        The complex latent ``(B, C, D)``: complex64 (complex128 on the reference path for 64-bit inputs).
    """
    weights = dict(q_weight=q_weight, kv_weight=kv_weight, out_weight=out_weight, out_bias=out_bias,
                   latent_norm_weight=latent_norm_weight, latent_norm_bias=latent_norm_bias,
                   context_norm_weight=context_norm_weight, context_norm_bias=context_norm_bias,
                   ff_norm_weight=ff_norm_weight, ff_norm_bias=ff_norm_bias, ff_in_weight=ff_in_weight,
                   ff_in_bias=ff_in_bias, ff_out_weight=ff_out_weight, ff_out_bias=ff_out_bias)
    flags = dict(token_fft=token_fft, normalize=normalize, inverse=inverse, latent_norm=latent_norm,
                 context_norm=context_norm, ff_norm=ff_norm)
    # Both backends take what _validate returns: the same checks, and plain Python bools, ints and floats.
    latent, tokens, weights, token_mask, flags = _validate(latent, tokens, weights, token_mask, heads, temperature,
                                                           fft_dims, eps, flags)
    heads = int(heads)
    options = dict(token_mask=token_mask, temperature=float(temperature), fft_dims=int(fft_dims), **flags,
                   eps=float(eps))
    chosen = choose_backend("fourier_cross_attention", backend, latent.device, {
        "triton": lambda: _triton_reasons(latent, tokens, weights, heads),
        "reference": lambda: [],
    }, inputs=(latent, tokens, weights))
    if chosen == "reference":
        return reference.fourier_cross_attention(latent, tokens, heads=heads, **weights, **options)
    return _triton(latent, tokens, weights, heads, **options)


def _triton_reasons(latent: Tensor, tokens: Tensor, weights: dict, heads: int) -> list[str]:
    inputs = [x for x in (latent, tokens, *weights.values()) if x is not None]
    reasons = triton_reasons(latent.device, *(x.dtype for x in inputs))
    wide = [name for name, x in (("latent", latent), ("tokens", tokens), *weights.items())
            if x is not None and x.dtype in (torch.float64, torch.complex128)]
    if wide:
        reasons.append(f"the kernels compute in float32 (inputs float16, bfloat16, float32 or complex64); "
                       f"{', '.join(wide)} {'is' if len(wide) == 1 else 'are'} 64-bit")
    _, channels, dim = latent.shape
    if channels > _MAX_LATENT or dim > _MAX_LATENT:
        reasons.append(f"latent (C, D) = ({channels}, {dim}): the kernels take C, D <= {_MAX_LATENT}")
    head_dim = weights["q_weight"].shape[0] // heads
    if head_dim > _MAX_HEAD_DIM:
        reasons.append(f"head width Dh = {head_dim} > {_MAX_HEAD_DIM}")
    return reasons


def _validate(latent, tokens, weights, token_mask, heads, temperature, fft_dims, eps, flags):
    latent = as_tensor(latent, "latent")
    tokens = as_tensor(tokens, "tokens")
    weights = {name: as_tensor(x, name, optional=name not in ("q_weight", "kv_weight", "out_weight"))
               for name, x in weights.items()}
    token_mask = as_tensor(token_mask, "token_mask", optional=True)
    check_dtype(latent, "latent", _LATENT_DTYPES)
    if latent.dim() != 3 or 0 in latent.shape[1:]:
        raise ValueError(f"latent: expected shape (B, C, D) with C >= 1 and D >= 1; got {describe(latent)}")
    check_dtype(tokens, "tokens", _FLOAT_DTYPES)
    if tokens.dim() != 3 or tokens.shape[0] != latent.shape[0] or tokens.shape[2] == 0:
        raise ValueError(f"tokens: expected shape (B, N, E) with B = {latent.shape[0]} like latent and E >= 1; "
                         f"got {describe(tokens)}")
    batch, channels, dim = latent.shape
    tokens_count, width = tokens.shape[1], tokens.shape[2]
    if not is_int(heads) or heads < 1:
        raise ValueError(f"heads: expected a positive int; got {heads!r}")
    heads = int(heads)
    flags = {name: check_flag(value, name) for name, value in flags.items()}
    q_weight = weights["q_weight"]
    if q_weight.dim() != 2 or q_weight.shape[1] != dim or q_weight.shape[0] % heads:
        raise ValueError(f"q_weight: expected shape (H*Dh, D) = (?, {dim}) with the query width divisible by "
                         f"heads = {heads}; got {describe(q_weight)}")
    inner = q_weight.shape[0]
    ffn = None
    if (weights["ff_in_weight"] is None) != (weights["ff_out_weight"] is None):
        given, missing = _FF_NAMES if weights["ff_in_weight"] is not None else _FF_NAMES[::-1]
        raise ValueError(f"{missing}: the feed-forward needs ff_in_weight and ff_out_weight together; "
                         f"{given} was given without it")
    if weights["ff_in_weight"] is None:
        stray = [n for n in ("ff_in_bias", "ff_out_bias", "ff_norm_weight", "ff_norm_bias") if weights[n] is not None]
        if stray:
            raise ValueError(f"{stray[0]}: given without the feed-forward weights (ff_in_weight, ff_out_weight), "
                             f"so it would be unused; pass None or the feed-forward weights")
    else:
        ff_in = weights["ff_in_weight"]
        if ff_in.dim() != 2 or ff_in.shape[1] != dim or ff_in.shape[0] % 2 or ff_in.shape[0] == 0:
            raise ValueError(f"ff_in_weight: expected shape (2F, D) = (?, {dim}) with an even, nonzero first "
                             f"size; got {describe(ff_in)}")
        ffn = ff_in.shape[0] // 2
    expected = dict(kv_weight=((2 * inner, width), "(2*H*Dh, E)"), out_weight=((dim, inner), "(D, H*Dh)"),
                    out_bias=((dim,), "(D,)"), latent_norm_weight=((dim,), "(D,)"),
                    latent_norm_bias=((dim,), "(D,)"), context_norm_weight=((width,), "(E,)"),
                    context_norm_bias=((width,), "(E,)"), ff_norm_weight=((dim,), "(D,)"),
                    ff_norm_bias=((dim,), "(D,)"), ff_in_bias=((2 * (ffn or 0),), "(2F,)"),
                    ff_out_weight=((dim, ffn), "(D, F)"), ff_out_bias=((dim,), "(D,)"))
    for switch, names in _NORM_WEIGHTS.items():
        stray = [n for n in names if weights[n] is not None]
        if stray and not flags[switch]:
            raise ValueError(f"{stray[0]}: given with {switch}=False, which leaves it unused; pass None or "
                             f"{switch}=True")
    for name, x in weights.items():
        if x is None:
            continue
        check_dtype(x, name, _FLOAT_DTYPES)
        if name in expected:
            check_shape(x, name, *expected[name])
        if x.device != latent.device:
            raise ValueError(f"{name}: expected a tensor on {latent.device} like latent; got {describe(x)}")
    if tokens.device != latent.device:
        raise ValueError(f"tokens: expected a tensor on {latent.device} like latent; got {describe(tokens)}")
    if token_mask is not None:
        check_dtype(token_mask, "token_mask", (torch.bool,))
        check_shape(token_mask, "token_mask", (batch, tokens_count), "(B, N) like tokens")
        if token_mask.device != latent.device:
            raise ValueError(f"token_mask: expected a tensor on {latent.device} like latent; "
                             f"got {describe(token_mask)}")
    check_positive_float(temperature, "temperature")
    if not is_int(fft_dims) or fft_dims not in (1, 2):
        raise ValueError(f"fft_dims: expected 1 (over C) or 2 (over C and D); got {fft_dims!r}")
    check_positive_float(eps, "eps")
    return latent, tokens, weights, token_mask, flags


# ----------------------------------------------------------------------------------------------- Triton path


def _token_spectrum(tokens: Tensor, token_mask: Tensor | None) -> Tensor:
    """``Re FFT`` along N of each sample's real tokens (float32, zeros at masked slots), differentiable.

    torch.fft (cuFFT) rather than a kernel: N reaches 10^4 and is arbitrary (not a power of two), which an FFT
    library handles in O(N log N); a DFT by matrix products would cost O(N^2 E). Samples are packed (real tokens
    first, in order; masked slots are never read, so NaN there cannot leak) and transformed in one batch per
    distinct token count (one device-to-host read of the counts); under torch.compile, where that read would
    break the graph, the reference's :func:`token_spectrum` does all lengths at once (Bluestein)."""
    x = tokens.float()
    if token_mask is None:
        return fft(x, (1,)).real
    if values_hidden(token_mask):
        return token_spectrum(x, token_mask)
    packed, index, counts = pack_tokens(x, token_mask)
    spectra = torch.zeros_like(packed)
    for count in counts.unique().tolist():
        if count == 0:
            continue
        chosen = (counts == count).nonzero().squeeze(1)
        spectra = spectra.index_put((chosen,), F.pad(torch.fft.fft(packed[chosen, :count], dim=1).real,
                                                     (0, 0, 0, x.shape[1] - count)))
    return torch.zeros_like(x).scatter(1, index, spectra)


def _triton(latent, tokens, weights, heads, *, token_mask, temperature, fft_dims, token_fft, normalize, inverse,
            latent_norm, context_norm, ff_norm, eps):
    # Token side in torch (see the module docstring): computed once per token, one cuBLAS GEMM for K and V.
    if token_fft:
        context = _token_spectrum(tokens, token_mask)
    else:
        context = tokens.float()
        if token_mask is not None:
            context = torch.where(token_mask[..., None], context, 0.0)
    if context_norm:
        context = F.layer_norm(context, (context.shape[-1],), _f32(weights["context_norm_weight"]),
                               _f32(weights["context_norm_bias"]), eps)
    # K and V in the tokens' dtype, unless the spectrum was left unnormalised: its DC term sums every token and
    # leaves the 16-bit range (a silent inf), so that case stays in float32.
    kv_dtype = torch.float32 if token_fft and not context_norm else tokens.dtype
    kv = F.linear(context.to(kv_dtype), weights["kv_weight"].to(kv_dtype)).contiguous()

    if latent.is_complex():
        latent_ri = torch.view_as_real(latent.to(torch.complex64).resolve_conj())  # a conj() view has no real view
    else:
        real = latent.float()
        latent_ri = torch.stack((real, torch.zeros_like(real)), dim=-1)
    head_dim = weights["q_weight"].shape[0] // heads
    scale = head_dim ** -0.5 / temperature
    out = call(
        _forward_op, latent_ri.contiguous(), kv, token_mask, *(_f32(weights[name]) for name in _WEIGHT_ORDER), heads,
        scale, fft_dims, normalize, latent_norm, ff_norm, inverse, eps)[0]
    return torch.view_as_complex(out)


_WEIGHT_ORDER = ("q_weight", "out_weight", "out_bias", "latent_norm_weight", "latent_norm_bias", "ff_norm_weight",
                 "ff_norm_bias", "ff_in_weight", "ff_in_bias", "ff_out_weight", "ff_out_bias")


def _f32(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.float().contiguous()


def _filled(wq, wo, bo, lnw, lnb, fnw, fnb, w1, b1, w2, b2):
    """Absent affine parts as ones / zeros, so the kernels take one code path."""
    dim = wq.shape[1]
    ones, zeros = wq.new_ones(dim), wq.new_zeros(dim)
    bo = zeros if bo is None else bo
    lnw, lnb = (ones if lnw is None else lnw), (zeros if lnb is None else lnb)
    if w1 is not None:
        fnw, fnb = (ones if fnw is None else fnw), (zeros if fnb is None else fnb)
        b1 = wq.new_zeros(w1.shape[0]) if b1 is None else b1
        b2 = zeros if b2 is None else b2
    return bo, lnw, lnb, fnw, fnb, b1, b2


@torch.library.custom_op("pyblend::fourier_cross_attention", mutates_args=())
def _forward_op(latent: Tensor, kv: Tensor, token_mask: Optional[Tensor], q_weight: Tensor, out_weight: Tensor,
                out_bias: Optional[Tensor], latent_norm_weight: Optional[Tensor], latent_norm_bias: Optional[Tensor],
                ff_norm_weight: Optional[Tensor], ff_norm_bias: Optional[Tensor], ff_in_weight: Optional[Tensor],
                ff_in_bias: Optional[Tensor], ff_out_weight: Optional[Tensor], ff_out_bias: Optional[Tensor],
                heads: int, scale: float, fft_dims: int, normalize: bool, latent_norm: bool, ff_norm: bool,
                inverse: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out (B, C, D, 2), o (B, C, H*Dh), lse2 (B, H, C), q (B, C, H*Dh))`` float32 from ``latent (B, C, D, 2)``
    float32 and ``kv (B, N, 2*H*Dh)``; weights float32. ``o``, ``lse2`` and the unscaled ``q`` are saved for the
    backward."""
    from ..kernels import fourier_cross_attention as kernel

    bo, lnw, lnb, fnw, fnb, b1, b2 = _filled(q_weight, out_weight, out_bias, latent_norm_weight, latent_norm_bias,
                                             ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight,
                                             ff_out_bias)
    out, _, o, lse, _, q = kernel.fourier_cross_attention_forward(
        latent.contiguous(), kv.contiguous(), token_mask, q_weight.contiguous(), out_weight.contiguous(), bo, lnw,
        lnb, fnw, fnb, ff_in_weight, b1, ff_out_weight, b2, heads, scale, fft_dims, normalize, latent_norm, ff_norm,
        inverse, eps)
    return out, o, lse, q


@_forward_op.register_fake
def _(latent, kv, token_mask, q_weight, *rest):
    batch, channels, _, _ = latent.shape
    heads = rest[10]
    f32 = dict(dtype=torch.float32, device=latent.device)
    return (torch.empty(latent.shape, **f32), torch.empty(batch, channels, q_weight.shape[0], **f32),
            torch.empty(batch, heads, channels, **f32), torch.empty(batch, channels, q_weight.shape[0], **f32))


@torch.library.custom_op("pyblend::fourier_cross_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, latent: Tensor, kv: Tensor, token_mask: Optional[Tensor], o: Tensor, lse: Tensor,
                 q: Tensor, q_weight: Tensor, out_weight: Tensor, out_bias: Optional[Tensor],
                 latent_norm_weight: Optional[Tensor], latent_norm_bias: Optional[Tensor],
                 ff_norm_weight: Optional[Tensor], ff_norm_bias: Optional[Tensor], ff_in_weight: Optional[Tensor],
                 ff_in_bias: Optional[Tensor], ff_out_weight: Optional[Tensor], ff_out_bias: Optional[Tensor],
                 heads: int, scale: float, fft_dims: int, normalize: bool, latent_norm: bool, ff_norm: bool,
                 inverse: bool, eps: float) -> list[Tensor]:
    """Gradients of (latent, kv, q_weight, out_weight, out_bias, latent_norm_weight, latent_norm_bias,
    ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias); float32 (kv's dtype
    for dkv), an empty tensor for an argument that is None."""
    return _backward_impl(grad_out, latent, kv, token_mask, o, lse, q, q_weight, out_weight, out_bias,
                          latent_norm_weight, latent_norm_bias, ff_norm_weight, ff_norm_bias, ff_in_weight,
                          ff_in_bias, ff_out_weight, ff_out_bias, heads, scale, fft_dims, normalize, latent_norm,
                          ff_norm, inverse, eps)


@_backward_op.register_fake
def _(grad_out, latent, kv, token_mask, o, lse, q, *weights_and_options):
    weights = weights_and_options[:11]
    shaped = [torch.empty(latent.shape, dtype=torch.float32, device=latent.device),
              torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)]
    shaped += [torch.empty(w.shape if w is not None else (0,), dtype=torch.float32, device=latent.device)
               for w in weights]
    return shaped


def _layer_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x - mean).square().mean(-1, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    y = xhat if weight is None else xhat * weight
    return (y if bias is None else y + bias), xhat, rstd


def _layer_norm_backward(dy: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor | None):
    """(dx, dweight, dbias) of a LayerNorm over the last axis; weight gradients summed over every row."""
    dxhat = dy if weight is None else dy * weight
    dx = (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd
    return dx, (dy * xhat).flatten(0, -2).sum(0), dy.flatten(0, -2).sum(0)


def _rows_gram(a: Tensor, b: Tensor) -> Tensor:
    """``sum over rows of a^T b`` for (..., m) and (..., n): a weight gradient, reduced over B*C rows."""
    return a.flatten(0, -2).T @ b.flatten(0, -2)


def _backward_impl(grad_out, latent, kv, token_mask, o, lse, q, wq, wo, bo, lnw, lnb, fnw, fnb, w1, b1, w2, b2,
                   heads, scale, fft_dims, normalize, latent_norm, ff_norm, inverse, eps):
    from ..kernels import fourier_cross_attention as kernel

    dims = (1, 2) if fft_dims == 2 else (1,)
    size = latent.shape[1] * (latent.shape[2] if fft_dims == 2 else 1)
    batch, channels, dim, _ = latent.shape
    l = torch.view_as_complex(latent.contiguous())
    # Recompute the latent side (B, C, D)-sized: normalisation, spectrum, LayerNorm, projections.
    if normalize:
        norm = l.abs().square().sum(1, keepdim=True).sqrt()
        clamped = norm.clamp_min(1e-12)
        ln = l / clamped
    else:
        ln = l
    q_in = fft(ln, dims).real
    x, xhat, rstd = _layer_norm_forward(q_in, lnw, lnb, eps) if latent_norm else (q_in, None, None)
    a_pre = o @ wo.T if bo is None else o @ wo.T + bo
    if token_mask is not None:
        has = token_mask.any(1)
    else:
        has = torch.full((batch,), kv.shape[1] > 0, dtype=torch.bool, device=latent.device)
    has = has[:, None, None]

    # out = IDFT(u + i Im L) (or u + i Im L): its adjoint is DFT / size.
    g = torch.view_as_complex(grad_out.contiguous())
    gz = fft(g, dims) / size if inverse else g
    du, d_imag = gz.real, gz.imag
    dq_in = torch.where(has, 0.0, du)
    du = torch.where(has, du, 0.0)
    grads = {}
    if w1 is not None:
        u1 = q_in + F.leaky_relu(a_pre, 0.01)
        z, zhat, zrstd = _layer_norm_forward(u1, fnw, fnb, eps) if ff_norm else (u1, None, None)
        hidden = z @ w1.T if b1 is None else z @ w1.T + b1
        value, gate = hidden.chunk(2, dim=-1)
        selu = F.selu(gate)
        grads["ff_out_weight"] = _rows_gram(du, value * selu)
        grads["ff_out_bias"] = du.flatten(0, 1).sum(0) if b2 is not None else None
        dgated = du @ w2
        dselu = torch.where(gate > 0, 1.0507009873554805, 1.0507009873554805 * 1.6732632423543772 * gate.exp())
        dhidden = torch.cat((dgated * selu, dgated * value * dselu), dim=-1)
        grads["ff_in_weight"] = _rows_gram(dhidden, z)
        grads["ff_in_bias"] = dhidden.flatten(0, 1).sum(0) if b1 is not None else None
        dz = dhidden @ w1
        if ff_norm:
            dz, grads["ff_norm_weight"], grads["ff_norm_bias"] = _layer_norm_backward(dz, zhat, zrstd, fnw)
        du = du + dz
    da = du * torch.where(a_pre > 0, 1.0, 0.01)
    grads["out_weight"] = _rows_gram(da, o)
    grads["out_bias"] = da.flatten(0, 1).sum(0) if bo is not None else None
    do = (da @ wo).contiguous()
    head_dim = wq.shape[0] // heads
    delta = (do * o).unflatten(-1, (heads, head_dim)).sum(-1).transpose(1, 2).contiguous()   # (B, H, C)
    # The forward's own q (kernel.fourier_cross_attention_forward says why), not x Wq^T from this recomputation.
    dq, dkv = kernel.fourier_cross_attention_attention_backward(q, do, lse.contiguous(), delta, kv.contiguous(),
                                                                token_mask, heads, scale)
    grads["q_weight"] = _rows_gram(dq, x)
    dx = dq @ wq
    if latent_norm:
        dx, grads["latent_norm_weight"], grads["latent_norm_bias"] = _layer_norm_backward(dx, xhat, rstd, lnw)
    dq_in = dq_in + du + dx
    # q_in + i Im L = DFT(l~): the adjoint of the DFT is size * IDFT.
    g_ln = fft(torch.complex(dq_in, d_imag), dims, inverse=True) * size
    if normalize:
        inner = (l.conj() * g_ln).real.sum(1, keepdim=True)
        g_l = g_ln / clamped - torch.where(norm > 1e-12, l * inner / (clamped * clamped * clamped), 0.0)
    else:
        g_l = g_ln
    result = [torch.view_as_real(g_l).contiguous(), dkv.to(kv.dtype)]
    supplied = dict(q_weight=wq, out_weight=wo, out_bias=bo, latent_norm_weight=lnw, latent_norm_bias=lnb,
                    ff_norm_weight=fnw, ff_norm_bias=fnb, ff_in_weight=w1, ff_in_bias=b1, ff_out_weight=w2,
                    ff_out_bias=b2)
    for name in _WEIGHT_ORDER:
        grad = grads.get(name)
        if supplied[name] is None:
            result.append(latent.new_empty(0))
        else:  # a weight of a switched-off LayerNorm gets zeros
            result.append(torch.zeros_like(supplied[name]) if grad is None else grad.contiguous())
    return result


def _setup_context(ctx, inputs, output):
    latent, kv, token_mask, *weights = inputs[:14]
    ctx.options = inputs[14:]
    _, o, lse, q = output
    ctx.present = [w is not None for w in weights]
    ctx.save_for_backward(latent, kv, token_mask, o, lse, q, *weights)


def _backward(ctx, grad_out, _do, _dlse, _dq):
    latent, kv, token_mask, o, lse, q, *weights = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(latent)
    grads = call(_backward_op, grad_out.contiguous(), latent, kv, token_mask, o, lse, q, *weights, *ctx.options)
    # A switched-off LayerNorm's weights take no part: no gradient (None), as autograd gives the reference.
    latent_norm, ff_norm = ctx.options[4], ctx.options[5]
    unused = set() if latent_norm else {"latent_norm_weight", "latent_norm_bias"}
    if not (ff_norm and ctx.present[_WEIGHT_ORDER.index("ff_in_weight")]):
        unused |= {"ff_norm_weight", "ff_norm_bias"}
    dweights = [grad if present and name not in unused else None
                for name, grad, present in zip(_WEIGHT_ORDER, grads[2:], ctx.present)]
    return (grads[0], grads[1], None, *dweights, *([None] * len(ctx.options)))


_forward_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_backward_op, "fourier_cross_attention")
