"""Fourier-domain cross-attention (MM-Lego LegoBlock, eq. 2-3) in Triton: the latent-side DFTs fused with the
query path, a flash-style cross-attention over the modality tokens, and its backward.

Semantics: :mod:`pyblend.reference.fourier_cross_attention`. The kernels see, per sample b:

* ``latent (B, C, D, 2)`` float32: the complex latent as ``torch.view_as_real`` (contiguous);
* ``kv (B, N, 2*H*Dh)`` (float16 / bfloat16 / float32, contiguous): ``[k | v]`` of every token, already projected
  (the context LayerNorm and K/V projection are one cuBLAS GEMM done by the op, once per token, not per latent
  row tile);
* ``mask (B, N)`` uint8 (a ``bool`` view), 1 = real token; optional;
* float32 weights: ``wq (H*Dh, D)``, ``wo (D, H*Dh)``, ``bo (D,)``, LayerNorm ``(D,)`` weights / biases,
  ``w1 (2F, D)``, ``b1 (2F,)``, ``w2 (D, F)``, ``b2 (D,)`` (absent affine parts come as ones / zeros).

Kernels:

``_fca_fwd_kernel``, one program per (tile of BLOCK_C latent rows, sample): the column norms of the latent over C
and the rows of ``q_in = Re DFT(latent / norm)`` (2-D over (C, D), or over C only), as small matrix products with
twiddles generated in-kernel (the angle from the integer ``(j * k) mod n``, so it stays exact for n <= 256); the
LayerNorm statistics; then per head ``q = LN(q_in) Wq_h^T``, an online softmax over BLOCK_N token blocks of
``k_h``/``v_h`` (the (C, N) scores never leave registers) and ``o_h`` written (the backward needs it) with the
row's log-sum-exp (base 2: ``lse2 = log2 sum 2^(s * log2 e)``; +inf for a sample without a token); then
``o Wout^T`` over all heads, bias, LeakyReLU(0.01), residual, the optional gated-SELU feed-forward row-wise, and
the real update ``u`` written. The complex spectrum is never written. Register budget (ptxas, sm_90, D = 256):
``q_in`` waits in the program's own rows of ``u`` while the heads run, and every product with a K extent of D
or H*Dh reads its (BLOCK_C, K) operand back from there (or from ``o``) in BLOCK_KD slices, because a whole
(BLOCK_C, D) dot operand is replicated in every warp. K/V are read in their dtype and the attention math runs in
float32 (TF32x3 tensor-core dots by default): float16 K/V products are cheap next to the K/V GEMM, and float32
keeps the softmax and its gradient at the inputs' precision.

``_fca_out_kernel``, one program per (row tile, sample): the output latent. With ``inverse`` it is
``IDFT(u + i Im L)``; since ``IDFT(i Im L) = (l~ - conj(l~[-n])) / 2`` exactly (``l~`` the normalised latent,
``-n`` the index negated over the transformed axes), the imaginary part of the spectrum is never formed: the
kernel transforms the real ``u`` and adds that term read straight from the latent. Without ``inverse`` it
recomputes ``Im L`` rows by the same DFT as the forward kernel and writes ``u + i Im L``.

``_fca_bwd_dq_kernel`` (per latent row tile and (sample, head)) and ``_fca_bwd_dkv_kernel`` (per token tile and
(sample, head), looping over the latent rows): the flash-attention backward from the saved ``lse2`` and
``delta = rowsum(dO * O)``. Each output element has one owner: deterministic, no atomics. Masked tokens are
never read (their loads are masked) and get exactly zero gradient.
"""
import torch
import triton
import triton.language as tl

from . import launch_grid

LOG2E = 1.4426950408889634
MAX_LATENT = 256  # C and D: one (BLOCK_C, D) register tile per row block


@triton.jit
def _twiddle(rows, cols, n, INVERSE: tl.constexpr):
    """(cos, sin) parts of ``exp(-+2 pi i rows cols / n)`` as (len(rows), len(cols)) float32 tiles; the angle
    comes from the integer ``rows * cols mod n`` so it stays in [0, 2 pi) and keeps full float32 accuracy."""
    k = (rows[:, None] * cols[None, :]) % n
    angle = k.to(tl.float32) * (6.283185307179586 / n)
    if INVERSE:
        return tl.cos(angle), tl.sin(angle)
    return tl.cos(angle), -tl.sin(angle)


@triton.jit
def _spectrum_rows(l_ptr, rinv_ptr, b, rows, C, D, WRITE_RINV, NORMALIZE: tl.constexpr, FFT2: tl.constexpr,
                   WANT_RE: tl.constexpr, WANT_IM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K2: tl.constexpr):
    """Rows ``rows`` of ``DFT(l / norm)`` as (re, im) (BLOCK_C, BLOCK_D) float32 tiles, 0 in padded columns.

    For each block of BLOCK_K2 latent columns: ``Y = W_C[rows, :] l[:, cols]`` over every channel (the column
    norms come in the same pass), scaled by 1/norm, then (2-D) ``Y W_D[cols, :]`` accumulated. One read of the
    sample's latent per program. The program with ``WRITE_RINV`` stores 1/norm (B, D) for the other kernels."""
    offs_d = tl.arange(0, BLOCK_D)
    re = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    im = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    base = l_ptr + b * C * D * 2
    for d0 in range(0, D, BLOCK_K2):
        cols = d0 + tl.arange(0, BLOCK_K2)
        cols_in = cols < D
        yr = tl.zeros((BLOCK_C, BLOCK_K2), dtype=tl.float32)
        yi = tl.zeros((BLOCK_C, BLOCK_K2), dtype=tl.float32)
        sq = tl.zeros((BLOCK_K2,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            ks = c0 + tl.arange(0, BLOCK_K)
            inside = (ks[:, None] < C) & cols_in[None, :]
            at = base + (ks[:, None] * D + cols[None, :]) * 2
            lr = tl.load(at, mask=inside, other=0.0)
            li = tl.load(at + 1, mask=inside, other=0.0)
            sq += tl.sum(lr * lr + li * li, 0)
            wr, wi = _twiddle(rows, ks, C, False)
            yr += tl.dot(wr, lr, input_precision=PRECISION) - tl.dot(wi, li, input_precision=PRECISION)
            yi += tl.dot(wr, li, input_precision=PRECISION) + tl.dot(wi, lr, input_precision=PRECISION)
        if NORMALIZE:
            rinv = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
        else:
            rinv = tl.full((BLOCK_K2,), 1.0, dtype=tl.float32)
        tl.store(rinv_ptr + b * D + cols, rinv, mask=cols_in & WRITE_RINV)
        yr = yr * rinv[None, :]
        yi = yi * rinv[None, :]
        if FFT2:
            wr, wi = _twiddle(cols, offs_d, D, False)
            if WANT_RE:
                re += tl.dot(yr, wr, input_precision=PRECISION) - tl.dot(yi, wi, input_precision=PRECISION)
            if WANT_IM:
                im += tl.dot(yr, wi, input_precision=PRECISION) + tl.dot(yi, wr, input_precision=PRECISION)
        else:  # BLOCK_K2 == BLOCK_D: one column block, the DFT over C is the whole transform
            re = yr
            im = yi
    d_in = offs_d < D
    return tl.where(d_in[None, :], re, 0.0), tl.where(d_in[None, :], im, 0.0)


@triton.jit
def _token_live(mask_ptr, b, offs_n, N, s_m_b, s_m_n, HAS_MASK: tl.constexpr):
    n_in = offs_n < N
    if HAS_MASK:
        return n_in & (tl.load(mask_ptr + b * s_m_b + offs_n * s_m_n, mask=n_in, other=0) != 0)
    return n_in


@triton.jit
def _fca_fwd_kernel(
    l_ptr, kv_ptr, mask_ptr, wq_ptr, wo_ptr, bo_ptr, lnw_ptr, lnb_ptr, fnw_ptr, fnb_ptr, w1_ptr, b1_ptr,
    w2_ptr, b2_ptr, u_ptr, o_ptr, lse_ptr, rinv_ptr, q_ptr,
    C, D, N, heads, head_dim, ffn, qk_scale, eps, s_m_b, s_m_n,
    FFT2: tl.constexpr, NORMALIZE: tl.constexpr, LATENT_NORM: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_FF: tl.constexpr, FF_NORM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K2: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_KD: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    pid, b = launch_grid.tile_and_item(tl.cdiv(C, BLOCK_C), FLAT_GRID)
    b = b.to(tl.int64)
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    rows_in = rows < C
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    offs_j = tl.arange(0, BLOCK_DH)
    j_in = offs_j < head_dim
    width = heads * head_dim

    q_in, _ = _spectrum_rows(l_ptr, rinv_ptr, b, rows, C, D, pid == 0, NORMALIZE, FFT2, True, False, PRECISION,
                             BLOCK_C, BLOCK_K, BLOCK_D, BLOCK_K2)
    mean = tl.sum(q_in, 1) / D
    centred = tl.where(d_in[None, :], q_in - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
    # q_in parks in this program's own rows of u (rewritten at the end) while the heads run: keeping it, and the
    # LayerNormed x, in registers across the attention loop spills at D = 256 (ptxas, sm_90).
    tile = u_ptr + (b * C + rows[:, None]) * D + offs_d[None, :]
    tile_in = rows_in[:, None] & d_in[None, :]
    tl.store(tile, q_in, mask=tile_in)
    tl.debug_barrier()

    kv_base = kv_ptr + b * N * 2 * width
    update = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    live_rows = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for h in range(0, heads):
        # q = x Wq_h^T in BLOCK_KD-wide slices of D read back from the parked q_in: a (BLOCK_C, D) dot operand
        # would be replicated whole in every warp (spills at D = 256).
        q = tl.zeros((BLOCK_C, BLOCK_DH), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_KD):
            dk = k0 + tl.arange(0, BLOCK_KD)
            dk_in = dk < D
            x = tl.load(u_ptr + (b * C + rows[:, None]) * D + dk[None, :], mask=rows_in[:, None] & dk_in[None, :],
                        other=0.0)
            if LATENT_NORM:
                x = tl.where(dk_in[None, :], (x - mean[:, None]) * rstd[:, None], 0.0) * \
                    tl.load(lnw_ptr + dk, mask=dk_in, other=0.0)[None, :] + tl.load(lnb_ptr + dk, mask=dk_in,
                                                                                     other=0.0)[None, :]
            wq = tl.load(wq_ptr + (h * head_dim + offs_j[None, :]) * D + dk[:, None],
                         mask=j_in[None, :] & dk_in[:, None], other=0.0)                  # Wq_h^T slice
            q += tl.dot(x, wq, input_precision=PRECISION)
        head_tile = (b * C + rows[:, None]) * width + h * head_dim + offs_j[None, :]
        tl.store(q_ptr + head_tile, q, mask=rows_in[:, None] & j_in[None, :])
        q = q * qk_scale
        m_i = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_C, BLOCK_DH), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            live = _token_live(mask_ptr, b, offs_n, N, s_m_b, s_m_n, HAS_MASK)
            load = live[:, None] & j_in[None, :]
            at = kv_base + offs_n[:, None] * (2 * width) + h * head_dim + offs_j[None, :]
            k = tl.load(at, mask=load, other=0.0).to(tl.float32)
            v = tl.load(at + width, mask=load, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new
        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))
        tl.store(o_ptr + head_tile, o, mask=rows_in[:, None] & j_in[None, :])
        tl.store(lse_ptr + (b * heads + h) * C + rows, lse, mask=rows_in)
        live_rows = l_i

    # o Wout^T over every head at once, in BLOCK_KD-wide slices of H*Dh read back from o (written above).
    tl.debug_barrier()
    for k0 in range(0, width, BLOCK_KD):
        kk = k0 + tl.arange(0, BLOCK_KD)
        kk_in = kk < width
        o = tl.load(o_ptr + (b * C + rows[:, None]) * width + kk[None, :], mask=rows_in[:, None] & kk_in[None, :],
                    other=0.0)
        wo = tl.load(wo_ptr + offs_d[None, :] * width + kk[:, None], mask=kk_in[:, None] & d_in[None, :], other=0.0)
        update += tl.dot(o, wo, input_precision=PRECISION)

    q_in = tl.load(tile, mask=tile_in, other=0.0)
    tl.debug_barrier()
    bo = tl.load(bo_ptr + offs_d, mask=d_in, other=0.0)
    a = update + bo[None, :]
    u = q_in + tl.where(a >= 0.0, a, 0.01 * a)
    if HAS_FF:
        # The feed-forward reads LN(u) back in slices of D for the same reason as the query projection.
        u = tl.where(d_in[None, :], u, 0.0)
        tl.debug_barrier()
        tl.store(tile, u, mask=tile_in)
        tl.debug_barrier()
        if FF_NORM:
            mean = tl.sum(u, 1) / D
            centred = tl.where(d_in[None, :], u - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
        ff = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        for f0 in range(0, ffn, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            f_in = offs_f < ffn
            hv = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
            hg = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_KD):
                dk = k0 + tl.arange(0, BLOCK_KD)
                dk_in = dk < D
                z = tl.load(u_ptr + (b * C + rows[:, None]) * D + dk[None, :],
                            mask=rows_in[:, None] & dk_in[None, :], other=0.0)
                if FF_NORM:
                    z = tl.where(dk_in[None, :], (z - mean[:, None]) * rstd[:, None], 0.0) * \
                        tl.load(fnw_ptr + dk, mask=dk_in, other=0.0)[None, :] + \
                        tl.load(fnb_ptr + dk, mask=dk_in, other=0.0)[None, :]
                w_mask = f_in[None, :] & dk_in[:, None]
                w1v = tl.load(w1_ptr + offs_f[None, :] * D + dk[:, None], mask=w_mask, other=0.0)
                w1g = tl.load(w1_ptr + (ffn + offs_f[None, :]) * D + dk[:, None], mask=w_mask, other=0.0)
                hv += tl.dot(z, w1v, input_precision=PRECISION)
                hg += tl.dot(z, w1g, input_precision=PRECISION)
            hv += tl.load(b1_ptr + offs_f, mask=f_in, other=0.0)[None, :]
            hg += tl.load(b1_ptr + ffn + offs_f, mask=f_in, other=0.0)[None, :]
            selu = 1.0507009873554805 * tl.where(hg > 0.0, hg, 1.6732632423543772 * (tl.exp(tl.minimum(hg, 0.0)) - 1.0))
            w2 = tl.load(w2_ptr + offs_d[None, :] * ffn + offs_f[:, None], mask=f_in[:, None] & d_in[None, :],
                         other=0.0)
            ff += tl.dot(hv * selu, w2, input_precision=PRECISION)
        u = u + ff + tl.load(b2_ptr + offs_d, mask=d_in, other=0.0)[None, :]
        tl.debug_barrier()
    # A sample without a real token is skipped: its update is dropped (the spec's normalize(l) / spectrum).
    u = tl.where((live_rows > 0.0)[:, None], u, q_in)
    tl.store(tile, u, mask=tile_in)


@triton.jit
def _fca_out_kernel(
    l_ptr, u_ptr, rinv_ptr, out_ptr, C, D,
    FFT2: tl.constexpr, NORMALIZE: tl.constexpr, INVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K2: tl.constexpr,
    FLAT_GRID: tl.constexpr,
):
    pid, b = launch_grid.tile_and_item(tl.cdiv(C, BLOCK_C), FLAT_GRID)
    b = b.to(tl.int64)
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    rows_in = rows < C
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    inside = rows_in[:, None] & d_in[None, :]
    if INVERSE:
        re = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        im = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K2):
            cols = d0 + tl.arange(0, BLOCK_K2)
            tr = tl.zeros((BLOCK_C, BLOCK_K2), dtype=tl.float32)
            ti = tl.zeros((BLOCK_C, BLOCK_K2), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_K):
                ks = c0 + tl.arange(0, BLOCK_K)
                u = tl.load(u_ptr + (b * C + ks[:, None]) * D + cols[None, :],
                            mask=(ks[:, None] < C) & (cols[None, :] < D), other=0.0)
                wr, wi = _twiddle(rows, ks, C, True)
                tr += tl.dot(wr, u, input_precision=PRECISION)
                ti += tl.dot(wi, u, input_precision=PRECISION)
            if FFT2:
                wr, wi = _twiddle(cols, offs_d, D, True)
                re += tl.dot(tr, wr, input_precision=PRECISION) - tl.dot(ti, wi, input_precision=PRECISION)
                im += tl.dot(tr, wi, input_precision=PRECISION) + tl.dot(ti, wr, input_precision=PRECISION)
            else:
                re = tr
                im = ti
        if FFT2:
            norm = 1.0 / (C * D)
            neg_d = (D - offs_d) % D
        else:
            norm = 1.0 / C
            neg_d = offs_d
        neg_r = (C - rows) % C
        # IDFT(i Im L) = (l~ - conj(l~[-n])) / 2, read from the latent: Im L is never formed.
        at = l_ptr + ((b * C + rows[:, None]) * D + offs_d[None, :]) * 2
        at_neg = l_ptr + ((b * C + neg_r[:, None]) * D + neg_d[None, :]) * 2
        if NORMALIZE:
            r = tl.load(rinv_ptr + b * D + offs_d, mask=d_in, other=0.0)[None, :]
            r_neg = tl.load(rinv_ptr + b * D + neg_d, mask=d_in, other=0.0)[None, :]
        else:
            r = 1.0
            r_neg = 1.0
        lr = tl.load(at, mask=inside, other=0.0) * r
        li = tl.load(at + 1, mask=inside, other=0.0) * r
        nr = tl.load(at_neg, mask=inside, other=0.0) * r_neg
        ni = tl.load(at_neg + 1, mask=inside, other=0.0) * r_neg
        re = re * norm + 0.5 * (lr - nr)
        im = im * norm + 0.5 * (li + ni)
    else:
        _, im = _spectrum_rows(l_ptr, rinv_ptr, b, rows, C, D, False, NORMALIZE, FFT2, False, True, PRECISION,
                               BLOCK_C, BLOCK_K, BLOCK_D, BLOCK_K2)
        re = tl.load(u_ptr + (b * C + rows[:, None]) * D + offs_d[None, :], mask=inside, other=0.0)
    at = out_ptr + ((b * C + rows[:, None]) * D + offs_d[None, :]) * 2
    tl.store(at, re, mask=inside)
    tl.store(at + 1, im, mask=inside)


@triton.jit
def _fca_bwd_dq_kernel(
    q_ptr, do_ptr, lse_ptr, delta_ptr, kv_ptr, mask_ptr, dq_ptr,
    C, N, heads, head_dim, qk_scale, scale, s_m_b, s_m_n,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """dQ for one tile of latent rows of one (sample, head): ``q``, ``do``, ``dq`` (B, C, H*Dh) float32."""
    row_tile, bh = launch_grid.tile_and_item(tl.cdiv(C, BLOCK_C), FLAT_GRID)
    rows = row_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows_in = rows < C
    offs_j = tl.arange(0, BLOCK_DH)
    j_in = offs_j < head_dim
    width = heads * head_dim
    tile = (b * C + rows[:, None]) * width + h * head_dim + offs_j[None, :]
    tile_in = rows_in[:, None] & j_in[None, :]
    q = tl.load(q_ptr + tile, mask=tile_in, other=0.0) * qk_scale
    do = tl.load(do_ptr + tile, mask=tile_in, other=0.0)
    lse = tl.load(lse_ptr + (b * heads + h) * C + rows, mask=rows_in, other=float("inf"))
    delta = tl.load(delta_ptr + (b * heads + h) * C + rows, mask=rows_in, other=0.0)
    dq = tl.zeros((BLOCK_C, BLOCK_DH), dtype=tl.float32)
    kv_base = kv_ptr + b * N * 2 * width
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        live = _token_live(mask_ptr, b, offs_n, N, s_m_b, s_m_n, HAS_MASK)
        load = live[:, None] & j_in[None, :]
        at = kv_base + offs_n[:, None] * (2 * width) + h * head_dim + offs_j[None, :]
        k = tl.load(at, mask=load, other=0.0).to(tl.float32)
        v = tl.load(at + width, mask=load, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.where(live[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision=PRECISION)
    tl.store(dq_ptr + tile, dq * scale, mask=tile_in)


@triton.jit
def _fca_bwd_dkv_kernel(
    q_ptr, do_ptr, lse_ptr, delta_ptr, kv_ptr, mask_ptr, dkv_ptr,
    C, N, heads, head_dim, qk_scale, scale, s_m_b, s_m_n,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """dK and dV for one token tile of one (sample, head), looping over the latent rows; ``dkv (B, N, 2*H*Dh)``
    float32, exactly 0 at masked tokens."""
    token_tile, bh = launch_grid.tile_and_item(tl.cdiv(N, BLOCK_N), FLAT_GRID)
    offs_n = token_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    offs_j = tl.arange(0, BLOCK_DH)
    j_in = offs_j < head_dim
    width = heads * head_dim
    live = _token_live(mask_ptr, b, offs_n, N, s_m_b, s_m_n, HAS_MASK)
    load = live[:, None] & j_in[None, :]
    at = (b * N + offs_n[:, None]) * (2 * width) + h * head_dim + offs_j[None, :]
    k = tl.load(kv_ptr + at, mask=load, other=0.0).to(tl.float32)
    v = tl.load(kv_ptr + at + width, mask=load, other=0.0).to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_DH), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DH), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        rows_in = rows < C
        tile = (b * C + rows[:, None]) * width + h * head_dim + offs_j[None, :]
        tile_in = rows_in[:, None] & j_in[None, :]
        q = tl.load(q_ptr + tile, mask=tile_in, other=0.0)
        qs = q * qk_scale
        do = tl.load(do_ptr + tile, mask=tile_in, other=0.0)
        lse = tl.load(lse_ptr + (b * heads + h) * C + rows, mask=rows_in, other=float("inf"))
        delta = tl.load(delta_ptr + (b * heads + h) * C + rows, mask=rows_in, other=0.0)
        st = tl.dot(k, tl.trans(qs), input_precision=PRECISION)                          # (BLOCK_N, BLOCK_C)
        pt = tl.where(live[:, None], tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt, do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst, q, input_precision=PRECISION)
    out = offs_n[:, None] < N
    store = out & j_in[None, :]
    tl.store(dkv_ptr + at, dk * scale, mask=store)
    tl.store(dkv_ptr + at + width, dv, mask=store)


# ------------------------------------------------------------------------------------------------ launchers


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(int(n), 1)))


def _precision() -> str:
    """The latent side is float32: TF32 only when the user allowed it for matmuls (torch's setting), else
    "tf32x3" (three TF32 tensor-core products: float32 accuracy). Plain "ieee" FMA dots need each operand's whole
    K extent per thread, which spills at D = 256 (ptxas, sm_90); tensor-core layouts do not."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def launch_config(kernel: str, channels: int, dim: int, head_dim: int, fft_dims: int) -> dict:
    """Block sizes and warps (tl.dot needs every block >= 16). Chosen so ptxas (sm_90) spills nothing for
    latents 16 x 16 to 256 x 256 and Dh up to 128 (tests/test_fourier_cross_attention.py checks it); the attention
    math runs in float32 (tf32x3 tensor-core dots), which is what limits Dh to 128."""
    block_d = _pow2(dim)
    block_dh = _pow2(head_dim)
    block_k = 32 if channels > 16 else 16
    block_k2 = 16 if fft_dims == 2 else block_d
    warps = 4 if block_d <= 32 else 8
    if kernel == "forward":
        # Dh = 128 with 4 warps spilled 100 bytes at a 16 x 16 latent.
        return dict(BLOCK_C=16, BLOCK_K=block_k if block_d <= 64 else 16, BLOCK_D=block_d, BLOCK_K2=block_k2,
                    BLOCK_N=64 if block_d <= 64 else 16, BLOCK_DH=block_dh, BLOCK_F=32 if block_d <= 64 else 16,
                    BLOCK_KD=min(block_d, 32) if block_d <= 64 else 16, num_warps=8 if block_dh > 64 else warps)
    if kernel == "out":
        # 32 rows at D = 64: 16-row tiles spill 8 bytes in the inverse for either DFT as launched (C and D known
        # multiples of 16; ptxas, sm_90); 32 rows spill nothing with or without the inverse, at the same warps.
        return dict(BLOCK_C=32 if block_d == 64 else 16, BLOCK_K=block_k if fft_dims == 2 else 16, BLOCK_D=block_d,
                    BLOCK_K2=block_k2, num_warps=4 if fft_dims == 1 and block_d <= 64 else warps)
    if block_dh > 64:
        # Dh = 128 spilled 88 (dQ) and 324 (dK, dV) bytes with 32-token tiles; dQ also needs unpipelined loads.
        if kernel == "dq":
            return dict(BLOCK_C=16, BLOCK_N=16, BLOCK_DH=block_dh, num_warps=8, num_stages=1)
        return dict(BLOCK_C=16, BLOCK_N=16, BLOCK_DH=block_dh, num_warps=8)
    if kernel == "dq":
        return dict(BLOCK_C=16, BLOCK_N=32, BLOCK_DH=block_dh, num_warps=4)
    return dict(BLOCK_C=16, BLOCK_N=32, BLOCK_DH=block_dh, num_warps=8)


def fourier_cross_attention_forward(latent, kv, mask, wq, wo, bo, lnw, lnb, fnw, fnb, w1, b1, w2, b2, heads: int,
                                    scale: float, fft_dims: int, normalize: bool, latent_norm: bool, ff_norm: bool,
                                    inverse: bool, eps: float):
    """Returns ``(out (B, C, D, 2), u (B, C, D), o (B, C, H*Dh), lse2 (B, H, C), rinv (B, D), q (B, C, H*Dh))``,
    all float32, ``q`` unscaled. The backward takes ``q`` as the forward computed it: ``o`` and ``lse2`` (hence
    ``delta = rowsum(dO * O)``) belong to that ``q``, and one recomputed another way (torch.fft's rounding, not
    the in-kernel DFT's) makes ``dS = P (dP - delta)`` inconsistent by its rounding times 1/temperature.

    ``latent (B, C, D, 2)`` float32 contiguous; ``kv (B, N, 2*H*Dh)`` contiguous; ``mask (B, N)`` bool or None;
    weights float32 contiguous with every affine part present (ones / zeros for an absent one); ``w1`` None
    means no feed-forward. ``scale`` is ``Dh^-0.5 / temperature``.
    """
    batch, channels, dim, _ = latent.shape
    tokens = kv.shape[1]
    width = kv.shape[2] // 2
    head_dim = width // heads
    f32 = dict(device=latent.device, dtype=torch.float32)
    u = torch.empty(batch, channels, dim, **f32)
    o = torch.empty(batch, channels, width, **f32)
    lse = torch.empty(batch, heads, channels, **f32)
    rinv = torch.empty(batch, dim, **f32)
    out = torch.empty(batch, channels, dim, 2, **f32)
    q = torch.empty(batch, channels, width, **f32)
    has_ff = w1 is not None
    ffn = w2.shape[1] if has_ff else 0
    mask_arg = mask.view(torch.uint8) if mask is not None else kv
    s_m = mask.stride() if mask is not None else (0, 0)
    dummy = wq
    precision = _precision()
    config = launch_config("forward", channels, dim, head_dim, fft_dims)
    grid, flat = launch_grid.tiles_by_items(triton.cdiv(channels, config["BLOCK_C"]), batch)
    _fca_fwd_kernel[grid](
        latent, kv, mask_arg, wq, wo, bo, lnw, lnb, fnw if has_ff else dummy, fnb if has_ff else dummy,
        w1 if has_ff else dummy, b1 if has_ff else dummy, w2 if has_ff else dummy, b2 if has_ff else dummy,
        u, o, lse, rinv, q, channels, dim, tokens, heads, head_dim, ffn, float(scale * LOG2E), float(eps),
        s_m[0], s_m[1], FFT2=fft_dims == 2, NORMALIZE=bool(normalize), LATENT_NORM=bool(latent_norm),
        HAS_MASK=mask is not None, HAS_FF=has_ff, FF_NORM=bool(ff_norm), PRECISION=precision, FLAT_GRID=flat,
        **config)
    config = launch_config("out", channels, dim, head_dim, fft_dims)
    grid, flat = launch_grid.tiles_by_items(triton.cdiv(channels, config["BLOCK_C"]), batch)
    _fca_out_kernel[grid](latent, u, rinv, out, channels, dim, FFT2=fft_dims == 2, NORMALIZE=bool(normalize),
                          INVERSE=bool(inverse), PRECISION=precision, FLAT_GRID=flat, **config)
    return out, u, o, lse, rinv, q


def fourier_cross_attention_attention_backward(q, do, lse, delta, kv, mask, heads: int, scale: float):
    """The attention core's backward: ``q``, ``do`` (B, C, H*Dh) float32 contiguous (``q`` unscaled), ``lse``
    (base 2) and ``delta`` (B, H, C) float32; returns ``(dq (B, C, H*Dh), dkv (B, N, 2*H*Dh))`` float32."""
    batch, channels, width = q.shape
    tokens = kv.shape[1]
    head_dim = width // heads
    dq = torch.empty_like(q)
    dkv = torch.empty(batch, tokens, 2 * width, device=q.device, dtype=torch.float32)
    mask_arg = mask.view(torch.uint8) if mask is not None else kv
    s_m = mask.stride() if mask is not None else (0, 0)
    common = (channels, tokens, heads, head_dim, float(scale * LOG2E), float(scale), s_m[0], s_m[1])
    config = launch_config("dq", channels, 0, head_dim, 2)
    grid, flat = launch_grid.tiles_by_items(triton.cdiv(channels, config["BLOCK_C"]), batch * heads)
    _fca_bwd_dq_kernel[grid](q, do, lse, delta, kv, mask_arg, dq, *common, HAS_MASK=mask is not None,
                             PRECISION=_precision(), FLAT_GRID=flat, **config)
    if tokens:
        config = launch_config("dkv", channels, 0, head_dim, 2)
        grid, flat = launch_grid.tiles_by_items(triton.cdiv(tokens, config["BLOCK_N"]), batch * heads)
        _fca_bwd_dkv_kernel[grid](q, do, lse, delta, kv, mask_arg, dkv, *common, HAS_MASK=mask is not None,
                                  PRECISION=_precision(), FLAT_GRID=flat, **config)
    return dq, dkv
