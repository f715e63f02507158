"""Plain-PyTorch Fourier-domain cross-attention: one MM-Lego LegoBlock step (seed 004, eq. 2-3).

Semantics every backend follows, per sample, for a latent ``l (C, D)`` (real, or complex after an earlier step;
C latent channels, D latent dims) and modality tokens ``x (N, E)``:

1. ``normalize``: ``l <- l / max(||l||, 1e-12)``, the norm taken over the channel axis C for each of the D columns
   (``|l|^2`` summed for a complex latent). The public code divides with no floor.
2. Spectrum ``L = FFT(l)``: over (C, D) for ``fft_dims=2`` (the paper), over C only for ``fft_dims=1`` (the
   public code). ``q_in = Re L``; ``Im L`` is kept for step 7.
3. Context: ``Re FFT(x)`` along the token axis for ``token_fft=True`` (the public code), the raw tokens
   otherwise. With a ``token_mask`` the FFT runs over the sample's real tokens only, in order (length = their
   count), exactly as if the sample were alone; masked tokens are never read.
4. PreNorm: LayerNorm over D of ``q_in`` and over E of the context (each optional, affine optional).
5. Multi-head cross-attention: ``q = q_in W_q^T (C, H*Dh)``, ``k, v = split(ctx W_kv^T)`` (k first),
   ``softmax(q_h k_h^T * Dh^-0.5 / temperature)`` over the real tokens, ``o = attn v``;
   ``a = leaky_relu(o W_out^T + b_out, 0.01)``; residual ``u = q_in + a``.
6. Optional gated-SELU feed-forward (PreNorm, residual): ``u <- u + W_2 (h * selu(g)) + b_2`` with
   ``(h, g) = split(W_1 LN(u) + b_1)`` (h first).
7. Recombination ``u + i Im L``, then the inverse FFT over the same axes when ``inverse=True`` (every step but
   the last; the last returns the spectrum, which the task head reads).

A sample with no real token (all of its ``token_mask`` False) is skipped: attention and feed-forward add
nothing, so it gets ``normalize(l)`` back (``inverse=True``) or its spectrum ``L`` (``inverse=False``).

Returns the complex latent ``(B, C, D)``: complex128 for float64/complex128 inputs, complex64 otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._values import values_hidden
from ._norm import vector_norm

__all__ = ["fft", "fourier_cross_attention", "token_spectrum"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    wide = any(t.dtype in (torch.float64, torch.complex128) for t in tensors)
    return torch.float64 if wide else torch.float32


def fft(x: Tensor, dim: tuple[int, ...], *, inverse: bool = False) -> Tensor:
    """``torch.fft.fftn`` (``ifftn`` when ``inverse``) of a float32/float64 or complex ``x`` over ``dim``, also
    for an ``x`` with no elements (a batch of 0 samples, 0 tokens), which the FFT libraries refuse; its
    transform is the same empty tensor, complex."""
    if x.numel() == 0:
        return x.to(torch.complex128 if x.dtype in (torch.float64, torch.complex128) else torch.complex64)
    return (torch.fft.ifftn if inverse else torch.fft.fftn)(x, dim=dim)


def token_spectrum(tokens: Tensor, token_mask: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``Re FFT`` of ``tokens (B, N, E)`` along N over each sample's real tokens (step 3), computed in ``dtype``
    (default: the tokens' dtype promoted to float32/float64). Masked positions come back as zeros.

    Eager calls transform each sample alone (its real tokens found on the host). Under torch.compile, where
    that read would break the graph (and for meta or fake tensors, which have no values), every length at once by :func:`ragged_fft_real`: the same transform up to
    rounding (Bluestein's algorithm), which ``fullgraph=True`` traces."""
    tokens = tokens.to(dtype or _compute_dtype(tokens))
    if token_mask is None:
        return fft(tokens, (1,)).real
    if values_hidden(token_mask):
        packed, index, counts = pack_tokens(tokens, token_mask)
        return torch.zeros_like(tokens).scatter(1, index, ragged_fft_real(packed, counts))
    out = torch.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        real = token_mask[b].nonzero().squeeze(1)
        if len(real):
            out[b, real] = torch.fft.fft(tokens[b, real], dim=0).real
    return out


def pack_tokens(tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's real tokens first, in order: ``(packed (B, N, E), index (B, N, E), counts (B,))`` with
    ``packed = tokens.gather(1, index)`` (its rows from ``counts[b]`` on hold masked tokens: never read them)
    and ``index`` the permutation that ``scatter(1, index, ...)`` undoes. No host read."""
    counts = token_mask.sum(1)
    order = torch.argsort((~token_mask).to(torch.int8), dim=1, stable=True)
    index = order[..., None].expand(-1, -1, tokens.shape[2])
    return tokens.gather(1, index), index, counts


def ragged_fft_real(packed: Tensor, counts: Tensor) -> Tensor:
    """``Re FFT`` of length ``counts[b]`` of each ``packed[b, :counts[b]]`` (float32 or float64 ``(B, N, E)``;
    zeros from ``counts[b]`` on), with no host read: Bluestein's chirp-z transform writes a length-n DFT as a
    convolution with the chirp ``exp(i pi m^2 / n)``, done by FFTs of one length L = 2N >= 2N - 1 for every
    sample. Costs about three FFTs of length L instead of one of length n, so eager calls transform each length
    on its own."""
    batch, width = packed.shape[:2]
    complex_dtype = torch.complex128 if packed.dtype == torch.float64 else torch.complex64
    # Any length >= 2N - 1 holds the linear convolution; 2N rather than the next power of two, whose bit_length()
    # would fix N in the compiled graph (one recompilation per token count).
    length = 2 * width
    n = counts.clamp(min=1).to(torch.int64)[:, None]
    m = torch.arange(width, device=packed.device, dtype=torch.int64)
    inside = m < counts[:, None]
    # m^2 mod 2n in integers: the phase pi m^2 / n stays exact for any N.
    angle = (m * m % (2 * n)).double() * (math.pi / n.double())
    chirp = torch.polar(inside.double(), angle).to(complex_dtype)  # (B, N), zero from n on
    signal = torch.where(inside[..., None], packed, 0.0) * chirp.conj()[..., None]
    kernel = torch.zeros(batch, length, dtype=complex_dtype, device=packed.device)
    kernel[:, :width] = chirp
    kernel[:, length - width + 1:] = chirp[:, 1:].flip(1)  # b[-m] = b[m]: the negative lags wrap around
    spectrum = torch.fft.ifft(torch.fft.fft(signal, n=length, dim=1) * torch.fft.fft(kernel, dim=1)[..., None],
                              dim=1)[:, :width]
    return (spectrum * chirp.conj()[..., None]).real


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
        ff_norm: bool = True, eps: float = 1e-5) -> Tensor:
    """Differentiable reference of :func:`pyblend.ops.fourier_cross_attention` (inputs are not validated here).

    Shapes: ``latent (B, C, D)`` real or complex; ``tokens (B, N, E)``; ``q_weight (H*Dh, D)``;
    ``kv_weight (2*H*Dh, E)``; ``out_weight (D, H*Dh)``; ``out_bias (D,)``; LayerNorm weights/biases ``(D,)`` /
    ``(E,)``; ``ff_in_weight (2*F, D)``, ``ff_in_bias (2*F,)``, ``ff_out_weight (D, F)``, ``ff_out_bias (D,)``
    (the feed-forward runs when ``ff_in_weight`` is given); ``token_mask (B, N)`` bool, True = real token.
    ``latent_norm`` / ``context_norm`` / ``ff_norm`` switch the three LayerNorms (their weights may be None for
    a non-affine norm). Computes in float64 when any input is 64-bit, float32 otherwise.
    """
    parameters = [t for t in (q_weight, kv_weight, out_weight, out_bias, latent_norm_weight, latent_norm_bias,
                              context_norm_weight, context_norm_bias, ff_norm_weight, ff_norm_bias, ff_in_weight,
                              ff_in_bias, ff_out_weight, ff_out_bias) if t is not None]
    compute = _compute_dtype(latent, tokens, *parameters)
    cast = (lambda t: None if t is None else t.to(compute))
    complex_dtype = torch.complex128 if compute == torch.float64 else torch.complex64
    axes = (1, 2) if fft_dims == 2 else (1,)

    latent = latent.to(complex_dtype) if latent.is_complex() else latent.to(compute)
    if normalize:
        # vector_norm's gradient at a zero column is 0 (sqrt's would be inf, and inf * 0 = NaN through the clamp);
        # this one's second derivative there too.
        norm = vector_norm(latent, dim=1, keepdim=True)
        latent = latent / norm.clamp_min(1e-12)
    spectrum = fft(latent, axes)
    q_in, kept_imag = spectrum.real, spectrum.imag

    context = token_spectrum(tokens, token_mask, compute) if token_fft else tokens.to(compute)
    if not token_fft and token_mask is not None:  # masked tokens are never read (0 * NaN would leak through v)
        context = torch.where(token_mask[..., None], context, torch.zeros((), dtype=compute, device=context.device))
    width = context.shape[-1]
    if context_norm:
        context = F.layer_norm(context, (width,), cast(context_norm_weight), cast(context_norm_bias), eps)
    dim = q_in.shape[-1]
    query = F.layer_norm(q_in, (dim,), cast(latent_norm_weight), cast(latent_norm_bias), eps) if latent_norm \
        else q_in

    batch, channels, _ = q_in.shape
    q = (query @ cast(q_weight).T).unflatten(-1, (heads, -1)).transpose(1, 2)            # (B, H, C, Dh)
    k, v = (context @ cast(kv_weight).T).chunk(2, dim=-1)
    k = k.unflatten(-1, (heads, -1)).transpose(1, 2)                                     # (B, H, N, Dh)
    v = v.unflatten(-1, (heads, -1)).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 / temperature)
    if token_mask is not None:
        logits = logits.masked_fill(~token_mask[:, None, None, :], float("-inf"))
    has_tokens = token_mask.any(dim=1) if token_mask is not None else \
        torch.full((batch,), tokens.shape[1] > 0, device=q_in.device)
    # A sample without tokens: finite logits (then its update is dropped below), so no NaN reaches a gradient.
    logits = torch.where(has_tokens[:, None, None, None], logits, torch.zeros((), dtype=compute, device=q.device))
    attended = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).flatten(2)            # (B, C, H*Dh)
    update = F.leaky_relu(attended @ cast(out_weight).T + (0 if out_bias is None else cast(out_bias)), 0.01)
    u = q_in + update

    if ff_in_weight is not None:
        hidden = F.layer_norm(u, (dim,), cast(ff_norm_weight), cast(ff_norm_bias), eps) if ff_norm else u
        hidden = hidden @ cast(ff_in_weight).T + (0 if ff_in_bias is None else cast(ff_in_bias))
        value, gate = hidden.chunk(2, dim=-1)
        u = u + (value * F.selu(gate)) @ cast(ff_out_weight).T + (0 if ff_out_bias is None else cast(ff_out_bias))

    u = torch.where(has_tokens[:, None, None], u, q_in)
    out = torch.complex(u, kept_imag)
    return fft(out, axes, inverse=True) if inverse else out
