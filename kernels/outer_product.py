"""Outer-product relation heads (MoleBlend eq. 10-11) fused with their losses, in Triton.

The kernels see one per-atom layout for both of pyblend's batch layouts: ``row (A, d1)``, ``col (A, d2)``
(padded ``(B, N, .)`` flattened to ``A = B * N`` rows, or packed ``(T, .)``), and per molecule ``b`` its first
atom ``start[b]``, its width ``length[b]`` and the start of its row-major ``(n, n)`` pair block
``pair_start[b]`` (padded: ``b N``, ``N`` and ``b N^2``; packed: ``cu_seqlens[b]``, ``N_b`` and
``sum_{c<b} N_c^2``). An optional per-atom ``mask (A,)`` marks real atoms (padded layout). Pair ``(i, j)`` of
molecule ``b`` is pair ``q = pair_start[b] + i * length[b] + j`` of every per-pair tensor.

With ``W_c = weight[c].view(d1, d2)`` the logit of class c on a tile of rows ``I`` and columns ``J`` is

    S_c = (row_I @ W_c) @ col_J^T + bias_c                                      (BLOCK_I, BLOCK_J)

two ``tl.dot``s whose intermediate ``row_I @ W_c`` is rounded to the input dtype (tensor cores for half
inputs; float32 accumulation). Neither the ``(pairs, d1 d2)`` outer products nor the ``(pairs, C)`` logits are
ever written (except by the logits entry, whose output they are).

Forward (``_outer_product_fwd_kernel``, one program per (molecule, i-tile), looping over j-tiles and classes):

- ``MODE_LOGITS``: writes ``S_c`` (0 at pairs touching padding).
- ``MODE_CROSS_ENTROPY``: per group g an online log-sum-exp over its K classes picks out the target logit;
  writes the per-(pair, group) log-sum-exp ``stats (Q, G)`` for the backward, and per program the loss sum and
  the count of non-ignored targets (``partial (programs, 2)``, summed by the launcher in a fixed order).
- ``MODE_COSINE`` (C = 3): ``cos = (S . delta) / (|S| |delta|)``, ``delta = pos_j - pos_i``, 0 where either
  vector is zero; writes ``stats (Q, 2) = (1 / (|S| |delta|), cos / |S|^2)`` (0 where degenerate or ``i == j``)
  and the partial sums of ``1 - cos`` and of the count of pairs with ``delta != 0`` (``i == j`` and coincident
  atoms have no direction to predict and are left out, as in the public MoleBlend code).

Backward, for ``dS_c`` (the upstream logits' gradient, or from the stats: ``g (softmax - onehot)`` for the
cross-entropy, ``-g (delta_c / (|S||delta|) - S_c cos / |S|^2)`` for the cosine, with ``g`` the loss gradient over
the count) the gradients are

    d row_I = sum_c (sum_J dS_c col_J) W_c^T,   d col_J = sum_c sum_I dS_c^T (row_I W_c),
    d W_c   = sum_I row_I^T (sum_J dS_c col_J),  d bias_c = sum dS_c.

``_outer_product_bwd_rows_kernel`` is persistent: program p takes the (molecule, i-tile) items p, p + P, ...;
for each class it accumulates ``E = sum_J dS_c col_J`` over the j-tiles, adds ``E W_c^T`` to ``d row_I`` and
``row_I^T E`` to its own ``d W`` partial (``(P, C, d1, d2)`` float32, read-modify-written by that program only),
and ``sum dS_c`` to its ``d bias`` partial. ``_outer_product_bwd_cols_kernel`` (one program per (molecule,
j-tile), looping over i-tiles and classes) accumulates ``d col_J = sum dS_c^T (row_I W_c)`` and writes it. Both
recompute the logits exactly as the forward does, ``(row_I W_c) col_J^T``, so the softmax they take against the
stored log-sum-exp is the forward's. The launcher sums the P partials in torch: every output has one
owner and one summation order, so the results are deterministic; no atomics. P is fixed per device (two programs
per SM), so the partials cost ``2 * SMs * C * d1 * d2 * 4`` bytes whatever the batch.

Padded atoms (mask False) and everything past a molecule's width are never read; their gradients are exactly 0.
"""
import torch
import triton
import triton.language as tl

from . import precision

MODE_LOGITS, MODE_CROSS_ENTROPY, MODE_COSINE = 0, 1, 2
MAX_FEATURES = 64  # d1, d2: one (BLOCK, 64) tile of each side plus W_c in registers
MAX_CLASSES = 128  # the d bias partial is one (next_pow2(C),) register vector


@triton.jit
def _atoms(length_ptr, start_ptr, mask_ptr, b, first, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    """Local indices, global atom indices and liveness of the tile starting at ``first`` of molecule b."""
    n = tl.load(length_ptr + b)
    local = first + tl.arange(0, BLOCK)
    inside = local < n
    atom = tl.load(start_ptr + b).to(tl.int64) + local
    live = inside
    if HAS_MASK:
        live = inside & (tl.load(mask_ptr + atom, mask=inside, other=0) != 0)
    return local, inside, atom, live


@triton.jit
def _load_tile(ptr, atom, live, offs, dim, s_a, s_d):
    return tl.load(ptr + atom[:, None] * s_a + offs[None, :] * s_d, mask=live[:, None] & (offs[None, :] < dim),
                   other=0.0)


@triton.jit
def _class_weight(w_ptr, c, offs_a, offs_b, d1, d2, s_wc, s_wk):
    """``W_c (BLOCK_D1, BLOCK_D2)``: ``W_c[a, b] = weight[c, a * d2 + b]``, 0 outside ``(d1, d2)``."""
    return tl.load(w_ptr + c * s_wc + (offs_a[:, None] * d2 + offs_b[None, :]) * s_wk,
                   mask=(offs_a[:, None] < d1) & (offs_b[None, :] < d2), other=0.0)


@triton.jit
def _bias(bias_ptr, c, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(bias_ptr + c).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _coordinate(pos_ptr, atom, live, c, s_pa, s_pc):
    return tl.load(pos_ptr + atom * s_pa + c * s_pc, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _logit_tile(row, col, w, bias_c, PRECISION: tl.constexpr):
    """``S_c = (row @ W_c) @ col^T + bias_c``: float32 ``(BLOCK_I, BLOCK_J)``."""
    a = tl.dot(row, w, input_precision=PRECISION).to(row.dtype)
    return tl.dot(a, tl.trans(col), input_precision=PRECISION) + bias_c


@triton.jit
def _outer_product_fwd_kernel(
    row_ptr, col_ptr, w_ptr, bias_ptr, mask_ptr, start_ptr, length_ptr, pair_ptr, aux_ptr, out_ptr, partial_ptr,
    d1, d2, n_classes, groups, ignore_index, tiles,
    s_ra, s_rd, s_ca, s_cd, s_wc, s_wk, s_xq, s_xg, s_oq, s_oc,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    n = tl.load(length_ptr + b)
    pair_start = tl.load(pair_ptr + b).to(tl.int64)
    rows, rows_in, atom_i, live_i = _atoms(length_ptr, start_ptr, mask_ptr, b, tile * BLOCK_I, BLOCK_I, HAS_MASK)
    offs_a = tl.arange(0, BLOCK_D1)
    offs_b = tl.arange(0, BLOCK_D2)
    row = _load_tile(row_ptr, atom_i, live_i, offs_a, d1, s_ra, s_rd)
    classes = n_classes // groups

    loss = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    count = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    j_end = tl.where(tile * BLOCK_I < n, n, 0)  # an i-tile past the molecule does nothing
    for j_start in range(0, j_end, BLOCK_J):
        cols, cols_in, atom_j, live_j = _atoms(length_ptr, start_ptr, mask_ptr, b, j_start, BLOCK_J, HAS_MASK)
        col = _load_tile(col_ptr, atom_j, live_j, offs_b, d2, s_ca, s_cd)
        pair = pair_start + rows[:, None].to(tl.int64) * n + cols[None, :]
        inside = rows_in[:, None] & cols_in[None, :]
        real = live_i[:, None] & live_j[None, :]
        if MODE == 0:
            for c in range(0, n_classes):
                w = _class_weight(w_ptr, c, offs_a, offs_b, d1, d2, s_wc, s_wk)
                s = _logit_tile(row, col, w, _bias(bias_ptr, c, HAS_BIAS), PRECISION)
                tl.store(out_ptr + pair * s_oq + c * s_oc, tl.where(real, s, 0.0).to(out_ptr.dtype.element_ty),
                         mask=inside)
        elif MODE == 1:
            for g in range(0, groups):
                target = tl.load(aux_ptr + pair * s_xq + g * s_xg, mask=real, other=ignore_index)
                valid = real & (target != ignore_index)
                m = tl.full((BLOCK_I, BLOCK_J), float("-inf"), dtype=tl.float32)
                l = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
                picked = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
                for k in range(0, classes):
                    c = g * classes + k
                    w = _class_weight(w_ptr, c, offs_a, offs_b, d1, d2, s_wc, s_wk)
                    s = _logit_tile(row, col, w, _bias(bias_ptr, c, HAS_BIAS), PRECISION)
                    m_new = tl.maximum(m, s)
                    l = l * tl.exp(m - m_new) + tl.exp(s - m_new)
                    m = m_new
                    picked = tl.where(target == k, s, picked)
                lse = m + tl.log(l)
                loss += tl.where(valid, lse - picked, 0.0)
                count += valid.to(tl.float32)
                tl.store(out_ptr + pair * s_oq + g * s_oc, tl.where(valid, lse, 0.0), mask=inside)
        else:
            dot = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
            pp = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
            dd = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
            for c in range(0, 3):
                w = _class_weight(w_ptr, c, offs_a, offs_b, d1, d2, s_wc, s_wk)
                s = _logit_tile(row, col, w, _bias(bias_ptr, c, HAS_BIAS), PRECISION)
                delta = (_coordinate(aux_ptr, atom_j, live_j, c, s_xq, s_xg)[None, :]
                         - _coordinate(aux_ptr, atom_i, live_i, c, s_xq, s_xg)[:, None])
                dot += s * delta
                pp += s * s
                dd += delta * delta
            valid = real & (rows[:, None] != cols[None, :])
            nonzero = valid & (pp > 0.0) & (dd > 0.0)
            # 1 / (|S| |delta|) as a product of square roots: pp * dd overflows float32 for logits ~1e17.
            inverse = tl.where(nonzero, 1.0 / (tl.sqrt(tl.where(nonzero, pp, 1.0)) *
                                               tl.sqrt(tl.where(nonzero, dd, 1.0))), 0.0)
            cosine = dot * inverse
            # delta = 0 (coincident atoms): no direction to predict, so the pair is not counted. A NaN position is
            # counted (dd != 0, not dd > 0): the loss turns NaN instead of quietly leaving the atom out.
            counted = valid & (dd != 0.0)
            loss += tl.where(counted, 1.0 - cosine, 0.0)
            count += counted.to(tl.float32)
            tl.store(out_ptr + pair * s_oq, inverse, mask=inside)
            tl.store(out_ptr + pair * s_oq + s_oc, tl.where(nonzero, cosine / tl.where(nonzero, pp, 1.0), 0.0),
                     mask=inside)
    if MODE != 0:
        program = b * tiles + tile
        tl.store(partial_ptr + program * 2, tl.sum(tl.sum(loss, 1), 0))
        tl.store(partial_ptr + program * 2 + 1, tl.sum(tl.sum(count, 1), 0))


@triton.jit
def _score_gradient(s, c, pair, real, rows, cols, atom_i, atom_j, live_i, live_j, scale,
                    grad_ptr, aux_ptr, stats_ptr, n_classes, groups, ignore_index,
                    s_gq, s_gc, s_xq, s_xg, s_sq, s_sg, MODE: tl.constexpr):
    """dL/dS_c on one tile, float32, exactly 0 off real pairs."""
    if MODE == 0:
        ds = tl.load(grad_ptr + pair * s_gq + c * s_gc, mask=real, other=0.0).to(tl.float32)
    elif MODE == 1:
        classes = n_classes // groups
        g = c // classes
        k = c - g * classes
        target = tl.load(aux_ptr + pair * s_xq + g * s_xg, mask=real, other=ignore_index)
        valid = real & (target != ignore_index)
        lse = tl.load(stats_ptr + pair * s_sq + g * s_sg, mask=valid, other=0.0)
        # exp only of valid entries: elsewhere lse is 0 and exp(s) would overflow (harmless, but noisy).
        ds = (tl.exp(tl.where(valid, s - lse, 0.0)) - (target == k).to(tl.float32)) * scale
    else:
        valid = real & (rows[:, None] != cols[None, :])
        inverse = tl.load(stats_ptr + pair * s_sq, mask=valid, other=0.0)
        ratio = tl.load(stats_ptr + pair * s_sq + s_sg, mask=valid, other=0.0)
        delta = (_coordinate(aux_ptr, atom_j, live_j, c, s_xq, s_xg)[None, :]
                 - _coordinate(aux_ptr, atom_i, live_i, c, s_xq, s_xg)[:, None])
        ds = -scale * (delta * inverse - s * ratio)
    if MODE != 0:
        ds = tl.where(valid, ds, 0.0)
    return ds


@triton.jit
def _outer_product_bwd_rows_kernel(
    row_ptr, col_ptr, w_ptr, bias_ptr, mask_ptr, start_ptr, length_ptr, pair_ptr, aux_ptr, stats_ptr, grad_ptr,
    drow_ptr, dw_ptr, dbias_ptr,
    d1, d2, n_classes, groups, ignore_index, tiles, items,
    s_ra, s_rd, s_ca, s_cd, s_wc, s_wk, s_xq, s_xg, s_sq, s_sg, s_gq, s_gc,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_a = tl.arange(0, BLOCK_D1)
    offs_b = tl.arange(0, BLOCK_D2)
    offs_c = tl.arange(0, BLOCK_C)
    inside_w = (offs_a[:, None] < d1) & (offs_b[None, :] < d2)
    dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw_base = dw_ptr + program.to(tl.int64) * n_classes * d1 * d2
    for item in range(program, items, programs):
        b = item // tiles
        tile = item - b * tiles
        scale = 0.0
        if MODE != 0:
            # dL / d(molecule b's loss sum): the upstream gradient over the count that sum is averaged by.
            scale = tl.load(grad_ptr + b * s_gq).to(tl.float32)
        n = tl.load(length_ptr + b)
        pair_start = tl.load(pair_ptr + b).to(tl.int64)
        rows, rows_in, atom_i, live_i = _atoms(length_ptr, start_ptr, mask_ptr, b, tile * BLOCK_I, BLOCK_I,
                                               HAS_MASK)
        row = _load_tile(row_ptr, atom_i, live_i, offs_a, d1, s_ra, s_rd)
        drow = tl.zeros((BLOCK_I, BLOCK_D1), dtype=tl.float32)
        j_end = tl.where(tile * BLOCK_I < n, n, 0)
        for c in range(0, n_classes):
            w = _class_weight(w_ptr, c, offs_a, offs_b, d1, d2, s_wc, s_wk)
            a = tl.dot(row, w, input_precision=PRECISION).to(row.dtype)
            bias_c = _bias(bias_ptr, c, HAS_BIAS)
            e = tl.zeros((BLOCK_I, BLOCK_D2), dtype=tl.float32)
            db = tl.zeros((BLOCK_I,), dtype=tl.float32)
            # Not software-pipelined: the prefetched per-pair loads (target, statistics) would hold a
            # (BLOCK_I, BLOCK_J) register tile per stage and spill (see the compile test).
            for j_start in tl.range(0, j_end, BLOCK_J, num_stages=1):
                cols, cols_in, atom_j, live_j = _atoms(length_ptr, start_ptr, mask_ptr, b, j_start, BLOCK_J,
                                                       HAS_MASK)
                col = _load_tile(col_ptr, atom_j, live_j, offs_b, d2, s_ca, s_cd)
                pair = pair_start + rows[:, None].to(tl.int64) * n + cols[None, :]
                real = live_i[:, None] & live_j[None, :]
                s = tl.dot(a, tl.trans(col), input_precision=PRECISION) + bias_c
                ds = _score_gradient(s, c, pair, real, rows, cols, atom_i, atom_j, live_i, live_j, scale,
                                     grad_ptr, aux_ptr, stats_ptr, n_classes, groups, ignore_index,
                                     s_gq, s_gc, s_xq, s_xg, s_sq, s_sg, MODE)
                e += tl.dot(ds.to(col.dtype), col, input_precision=PRECISION)
                db += tl.sum(ds, 1)
            e_low = e.to(row.dtype)
            drow += tl.dot(e_low, tl.trans(w), input_precision=PRECISION)
            dbias = tl.where(offs_c == c, dbias + tl.sum(db, 0), dbias)
            # This program's own slice: read, add, write back. The barrier orders the write before the next
            # item's read of the same addresses by other threads of the program.
            dw_at = dw_base + c * d1 * d2 + offs_a[:, None] * d2 + offs_b[None, :]
            dw = tl.load(dw_at, mask=inside_w, other=0.0)
            tl.store(dw_at, dw + tl.dot(tl.trans(row), e_low, input_precision=PRECISION), mask=inside_w)
            tl.debug_barrier()
        tl.store(drow_ptr + atom_i[:, None] * d1 + offs_a[None, :], drow.to(drow_ptr.dtype.element_ty),
                 mask=rows_in[:, None] & (offs_a[None, :] < d1))
    tl.store(dbias_ptr + program * n_classes + offs_c, dbias, mask=offs_c < n_classes)


@triton.jit
def _outer_product_bwd_cols_kernel(
    row_ptr, col_ptr, w_ptr, bias_ptr, mask_ptr, start_ptr, length_ptr, pair_ptr, aux_ptr, stats_ptr, grad_ptr,
    dcol_ptr,
    d1, d2, n_classes, groups, ignore_index,
    s_ra, s_rd, s_ca, s_cd, s_wc, s_wk, s_xq, s_xg, s_sq, s_sg, s_gq, s_gc,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    n = tl.load(length_ptr + b)
    pair_start = tl.load(pair_ptr + b).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_D1)
    offs_b = tl.arange(0, BLOCK_D2)
    scale = 0.0
    if MODE != 0:
        scale = tl.load(grad_ptr + b * s_gq).to(tl.float32)
    cols, cols_in, atom_j, live_j = _atoms(length_ptr, start_ptr, mask_ptr, b, tile * BLOCK_J, BLOCK_J, HAS_MASK)
    col = _load_tile(col_ptr, atom_j, live_j, offs_b, d2, s_ca, s_cd)
    dcol = tl.zeros((BLOCK_J, BLOCK_D2), dtype=tl.float32)
    i_end = tl.where(tile * BLOCK_J < n, n, 0)
    for i_start in tl.range(0, i_end, BLOCK_I, num_stages=1):  # not pipelined: as in the rows kernel
        rows, rows_in, atom_i, live_i = _atoms(length_ptr, start_ptr, mask_ptr, b, i_start, BLOCK_I, HAS_MASK)
        row = _load_tile(row_ptr, atom_i, live_i, offs_a, d1, s_ra, s_rd)
        pair = pair_start + rows[:, None].to(tl.int64) * n + cols[None, :]
        real = live_i[:, None] & live_j[None, :]
        for c in range(0, n_classes):
            w = _class_weight(w_ptr, c, offs_a, offs_b, d1, d2, s_wc, s_wk)
            # The forward's association, (row W_c) col^T: the softmax of the backward must see the logits the
            # forward's log-sum-exp saw (col (row W_c)^T rounds differently, ~1e-3 absolute at logits ~1e4).
            a = tl.dot(row, w, input_precision=PRECISION).to(row.dtype)
            s = tl.dot(a, tl.trans(col), input_precision=PRECISION) + _bias(bias_ptr, c, HAS_BIAS)
            ds = _score_gradient(s, c, pair, real, rows, cols, atom_i, atom_j, live_i, live_j, scale,
                                 grad_ptr, aux_ptr, stats_ptr, n_classes, groups, ignore_index,
                                 s_gq, s_gc, s_xq, s_xg, s_sq, s_sg, MODE)
            dcol += tl.dot(tl.trans(ds.to(a.dtype)), a, input_precision=PRECISION)
    tl.store(dcol_ptr + atom_j[:, None] * d2 + offs_b[None, :], dcol.to(dcol_ptr.dtype.element_ty),
             mask=cols_in[:, None] & (offs_b[None, :] < d2))


# ----------------------------------------------------------------------------------------------- launchers


def launch_config(kernel: str, max_n: int, d1: int, d2: int, mode: int, dtype: torch.dtype) -> dict:
    """Tiles and warps of ``kernel`` ("forward", "rows" or "cols") for ``d1 = d2`` a power of two (the launchers
    pad the features so: ``_square_features``): square pair tiles of 16 (small molecules, or more than 32 features
    a side: 32-tiles spill on sm_90 there) or 32; chosen so that ptxas (sm_90, arguments specialised as at launch)
    spills no register; not yet tuned on a GPU."""
    block = 16 if max_n <= 16 or max(d1, d2) > 32 else 32
    config = dict(BLOCK_I=block, BLOCK_J=block, BLOCK_D1=max(16, triton.next_power_of_2(d1)),
                  BLOCK_D2=max(16, triton.next_power_of_2(d2)))
    if dtype == torch.float32 and precision.dot_precision(dtype) == "ieee":
        # IEEE float32 dots run on the FMA units, each thread holding whole operand rows: the 16-bit choices below
        # spilled up to 440 bytes there (TF32 ones run on the tensor cores, and spill-free with them). Chosen per
        # kernel from ptxas's reports, which are erratic: besides spilling at 255 registers, it aimed some kernels
        # at 64-128 registers and spilled a few scalars to get there; other warps, or no software pipelining (no
        # prefetched next tile), moved it off those targets.
        if max(d1, d2) > 32:
            if kernel == "rows":  # 8 warps spilled at 255 registers; 32 (at most 64 registers) did not
                return dict(config, num_warps=32)
            return dict(config, num_warps=8, num_stages=1)
        if kernel == "rows":
            return dict(config, num_warps=4 if block == 32 and mode == MODE_LOGITS else 8)
        if kernel == "cols" and mode == MODE_COSINE:
            return dict(config, num_warps=4, num_stages=1)
        return dict(config, num_warps=4)
    warps = 8 if max(d1, d2) > 32 else 4
    if mode == MODE_LOGITS:
        # Half the warps: as launched (unit strides and aligned pointers specialised), ptxas held the logits' rows
        # backward (d = 32) and forward (d = 64) at 128 registers a thread with the losses' warps, and spilled.
        warps //= 2
    return dict(config, num_warps=warps)


def row_programs(items: int, device: torch.device) -> int:
    """Programs of the persistent rows backward: two per SM on a GPU (each owns one d weight partial)."""
    if device.type == "cuda":
        return max(1, min(items, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(items, 3))  # the interpreter: few, so that programs take several items


def _mask_bytes(mask, like):
    return mask.view(torch.uint8) if mask is not None else like.new_empty(1, dtype=torch.uint8)


def _square_features(row, col, weight):
    """The operands zero-padded to one square power-of-two feature tile ``F = max(16, next_pow2(max(d1, d2)))`` a
    side: ``(row (A, F), col (A, F), weight (C, F * F))``, unchanged if already so. Masked (d not a power of two)
    or unequal feature tiles made ptxas spill (sm_90: up to 324 bytes in IEEE float32's rows backward at d = 40,
    4-36 bytes with the tensor cores), square unmasked ones did not; the zeros add exact zeros, so the values are
    those of the unpadded problem, at the square tile's cost."""
    d1, d2 = row.shape[1], col.shape[1]
    width = max(16, triton.next_power_of_2(max(d1, d2)))
    if d1 == d2 == width:
        return row, col, weight
    classes = weight.shape[0]
    weight = torch.nn.functional.pad(weight.reshape(classes, d1, d2), (0, width - d2, 0, width - d1))
    return (torch.nn.functional.pad(row, (0, width - d1)), torch.nn.functional.pad(col, (0, width - d2)),
            weight.reshape(classes, width * width))


def _common(row, col, weight, bias, mask, max_n, mode):
    """(d1, d2, each kernel's launch keywords, the bias argument)."""
    d1, d2 = row.shape[1], col.shape[1]
    flags = dict(MODE=mode, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                 PRECISION=precision.dot_precision(row.dtype))
    configs = {kernel: dict(flags, **launch_config(kernel, max_n, d1, d2, mode, row.dtype))
               for kernel in ("forward", "rows", "cols")}
    bias_arg = bias if bias is not None else weight
    return d1, d2, configs, bias_arg


def _aux_strides(aux):
    return (aux.stride(0), aux.stride(1)) if aux is not None and aux.dim() == 2 else (0, 0)


def outer_product_forward(row, col, weight, bias, aux, mask, start, length, pair_start, max_n: int, pairs: int,
                          mode: int, groups: int, ignore_index: int):
    """One forward pass.

    row ``(A, d1)``, col ``(A, d2)``, weight ``(C, d1 * d2)``, bias ``(C,)`` or None: one float dtype, any
    strides. aux: the target ``(Q, G)`` (any integer dtype; cross-entropy), float32 positions ``(A, 3)``
    (cosine) or None (logits). mask: bool ``(A,)`` contiguous or None. start, length: int32 ``(B,)``;
    pair_start: int64 ``(B,)``; ``max_n >= max(length)``, ``pairs = Q``.

    Returns logits ``(Q, C)`` in row's dtype (``MODE_LOGITS``), else ``(stats (Q, G or 2) float32,
    loss_sums (B,) float32, counts (B,) float64)``, per molecule.
    """
    row, col, weight = _square_features(row, col, weight)
    d1, d2, configs, bias_arg = _common(row, col, weight, bias, mask, max_n, mode)
    flags = configs["forward"]
    batch = start.numel()
    classes = weight.shape[0]
    tiles = triton.cdiv(max(max_n, 1), flags["BLOCK_I"])
    if mode == MODE_LOGITS:
        out = torch.empty((pairs, classes), dtype=row.dtype, device=row.device)
    else:
        out = torch.empty((pairs, groups if mode == MODE_CROSS_ENTROPY else 2), dtype=torch.float32,
                          device=row.device)
    partial = torch.zeros((batch * tiles, 2), dtype=torch.float32, device=row.device)
    if batch and pairs:
        aux_arg = aux if aux is not None else row
        _outer_product_fwd_kernel[(batch, tiles)](
            row, col, weight, bias_arg, _mask_bytes(mask, row), start, length, pair_start, aux_arg, out, partial,
            d1, d2, classes, groups, ignore_index, tiles,
            *row.stride(), *col.stride(), *weight.stride(), *_aux_strides(aux), *out.stride(), **flags)
    if mode == MODE_LOGITS:
        return out
    # Fixed-order sums per molecule; the counts in float64 so that their totals stay exact past 2^24 targets.
    per_molecule = partial.view(batch, tiles, 2)
    return out, per_molecule[..., 0].sum(1), per_molecule[..., 1].double().sum(1)


def outer_product_backward(grad, row, col, weight, bias, aux, mask, start, length, pair_start, stats,
                           max_n: int, mode: int, groups: int, ignore_index: int, programs: int | None = None):
    """Gradients ``(drow (A, d1), dcol (A, d2), dweight (C, d1 * d2), dbias (C,))`` in the inputs' dtypes (0 at
    padded atoms). ``grad``: the logits' gradient ``(Q, C)`` (``MODE_LOGITS``), else a float32 ``(B,)`` tensor
    (any stride, 0 included): the loss gradient with respect to each molecule's loss sum. ``stats``: the
    forward's (ignored for logits)."""
    d1_given, d2_given = row.shape[1], col.shape[1]
    row, col, weight = _square_features(row, col, weight)
    d1, d2, configs, bias_arg = _common(row, col, weight, bias, mask, max_n, mode)
    batch = start.numel()
    classes = weight.shape[0]
    atoms = row.shape[0]
    drow = torch.zeros((atoms, d1), dtype=row.dtype, device=row.device)
    dcol = torch.zeros((atoms, d2), dtype=col.dtype, device=col.device)
    tiles = triton.cdiv(max(max_n, 1), configs["rows"]["BLOCK_I"])  # the rows backward's i-tiles
    items = batch * tiles
    if programs is None:
        programs = row_programs(items, row.device)
    dw = torch.zeros((programs, classes, d1, d2), dtype=torch.float32, device=row.device)
    db = torch.zeros((programs, classes), dtype=torch.float32, device=row.device)
    if batch and max_n:
        aux_arg = aux if aux is not None else row
        stats_arg = stats if mode != MODE_LOGITS else row
        strides = (*row.stride(), *col.stride(), *weight.stride(), *_aux_strides(aux),
                   *(stats.stride() if mode != MODE_LOGITS else (0, 0)),
                   *(grad.stride() if mode == MODE_LOGITS else (grad.stride(0), 0)))
        common = (row, col, weight, bias_arg, _mask_bytes(mask, row), start, length, pair_start, aux_arg,
                  stats_arg, grad)
        _outer_product_bwd_rows_kernel[(programs,)](
            *common, drow, dw, db, d1, d2, classes, groups, ignore_index, tiles, items, *strides,
            BLOCK_C=max(16, triton.next_power_of_2(classes)), **configs["rows"])
        _outer_product_bwd_cols_kernel[(batch, triton.cdiv(max_n, configs["cols"]["BLOCK_J"]))](
            *common, dcol, d1, d2, classes, groups, ignore_index, *strides, **configs["cols"])
    dweight = dw.sum(0)
    if (d1, d2) != (d1_given, d2_given):  # _square_features padded them
        drow, dcol = drow[:, :d1_given].contiguous(), dcol[:, :d2_given].contiguous()
        dweight = dweight[:, :d1_given, :d2_given]
    dweight = dweight.reshape(classes, d1_given * d2_given).to(weight.dtype)
    dbias = db.sum(0).to(weight.dtype)
    return drow, dcol, dweight, dbias
