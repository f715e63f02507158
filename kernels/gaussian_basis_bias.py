"""Fused Gaussian-basis attention bias (MoleBlend eq. 6-7; Uni-Mol / Transformer-M GaussianLayer + NonLinear) in
Triton, forward and backward, never writing the ``(pairs, K)`` Gaussian features.

Per real atom pair (i, j) of a molecule, the diagonal included (semantics: ``pyblend.reference.gaussian_basis_bias``):

    d = ||p_i - p_j||,  x = mul_ij d + bias_ij,  z_k = (x - mu_k) / s_k,  g_k = exp(-z_k^2 / 2) / (sqrt(2 pi) s_k)
    h = W1 g + b1 (K_hidden),  a = gelu(h) (exact erf form),  out = W2 a + b2 (H)
    feat_i = sum over the real j of g_ij

Work is split by (molecule, tile of BLOCK_I rows i). A pair tile is BLOCK_I x BLOCK_J pairs flattened to
``BLOCK_P = BLOCK_I * BLOCK_J`` columns, so the Gaussians are a (K, BLOCK_P) register tile and the MLP tile
matmuls (tl.dot) with the weights, by chunks of BLOCK_C hidden units. The program owning rows i loops over
every j tile of its molecule, so it sums
feat_i itself: no atomics, and nothing of size (pairs, K) ever reaches memory.

Backward (upstream ``dout`` per pair and head, ``dfeat`` per atom), recomputing each tile, in three kernels:

    pairs:     da = W2^T dout,  dh = da * gelu'(h),  dg = W1^T dh + dfeat_i       (dfeat only on real pairs)
               dx = -sum_k dg_k g_k z_k / s_k,  dmu_k += dg_k g_k z_k / s_k,  ds_k += dg_k g_k (z_k^2 - 1) / s_k
    weights:   dW2 += dout a^T, db2 += dout, dW1 += dh g^T, db1 += dh            (one program per hidden chunk)
    positions: dmul_ij = dx_ij d_ij,  dp_i = sum_j (dx_ij mul_ij + dx_ji mul_ji) (p_i - p_j) / d_ij
               (0 where d = 0, as torch's norm; dx_ji read transposed)

Splitting the MLP's parameter gradients from dg keeps the register tiles small enough not to spill. Parameter
gradients accumulate in float32 registers of a fixed number of programs, each walking a fixed list of work items
and writing its own partial sums (summed in torch): deterministic, no atomics. Per pair, only the scalars dx
(the gradient of bias_ij) and dmul_ij reach memory; torch scatters them to the rows of ``mul`` and ``bias``.
Tiles are held transposed, features x pairs, so that per-pair vectors spread over the threads.

Layouts: padded, positions ``(B, N, 3)``, pair types ``(B, N, N[, 2])``, optional mask ``(B, N)`` (any pattern of
real atoms), bias out ``(B, H, N, N)``, features ``(B, N, K)``; packed, positions ``(T, 3)``, pair types
``(P[, 2])``, ``cu_seqlens`` and ``pair_offsets`` (``sum_{m<b} n_m^2``), bias out ``(H, P)``, features
``(T, K)``. Padded atoms are never read (their loads are masked): NaN there reaches nothing.
"""
import torch
import triton
import triton.language as tl

from . import precision
from . import launch_grid


@triton.jit
def _molecule(b, cu_ptr, pairs_ptr, width, PACKED: tl.constexpr):
    """(first atom, atom count, first pair) of molecule b; padded: (0, width, 0) (b enters through strides)."""
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        count = tl.load(cu_ptr + b + 1).to(tl.int64) - start
        first_pair = tl.load(pairs_ptr + b)
    else:
        start = tl.zeros((), dtype=tl.int64)
        count = tl.zeros((), dtype=tl.int64) + width
        first_pair = tl.zeros((), dtype=tl.int64)
    return start, count, first_pair


@triton.jit
def _atoms(pos_ptr, mask_ptr, b, start, count, rows, s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a,
           PACKED: tl.constexpr, HAS_MASK: tl.constexpr):
    """(real, x, y, z) for atom indices ``rows`` (int64) of molecule b: float32 coordinates, 0 where not real."""
    inside = rows < count
    if PACKED:
        base = pos_ptr + (start + rows) * s_pos_a
    else:
        base = pos_ptr + b * s_pos_b + rows * s_pos_a
    real = inside
    if HAS_MASK:
        real = inside & (tl.load(mask_ptr + b * s_mask_b + rows * s_mask_a, mask=inside, other=0) != 0)
    px = tl.load(base, mask=real, other=0.0).to(tl.float32)
    py = tl.load(base + s_pos_c, mask=real, other=0.0).to(tl.float32)
    pz = tl.load(base + 2 * s_pos_c, mask=real, other=0.0).to(tl.float32)
    return inside, real, px, py, pz


@triton.jit
def _pair_tile(pos_ptr, mask_ptr, types_ptr, mul_ptr, add_ptr, b, start, count, first_pair, i0, j0,
               s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a, s_t_b, s_t_i, s_t_j, s_t_t, s_mul, s_add,
               PACKED: tl.constexpr, HAS_MASK: tl.constexpr, TWO_TYPES: tl.constexpr,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """One flattened tile of BLOCK_I x BLOCK_J pairs (entry p = pair (i0 + p // BLOCK_J, j0 + p % BLOCK_J)).

    Returns (ii, inside, real, pair, d, m, x): row atoms ii, ``inside`` = both atoms within the molecule (an
    output exists there), ``real`` = both real, ``pair`` the index into a per-pair scalar array (padded
    ``b * N^2 + i N + j``, packed ``first_pair + i n + j``), the distance d, mul_ij and x = mul_ij d + bias_ij
    (float32; 0 where not real)."""
    offs = tl.arange(0, BLOCK_I * BLOCK_J)
    ii = i0 + (offs // BLOCK_J).to(tl.int64)
    jj = j0 + (offs % BLOCK_J).to(tl.int64)
    in_i, real_i, xi, yi, zi = _atoms(pos_ptr, mask_ptr, b, start, count, ii, s_pos_b, s_pos_a, s_pos_c,
                                      s_mask_b, s_mask_a, PACKED, HAS_MASK)
    in_j, real_j, xj, yj, zj = _atoms(pos_ptr, mask_ptr, b, start, count, jj, s_pos_b, s_pos_a, s_pos_c,
                                      s_mask_b, s_mask_a, PACKED, HAS_MASK)
    inside = in_i & in_j
    real = real_i & real_j
    dx = xi - xj
    dy = yi - yj
    dz = zi - zj
    d = tl.sqrt(dx * dx + dy * dy + dz * dz)
    if PACKED:
        pair = first_pair + ii * count + jj
        t_base = types_ptr + pair * s_t_i
    else:
        pair = (b * count + ii) * count + jj
        t_base = types_ptr + b * s_t_b + ii * s_t_i + jj * s_t_j
    t0 = tl.load(t_base, mask=real, other=0).to(tl.int64)
    m = tl.load(mul_ptr + t0 * s_mul, mask=real, other=0.0).to(tl.float32)
    c = tl.load(add_ptr + t0 * s_add, mask=real, other=0.0).to(tl.float32)
    if TWO_TYPES:
        t1 = tl.load(t_base + s_t_t, mask=real, other=0).to(tl.int64)
        m += tl.load(mul_ptr + t1 * s_mul, mask=real, other=0.0).to(tl.float32)
        c += tl.load(add_ptr + t1 * s_add, mask=real, other=0.0).to(tl.float32)
    return ii, inside, real, pair, d, m, m * d + c


@triton.jit
def _gaussian_params(means_ptr, stds_ptr, num_kernels, std_eps, BLOCK_K: tl.constexpr):
    """(mu, 1/s, 1/(sqrt(2 pi) s), sign(stds)) as (BLOCK_K,) float32; padded kernels get s = 1, coefficient 0."""
    offs_k = tl.arange(0, BLOCK_K)
    live = offs_k < num_kernels
    mu = tl.load(means_ptr + offs_k, mask=live, other=0.0).to(tl.float32)
    raw = tl.load(stds_ptr + offs_k, mask=live, other=0.0).to(tl.float32)
    sigma = tl.where(live, tl.abs(raw) + std_eps, 1.0)
    inv_sigma = 1.0 / sigma
    coef = tl.where(live, inv_sigma * 0.3989422804014327, 0.0)
    sign = tl.where(raw > 0.0, 1.0, tl.where(raw < 0.0, -1.0, 0.0))
    return mu, inv_sigma, coef, sign


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def _gaussians_t(x, real, mu, inv_sigma, coef):
    """(z, g) transposed: (BLOCK_K, BLOCK_P) float32, one column per pair; g = 0 at pairs that are not real."""
    z = (x[None, :] - mu[:, None]) * inv_sigma[:, None]
    g = tl.where(real[None, :], tl.exp(-0.5 * z * z) * coef[:, None], 0.0)
    return z, g


@triton.jit
def _hidden_chunk(g, w1_ptr, b1_ptr, c0, num_kernels, hidden, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Hidden units [c0, c0 + BLOCK_C) of the tile, transposed: (h (BLOCK_C, BLOCK_P) float32 pre-activations,
    w1 rows (BLOCK_C, BLOCK_K) in the weights' dtype, zero-padded). Chunks keep the register tiles small; the
    weights are re-read per tile (L1/L2) rather than held across the loop, which would spill."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    w1 = tl.load(w1_ptr + offs_c[:, None] * num_kernels + offs_k[None, :],
                 mask=(offs_c[:, None] < hidden) & (offs_k[None, :] < num_kernels), other=0.0)
    b1 = tl.load(b1_ptr + offs_c, mask=offs_c < hidden, other=0.0).to(tl.float32)
    h = tl.dot(w1, g.to(w1.dtype), input_precision=PRECISION) + b1[:, None]
    return h, w1


@triton.jit
def _w2_chunk(w2_ptr, c0, hidden, heads, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """w2[:, c0:c0 + BLOCK_C] as (BLOCK_H, BLOCK_C) in the weights' dtype, zero-padded."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_H)
    return tl.load(w2_ptr + offs_h[:, None] * hidden + offs_c[None, :],
                   mask=(offs_h[:, None] < heads) & (offs_c[None, :] < hidden), other=0.0)


@triton.jit
def _load_dout(dout_ptr, b, pair, real, heads, plane, s_do_b, s_do_h, s_do_p, PACKED: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """The upstream gradient of the tile's pairs, transposed (BLOCK_H, BLOCK_P) float32, 0 off real pairs."""
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    if PACKED:
        offsets = offs_h[:, None] * s_do_h + pair[None, :] * s_do_p
    else:
        offsets = b * s_do_b + offs_h[:, None] * s_do_h + (pair - b * plane)[None, :] * s_do_p
    return tl.load(dout_ptr + offsets, mask=real[None, :] & (offs_h[:, None] < heads), other=0.0).to(tl.float32)


@triton.jit
def _gaussian_basis_bias_fwd_kernel(
    pos_ptr, mask_ptr, types_ptr, cu_ptr, pairs_ptr, means_ptr, stds_ptr, mul_ptr, add_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, feat_ptr,
    width, num_kernels, hidden, heads, plane, std_eps,
    s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a, s_t_b, s_t_i, s_t_j, s_t_t, s_mul, s_add,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, TWO_TYPES: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KH: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """Program (i tile, molecule b) of a ``launch_grid.tiles_by_items`` grid. ``plane`` is the per-head stride of
    ``out`` (N^2 padded, P packed).

    Tiles are transposed, features x pairs (g is (BLOCK_K, BLOCK_P)): the per-pair vectors (indices, distances,
    types) then spread over the threads instead of being replicated in each thread's registers."""
    tile, b = launch_grid.tile_and_item(tl.cdiv(width, BLOCK_I), FLAT_GRID)
    b = b.to(tl.int64)
    i0 = tile.to(tl.int64) * BLOCK_I
    start, count, first_pair = _molecule(b, cu_ptr, pairs_ptr, width, PACKED)
    if i0 < count:
        mu, inv_sigma, coef, _ = _gaussian_params(means_ptr, stds_ptr, num_kernels, std_eps, BLOCK_K)
        offs_h = tl.arange(0, BLOCK_H)
        offs_k = tl.arange(0, BLOCK_K)
        b2 = tl.load(b2_ptr + offs_h, mask=offs_h < heads, other=0.0).to(tl.float32)
        feat = tl.zeros((BLOCK_K, BLOCK_I), dtype=tl.float32)
        for j0 in range(0, count, BLOCK_J):
            ii, inside, real, pair, d, m, x = _pair_tile(
                pos_ptr, mask_ptr, types_ptr, mul_ptr, add_ptr, b, start, count, first_pair, i0, j0,
                s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a, s_t_b, s_t_i, s_t_j, s_t_t, s_mul, s_add,
                PACKED, HAS_MASK, TWO_TYPES, BLOCK_I, BLOCK_J)
            z, g = _gaussians_t(x, real, mu, inv_sigma, coef)
            out = tl.zeros((BLOCK_H, BLOCK_I * BLOCK_J), dtype=tl.float32) + b2[:, None]
            for c0 in range(0, BLOCK_KH, BLOCK_C):
                h, unused = _hidden_chunk(g, w1_ptr, b1_ptr, c0, num_kernels, hidden, PRECISION, BLOCK_K, BLOCK_C)
                w2 = _w2_chunk(w2_ptr, c0, hidden, heads, BLOCK_C, BLOCK_H)
                out += tl.dot(w2, _gelu(h).to(w2.dtype), input_precision=PRECISION)
            out = tl.where(real[None, :], out, 0.0)
            if PACKED:
                out_offsets = offs_h[:, None].to(tl.int64) * plane + pair[None, :]
            else:
                out_offsets = (b * heads + offs_h[:, None]) * plane + (pair - b * plane)[None, :]
            tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty),
                     mask=inside[None, :] & (offs_h[:, None] < heads))
            feat += tl.sum(tl.reshape(g, (BLOCK_K, BLOCK_I, BLOCK_J)), 2)
        rows = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        if PACKED:
            feat_rows = start + rows
        else:
            feat_rows = b * count + rows
        tl.store(feat_ptr + feat_rows[None, :] * num_kernels + offs_k[:, None], feat.to(feat_ptr.dtype.element_ty),
                 mask=(rows[None, :] < count) & (offs_k[:, None] < num_kernels))


@triton.jit
def _gaussian_basis_bias_bwd_pairs_kernel(
    pos_ptr, mask_ptr, types_ptr, cu_ptr, pairs_ptr, means_ptr, stds_ptr, mul_ptr, add_ptr,
    w1_ptr, b1_ptr, w2_ptr, dout_ptr, dfeat_ptr, dx_ptr, partial_ptr,
    width, num_kernels, hidden, heads, plane, std_eps, work_items, tiles,
    s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a, s_t_b, s_t_i, s_t_j, s_t_t, s_mul, s_add,
    s_do_b, s_do_h, s_do_p, s_df_r, s_df_k,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, TWO_TYPES: tl.constexpr, HAS_DFEAT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The Gaussian side of the backward: per pair dg (through the MLP, plus dfeat_i), then dx (one float32 per
    pair into ``dx``, 0 at pairs that are not real) and the partial sums [dmu | dstds] of this program (row
    ``program`` of ``partial``, 2 * BLOCK_K float32). Tiles transposed as in the forward.

    Program g walks work items g, g + G, ... (item = molecule * tiles + i tile): a fixed assignment, so the sums
    are deterministic. ``dout`` is read by strides: padded (b, h, i * N + j), packed (h, pair)."""
    program = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    dmu = tl.zeros((BLOCK_K,), dtype=tl.float32)
    dsigma = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for item in range(program, work_items, tl.num_programs(0)):
        b = (item // tiles).to(tl.int64)
        i0 = (item % tiles).to(tl.int64) * BLOCK_I
        start, count, first_pair = _molecule(b, cu_ptr, pairs_ptr, width, PACKED)
        # An i tile past the molecule's end has no work: its loop below runs zero times.
        stop = tl.where(i0 < count, count, 0)
        for j0 in range(0, stop, BLOCK_J):
            ii, inside, real, pair, d, m, x = _pair_tile(
                pos_ptr, mask_ptr, types_ptr, mul_ptr, add_ptr, b, start, count, first_pair, i0, j0,
                s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a, s_t_b, s_t_i, s_t_j, s_t_t, s_mul, s_add,
                PACKED, HAS_MASK, TWO_TYPES, BLOCK_I, BLOCK_J)
            # The (K,) parameters are read per tile (L1 hits) and again after the hidden-chunk loop: kept live
            # across the loops, each costs BLOCK_K / 8 registers per thread, and they spilled.
            mu, inv_sigma, coef, unused = _gaussian_params(means_ptr, stds_ptr, num_kernels, std_eps, BLOCK_K)
            z, g = _gaussians_t(x, real, mu, inv_sigma, coef)
            dout = _load_dout(dout_ptr, b, pair, real, heads, plane, s_do_b, s_do_h, s_do_p, PACKED, BLOCK_H)
            if HAS_DFEAT:
                feat_rows = (start + ii) if PACKED else (b * count + ii)
                dg = tl.load(dfeat_ptr + feat_rows[None, :] * s_df_r + offs_k[:, None] * s_df_k,
                             mask=real[None, :] & (offs_k[:, None] < num_kernels), other=0.0).to(tl.float32)
            else:
                dg = tl.zeros((BLOCK_K, BLOCK_I * BLOCK_J), dtype=tl.float32)
            for c0 in range(0, BLOCK_KH, BLOCK_C):
                h, w1 = _hidden_chunk(g, w1_ptr, b1_ptr, c0, num_kernels, hidden, PRECISION, BLOCK_K, BLOCK_C)
                w2 = _w2_chunk(w2_ptr, c0, hidden, heads, BLOCK_C, BLOCK_H)
                dh = tl.dot(tl.trans(w2), dout.to(w2.dtype), input_precision=PRECISION) * _gelu_grad(h)
                dg += tl.dot(tl.trans(w1), dh.to(w1.dtype), input_precision=PRECISION)
            mu, inv_sigma, coef, unused = _gaussian_params(means_ptr, stds_ptr, num_kernels, std_eps, BLOCK_K)
            gz = dg * g * z * inv_sigma[:, None]       # dg_k * d g_k / d mu_k
            dmu += tl.sum(gz, 1)
            dsigma += tl.sum(dg * g * (z * z - 1.0), 1)
            dx = -tl.sum(gz, 0)
            tl.store(dx_ptr + pair, dx, mask=inside)
    # sign(stds) (d|stds|/dstds, 0 at 0 as torch's abs) is read again here: live across the loops, it spilled.
    mu, inv_sigma, coef, sign = _gaussian_params(means_ptr, stds_ptr, num_kernels, std_eps, BLOCK_K)
    own = partial_ptr + program.to(tl.int64) * (2 * BLOCK_K)
    tl.store(own + offs_k, dmu)
    tl.store(own + BLOCK_K + offs_k, dsigma * inv_sigma * sign)


@triton.jit
def _gaussian_basis_bias_bwd_weights_kernel(
    pos_ptr, mask_ptr, types_ptr, cu_ptr, pairs_ptr, means_ptr, stds_ptr, mul_ptr, add_ptr,
    w1_ptr, b1_ptr, w2_ptr, dout_ptr, partial_ptr,
    width, num_kernels, hidden, heads, plane, std_eps, work_items, tiles,
    s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a, s_t_b, s_t_i, s_t_j, s_t_t, s_mul, s_add,
    s_do_b, s_do_h, s_do_p,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, TWO_TYPES: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The MLP's parameter gradients for the hidden chunk ``program_id(1)``: program (g, c) walks the same work
    items as the pairs kernel and writes row (g, c) of ``partial``: [dW1 rows (BLOCK_C, BLOCK_K) | dW2 columns
    (BLOCK_H, BLOCK_C) | db1 (BLOCK_C) | db2 (BLOCK_H)] float32 (db2 is the same in every chunk)."""
    program = tl.program_id(0)
    chunk = tl.program_id(1)
    c0 = chunk * BLOCK_C
    mu, inv_sigma, coef, _ = _gaussian_params(means_ptr, stds_ptr, num_kernels, std_eps, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, BLOCK_H)
    dw1 = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for item in range(program, work_items, tl.num_programs(0)):
        b = (item // tiles).to(tl.int64)
        i0 = (item % tiles).to(tl.int64) * BLOCK_I
        start, count, first_pair = _molecule(b, cu_ptr, pairs_ptr, width, PACKED)
        stop = tl.where(i0 < count, count, 0)
        for j0 in range(0, stop, BLOCK_J):
            ii, inside, real, pair, d, m, x = _pair_tile(
                pos_ptr, mask_ptr, types_ptr, mul_ptr, add_ptr, b, start, count, first_pair, i0, j0,
                s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a, s_t_b, s_t_i, s_t_j, s_t_t, s_mul, s_add,
                PACKED, HAS_MASK, TWO_TYPES, BLOCK_I, BLOCK_J)
            z, g = _gaussians_t(x, real, mu, inv_sigma, coef)
            dout = _load_dout(dout_ptr, b, pair, real, heads, plane, s_do_b, s_do_h, s_do_p, PACKED, BLOCK_H)
            h, w1 = _hidden_chunk(g, w1_ptr, b1_ptr, c0, num_kernels, hidden, PRECISION, BLOCK_K, BLOCK_C)
            w2 = _w2_chunk(w2_ptr, c0, hidden, heads, BLOCK_C, BLOCK_H)
            dw2 += tl.dot(dout.to(w2.dtype), tl.trans(_gelu(h).to(w2.dtype)), input_precision=PRECISION)
            db2 += tl.sum(dout, 1)
            dh = tl.dot(tl.trans(w2), dout.to(w2.dtype), input_precision=PRECISION) * _gelu_grad(h)
            dw1 += tl.dot(dh.to(w1.dtype), tl.trans(g.to(w1.dtype)), input_precision=PRECISION)
            db1 += tl.sum(dh, 1)
    own = partial_ptr + (program.to(tl.int64) * tl.num_programs(1) + chunk) * (
        BLOCK_C * BLOCK_K + BLOCK_H * BLOCK_C + BLOCK_C + BLOCK_H)
    tl.store(own + offs_c[:, None] * BLOCK_K + offs_k[None, :], dw1)
    own += BLOCK_C * BLOCK_K
    tl.store(own + offs_h[:, None] * BLOCK_C + offs_c[None, :], dw2)
    own += BLOCK_H * BLOCK_C
    tl.store(own + offs_c, db1)
    own += BLOCK_C
    tl.store(own + offs_h, db2)


@triton.jit
def _pair_mul(types_ptr, mul_ptr, b, base, rows, cols, count, real, s_t_b, s_t_i, s_t_j, s_t_t, s_mul,
              PACKED: tl.constexpr, TWO_TYPES: tl.constexpr):
    """mul_ij for a (rows, cols) tile of pairs, float32, 0 where not real."""
    if PACKED:
        t_base = types_ptr + (base + rows[:, None] * count + cols[None, :]) * s_t_i
    else:
        t_base = types_ptr + b * s_t_b + rows[:, None] * s_t_i + cols[None, :] * s_t_j
    t0 = tl.load(t_base, mask=real, other=0).to(tl.int64)
    m = tl.load(mul_ptr + t0 * s_mul, mask=real, other=0.0).to(tl.float32)
    if TWO_TYPES:
        t1 = tl.load(t_base + s_t_t, mask=real, other=0).to(tl.int64)
        m += tl.load(mul_ptr + t1 * s_mul, mask=real, other=0.0).to(tl.float32)
    return m


@triton.jit
def _gaussian_basis_bias_bwd_positions_kernel(
    pos_ptr, mask_ptr, types_ptr, cu_ptr, pairs_ptr, mul_ptr, dx_ptr, dmul_ptr, dpos_ptr, width,
    s_pos_b, s_pos_a, s_pos_c, s_mask_b, s_mask_a, s_t_b, s_t_i, s_t_j, s_t_t, s_mul,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, TWO_TYPES: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """Program (i tile, molecule b), from the per-pair dx: ``dmul_pair_ij = dx_ij d_ij`` (into ``dmul``, laid
    out like ``dx``) and, with dd = dx * mul, ``dp_i = sum_j (dd_ij + dd_ji) (p_i - p_j) / d_ij`` (0 where
    d = 0, as torch's norm) into float32 ``dpos`` (contiguous, shaped like the positions; 0 at padded atoms)."""
    tile, b = launch_grid.tile_and_item(tl.cdiv(width, BLOCK_I), FLAT_GRID)
    b = b.to(tl.int64)
    i0 = tile.to(tl.int64) * BLOCK_I
    start, count, first_pair = _molecule(b, cu_ptr, pairs_ptr, width, PACKED)
    if i0 < count:
        rows = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        in_i, real_i, xi, yi, zi = _atoms(pos_ptr, mask_ptr, b, start, count, rows, s_pos_b, s_pos_a, s_pos_c,
                                          s_mask_b, s_mask_a, PACKED, HAS_MASK)
        gx = tl.zeros((BLOCK_I,), dtype=tl.float32)
        gy = tl.zeros((BLOCK_I,), dtype=tl.float32)
        gz = tl.zeros((BLOCK_I,), dtype=tl.float32)
        base = first_pair if PACKED else b * count * count
        for j0 in range(0, count, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            in_j, real_j, xj, yj, zj = _atoms(pos_ptr, mask_ptr, b, start, count, cols, s_pos_b, s_pos_a, s_pos_c,
                                              s_mask_b, s_mask_a, PACKED, HAS_MASK)
            real = real_i[:, None] & real_j[None, :]
            forward = base + rows[:, None] * count + cols[None, :]
            dx_ij = tl.load(dx_ptr + forward, mask=real, other=0.0)
            dx_ji = tl.load(dx_ptr + base + cols[None, :] * count + rows[:, None], mask=real, other=0.0)
            m_ij = _pair_mul(types_ptr, mul_ptr, b, base, rows, cols, count, real, s_t_b, s_t_i, s_t_j, s_t_t,
                             s_mul, PACKED, TWO_TYPES)
            m_ji = tl.trans(_pair_mul(types_ptr, mul_ptr, b, base, cols, rows, count, tl.trans(real), s_t_b, s_t_i,
                                      s_t_j, s_t_t, s_mul, PACKED, TWO_TYPES))
            ex = xi[:, None] - xj[None, :]
            ey = yi[:, None] - yj[None, :]
            ez = zi[:, None] - zj[None, :]
            d = tl.sqrt(ex * ex + ey * ey + ez * ez)
            tl.store(dmul_ptr + forward, dx_ij * d, mask=in_i[:, None] & in_j[None, :])
            w = tl.where(real & (d > 0.0), (dx_ij * m_ij + dx_ji * m_ji) / tl.where(d > 0.0, d, 1.0), 0.0)
            gx += tl.sum(w * ex, 1)
            gy += tl.sum(w * ey, 1)
            gz += tl.sum(w * ez, 1)
        out = dpos_ptr + ((start + rows) if PACKED else (b * count + rows)) * 3
        tl.store(out, gx, mask=in_i)
        tl.store(out + 1, gy, mask=in_i)
        tl.store(out + 2, gz, mask=in_i)


# ----------------------------------------------------------------------------------------------- launchers

MAX_KERNELS = 256  # K and K_hidden: one (BLOCK_P, K) tile and the weights live in registers/shared memory
MAX_HEADS = 128


def _launch_config(kernel: str, max_seqlen: int, num_kernels: int, hidden: int, heads: int,
                   dtype: torch.dtype) -> dict:
    """Tiles and warps. A pair tile is BLOCK_I x BLOCK_J pairs (tl.dot needs >= 16) and the hidden layer goes by
    chunks of BLOCK_C units. Chosen so that ptxas (sm_90) spills no register: 16-bit and float32 weights at
    K = K_hidden <= 256, H <= 128, TF32 ones too; not yet tuned on a GPU
    (small tiles: wgmma wants 64 rows, so these run as mma.sync). ``dtype`` is the weights' dtype, that of the
    matmuls."""
    if kernel == "positions":
        block = 16 if max_seqlen <= 16 else 32
        return dict(BLOCK_I=block, BLOCK_J=block, num_warps=4)
    block_k = max(16, triton.next_power_of_2(num_kernels))
    block_kh = max(16, triton.next_power_of_2(hidden))
    block_h = max(16, triton.next_power_of_2(heads))
    # (BLOCK_I, BLOCK_J, BLOCK_C) per kernel: the smallest tiles where ptxas reports 0 spills, padded (masked)
    # and packed alike; molecules of <= 4 atoms take 4 x 4 tiles.
    block_i, block_j, block_c = {"forward": (8, 4, 32), "pairs": (4, 4, 32), "weights": (8, 4, 16)}[kernel]
    if max_seqlen <= 4:
        block_i = block_j = 4
    config = dict(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k, BLOCK_C=min(block_c, block_kh),
                  BLOCK_H=block_h, num_warps=4 if block_k <= 64 else 8)
    if kernel != "weights":
        config["BLOCK_KH"] = block_kh
    if block_k > 128 and (dtype != torch.float32 or precision.dot_precision(dtype) == "tf32"):
        # Tensor-core dots at K = 256 spilled (bf16: 24 bytes in the padded forward, 104 in the weights kernel at
        # H = 128; TF32: 32 in the forward): half the pair tile, and the pairs kernel unpipelined.
        config["BLOCK_I"] = 4
        if kernel == "pairs":
            config["num_stages"] = 1
    if dtype == torch.float32:
        # float32 IEEE dots run on the FMA units, each thread holding whole operand rows (K or H long), and the
        # 16-bit choices spilled there (850 bytes at K = 128, H = 32; also at K = 32, 64, 256 and H = 64, 128):
        # 8 warps and unpipelined loads leave room, and the longest rows take half the pair tile (H = 128; the
        # weights kernel, with the most live tiles, at K = 256 too) or half the hidden chunk (K = 256).
        config.update(num_warps=8, num_stages=1)
        if block_h > 64 or (kernel == "weights" and block_k > 128):
            config["BLOCK_I"] = 4
        if kernel != "weights" and block_k > 128:
            config["BLOCK_C"] = 16
        if kernel == "pairs" and block_k > 128 and precision.dot_precision(dtype) == "tf32":
            # TF32's pairs kernel at K = 256 spilled unpipelined (16-24 bytes at H = 128), not with 2 stages;
            # 2 stages spill in other shapes (K = 128, H = 128; IEEE K = 256), so they are kept to this one.
            config["num_stages"] = 2
    return config


class _Problem:
    """Pointers, strides, sizes and flags shared by the kernels of one call."""

    def __init__(self, positions, pair_types, mul, bias, mask, cu_seqlens, max_seqlen, w1, w2):
        self.packed = cu_seqlens is not None
        dummy = positions.new_empty(1, dtype=torch.int32)
        self.two_types = pair_types.dim() == (2 if self.packed else 4)
        if self.packed:
            self.batch = cu_seqlens.numel() - 1
            self.width = max_seqlen
            self.pairs = pair_types.shape[0]
            self.cu = cu_seqlens.contiguous()  # read by molecule index
            counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long() ** 2
            self.pair_offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
            self.plane = self.pairs
            s_pos = (0, positions.stride(0), positions.stride(1))
            s_t = (0, pair_types.stride(0), 0, pair_types.stride(1) if self.two_types else 0)
        else:
            self.batch, self.width = positions.shape[0], positions.shape[1]
            self.pairs = self.batch * self.width * self.width
            self.cu = self.pair_offsets = dummy
            self.plane = self.width * self.width
            s_pos = positions.stride()
            s_t = (*pair_types.stride()[:3], pair_types.stride(3) if self.two_types else 0)
        self.mask = dummy if mask is None else mask.view(torch.uint8)
        s_mask = (0, 0) if mask is None else self.mask.stride()
        self.has_mask = mask is not None
        self.strides = (*s_pos, *s_mask, *s_t, mul.stride(0), bias.stride(0))
        self.num_kernels, self.hidden, self.heads = w1.shape[1], w1.shape[0], w2.shape[0]
        self.precision = precision.dot_precision(w1.dtype)

    def flags(self):
        return dict(PACKED=self.packed, HAS_MASK=self.has_mask, TWO_TYPES=self.two_types, PRECISION=self.precision)


def _contiguous(*tensors):
    return tuple(t.contiguous() for t in tensors)


def gaussian_basis_bias_forward(positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask, cu_seqlens,
                                max_seqlen: int, std_eps: float):
    """``(attn_bias, atom_features)`` in ``w1``'s dtype: padded ``(B, H, N, N)`` / ``(B, N, K)``, packed
    ``(H, P)`` / ``(T, K)``; 0 at pairs touching a padded atom and at padded atoms."""
    means, stds, w1, b1, w2, b2 = _contiguous(means, stds, w1, b1, w2, b2)
    problem = _Problem(positions, pair_types, mul, bias, mask, cu_seqlens, max_seqlen, w1, w2)
    heads, kernels = problem.heads, problem.num_kernels
    if problem.packed:
        out = torch.empty((heads, problem.pairs), dtype=w1.dtype, device=w1.device)
        feat = torch.empty((positions.shape[0], kernels), dtype=w1.dtype, device=w1.device)
    else:
        out = torch.empty((problem.batch, heads, problem.width, problem.width), dtype=w1.dtype, device=w1.device)
        feat = torch.empty((problem.batch, problem.width, kernels), dtype=w1.dtype, device=w1.device)
    if problem.batch == 0 or problem.width == 0:
        return out.zero_(), feat.zero_()
    config = _launch_config("forward", problem.width, kernels, problem.hidden, heads, w1.dtype)
    grid, flat = launch_grid.tiles_by_items(triton.cdiv(problem.width, config["BLOCK_I"]), problem.batch)
    _gaussian_basis_bias_fwd_kernel[grid](
        positions, problem.mask, pair_types, problem.cu, problem.pair_offsets, means, stds, mul, bias,
        w1, b1, w2, b2, out, feat,
        problem.width, kernels, problem.hidden, heads, problem.plane, float(std_eps), *problem.strides,
        FLAT_GRID=flat, **problem.flags(), **config)
    return out, feat


def backward_programs(work_items: int, device: torch.device) -> int:
    """How many programs share the backward's work items: each writes one partial-sum row, so enough to fill
    the GPU the tensors are on (a few per SM), no more."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(work_items, 4 * sms))
    return max(1, min(work_items, 4))


def gaussian_basis_bias_backward(dout, dfeat, positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2, mask,
                                 cu_seqlens, max_seqlen: int, std_eps: float):
    """Float32 gradients ``(dpositions, dmeans, dstds, dW1, db1, dW2, db2)`` and the per-pair float32 scalars
    ``(dmul_pair, dbias_pair)`` (flat: padded ``B * N * N``, packed ``P``; 0 where not a real pair) that the
    caller scatters to the rows of ``mul`` and ``bias``. ``dfeat`` may be None (no feature gradient). Each
    backward program's partial sums take ``2 K + K_hidden (K + H + 1) + H`` floats, far below a (pairs, K)
    tensor."""
    means, stds, w1, b1, w2, b2 = _contiguous(means, stds, w1, b1, w2, b2)
    problem = _Problem(positions, pair_types, mul, bias, mask, cu_seqlens, max_seqlen, w1, w2)
    heads, kernels, hidden = problem.heads, problem.num_kernels, problem.hidden
    pairs_config = _launch_config("pairs", problem.width, kernels, hidden, heads, w1.dtype)
    weights_config = _launch_config("weights", problem.width, kernels, hidden, heads, w1.dtype)
    bk, bc, bh = weights_config["BLOCK_K"], weights_config["BLOCK_C"], weights_config["BLOCK_H"]
    chunks = triton.cdiv(hidden, bc)
    # Each kernel tiles the rows its own way: (work items, i tiles per molecule, programs).
    split = {}
    for name, config in (("pairs", pairs_config), ("weights", weights_config)):
        tiles = triton.cdiv(max(problem.width, 1), config["BLOCK_I"])
        split[name] = (problem.batch * tiles, tiles, backward_programs(problem.batch * tiles, positions.device))
    row = bc * bk + bh * bc + bc + bh
    gaussian_partial = torch.zeros((split["pairs"][2], 2, bk), dtype=torch.float32, device=w1.device)
    mlp_partial = torch.zeros((split["weights"][2], chunks, row), dtype=torch.float32, device=w1.device)
    dx = torch.zeros(problem.pairs, dtype=torch.float32, device=w1.device)
    dmul = torch.zeros(problem.pairs, dtype=torch.float32, device=w1.device)
    dpos = torch.zeros((*positions.shape[:-1], 3), dtype=torch.float32, device=w1.device)
    if problem.batch and problem.width:
        if problem.packed:
            s_do = (0, dout.stride(0), dout.stride(1))
        else:
            if dout.stride(2) != problem.width * dout.stride(3):
                dout = dout.contiguous()
            s_do = (dout.stride(0), dout.stride(1), dout.stride(3))
        if dfeat is not None and not problem.packed and dfeat.stride(0) != problem.width * dfeat.stride(1):
            dfeat = dfeat.contiguous()
        s_df = (0, 0) if dfeat is None else (dfeat.stride(-2), dfeat.stride(-1))
        common = (problem.width, kernels, hidden, heads, problem.plane, float(std_eps))
        _gaussian_basis_bias_bwd_pairs_kernel[(split["pairs"][2],)](
            positions, problem.mask, pair_types, problem.cu, problem.pair_offsets, means, stds, mul, bias,
            w1, b1, w2, dout, dout if dfeat is None else dfeat, dx, gaussian_partial,
            *common, *split["pairs"][:2], *problem.strides, *s_do, *s_df, HAS_DFEAT=dfeat is not None,
            **problem.flags(), **pairs_config)
        _gaussian_basis_bias_bwd_weights_kernel[(split["weights"][2], chunks)](
            positions, problem.mask, pair_types, problem.cu, problem.pair_offsets, means, stds, mul, bias,
            w1, b1, w2, dout, mlp_partial, *common, *split["weights"][:2], *problem.strides, *s_do,
            **problem.flags(), **weights_config)
        positions_config = _launch_config("positions", problem.width, kernels, hidden, heads, w1.dtype)
        tiles = triton.cdiv(problem.width, positions_config["BLOCK_I"])
        grid, flat = launch_grid.tiles_by_items(tiles, problem.batch)
        _gaussian_basis_bias_bwd_positions_kernel[grid](
            positions, problem.mask, pair_types, problem.cu, problem.pair_offsets, mul, dx, dmul, dpos,
            problem.width, *problem.strides[:10], PACKED=problem.packed, HAS_MASK=problem.has_mask,
            TWO_TYPES=problem.two_types, FLAT_GRID=flat, **positions_config)
    dmu, dstds = gaussian_partial.sum(0)[:, :kernels]
    mlp = mlp_partial.sum(0)  # (chunks, row)
    dw1, dw2, db1, db2 = torch.split(mlp, [bc * bk, bh * bc, bc, bh], dim=1)
    dw1 = dw1.reshape(chunks * bc, bk)[:hidden, :kernels]
    dw2 = dw2.reshape(chunks, bh, bc).permute(1, 0, 2).reshape(bh, chunks * bc)[:heads, :hidden]
    db1 = db1.reshape(-1)[:hidden]
    db2 = db2[0, :heads]
    return dpos, dmu, dstds, dw1, db1, dw2, db2, dmul, dx
