"""Dynamic gated fusion (IBM Dynamic Fusion, eq. 1-4) in Triton: intra-modal soft gating, the inter-modal
weighted sum over the present modalities and the entropy of the modality weights, forward and backward, in one
pass over the modalities.

The kernels see, for a batch of B samples and M modalities already projected to a common width C:
``h (B, M, C)`` the projected embeddings, ``a (B, M, C)`` the intra-modal gate logits (``W_s h``), ``z (B, M)``
the inter-modal score logits (any strides, one dtype), an optional ``present (B, M)`` bool mask, a float32
``scale`` on the gated feature and a float32 ``eps``, and compute per sample b

    g_m      = softmax_C(a_m)                                  (eq. 1: C weights summing to 1, per modality)
    x~_m     = scale * g_m * h_m                               (eq. 2; scale = 1 is the paper's, C makes an
                                                                all-equal gate the identity)
    s        = softmax over the present modalities of z        (0, exactly, at a missing modality)
    fused    = sum_m s_m x~_m                                  (eq. 3)
    entropy  = -sum_{m present} s_m log(s_m + eps)             (eq. 4)

One program per block of ``BLOCK_B`` samples. The forward first forms the ``(BLOCK_B, BLOCK_M)`` weight tile
(a masked softmax of ``z``), then loops over the modalities, each a ``(BLOCK_B, BLOCK_C)`` tile of ``a`` and
``h`` read once, accumulating ``fused`` in float32 registers.

The backward, given ``dfused (B, C)``, ``dweights (B, M)`` and ``dentropy (B,)`` (float32 accumulation), reloads
the saved weights and loops over the modalities once more:

    dh_m  = s_m * scale * dfused * g_m
    da_m  = g_m * (dg_m - sum_C g_m dg_m),       dg_m = s_m * scale * dfused * h_m
    ds_m  = dfused . x~_m + dweights_m - dentropy * (log(s_m + eps) + s_m / (s_m + eps))
    dz_m  = s_m * (ds_m - sum_k s_k ds_k)        (present modalities; 0 elsewhere)

Each output element has one owner and one summation order: deterministic, no atomics.

A missing modality (``present`` False) is never read: its loads are masked (the values stand in as 0), its
weight is exactly 0 and its gradients exactly 0, so a NaN stored there reaches nothing. A sample with no
present modality gets ``fused = 0``, weights 0 and entropy 0 (the op refuses such a sample before launching).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _weights_tile(z_ptr, present_ptr, rows, rows_in, offs_m, modalities, s_z_b, s_z_m, s_p_b, s_p_m,
                  HAS_MASK: tl.constexpr):
    """(live, z) tiles (BLOCK_B, BLOCK_M): live = inside and present; z float32, -inf where not live."""
    inside = rows_in[:, None] & (offs_m[None, :] < modalities)
    if HAS_MASK:
        live = inside & (tl.load(present_ptr + rows[:, None] * s_p_b + offs_m[None, :] * s_p_m, mask=inside,
                                 other=0) != 0)
    else:
        live = inside
    z = tl.load(z_ptr + rows[:, None] * s_z_b + offs_m[None, :] * s_z_m, mask=live, other=0.0).to(tl.float32)
    return live, tl.where(live, z, float("-inf"))


@triton.jit
def _column(tile, offs_m, m):
    """Column ``m`` of a (BLOCK_B, BLOCK_M) tile, as (BLOCK_B,)."""
    return tl.sum(tl.where(offs_m[None, :] == m, tile, 0.0), 1)


@triton.jit
def _gate(a_ptr, h_ptr, rows, live_m, m, offs_c, channels, s_a_b, s_a_m, s_a_c, s_h_b, s_h_m, s_h_c):
    """Modality m's (g, h) tiles (BLOCK_B, BLOCK_C) float32: g = softmax over C of the gate logits. Rows that are
    not live read nothing (their values stand in as 0: a uniform g, h = 0)."""
    cols_in = offs_c[None, :] < channels
    load = live_m[:, None] & cols_in
    a = tl.load(a_ptr + rows[:, None] * s_a_b + m * s_a_m + offs_c[None, :] * s_a_c, mask=load,
                other=0.0).to(tl.float32)
    h = tl.load(h_ptr + rows[:, None] * s_h_b + m * s_h_m + offs_c[None, :] * s_h_c, mask=load,
                other=0.0).to(tl.float32)
    a = tl.where(cols_in, a, float("-inf"))
    e = tl.exp(a - tl.max(a, 1)[:, None])
    g = e / tl.sum(e, 1)[:, None]
    return g, h


@triton.jit
def _gated_fusion_fwd_kernel(
    h_ptr, a_ptr, z_ptr, present_ptr, fused_ptr, weights_ptr, entropy_ptr,
    batch, modalities, channels, scale, eps,
    s_h_b, s_h_m, s_h_c, s_a_b, s_a_m, s_a_c, s_z_b, s_z_m, s_p_b, s_p_m,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_in = rows < batch
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    rows = rows.to(tl.int64)

    # Inter-modal weights: a softmax over the present modalities; a row with none keeps all weights 0.
    live, z = _weights_tile(z_ptr, present_ptr, rows, rows_in, offs_m, modalities, s_z_b, s_z_m, s_p_b, s_p_m,
                            HAS_MASK)
    z_max = tl.max(z, 1)
    z_max = tl.where(z_max == float("-inf"), 0.0, z_max)
    e = tl.where(live, tl.exp(z - z_max[:, None]), 0.0)
    total = tl.sum(e, 1)
    s = e / tl.where(total > 0.0, total, 1.0)[:, None]
    entropy = -tl.sum(tl.where(live, s * tl.log(s + eps), 0.0), 1)
    inside = rows_in[:, None] & (offs_m[None, :] < modalities)
    tl.store(weights_ptr + rows[:, None] * modalities + offs_m[None, :], s, mask=inside)
    tl.store(entropy_ptr + rows, entropy, mask=rows_in)

    live_f = live.to(tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for m in range(0, modalities):
        live_m = _column(live_f, offs_m, m) > 0.0
        s_m = _column(s, offs_m, m)
        g, h = _gate(a_ptr, h_ptr, rows, live_m, m, offs_c, channels, s_a_b, s_a_m, s_a_c, s_h_b, s_h_m, s_h_c)
        acc += tl.where(live_m[:, None], s_m[:, None] * (g * h), 0.0)

    out = rows_in[:, None] & (offs_c[None, :] < channels)
    tl.store(fused_ptr + rows[:, None] * channels + offs_c[None, :], (acc * scale).to(fused_ptr.dtype.element_ty),
             mask=out)


@triton.jit
def _gated_fusion_bwd_kernel(
    h_ptr, a_ptr, present_ptr, weights_ptr, dfused_ptr, dweights_ptr, dentropy_ptr, dh_ptr, da_ptr, dz_ptr,
    batch, modalities, channels, scale, eps,
    s_h_b, s_h_m, s_h_c, s_a_b, s_a_m, s_a_c, s_p_b, s_p_m, s_df_b, s_df_c, s_dw_b, s_dw_m,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_in = rows < batch
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    rows = rows.to(tl.int64)
    cols_in = offs_c[None, :] < channels
    inside = rows_in[:, None] & (offs_m[None, :] < modalities)
    if HAS_MASK:
        live = inside & (tl.load(present_ptr + rows[:, None] * s_p_b + offs_m[None, :] * s_p_m, mask=inside,
                                 other=0) != 0)
    else:
        live = inside
    s = tl.load(weights_ptr + rows[:, None] * modalities + offs_m[None, :], mask=live, other=0.0)
    dfused = tl.load(dfused_ptr + rows[:, None] * s_df_b + offs_c[None, :] * s_df_c,
                     mask=rows_in[:, None] & cols_in, other=0.0).to(tl.float32)

    live_f = live.to(tl.float32)
    dots = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for m in range(0, modalities):
        live_m = _column(live_f, offs_m, m) > 0.0
        s_m = _column(s, offs_m, m)
        g, h = _gate(a_ptr, h_ptr, rows, live_m, m, offs_c, channels, s_a_b, s_a_m, s_a_c, s_h_b, s_h_m, s_h_c)
        dots = tl.where(offs_m[None, :] == m, tl.sum(dfused * g * h, 1)[:, None] * scale, dots)
        dgated = (s_m * scale)[:, None] * dfused
        dh = tl.where(live_m[:, None], dgated * g, 0.0)
        dg = dgated * h
        da = g * (dg - tl.sum(g * dg, 1)[:, None])
        da = tl.where(live_m[:, None], da, 0.0)
        out = rows_in[:, None] & cols_in
        offset = rows[:, None] * (modalities * channels) + m * channels + offs_c[None, :]
        tl.store(dh_ptr + offset, dh.to(dh_ptr.dtype.element_ty), mask=out)
        tl.store(da_ptr + offset, da.to(da_ptr.dtype.element_ty), mask=out)

    dweights = tl.load(dweights_ptr + rows[:, None] * s_dw_b + offs_m[None, :] * s_dw_m, mask=live,
                       other=0.0).to(tl.float32)
    dentropy = tl.load(dentropy_ptr + rows, mask=rows_in, other=0.0).to(tl.float32)
    ds = dots + dweights - dentropy[:, None] * (tl.log(s + eps) + s / (s + eps))
    ds = tl.where(live, ds, 0.0)
    dz = s * (ds - tl.sum(s * ds, 1)[:, None])
    dz = tl.where(live, dz, 0.0)
    tl.store(dz_ptr + rows[:, None] * modalities + offs_m[None, :], dz.to(dz_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------- launchers

MAX_CHANNELS = 4096  # one (BLOCK_B, C) tile per modality in registers; wider would spill
MAX_MODALITIES = 64


def _launch_config(batch: int, modalities: int, channels: int) -> dict:
    """About 2048 float32 elements per (BLOCK_B, BLOCK_C) tile (the backward holds ~5 of them), at most 32 rows.
    Not yet tuned on a GPU."""
    block_c = max(16, triton.next_power_of_2(channels))
    block_b = max(1, min(32, 2048 // block_c, triton.next_power_of_2(max(batch, 1))))
    block_m = max(2, triton.next_power_of_2(modalities))
    warps = 4 if block_b * block_c <= 1024 else 8
    return dict(BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)


def _mask_bytes(present, like):
    if present is None:
        return like.new_empty(1, dtype=torch.uint8), (0, 0)
    mask = present.view(torch.uint8)
    return mask, mask.stride()


def gated_fusion_forward(h, gate_logits, score_logits, present, scale: float, eps: float):
    """``(fused (B, C) in h's dtype, weights (B, M) float32, entropy (B,) float32)``, all contiguous.

    h, gate_logits: ``(B, M, C)``; score_logits: ``(B, M)``; one float dtype, any strides; present: bool
    ``(B, M)`` or None (all present).
    """
    batch, modalities, channels = h.shape
    fused = torch.empty((batch, channels), dtype=h.dtype, device=h.device)
    weights = torch.empty((batch, modalities), dtype=torch.float32, device=h.device)
    entropy = torch.empty(batch, dtype=torch.float32, device=h.device)
    if batch == 0:
        return fused, weights, entropy
    mask, mask_strides = _mask_bytes(present, h)
    config = _launch_config(batch, modalities, channels)
    grid = (triton.cdiv(batch, config["BLOCK_B"]),)
    _gated_fusion_fwd_kernel[grid](
        h, gate_logits, score_logits, mask, fused, weights, entropy,
        batch, modalities, channels, float(scale), float(eps),
        *h.stride(), *gate_logits.stride(), *score_logits.stride(), *mask_strides,
        HAS_MASK=present is not None, **config)
    return fused, weights, entropy


def gated_fusion_backward(dfused, dweights, dentropy, h, gate_logits, score_logits, present, weights,
                          scale: float, eps: float):
    """``(dh, dgate_logits, dscore_logits)``, contiguous in the inputs' dtypes, exactly 0 at missing modalities.
    ``weights`` is the forward's float32 ``(B, M)`` output (contiguous)."""
    batch, modalities, channels = h.shape
    dh = torch.empty((batch, modalities, channels), dtype=h.dtype, device=h.device)
    da = torch.empty((batch, modalities, channels), dtype=gate_logits.dtype, device=h.device)
    dz = torch.empty((batch, modalities), dtype=score_logits.dtype, device=h.device)
    if batch == 0:
        return dh, da, dz
    mask, mask_strides = _mask_bytes(present, h)
    config = _launch_config(batch, modalities, channels)
    grid = (triton.cdiv(batch, config["BLOCK_B"]),)
    _gated_fusion_bwd_kernel[grid](
        h, gate_logits, mask, weights, dfused, dweights, dentropy, dh, da, dz,
        batch, modalities, channels, float(scale), float(eps),
        *h.stride(), *gate_logits.stride(), *mask_strides, *dfused.stride(), *dweights.stride(),
        HAS_MASK=present is not None, **config)
    return dh, da, dz
