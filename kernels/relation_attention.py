"""Fused relation-biased attention in Triton: ``O = softmax(Q K^T * scale + Bias + key_mask) V`` per head.

Flash-style: scores live in registers only, tile by tile, with an online softmax; the backward recomputes them
from the saved log-sum-exp. The bias is read through strides (a size-1 or stride-0 batch/head dimension is
broadcast in place), gathered from a ``(R, H)`` relation table by an integer relation matrix, or both.
Semantics (padded rows, fully masked rows, logits, dropout): :mod:`pyblend.reference.relation_attention`.

Programs: forward and dQ run one per (query tile, molecule, head); dK/dV one per (key tile, molecule, head).
dBias for a full bias is written by the dK/dV program that owns its key tile. A bias broadcast over batch or
heads and the relation table get their gradients from programs that own an output slice and recompute the
score gradient of every (molecule, head) they cover: every sum has one fixed order, so the backward is
deterministic and uses no atomics.

Pair tensors (bias, relation ids) are addressed as padded ``(B, H, N, N)`` through strides or packed
``(H, P)``, molecule ``b``'s block at ``pair_offsets[b]``. Logits, their gradient and dropout use the canonical
contiguous index of that shape, so the dropout pattern is ``rand(seed, flat index) >= dropout_p``.
"""
import math

import torch
import triton
import triton.language as tl

from . import precision
from . import launch_grid

# Relation ids handled per step of the table gradient's one-hot reduction.
RELATION_CHUNK = 16


@triton.jit
def _sequence(b, cu_seqlens_ptr, pair_offsets_ptr, padded_len, PACKED: tl.constexpr):
    """``(atoms, seqlen, pair_start)`` of molecule ``b``: the index of its rows in the per-atom tensors (int64, times
    their molecule stride; packed: its first token, the launcher passing the token stride as the molecule stride,
    so that a million tokens times a row stride do not wrap in 32 bits), its length and its first pair."""
    if PACKED:
        first = tl.load(cu_seqlens_ptr + b)
        seqlen = tl.load(cu_seqlens_ptr + b + 1) - first
        atoms = first.to(tl.int64)
        pair_start = tl.load(pair_offsets_ptr + b)
    else:
        atoms = b
        seqlen = padded_len
        pair_start = 0
    return atoms, seqlen, pair_start


@triton.jit
def _pair_offsets(rows, cols, b, h, pair_start, seqlen, s_b, s_h, s_i, s_j, PACKED: tl.constexpr):
    """Offsets of a pair tensor's (rows, cols) tile; packed tensors are ``(H, P)`` with P-stride ``s_j``."""
    if PACKED:
        return h * s_h + (pair_start + rows[:, None] * seqlen + cols[None, :]) * s_j
    else:
        return b * s_b + h * s_h + rows[:, None] * s_i + cols[None, :] * s_j


@triton.jit
def _canonical_offsets(rows, cols, b, h, pair_start, seqlen, num_heads, padded_len, total_pairs,
                       PACKED: tl.constexpr):
    """Flat index of (b, h, rows, cols) in a contiguous ``(B, H, N, N)`` (packed: ``(H, P)``) tensor."""
    if PACKED:
        return h * total_pairs + pair_start + rows[:, None] * seqlen + cols[None, :]
    else:
        return ((b * num_heads + h) * padded_len + rows[:, None]) * padded_len + cols[None, :]


@triton.jit
def _atom_mask(mask_ptr, b, positions, inside, s_m_b, s_m_n, HAS_MASK: tl.constexpr):
    """True for positions inside the molecule that the mask calls real."""
    if HAS_MASK:
        return inside & (tl.load(mask_ptr + b * s_m_b + positions * s_m_n, mask=inside, other=0) != 0)
    else:
        return inside


@triton.jit
def _atom_offsets(atoms, h, positions, offs_d, s_b, s_n, s_h, ALIGN: tl.constexpr):
    """Offsets of a (positions, D) tile of a per-atom tensor: rows ``positions`` of the molecule whose rows start at
    ``atoms * s_b`` (see :func:`_sequence`). Every row starts at a multiple of ALIGN elements (the launcher checked
    the strides), which lets the compiler use 16-byte loads and stores when D is not a multiple of 16 (D = 24: the
    per-head width of a 768-wide model with 32 heads)."""
    # Positions within a molecule times the stride fit 32 bits (the launcher checked): the per-row math stays 32-bit.
    starts = tl.multiple_of(atoms * s_b + positions * s_n + h * s_h, ALIGN)
    return starts[:, None] + offs_d[None, :]


@triton.jit
def _load_atoms(ptr, atoms, h, positions, inside, offs_d, head_dim, s_b, s_n, s_h, ALIGN: tl.constexpr):
    return tl.load(ptr + _atom_offsets(atoms, h, positions, offs_d, s_b, s_n, s_h, ALIGN),
                   mask=inside[:, None] & (offs_d[None, :] < head_dim), other=0.0)


@triton.jit
def _logits(q, k, rows, cols, real, b, h, pair_start, seqlen, scale,
            bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
            index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
            HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr):
    """S = Q K^T * scale + bias + rel_table[rel_index] for one tile, float32; the bias is read on real pairs."""
    return _biased_logits(tl.dot(q, tl.trans(k), input_precision=PRECISION), rows, cols, real, b, h, pair_start,
                          seqlen, scale, bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
                          index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
                          HAS_BIAS, HAS_TABLE, PACKED)


@triton.jit
def _relation_ids(pointers, real, num_relations):
    """The tile's relation ids as int32, -1 for a padded pair or an id outside ``[0, num_relations)``: compared
    in the ids' own dtype, so an int64 id past 2^31 cannot wrap into the table when narrowed."""
    if tl.constexpr(pointers.dtype.element_ty.is_int_unsigned()):
        # uint8 ids: widened first, as their dtype holds no -1. (if/else: the compiler has no early return.)
        widened = tl.load(pointers, mask=real, other=0).to(tl.int32)
        relation = tl.where(real & (widened < num_relations), widened, -1)
    else:
        raw = tl.load(pointers, mask=real, other=-1)
        relation = tl.where((raw >= 0) & (raw < num_relations), raw, -1).to(tl.int32)
    return relation


@triton.jit
def _biased_logits(qk, rows, cols, real, b, h, pair_start, seqlen, scale,
                   bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
                   index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
                   HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, PACKED: tl.constexpr):
    """_logits from the tile's Q K^T (float32)."""
    s = qk * scale
    if HAS_BIAS:
        offsets = _pair_offsets(rows, cols, b, h, pair_start, seqlen, s_bias_b, s_bias_h, s_bias_i, s_bias_j, PACKED)
        s += tl.load(bias_ptr + offsets, mask=real, other=0.0).to(tl.float32)
    if HAS_TABLE:
        offsets = _pair_offsets(rows, cols, b, 0, pair_start, seqlen, s_index_b, 0, s_index_i, s_index_j, PACKED)
        relation = _relation_ids(index_ptr + offsets, real, num_relations)
        # Ids were validated by the caller (unless value checks are off); a bad one adds no bias.
        known = real & (relation >= 0)
        s += tl.load(table_ptr + relation * s_table_r + h * s_table_h, mask=known, other=0.0).to(tl.float32)
    return s


@triton.jit
def _dropout_keep(seed, offsets, dropout_p):
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _relation_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, logits_ptr,
    bias_ptr, index_ptr, table_ptr, mask_ptr, cu_seqlens_ptr, pair_offsets_ptr,
    s_q_b, s_q_n, s_q_h, s_k_b, s_k_n, s_k_h, s_v_b, s_v_n, s_v_h, s_o_b, s_o_n, s_o_h, s_l_b, s_l_n, s_l_h, s_l_plane,
    s_bias_b, s_bias_h, s_bias_i, s_bias_j, s_index_b, s_index_i, s_index_j, s_table_r, s_table_h, num_relations,
    s_m_b, s_m_n,
    padded_len, num_heads, HEAD_DIM: tl.constexpr, total_pairs, scale, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr,
    DROPOUT: tl.constexpr, WRITE_LOGITS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    tile, b = launch_grid.tile_and_item(tl.cdiv(padded_len, BLOCK_M), FLAT_GRID)
    b = b.to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    atoms, seqlen, pair_start = _sequence(b, cu_seqlens_ptr, pair_offsets_ptr, padded_len, PACKED)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if tile * BLOCK_M >= seqlen:
        return
    offs_d = tl.arange(0, BLOCK_D)
    rows_in = rows < seqlen
    rows_real = _atom_mask(mask_ptr, b, rows, rows_in, s_m_b, s_m_n, HAS_MASK)
    q = _load_atoms(q_ptr, atoms, h, rows, rows_real, offs_d, HEAD_DIM, s_q_b, s_q_n, s_q_h, ALIGN)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col_start in range(0, seqlen, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        cols_in = cols < seqlen
        keys_real = _atom_mask(mask_ptr, b, cols, cols_in, s_m_b, s_m_n, HAS_MASK)
        k = _load_atoms(k_ptr, atoms, h, cols, keys_real, offs_d, HEAD_DIM, s_k_b, s_k_n, s_k_h, ALIGN)
        v = _load_atoms(v_ptr, atoms, h, cols, keys_real, offs_d, HEAD_DIM, s_v_b, s_v_n, s_v_h, ALIGN)
        inside = rows_in[:, None] & cols_in[None, :]
        real = rows_real[:, None] & keys_real[None, :]
        s = _logits(q, k, rows, cols, real, b, h, pair_start, seqlen, scale,
                    bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
                    index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
                    HAS_BIAS, HAS_TABLE, PACKED, PRECISION)
        canonical = _canonical_offsets(rows, cols, b, h, pair_start, seqlen, num_heads, padded_len, total_pairs,
                                       PACKED)
        if WRITE_LOGITS:
            tl.store(logits_ptr + canonical, tl.where(real, s, 0.0).to(logits_ptr.dtype.element_ty), mask=inside)
        s = tl.where(keys_real[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no finite score yet keeps a finite stand-in maximum, so exp never sees inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, canonical, dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Dead: no key with a finite score (l = 0). A NaN score makes l NaN and keeps the row live, so the NaN reaches
    # the output (as in torch's softmax) instead of turning the row into zeros.
    live = rows_real & (l_i != 0.0)
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    if DROPOUT:
        out = out / (1.0 - dropout_p)
    out = tl.where(live[:, None], out, 0.0)
    tl.store(out_ptr + _atom_offsets(atoms, h, rows, offs_d, s_o_b, s_o_n, s_o_h, ALIGN),
             out.to(out_ptr.dtype.element_ty), mask=rows_in[:, None] & (offs_d[None, :] < HEAD_DIM))
    # The log-sum-exp in two planes, the row maximum and log l: summed in one float32, log l is lost against a
    # maximum of 1e9 (every logit of the row carrying a -1e9 bias) and the backward's probabilities all become 1.
    # +inf for dead rows: the backward's exp(s - max) is then 0 there.
    row = lse_ptr + atoms * s_l_b + rows * s_l_n + h * s_l_h
    tl.store(row, tl.where(live, m_i, float("inf")), mask=rows_in)
    tl.store(row + s_l_plane, tl.where(live, tl.log(tl.where(live, l_i, 1.0)), 0.0), mask=rows_in)


@triton.jit
def _load_lse(lse_ptr, atoms, h, rows, rows_real, s_l_b, s_l_n, s_l_h, s_l_plane):
    """The forward's row maximum and log normaliser of the molecule's rows ``rows`` (+inf and 0 off real rows)."""
    row = lse_ptr + atoms * s_l_b + rows * s_l_n + h * s_l_h
    return (tl.load(row, mask=rows_real, other=float("inf")), tl.load(row + s_l_plane, mask=rows_real, other=0.0))


@triton.jit
def _score_gradient(q, k, v, do, row_max, log_l, delta, rows, cols, rows_real, keys_real, b, h, pair_start, seqlen,
                    scale, bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
                    index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
                    dlogits_ptr, num_heads, padded_len, total_pairs, dropout_p, seed,
                    HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, PACKED: tl.constexpr,
                    DROPOUT: tl.constexpr, HAS_DLOGITS: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute a tile's probabilities and return (P after dropout, dL/dS), both float32; 0 off real pairs."""
    real = rows_real[:, None] & keys_real[None, :]
    s = _logits(q, k, rows, cols, real, b, h, pair_start, seqlen, scale,
                bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
                index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
                HAS_BIAS, HAS_TABLE, PACKED, PRECISION)
    p = tl.where(keys_real[None, :], tl.exp((s - row_max[:, None]) - log_l[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return _dropout_and_score_gradient(p, dp, delta, real, rows, cols, b, h, pair_start, seqlen, dlogits_ptr,
                                       num_heads, padded_len, total_pairs, dropout_p, seed,
                                       PACKED, DROPOUT, HAS_DLOGITS)


@triton.jit
def _dropout_and_score_gradient(p, dp, delta, real, rows, cols, b, h, pair_start, seqlen, dlogits_ptr,
                                num_heads, padded_len, total_pairs, dropout_p, seed,
                                PACKED: tl.constexpr, DROPOUT: tl.constexpr, HAS_DLOGITS: tl.constexpr):
    """(P after dropout, dL/dS) from the tile's probabilities P and dL/dP before dropout, dp = dO V^T."""
    canonical = _canonical_offsets(rows, cols, b, h, pair_start, seqlen, num_heads, padded_len, total_pairs, PACKED)
    if DROPOUT:
        keep = _dropout_keep(seed, canonical, dropout_p)
        p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_dropped = p
    ds = p * (dp - delta[:, None])
    if HAS_DLOGITS:
        ds += tl.load(dlogits_ptr + canonical, mask=real, other=0.0).to(tl.float32)
    return p_dropped, ds


@triton.jit
def _relation_attention_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr, dlogits_ptr,
    bias_ptr, index_ptr, table_ptr, mask_ptr, cu_seqlens_ptr, pair_offsets_ptr,
    s_q_b, s_q_n, s_q_h, s_k_b, s_k_n, s_k_h, s_v_b, s_v_n, s_v_h, s_o_b, s_o_n, s_o_h, s_l_b, s_l_n, s_l_h, s_l_plane,
    s_bias_b, s_bias_h, s_bias_i, s_bias_j, s_index_b, s_index_i, s_index_j, s_table_r, s_table_h, num_relations,
    s_m_b, s_m_n,
    padded_len, num_heads, HEAD_DIM: tl.constexpr, total_pairs, scale, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DLOGITS: tl.constexpr, WRITE_DBIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """dK and dV for one key tile (``do``, ``dk``, ``dv`` share the contiguous strides ``s_o_*``). With
    WRITE_DBIAS the score gradient goes straight to a contiguous dBias of the bias's full shape and dtype."""
    tile, b = launch_grid.tile_and_item(tl.cdiv(padded_len, BLOCK_N), FLAT_GRID)
    b = b.to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    atoms, seqlen, pair_start = _sequence(b, cu_seqlens_ptr, pair_offsets_ptr, padded_len, PACKED)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    if tile * BLOCK_N >= seqlen:
        return
    offs_d = tl.arange(0, BLOCK_D)
    cols_in = cols < seqlen
    keys_real = _atom_mask(mask_ptr, b, cols, cols_in, s_m_b, s_m_n, HAS_MASK)
    k = _load_atoms(k_ptr, atoms, h, cols, keys_real, offs_d, HEAD_DIM, s_k_b, s_k_n, s_k_h, ALIGN)
    v = _load_atoms(v_ptr, atoms, h, cols, keys_real, offs_d, HEAD_DIM, s_v_b, s_v_n, s_v_h, ALIGN)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for row_start in range(0, seqlen, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        rows_in = rows < seqlen
        rows_real = _atom_mask(mask_ptr, b, rows, rows_in, s_m_b, s_m_n, HAS_MASK)
        q = _load_atoms(q_ptr, atoms, h, rows, rows_real, offs_d, HEAD_DIM, s_q_b, s_q_n, s_q_h, ALIGN)
        do = _load_atoms(do_ptr, atoms, h, rows, rows_real, offs_d, HEAD_DIM, s_o_b, s_o_n, s_o_h, ALIGN)
        row_max, log_l = _load_lse(lse_ptr, atoms, h, rows, rows_real, s_l_b, s_l_n, s_l_h, s_l_plane)
        delta = tl.load(delta_ptr + atoms * s_l_b + rows * s_l_n + h * s_l_h, mask=rows_real, other=0.0)
        inside = rows_in[:, None] & cols_in[None, :]
        p_dropped, ds = _score_gradient(
            q, k, v, do, row_max, log_l, delta, rows, cols, rows_real, keys_real, b, h, pair_start, seqlen, scale,
            bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
            index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
            dlogits_ptr, num_heads, padded_len, total_pairs, dropout_p, seed,
            HAS_BIAS, HAS_TABLE, PACKED, DROPOUT, HAS_DLOGITS, PRECISION)
        if WRITE_DBIAS:
            canonical = _canonical_offsets(rows, cols, b, h, pair_start, seqlen, num_heads, padded_len, total_pairs,
                                           PACKED)
            tl.store(dbias_ptr + canonical, ds.to(dbias_ptr.dtype.element_ty), mask=inside)
        dv += tl.dot(tl.trans(p_dropped).to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    offsets = _atom_offsets(atoms, h, cols, offs_d, s_o_b, s_o_n, s_o_h, ALIGN)
    inside_d = cols_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(dk_ptr + offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=inside_d)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=inside_d)


@triton.jit
def _relation_attention_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dlogits_ptr, out_ptr,
    bias_ptr, index_ptr, table_ptr, mask_ptr, cu_seqlens_ptr, pair_offsets_ptr,
    s_q_b, s_q_n, s_q_h, s_k_b, s_k_n, s_k_h, s_v_b, s_v_n, s_v_h, s_o_b, s_o_n, s_o_h, s_l_b, s_l_n, s_l_h, s_l_plane,
    s_bias_b, s_bias_h, s_bias_i, s_bias_j, s_index_b, s_index_i, s_index_j, s_table_r, s_table_h, num_relations,
    s_m_b, s_m_n,
    padded_len, num_heads, HEAD_DIM: tl.constexpr, total_pairs, scale, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DLOGITS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """dQ for one query tile, summing over key tiles in order. Runs first: it also writes
    ``delta = rowsum(dO * O)`` (float32, laid out as one plane of lse) for the kernels after it."""
    tile, b = launch_grid.tile_and_item(tl.cdiv(padded_len, BLOCK_M), FLAT_GRID)
    b = b.to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    atoms, seqlen, pair_start = _sequence(b, cu_seqlens_ptr, pair_offsets_ptr, padded_len, PACKED)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if tile * BLOCK_M >= seqlen:
        return
    offs_d = tl.arange(0, BLOCK_D)
    rows_in = rows < seqlen
    rows_real = _atom_mask(mask_ptr, b, rows, rows_in, s_m_b, s_m_n, HAS_MASK)
    q = _load_atoms(q_ptr, atoms, h, rows, rows_real, offs_d, HEAD_DIM, s_q_b, s_q_n, s_q_h, ALIGN)
    do = _load_atoms(do_ptr, atoms, h, rows, rows_real, offs_d, HEAD_DIM, s_o_b, s_o_n, s_o_h, ALIGN)
    out = _load_atoms(out_ptr, atoms, h, rows, rows_real, offs_d, HEAD_DIM, s_o_b, s_o_n, s_o_h, ALIGN)
    row_max, log_l = _load_lse(lse_ptr, atoms, h, rows, rows_real, s_l_b, s_l_n, s_l_h, s_l_plane)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(delta_ptr + atoms * s_l_b + rows * s_l_n + h * s_l_h, delta, mask=rows_in)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col_start in range(0, seqlen, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        cols_in = cols < seqlen
        keys_real = _atom_mask(mask_ptr, b, cols, cols_in, s_m_b, s_m_n, HAS_MASK)
        k = _load_atoms(k_ptr, atoms, h, cols, keys_real, offs_d, HEAD_DIM, s_k_b, s_k_n, s_k_h, ALIGN)
        v = _load_atoms(v_ptr, atoms, h, cols, keys_real, offs_d, HEAD_DIM, s_v_b, s_v_n, s_v_h, ALIGN)
        _, ds = _score_gradient(
            q, k, v, do, row_max, log_l, delta, rows, cols, rows_real, keys_real, b, h, pair_start, seqlen, scale,
            bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
            index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
            dlogits_ptr, num_heads, padded_len, total_pairs, dropout_p, seed,
            HAS_BIAS, HAS_TABLE, PACKED, DROPOUT, HAS_DLOGITS, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + _atom_offsets(atoms, h, rows, offs_d, s_o_b, s_o_n, s_o_h, ALIGN),
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=rows_in[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _tile_score_gradient(
    b, h, rows, cols, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dlogits_ptr,
    bias_ptr, index_ptr, table_ptr, mask_ptr, cu_seqlens_ptr, pair_offsets_ptr,
    s_q_b, s_q_n, s_q_h, s_k_b, s_k_n, s_k_h, s_v_b, s_v_n, s_v_h, s_o_b, s_o_n, s_o_h, s_l_b, s_l_n, s_l_h, s_l_plane,
    s_bias_b, s_bias_h, s_bias_i, s_bias_j, s_index_b, s_index_i, s_index_j, s_table_r, s_table_h, num_relations,
    s_m_b, s_m_n, padded_len, num_heads, HEAD_DIM: tl.constexpr, total_pairs, scale, dropout_p, seed,
    HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DLOGITS: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_STEP: tl.constexpr,
):
    """dL/dS of molecule b, head h on the (rows, cols) tile, loading everything it needs (0 outside). Q K^T and
    dO V^T are summed over head-dimension slices of D_STEP (a divisor of BLOCK_D), so that only slices of the four
    per-atom tiles are live at once (float32 at D = 128: whole tiles spilled 5.5 KB)."""
    atoms, seqlen, pair_start = _sequence(b, cu_seqlens_ptr, pair_offsets_ptr, padded_len, PACKED)
    rows_in = rows < seqlen
    cols_in = cols < seqlen
    rows_real = _atom_mask(mask_ptr, b, rows, rows_in, s_m_b, s_m_n, HAS_MASK)
    keys_real = _atom_mask(mask_ptr, b, cols, cols_in, s_m_b, s_m_n, HAS_MASK)
    row_max, log_l = _load_lse(lse_ptr, atoms, h, rows, rows_real, s_l_b, s_l_n, s_l_h, s_l_plane)
    delta = tl.load(delta_ptr + atoms * s_l_b + rows * s_l_n + h * s_l_h, mask=rows_real, other=0.0)
    qk = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d_start in range(0, BLOCK_D, D_STEP):
        offs_d = d_start + tl.arange(0, D_STEP)
        q = _load_atoms(q_ptr, atoms, h, rows, rows_real, offs_d, HEAD_DIM, s_q_b, s_q_n, s_q_h, ALIGN)
        k = _load_atoms(k_ptr, atoms, h, cols, keys_real, offs_d, HEAD_DIM, s_k_b, s_k_n, s_k_h, ALIGN)
        qk += tl.dot(q, tl.trans(k), input_precision=PRECISION)
        do = _load_atoms(do_ptr, atoms, h, rows, rows_real, offs_d, HEAD_DIM, s_o_b, s_o_n, s_o_h, ALIGN)
        v = _load_atoms(v_ptr, atoms, h, cols, keys_real, offs_d, HEAD_DIM, s_v_b, s_v_n, s_v_h, ALIGN)
        dp += tl.dot(do, tl.trans(v), input_precision=PRECISION)
    real = rows_real[:, None] & keys_real[None, :]
    s = _biased_logits(qk, rows, cols, real, b, h, pair_start, seqlen, scale,
                       bias_ptr, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
                       index_ptr, s_index_b, s_index_i, s_index_j, table_ptr, s_table_r, s_table_h, num_relations,
                       HAS_BIAS, HAS_TABLE, PACKED)
    p = tl.where(keys_real[None, :], tl.exp((s - row_max[:, None]) - log_l[:, None]), 0.0)
    _, ds = _dropout_and_score_gradient(p, dp, delta, real, rows, cols, b, h, pair_start, seqlen, dlogits_ptr,
                                        num_heads, padded_len, total_pairs, dropout_p, seed,
                                        PACKED, DROPOUT, HAS_DLOGITS)
    return ds, real, pair_start, seqlen


@triton.jit
def _relation_attention_bwd_bias_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dbias_ptr, dlogits_ptr,
    bias_ptr, index_ptr, table_ptr, mask_ptr, cu_seqlens_ptr, pair_offsets_ptr,
    s_q_b, s_q_n, s_q_h, s_k_b, s_k_n, s_k_h, s_v_b, s_v_n, s_v_h, s_o_b, s_o_n, s_o_h, s_l_b, s_l_n, s_l_h, s_l_plane,
    s_bias_b, s_bias_h, s_bias_i, s_bias_j, s_index_b, s_index_i, s_index_j, s_table_r, s_table_h, num_relations,
    s_m_b, s_m_n,
    padded_len, num_heads, HEAD_DIM: tl.constexpr, total_pairs, scale, dropout_p, seed, num_batch,
    s_db_b, s_db_h, s_db_i, s_db_j,
    SUM_BATCH: tl.constexpr, SUM_HEADS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DLOGITS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    D_STEP: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """dBias of a broadcast bias: one program per (row tile, column tile, bias slice), summing the score
    gradient over the molecules (SUM_BATCH) and heads (SUM_HEADS) that share the slice, in order. The float32
    output ``dbias`` has the bias's own shape, strides ``s_db_*`` (packed: ``(1, P)``)."""
    row_tile, slice_id = launch_grid.tile_and_item(tl.cdiv(padded_len, BLOCK_M), FLAT_GRID)
    col_tile = tl.program_id(2)
    slice_id = slice_id.to(tl.int64)
    if SUM_HEADS:
        b_first = slice_id
        h_first = slice_id * 0
        head_count = num_heads
    else:
        b_first = slice_id // num_heads
        h_first = slice_id % num_heads
        head_count = 1
    if SUM_BATCH:
        b_first = slice_id * 0
        batch_count = num_batch
    else:
        batch_count = 1
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(b_first, b_first + batch_count):
        for h in range(h_first, h_first + head_count):
            ds, _, _, _ = _tile_score_gradient(
                b, h, rows, cols, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dlogits_ptr,
                bias_ptr, index_ptr, table_ptr, mask_ptr, cu_seqlens_ptr, pair_offsets_ptr,
                s_q_b, s_q_n, s_q_h, s_k_b, s_k_n, s_k_h, s_v_b, s_v_n, s_v_h, s_o_b, s_o_n, s_o_h,
                s_l_b, s_l_n, s_l_h, s_l_plane, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
                s_index_b, s_index_i, s_index_j, s_table_r, s_table_h, num_relations,
                s_m_b, s_m_n, padded_len, num_heads, HEAD_DIM, total_pairs, scale, dropout_p, seed,
                HAS_BIAS, HAS_TABLE, HAS_MASK, PACKED, DROPOUT, HAS_DLOGITS, PRECISION, ALIGN,
                BLOCK_M, BLOCK_N, BLOCK_D, D_STEP)
            total += ds
    # The output slice is (b_first, h_first): 0 along a summed dimension, whose dbias stride is 0 anyway.
    _, seqlen, pair_start = _sequence(b_first, cu_seqlens_ptr, pair_offsets_ptr, padded_len, PACKED)
    inside = (rows < seqlen)[:, None] & (cols < seqlen)[None, :]
    offsets = _pair_offsets(rows, cols, b_first, h_first, pair_start, seqlen, s_db_b, s_db_h, s_db_i, s_db_j, PACKED)
    tl.store(dbias_ptr + offsets, total, mask=inside)


@triton.jit
def _relation_attention_bwd_table_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, partial_ptr, dlogits_ptr,
    bias_ptr, index_ptr, table_ptr, mask_ptr, cu_seqlens_ptr, pair_offsets_ptr,
    s_q_b, s_q_n, s_q_h, s_k_b, s_k_n, s_k_h, s_v_b, s_v_n, s_v_h, s_o_b, s_o_n, s_o_h, s_l_b, s_l_n, s_l_h, s_l_plane,
    s_bias_b, s_bias_h, s_bias_i, s_bias_j, s_index_b, s_index_i, s_index_j, s_table_r, s_table_h, num_relations,
    s_m_b, s_m_n,
    padded_len, num_heads, HEAD_DIM: tl.constexpr, total_pairs, scale, dropout_p, seed, num_batch, molecules_per_group,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PACKED: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DLOGITS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    ALIGN: tl.constexpr, D_STEP: tl.constexpr,
):
    """d(rel_table) partial sums: program (h, g) owns ``partial[h, g, :]`` (float32, zeroed) and adds the score
    gradient of head h over molecule group g, tile by tile of each molecule's own pairs, one relation chunk at a
    time (only the chunks a tile uses). Square tiles: BLOCK_M == BLOCK_N."""
    h = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    own = partial_ptr + (h * tl.num_programs(1) + group) * num_relations
    chunk = tl.arange(0, CHUNK)
    b_first = group * molecules_per_group
    b_last = tl.minimum(b_first + molecules_per_group, num_batch)
    for b in range(b_first, b_last):
        # A molecule shorter than the longest (most of a packed batch) has fewer tiles.
        _, seqlen, _ = _sequence(b, cu_seqlens_ptr, pair_offsets_ptr, padded_len, PACKED)
        side = tl.cdiv(seqlen, BLOCK_M)
        for tile in range(0, side * side):
            rows = (tile // side) * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = (tile % side) * BLOCK_N + tl.arange(0, BLOCK_N)
            ds, real, pair_start, seqlen = _tile_score_gradient(
                b, h, rows, cols, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dlogits_ptr,
                bias_ptr, index_ptr, table_ptr, mask_ptr, cu_seqlens_ptr, pair_offsets_ptr,
                s_q_b, s_q_n, s_q_h, s_k_b, s_k_n, s_k_h, s_v_b, s_v_n, s_v_h, s_o_b, s_o_n, s_o_h,
                s_l_b, s_l_n, s_l_h, s_l_plane, s_bias_b, s_bias_h, s_bias_i, s_bias_j,
                s_index_b, s_index_i, s_index_j, s_table_r, s_table_h, num_relations,
                s_m_b, s_m_n, padded_len, num_heads, HEAD_DIM, total_pairs, scale, dropout_p, seed,
                HAS_BIAS, True, HAS_MASK, PACKED, DROPOUT, HAS_DLOGITS, PRECISION, ALIGN,
                BLOCK_M, BLOCK_N, BLOCK_D, D_STEP)
            offsets = _pair_offsets(rows, cols, b, 0, pair_start, seqlen, s_index_b, 0, s_index_i, s_index_j, PACKED)
            relation = _relation_ids(index_ptr + offsets, real, num_relations)
            lowest = tl.min(tl.where(real, relation, num_relations), axis=1)
            lowest = tl.maximum(tl.min(lowest, axis=0), 0)
            highest = tl.max(tl.max(relation, axis=1), axis=0)
            for chunk_start in range((lowest // CHUNK) * CHUNK, highest + 1, CHUNK):
                in_chunk = (relation >= chunk_start) & (relation < chunk_start + CHUNK)
                # Ids cluster (MoleBlend: distances 0-10 or so, then 65 and 66): the chunks between are skipped.
                if tl.max(tl.max(in_chunk.to(tl.int32), axis=1), axis=0) > 0:
                    ids = chunk_start + chunk
                    hits = relation[:, :, None] == ids[None, None, :]
                    sums = tl.sum(tl.sum(tl.where(hits, ds[:, :, None], 0.0), axis=0), axis=0)
                    # Ids outside the table (unchecked under torch.compile) add no bias and get no gradient.
                    in_table = (ids >= 0) & (ids < num_relations)
                    # Same program, same addresses: the barrier orders this read after the previous write.
                    tl.debug_barrier()
                    tl.store(own + ids, tl.load(own + ids, mask=in_table, other=0.0) + sums, mask=in_table)


@triton.jit
def _dropout_keep_kernel(keep_ptr, numel, dropout_p, seed, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(keep_ptr + offsets, _dropout_keep(seed, offsets, dropout_p).to(tl.int8), mask=offsets < numel)


# ----------------------------------------------------------------------------------------------- launchers


def _launch_config(kernel: str, max_seqlen: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles and warps per kernel. Chosen so that ptxas (sm_90, every feature on, arguments specialised as at
    launch) spills no register; not yet tuned on a GPU. Forward: wide query tiles; the backward kernels hold more
    live tiles, so smaller ones. float32 takes smaller tiles or more warps: its IEEE dots run on the FMA units,
    each thread holding whole operand rows, and the 16-bit choices spill there (up to 1.3 KB)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    short = max_seqlen <= 16
    if dtype == torch.float32:
        if kernel == "forward":
            block = 16 if short else 32
            # The log-sum-exp's second row vector tipped two cases into spilling: D <= 16 (8 bytes; two stages
            # instead of three) and D > 64 (16 bytes; 16 keys a step, and two stages: with three, a dense bias and
            # dropout still spilled 16-44 bytes at D = 72-256).
            stages = {"num_stages": 2} if block == 32 and (block_d == 16 or block_d > 64) else {}
            keys = 16 if block_d > 64 else block
            return dict(BLOCK_M=block, BLOCK_N=keys, BLOCK_D=block_d, num_warps=8 if block == 32 else 4, **stages)
        if kernel in ("gradients", "dq"):
            # One stage at D > 64, and for dK/dV at D = 33-64: the pipelined loads' registers tipped dK/dV into
            # spilling (8 bytes with the table alone at D = 40, or a dense bias and dropout at D = 64).
            stages = {"num_stages": 1} if block_d > 64 or (kernel == "gradients" and block_d == 64) else {}
            return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=8, **stages)
        if kernel == "table":
            if block_d == 64:
                # 32-key tiles spilled 276-312 bytes with the relation table alone (no dense bias, no dropout),
                # 16 keys over 8 warps nothing.
                return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=8)
            if block_d == 128:
                # Whole 32 x 128 tiles of q, k, v and dO spilled 5.5 KB with the table alone; 64-wide slices of
                # them, nothing with the table alone or with every feature on.
                return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, D_STEP=64)
            block = 16 if short and block_d <= 64 else 32
            return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=8 if block == 32 else 4)
    if kernel == "forward":
        block_m = 16 if short else 32 if max_seqlen <= 32 else 64
        return dict(BLOCK_M=block_m, BLOCK_N=min(block_m, 32), BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8)
    if kernel == "bias":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4 if block_d <= 32 else 8)
    if kernel == "table":
        block = 16 if short or block_d > 64 else 32
        warps = 8 if block == 32 or block_d > 64 else 4
    else:  # gradients (dK/dV) and dq
        block = 16 if short else 32
        warps = 8 if block_d > 32 or (block_d == 16 and block == 32) else 4
        if kernel == "dq" and head_dim < block_d == 32:
            # D = 17-31 (MoleBlend's 24): the masked head columns and the log-sum-exp's two row vectors spilled
            # 4 bytes at 32 keys a step.
            return dict(BLOCK_M=block, BLOCK_N=16, BLOCK_D=block_d, num_warps=warps)
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=warps)


def _row_alignment(*strides: tuple[int, ...]) -> int:
    """The largest power of two, up to 16, that divides every stride: per-atom rows start at multiples of it."""
    common = math.gcd(*(stride for group in strides for stride in group))
    return math.gcd(common, 16) if common else 16


def _within_int32_offsets(x: torch.Tensor, width: int, dims: tuple[int, ...]) -> torch.Tensor:
    """``x``, copied contiguous when a molecule's last atom index times the stride of one of ``dims`` (its atom
    dimensions) would not fit 32 bits, as the kernels compute those products: a sequence-first view
    ``(N, B, H, D).transpose(0, 1)`` of q, or a pair-first ``(N, N, B, H)`` bias permuted to ``(B, H, N, N)``, of
    2^31 elements or more. Contiguous, a molecule's offsets are small."""
    if all((width - 1) * abs(x.stride(dim)) < 2 ** 31 for dim in dims):
        return x
    return x.contiguous()


class _Problem:
    """Pointers, strides and flags shared by every kernel of one call."""

    def __init__(self, q, k, v, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed):
        self.packed = cu_seqlens is not None
        width = max_seqlen if self.packed else q.shape[1]
        self.q, self.k, self.v = (_within_int32_offsets(x, width, (-3,)) for x in (q, k, v))
        if not self.packed:  # packed pair offsets are 64-bit from the molecule's first pair on
            bias = None if bias is None else _within_int32_offsets(bias, width, (-2, -1))
            rel_index = None if rel_index is None else _within_int32_offsets(rel_index, width, (-2, -1))
        self.head_dim = q.shape[-1]
        self.num_heads = q.shape[-2]
        dummy = q.new_empty(1, dtype=torch.int32)  # a valid pointer for arguments a flag disables
        if self.packed:
            self.batch = cu_seqlens.numel() - 1
            self.padded_len = max_seqlen
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            self.pair_offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths * lengths, 0)])
            self.total_pairs = int(self.pair_offsets[-1]) if bias is None and rel_index is None else (
                bias.shape[-1] if bias is not None else rel_index.shape[0])
            # The molecule stride is the token stride: kernels index a molecule's rows from its first token.
            atom_strides = lambda x: (x.stride(0), x.stride(0), x.stride(1))  # noqa: E731
        else:
            self.batch, self.padded_len = q.shape[0], q.shape[1]
            self.pair_offsets = dummy
            self.total_pairs = 0
            atom_strides = lambda x: (x.stride(0), x.stride(1), x.stride(2))  # noqa: E731
        self.atom_strides = atom_strides
        self.cu_seqlens = cu_seqlens.contiguous() if self.packed else dummy  # read at b and b + 1
        # out, grad_out, dq, dk, dv: contiguous with q's shape.
        row = self.num_heads * self.head_dim
        self.contiguous_strides = (row if self.packed else q.shape[1] * row, row, self.head_dim)
        lse_like = q.new_empty(q.shape[:-1], dtype=torch.float32)  # one plane of lse (and delta)
        self.lse_strides = (lse_like.stride(0), *lse_like.stride()) if self.packed else lse_like.stride()
        self.lse_strides += (lse_like.numel(),)
        self.bias = bias if bias is not None else dummy
        if bias is None:
            self.bias_strides = (0, 0, 0, 0)
        elif self.packed:
            self.bias_strides = (0, bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1), bias.stride(1))
        else:
            self.bias_strides = tuple(s if n > 1 else 0 for s, n in zip(bias.stride(), bias.shape))
        self.rel_index = rel_index if rel_index is not None else dummy
        if rel_index is None:
            self.index_strides = (0, 0, 0)
        elif self.packed:
            self.index_strides = (0, rel_index.stride(0), rel_index.stride(0))
        else:
            self.index_strides = tuple(rel_index.stride())
        self.rel_table = rel_table if rel_table is not None else dummy
        self.table_strides = (rel_table.stride(0), rel_table.stride(1), rel_table.shape[0]) if rel_table is not None \
            else (0, 0, 0)
        self.mask = mask.view(torch.uint8) if mask is not None else dummy
        self.mask_strides = mask.stride() if mask is not None else (0, 0)
        self.scale, self.dropout_p, self.seed = float(scale), float(dropout_p), int(seed)
        self.flags = dict(HAS_BIAS=bias is not None, HAS_TABLE=rel_table is not None, HAS_MASK=mask is not None,
                          PACKED=self.packed, DROPOUT=dropout_p > 0.0, PRECISION=precision.dot_precision(q.dtype),
                          ALIGN=_row_alignment(*(atom_strides(x) for x in (self.q, self.k, self.v)),
                                               self.contiguous_strides))
        self.dummy = dummy

    def shared_arguments(self):
        """Everything after the per-kernel pointers, through ``seed``."""
        return (self.bias, self.rel_index, self.rel_table, self.mask, self.cu_seqlens, self.pair_offsets,
                *self.atom_strides(self.q), *self.atom_strides(self.k), *self.atom_strides(self.v),
                *self.contiguous_strides, *self.lse_strides, *self.bias_strides, *self.index_strides,
                *self.table_strides, *self.mask_strides,
                self.padded_len, self.num_heads, self.head_dim, self.total_pairs, self.scale, self.dropout_p,
                self.seed)

    def config(self, kernel: str) -> tuple[dict, int]:
        """The kernel's launch configuration and its number of row tiles."""
        config = _launch_config(kernel, self.padded_len, self.head_dim, self.q.dtype)
        if kernel in ("bias", "table"):
            config.setdefault("D_STEP", config["BLOCK_D"])
        return config, triton.cdiv(self.padded_len, config["BLOCK_M"])


def relation_attention_forward(q, k, v, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale,
                               dropout_p, seed, return_logits):
    """Launch the forward. q, k, v: ``(B, N, H, D)`` or ``(T, H, D)`` with unit stride in D.

    Returns ``(out, lse, logits)``: out like q (contiguous); lse float32 ``(2, *q.shape[:-1])``, each row's
    log-sum-exp as its maximum (+inf on rows with no live key) and the log of its normaliser; logits
    ``(B, H, N, N)`` / ``(H, P)`` in q's dtype when ``return_logits``, else an empty tensor.
    """
    problem = _Problem(q, k, v, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed)
    q, k, v = problem.q, problem.k, problem.v
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((2, *q.shape[:-1]), dtype=torch.float32, device=q.device)
    if return_logits:
        shape = (q.shape[-2], problem.total_pairs) if problem.packed else \
            (problem.batch, q.shape[-2], problem.padded_len, problem.padded_len)
        logits = torch.empty(shape, dtype=q.dtype, device=q.device)
    else:
        logits = q.new_empty(0)
    if q.numel():
        config, tiles = problem.config("forward")
        grid, flat = launch_grid.tiles_by_items(tiles, problem.batch, problem.num_heads)
        _relation_attention_fwd_kernel[grid](
            q, k, v, out, lse, logits if return_logits else problem.dummy, *problem.shared_arguments(),
            WRITE_LOGITS=return_logits, FLAT_GRID=flat, **problem.flags, **config)
    return out, lse, logits


def relation_attention_backward(grad_out, grad_logits, q, k, v, out, lse, bias, rel_index, rel_table, mask,
                                cu_seqlens, max_seqlen, scale, dropout_p, seed, bias_grad, table_grad):
    """Launch the backward. Returns ``(dq, dk, dv, dbias, dtable)``: dbias with the bias's shape (or None),
    dtable float32 ``(R, H)`` (or None). ``grad_logits`` (logits' shape) may be None."""
    problem = _Problem(q, k, v, bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed)
    q, k, v = problem.q, problem.k, problem.v
    grad_out = grad_out.contiguous()
    delta = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # written by the dQ kernel
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    has_dlogits = grad_logits is not None
    dlogits = grad_logits.contiguous() if has_dlogits else problem.dummy
    flags = dict(problem.flags, HAS_DLOGITS=has_dlogits)
    dbias = dtable = None
    heads, batch = problem.num_heads, problem.batch
    if bias_grad:
        if problem.packed:
            sum_batch, sum_heads = False, bias.shape[0] == 1 and heads > 1
        else:
            sum_batch, sum_heads = bias.shape[0] == 1 and batch > 1, bias.shape[1] == 1 and heads > 1
        direct = not (sum_batch or sum_heads)
        # Direct: one value per element, written once in the bias's dtype. Summed: float32, cast at the end.
        dbias = torch.empty(bias.shape, dtype=bias.dtype if direct else torch.float32, device=q.device)
    if not q.numel():
        dtable = torch.zeros(rel_table.shape, dtype=torch.float32, device=q.device) if table_grad else None
        return dq, dk, dv, None if dbias is None else dbias.zero_(), dtable
    config, _ = problem.config("gradients")
    q_config, q_tiles = problem.config("dq")
    key_tiles = triton.cdiv(problem.padded_len, config["BLOCK_N"])
    common = (*problem.shared_arguments(),)
    grid, flat = launch_grid.tiles_by_items(q_tiles, batch, heads)
    _relation_attention_bwd_q_kernel[grid](
        q, k, v, grad_out, lse, delta, dq, dlogits, out, *common, FLAT_GRID=flat, **flags, **q_config)
    grid, flat = launch_grid.tiles_by_items(key_tiles, batch, heads)
    _relation_attention_bwd_kv_kernel[grid](
        q, k, v, grad_out, lse, delta, dk, dv, dbias if bias_grad and direct else problem.dummy, dlogits, *common,
        WRITE_DBIAS=bias_grad and direct, FLAT_GRID=flat, **flags, **config)
    if bias_grad and not direct:
        if problem.packed:
            slices, db_strides = batch, (0, 0, dbias.stride(1), dbias.stride(1))
        else:
            slices = (1 if sum_batch else batch) * (1 if sum_heads else heads)
            db_strides = tuple(s if n > 1 else 0 for s, n in zip(dbias.stride(), dbias.shape))
        bias_config, row_tiles = problem.config("bias")
        column_tiles = triton.cdiv(problem.padded_len, bias_config["BLOCK_N"])
        grid, flat = launch_grid.tiles_by_items(row_tiles, slices, column_tiles)
        _relation_attention_bwd_bias_kernel[grid](
            q, k, v, grad_out, lse, delta, dbias, dlogits, *common, batch, *db_strides,
            SUM_BATCH=sum_batch, SUM_HEADS=sum_heads, FLAT_GRID=flat, **flags, **bias_config)
    if table_grad:
        groups = max(1, min(batch, 64))
        per_group = triton.cdiv(batch, groups)
        groups = triton.cdiv(batch, per_group)
        partial = torch.zeros((heads, groups, rel_table.shape[0]), dtype=torch.float32, device=q.device)
        table_config, _ = problem.config("table")
        table_flags = {name: value for name, value in flags.items() if name != "HAS_TABLE"}
        _relation_attention_bwd_table_kernel[(heads, groups)](
            q, k, v, grad_out, lse, delta, partial, dlogits, *common, batch, per_group,
            **table_flags, CHUNK=RELATION_CHUNK, **table_config)
        dtable = partial.sum(1).transpose(0, 1).contiguous()
    return dq, dk, dv, dbias, dtable


def dropout_keep(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The kernels' dropout pattern for a contiguous pair tensor of ``shape`` ((B, H, N, N) or (H, P)): bool."""
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    if keep.numel():
        block = 1024
        _dropout_keep_kernel[(triton.cdiv(keep.numel(), block),)](keep, keep.numel(), float(dropout_p), int(seed),
                                                                  BLOCK=block)
    return keep.bool()
