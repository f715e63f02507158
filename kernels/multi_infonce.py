"""Blockwise row/column log-sum-exp of a scaled similarity matrix in Triton, for the InfoNCE loss.

For one modality pair the kernels see ``x (B, D)``, ``y (B, D)`` (any strides, one dtype), float32 scales
``x_scale (B,)`` and ``y_scale (B,)`` and an optional ``present (B,)`` bool mask, and work on

    S_ij = (x_i . y_j) * x_scale_i * y_scale_j        over present rows i and present columns j

(the op folds L2 normalisation and the temperature into the scales, so the dot runs in the input dtype with
float32 accumulation and nothing is rescaled in memory). S is never written: every tile lives in registers.

Forward, one program per row block (``_multi_infonce_fwd_kernel``): an online log-sum-exp along the row gives
``row_lse``; each column tile's log-sum-exp over the program's rows is written to ``col_partial[row_block, j]``
and the launcher reduces those ``(cdiv(B, BLOCK_M), B)`` partials with one ``torch.logsumexp`` into ``col_lse``:
the matrix product runs once.

Backward, for upstream gradients ``g_row``, ``g_col`` of the two log-sum-exps,
``dS_ij = g_row_i exp(S_ij - row_lse_i) + g_col_j exp(S_ij - col_lse_j)`` on present pairs, 0 elsewhere.
``_multi_infonce_bwd_rows_kernel`` (one program per row block, looping over column blocks) recomputes each tile
and accumulates ``u_i = sum_j dS_ij y_scale_j y_j``; ``_multi_infonce_bwd_cols_kernel`` (one program per column
block, looping over row blocks) accumulates ``v_j = sum_i dS_ij x_scale_i x_i``. They write ``dx = x_scale * u``,
``dy = y_scale * v`` and the scales' gradients ``x . u`` and ``y . v``. Each output element has one owner and
one summation order: deterministic, no atomics. The weights ``dS_ij y_scale_j`` are rounded to the input dtype
for the dot; in float16 each tile's rows (columns for ``v``) are first divided by their largest magnitude and the
product multiplied back, because those weights are small (the 1/(2B) of the mean times 1/||y||: 1.5e-8 at
B = 16k and ||y|| = 2) and float16 keeps full precision only down to 6.1e-5. The weights take their scale from
``x_weight`` / ``y_weight``: the scales, but 0 for an all-zero float16 row, whose 1/eps inverse norm would
otherwise be the peak every other weight is divided by (rounding those to 0) while it multiplies only zeros.

Rectangular problems (the distributed path, ``multi_infonce_row_lse_*``): a rank's local rows ``x (M, D)``
against the columns gathered from every rank ``y (N, D)``, with separate row and column masks. Only the row
log-sum-exps are computed (``COLUMNS=False``: no column partials in the forward, no ``g_col`` term in the
backward); the same three kernels serve both shapes, and the square single-process path passes one mask twice
with ``COLUMNS=True``, as before.

Absent samples (``present`` False) are never read: their loads are masked, their LSEs are 0 and their gradients
exactly 0, so a NaN stored there cannot reach anything.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import precision


@triton.jit
def _present(present_ptr, index, inside, HAS_MASK: tl.constexpr):
    """True where ``index`` is inside the batch and (with a mask) present."""
    if HAS_MASK:
        return inside & (tl.load(present_ptr + index, mask=inside, other=0) != 0)
    else:
        return inside


@triton.jit
def _load_rows(ptr, rows, live, offs_d, dim, s_n, s_d):
    return tl.load(ptr + rows[:, None] * s_n + offs_d[None, :] * s_d,
                   mask=live[:, None] & (offs_d[None, :] < dim), other=0.0)


@triton.jit
def _similarity(x, y, x_scale, y_scale, PRECISION: tl.constexpr):
    """One float32 tile of S = (x y^T) * x_scale[:, None] * y_scale[None, :]."""
    s = tl.dot(x, tl.trans(y), input_precision=PRECISION)
    return s * x_scale[:, None] * y_scale[None, :]


@triton.jit
def _multi_infonce_fwd_kernel(
    x_ptr, y_ptr, x_scale_ptr, y_scale_ptr, row_present_ptr, col_present_ptr, row_lse_ptr, col_partial_ptr,
    n_rows, n_cols, dim, s_x_n, s_x_d, s_y_n, s_y_d,
    HAS_MASK: tl.constexpr, COLUMNS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = rows < n_rows
    rows_live = _present(row_present_ptr, rows, rows_in, HAS_MASK)
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(x_ptr, rows, rows_live, offs_d, dim, s_x_n, s_x_d)
    x_scale = tl.load(x_scale_ptr + rows, mask=rows_live, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    partial_row = col_partial_ptr + block.to(tl.int64) * n_cols
    for col_start in range(0, n_cols, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        cols_in = cols < n_cols
        cols_live = _present(col_present_ptr, cols, cols_in, HAS_MASK)
        y = _load_rows(y_ptr, cols, cols_live, offs_d, dim, s_y_n, s_y_d)
        y_scale = tl.load(y_scale_ptr + cols, mask=cols_live, other=0.0)
        s = _similarity(x, y, x_scale, y_scale, PRECISION)
        s = tl.where(rows_live[:, None] & cols_live[None, :], s, float("-inf"))
        # Rows: online log-sum-exp. A row with no finite score yet keeps a finite stand-in maximum.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
        if COLUMNS:
            # Columns: this row block's log-sum-exp of the tile, -inf where it holds no present pair.
            c_max = tl.max(s, 0)
            c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp(s - c_safe[None, :]), 0)
            partial = tl.where(c_sum > 0.0, c_safe + tl.log(tl.where(c_sum > 0.0, c_sum, 1.0)), float("-inf"))
            tl.store(partial_row + cols, partial, mask=cols_in)

    live = rows_live & (l_i > 0.0)
    m_final = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(live, m_final + tl.log(tl.where(live, l_i, 1.0)), 0.0)
    tl.store(row_lse_ptr + rows, lse, mask=rows_in)


@triton.jit
def _unit_peaks(w, AXIS: tl.constexpr):
    """The largest magnitude of ``w`` along ``AXIS``, 1 where all are 0: the divisor that brings those values
    to [-1, 1] before they are rounded to float16."""
    peak = tl.max(tl.abs(w), AXIS)
    return tl.where(peak > 0, peak, 1.0)


@triton.jit
def _score_gradient(s, row_lse, col_lse, g_row, g_col, real, COLUMNS: tl.constexpr):
    """dL/dS for one tile (float32), 0 off present pairs; without ``COLUMNS`` only the row term."""
    ds = g_row[:, None] * tl.exp(s - row_lse[:, None])
    if COLUMNS:
        ds += g_col[None, :] * tl.exp(s - col_lse[None, :])
    return tl.where(real, ds, 0.0)


@triton.jit
def _multi_infonce_bwd_rows_kernel(
    x_ptr, y_ptr, x_scale_ptr, y_scale_ptr, x_weight_ptr, y_weight_ptr, row_present_ptr, col_present_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
    dx_ptr, dx_scale_ptr,
    n_rows, n_cols, dim, s_x_n, s_x_d, s_y_n, s_y_d,
    HAS_MASK: tl.constexpr, COLUMNS: tl.constexpr, PRECISION: tl.constexpr, RESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = rows < n_rows
    rows_live = _present(row_present_ptr, rows, rows_in, HAS_MASK)
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_rows(x_ptr, rows, rows_live, offs_d, dim, s_x_n, s_x_d)
    x_scale = tl.load(x_scale_ptr + rows, mask=rows_live, other=0.0)
    row_lse = tl.load(row_lse_ptr + rows, mask=rows_live, other=0.0)
    g_row = tl.load(g_row_ptr + rows, mask=rows_live, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col_start in range(0, n_cols, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        cols_live = _present(col_present_ptr, cols, cols < n_cols, HAS_MASK)
        y = _load_rows(y_ptr, cols, cols_live, offs_d, dim, s_y_n, s_y_d)
        y_scale = tl.load(y_scale_ptr + cols, mask=cols_live, other=0.0)
        if COLUMNS:
            col_lse = tl.load(col_lse_ptr + cols, mask=cols_live, other=0.0)
            g_col = tl.load(g_col_ptr + cols, mask=cols_live, other=0.0)
        else:
            col_lse = y_scale
            g_col = y_scale
        s = _similarity(x, y, x_scale, y_scale, PRECISION)
        ds = _score_gradient(s, row_lse, col_lse, g_row, g_col, rows_live[:, None] & cols_live[None, :], COLUMNS)
        weights = ds * tl.load(y_weight_ptr + cols, mask=cols_live, other=0.0)[None, :]
        if RESCALE:
            peak = _unit_peaks(weights, 1)
            acc += tl.dot((weights * (1.0 / peak)[:, None]).to(y.dtype), y, input_precision=PRECISION) * peak[:, None]
        else:
            acc += tl.dot(weights.to(y.dtype), y, input_precision=PRECISION)

    inside = rows_in[:, None] & (offs_d[None, :] < dim)
    tl.store(dx_ptr + rows[:, None] * dim + offs_d[None, :], (acc * x_scale[:, None]).to(dx_ptr.dtype.element_ty),
             mask=inside)
    tl.store(dx_scale_ptr + rows, tl.sum(x.to(tl.float32) * acc, 1), mask=rows_in)


@triton.jit
def _multi_infonce_bwd_cols_kernel(
    x_ptr, y_ptr, x_scale_ptr, y_scale_ptr, x_weight_ptr, y_weight_ptr, row_present_ptr, col_present_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
    dy_ptr, dy_scale_ptr,
    n_rows, n_cols, dim, s_x_n, s_x_d, s_y_n, s_y_d,
    HAS_MASK: tl.constexpr, COLUMNS: tl.constexpr, PRECISION: tl.constexpr, RESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_in = cols < n_cols
    cols_live = _present(col_present_ptr, cols, cols_in, HAS_MASK)
    offs_d = tl.arange(0, BLOCK_D)
    y = _load_rows(y_ptr, cols, cols_live, offs_d, dim, s_y_n, s_y_d)
    y_scale = tl.load(y_scale_ptr + cols, mask=cols_live, other=0.0)
    if COLUMNS:
        col_lse = tl.load(col_lse_ptr + cols, mask=cols_live, other=0.0)
        g_col = tl.load(g_col_ptr + cols, mask=cols_live, other=0.0)
    else:
        col_lse = y_scale
        g_col = y_scale

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for row_start in range(0, n_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        rows_live = _present(row_present_ptr, rows, rows < n_rows, HAS_MASK)
        x = _load_rows(x_ptr, rows, rows_live, offs_d, dim, s_x_n, s_x_d)
        x_scale = tl.load(x_scale_ptr + rows, mask=rows_live, other=0.0)
        row_lse = tl.load(row_lse_ptr + rows, mask=rows_live, other=0.0)
        g_row = tl.load(g_row_ptr + rows, mask=rows_live, other=0.0)
        s = _similarity(x, y, x_scale, y_scale, PRECISION)
        ds = _score_gradient(s, row_lse, col_lse, g_row, g_col, rows_live[:, None] & cols_live[None, :], COLUMNS)
        weights = ds * tl.load(x_weight_ptr + rows, mask=rows_live, other=0.0)[:, None]
        if RESCALE:
            peak = _unit_peaks(weights, 0)
            acc += tl.dot(tl.trans((weights * (1.0 / peak)[None, :]).to(x.dtype)), x,
                          input_precision=PRECISION) * peak[:, None]
        else:
            acc += tl.dot(tl.trans(weights.to(x.dtype)), x, input_precision=PRECISION)

    inside = cols_in[:, None] & (offs_d[None, :] < dim)
    tl.store(dy_ptr + cols[:, None] * dim + offs_d[None, :], (acc * y_scale[:, None]).to(dy_ptr.dtype.element_ty),
             mask=inside)
    tl.store(dy_scale_ptr + cols, tl.sum(y.to(tl.float32) * acc, 1), mask=cols_in)


# ----------------------------------------------------------------------------------------------- launchers


def _launch_config(kernel: str, batch: int, dim: int, dtype: torch.dtype) -> dict:
    """Square tiles, smaller for wide embeddings (the backward holds a (BLOCK, D) float32 accumulator); the three
    kernels ("forward", "rows", "columns") of a call share them and may differ in warps and stages. Chosen so that
    ptxas (sm_90, sizes and aligned pointers specialised as at launch) spills no register; not yet tuned on a GPU."""
    block_d = max(16, triton.next_power_of_2(dim))
    if block_d > 512:
        # (16, 1024) tiles: with the choices below, 16-bit backwards spilled 228-560 bytes (4 warps) or 108 (8
        # warps, pipelined); 8 warps without software pipelining spilled nothing in any dtype, TF32 included.
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=8, num_stages=1)
    if dtype == torch.float32:
        # IEEE float32 dots run on the FMA units, each thread holding whole operand rows: the 16-bit choices spilled
        # there (up to 1.1 KB at D = 128). Below, ptxas also trims a kernel to the next occupancy step (64 or 128
        # registers a thread) and spills a few bytes for it; these choices kept clear of both over d = 10..512 and
        # B = 7..4096, square and rectangular: at most 32 rows, 16 past D = 64, 8 warps past D = 32, and 2 stages
        # except for 32-row tiles up to D = 32.
        block = 16 if batch <= 16 or block_d > 64 else 32
        warps = 4 if block_d <= 32 else 8
        stages = 3 if block == 32 and block_d <= 32 else 2
        if block_d > 256 and kernel == "rows":
            # Over 8 warps ptxas held it at 128 registers and spilled; TF32's tensor-core dots fit 8 with one stage,
            # while 16 warps spilled 600 bytes there.
            warps, stages = (8, 1) if precision.dot_precision(dtype) == "tf32" else (16, 2)
        return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    block = 16 if batch <= 16 else 32 if batch <= 32 or block_d > 64 else 64
    warps = 4 if block * block_d <= 64 * 64 else 8
    if block_d > 256:
        # 4 warps, not 8: as launched (sizes and aligned pointers specialised), ptxas held the columns backward's
        # (16, 512) tiles over 8 warps at 128 registers a thread and spilled.
        block, warps = 16, 4
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=warps)


def _mask_bytes(present, like):
    return present.view(torch.uint8) if present is not None else like.new_empty(1, dtype=torch.uint8)


def _flags(x, present, rows: int, cols: int, columns: bool, kernel: str = "forward") -> dict:
    flags = dict(HAS_MASK=present is not None, COLUMNS=columns, PRECISION=precision.dot_precision(x.dtype),
                 **_launch_config(kernel, min(rows, cols), x.shape[1], x.dtype))
    if kernel != "forward":
        flags["RESCALE"] = x.dtype == torch.float16
    return flags


def _aligned(x, y):
    """``(x, y)`` with more than 512 features zero-padded to a multiple of 16: at D = 600, a width whose rows are
    not 16-byte multiples, ptxas (sm_90) spilled up to 10 KB in float32's rows backward and 32 bytes in bf16's,
    at D = 768, 800 or 1024 nothing (nor at unaligned widths up to 512). Zeros add nothing to ``x y^T``; the
    backward cuts their gradient off."""
    dim = x.shape[1]
    if dim <= 512 or dim % 16 == 0:
        return x, y
    return F.pad(x, (0, -dim % 16)), F.pad(y, (0, -dim % 16))


def _weight_scales(x, x_scale, y, y_scale):
    """The backward's scales for the weights ``dS * scale`` (see the module's docstring): in float16 0 at an
    all-zero row, which adds nothing to the other side's gradient, but whose scale (a clamped norm's 1/eps) would
    set the peak that the tile's other weights are divided by; the scales themselves otherwise."""
    if x.dtype != torch.float16:
        return x_scale, y_scale
    return tuple(torch.where((rows != 0).any(1), scale, 0.0) for rows, scale in ((x, x_scale), (y, y_scale)))


def _cut(dx, dy, dim: int):
    """The gradients of the ``dim`` features given, without ``_aligned``'s padding."""
    if dx.shape[1] == dim:
        return dx, dy
    return dx[:, :dim].contiguous(), dy[:, :dim].contiguous()


def multi_infonce_lse_forward(x, y, x_scale, y_scale, present):
    """Row and column log-sum-exps of ``S = (x y^T) * x_scale[:, None] * y_scale[None, :]`` over present pairs.

    x, y: ``(B, D)``, one dtype, any strides; x_scale, y_scale: float32 ``(B,)`` contiguous; present: bool
    ``(B,)`` contiguous or None (all present). Returns ``(row_lse, col_lse)``, float32 ``(B,)``, 0 at absent
    samples.
    """
    x, y = _aligned(x, y)
    batch, dim = x.shape
    mask = _mask_bytes(present, x)
    flags = _flags(x, present, batch, batch, True)
    row_lse = torch.empty(batch, dtype=torch.float32, device=x.device)
    if batch == 0:
        return row_lse, torch.empty_like(row_lse)
    blocks = triton.cdiv(batch, flags["BLOCK_M"])
    col_partial = torch.empty((blocks, batch), dtype=torch.float32, device=x.device)
    _multi_infonce_fwd_kernel[(blocks,)](
        x, y, x_scale, y_scale, mask, mask, row_lse, col_partial, batch, batch, dim, *x.stride(), *y.stride(),
        **flags)
    col_lse = torch.logsumexp(col_partial, 0)  # a fixed-order reduction over the row blocks
    col_lse = torch.where(col_lse == float("-inf"), 0.0, col_lse)  # absent columns
    return row_lse, col_lse


def multi_infonce_lse_backward(g_row, g_col, x, y, x_scale, y_scale, present, row_lse, col_lse):
    """Gradients of ``sum(g_row * row_lse) + sum(g_col * col_lse)``: ``(dx, dy, dx_scale, dy_scale)``, dx and dy
    contiguous in the inputs' dtype, the scales' float32; all 0 at absent samples."""
    given = x.shape[1]
    x, y = _aligned(x, y)
    batch, dim = x.shape
    mask = _mask_bytes(present, x)
    flags = _flags(x, present, batch, batch, True, "rows")
    dx = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    dy = torch.empty((batch, dim), dtype=y.dtype, device=y.device)
    dx_scale = torch.empty(batch, dtype=torch.float32, device=x.device)
    dy_scale = torch.empty(batch, dtype=torch.float32, device=x.device)
    if batch == 0:
        return (*_cut(dx, dy, given), dx_scale, dy_scale)
    g_row = g_row.float().contiguous()
    g_col = g_col.float().contiguous()
    arguments = (x, y, x_scale, y_scale, *_weight_scales(x, x_scale, y, y_scale), mask, mask, row_lse, col_lse,
                 g_row, g_col)
    sizes = (batch, batch, dim, *x.stride(), *y.stride())
    _multi_infonce_bwd_rows_kernel[(triton.cdiv(batch, flags["BLOCK_M"]),)](
        *arguments, dx, dx_scale, *sizes, **flags)
    flags = _flags(x, present, batch, batch, True, "columns")
    _multi_infonce_bwd_cols_kernel[(triton.cdiv(batch, flags["BLOCK_N"]),)](
        *arguments, dy, dy_scale, *sizes, **flags)
    return (*_cut(dx, dy, given), dx_scale, dy_scale)


# Rectangular: the distributed path. A rank's local rows x (M, D) against the gathered columns y (N, D); only the
# row log-sum-exps are wanted (the columns' would need every rank's rows), so the column partials are skipped.


def multi_infonce_row_lse_forward(x, y, x_scale, y_scale, row_present, col_present):
    """Row log-sum-exps of ``S = (x y^T) * x_scale[:, None] * y_scale[None, :]`` over present pairs.

    x: ``(M, D)``, y: ``(N, D)``, one dtype, any strides; x_scale: float32 ``(M,)``, y_scale: float32 ``(N,)``,
    contiguous; row_present ``(M,)`` and col_present ``(N,)``: bool, contiguous, both or neither (None: all
    present). Returns float32 ``(M,)``, 0 at absent rows and at rows with no present column.
    """
    x, y = _aligned(x, y)
    rows, dim = x.shape
    cols = y.shape[0]
    flags = _flags(x, row_present, rows, cols, False)
    row_lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return row_lse
    if cols == 0:
        return row_lse.zero_()
    blocks = triton.cdiv(rows, flags["BLOCK_M"])
    _multi_infonce_fwd_kernel[(blocks,)](
        x, y, x_scale, y_scale, _mask_bytes(row_present, x), _mask_bytes(col_present, x), row_lse, row_lse,
        rows, cols, dim, *x.stride(), *y.stride(), **flags)
    return row_lse


def multi_infonce_row_lse_backward(g_row, x, y, x_scale, y_scale, row_present, col_present, row_lse,
                                   columns: bool = True):
    """Gradients of ``sum(g_row * row_lse)``: ``(dx (M, D), dy (N, D), dx_scale (M,), dy_scale (N,))``, dx and dy
    contiguous in the inputs' dtype, the scales' float32; all 0 at absent samples. Without ``columns`` dy and
    dy_scale are returned uninitialised (the caller does not need them) and their kernel is not launched."""
    given = x.shape[1]
    x, y = _aligned(x, y)
    rows, dim = x.shape
    cols = y.shape[0]
    flags = _flags(x, row_present, rows, cols, False, "rows")
    dx = torch.empty((rows, dim), dtype=x.dtype, device=x.device)
    dy = torch.empty((cols, dim), dtype=y.dtype, device=y.device)
    dx_scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    dy_scale = torch.empty(cols, dtype=torch.float32, device=x.device)
    if rows == 0 or cols == 0:
        return (*_cut(dx.zero_(), dy.zero_(), given), dx_scale.zero_(), dy_scale.zero_())
    g_row = g_row.float().contiguous()
    arguments = (x, y, x_scale, y_scale, *_weight_scales(x, x_scale, y, y_scale), _mask_bytes(row_present, x),
                 _mask_bytes(col_present, x), row_lse, row_lse, g_row, g_row)
    sizes = (rows, cols, dim, *x.stride(), *y.stride())
    _multi_infonce_bwd_rows_kernel[(triton.cdiv(rows, flags["BLOCK_M"]),)](
        *arguments, dx, dx_scale, *sizes, **flags)
    if columns:
        flags = _flags(x, row_present, rows, cols, False, "columns")
        _multi_infonce_bwd_cols_kernel[(triton.cdiv(cols, flags["BLOCK_N"]),)](
            *arguments, dy, dy_scale, *sizes, **flags)
    return (*_cut(dx, dy, given), dx_scale, dy_scale)
