"""Edge encoding along the shortest path (Graphormer / MoleBlend "multi_hop") in Triton, forward and backward.

Inputs, all contiguous: ``routes (pairs, K)`` int32 (bond id of hop k, -1 past the path's end), ``distances
(pairs,)`` int32 (``<= 0``: no path), ``emb (E, H)`` and ``w (K_max, H, H)`` in one float dtype. Per pair p with
``d_p > 0``:

    bias[p, h] = (1 / clamp(d_p, 1, K)) * sum_{k < K, route_pk >= 0} sum_{h'} emb[route_pk, h'] * w[k, h', h]

and 0 where ``d_p <= 0``. The pairs are a flat list; the bias is stored per head: pair ``p`` of block
``p // block_pairs`` (a molecule's ``N x N`` block when padded, ``block_pairs = N^2``; the whole ``(H, P)``
tensor when packed, ``block_pairs = P``) goes to ``block * H * block_pairs + h * block_pairs + p % block_pairs``,
which is ``(B, H, N, N)`` and ``(H, P)`` row-major.

Forward: one program per ``BLOCK_P`` pairs; per hop it gathers the ``(BLOCK_P, H)`` rows of ``emb`` its routes
name and multiplies them by ``w[k]`` with ``tl.dot``, accumulating in float32 registers: the ``(pairs, K, H)``
gathered tensor is never written. Float32 inputs use exact (IEEE) dots so the result meets the float32 bound.

Backward, given ``grad`` (the layout of the bias) and ``g_p = grad[p, :] / clamp(d_p, 1, K)`` (0 where no
path), both gradients are small GEMMs of the per-bond, per-hop sums ``S[k, e] = sum_{p: route_pk = e} g_p``
(float32 ``(K, E, H)``, per bond, never per pair):

    demb = sum_k S[k] @ w[k]^T          dw[k] = emb^T @ S[k]      (torch: bmm / matmul, then a fixed-order sum)

``S`` is a segment reduction. The launcher stable-sorts the (pair, hop) entries that carry a bond on a real path
by the key ``k * E + route_pk`` (the others sort last), so hop k's entries of bonds ``e0 .. e1`` are one
contiguous range. Program (bond block, k) owns ``S[k, e0:e0 + BLOCK_E]`` and sums its range chunk by chunk as a
one-hot product ``onehot(BLOCK_E, BLOCK_Q) @ g(BLOCK_Q, H)``. Any bond ids work (a molecule's ids need not be
a contiguous range), every entry is read by exactly one program, ``grad`` is read once, and nothing is
``(pairs, K, H)``. (Per-program ``dw`` partials over pair tiles would read ``grad`` K more times and gather
``emb`` per pair; ``emb^T S`` gets the same sum from the per-bond sums.)

Every sum has one fixed order (a function of the shapes only): deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

# Larger H spills registers in the float32 tiles (checked by the Hopper compile test); the op sends it to the
# reference.
MAX_HEADS = 64


@triton.jit
def _scale(d, hops):
    """1 / clamp(d, 1, K) in float32 where there is a path (d > 0), else 0."""
    divisor = tl.minimum(tl.maximum(d, 1), hops).to(tl.float32)
    return tl.where(d > 0, 1.0 / divisor, 0.0)


@triton.jit
def _bias_offsets(pairs, offs_h, block_pairs, heads):
    """Offsets of the (pairs, heads) tile in the (blocks, H, block_pairs) bias."""
    block = pairs // block_pairs
    within = pairs - block * block_pairs
    return (block * heads * block_pairs + within)[:, None] + offs_h[None, :].to(tl.int64) * block_pairs


@triton.jit
def _path_edge_bias_fwd_kernel(
    routes_ptr, dist_ptr, emb_ptr, w_ptr, out_ptr,
    num_pairs, block_pairs, hops, heads,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = pairs < num_pairs
    offs_h = tl.arange(0, BLOCK_H)
    h_in = offs_h < heads
    d = tl.load(dist_ptr + pairs, mask=inside, other=0)
    has_path = inside & (d > 0)
    w_offs = offs_h[:, None] * heads + offs_h[None, :]
    w_in = h_in[:, None] & h_in[None, :]

    acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    for k in range(0, hops):
        ids = tl.load(routes_ptr + pairs * hops + k, mask=has_path, other=-1)
        live = has_path & (ids >= 0)
        e = tl.load(emb_ptr + ids.to(tl.int64)[:, None] * heads + offs_h[None, :],
                    mask=live[:, None] & h_in[None, :], other=0.0)
        w = tl.load(w_ptr + k * heads * heads + w_offs, mask=w_in, other=0.0)
        acc = tl.dot(e, w, acc, input_precision=PRECISION)

    acc = acc * _scale(d, hops)[:, None]
    tl.store(out_ptr + _bias_offsets(pairs, offs_h, block_pairs, heads), acc.to(out_ptr.dtype.element_ty),
             mask=inside[:, None] & h_in[None, :])


@triton.jit
def _path_edge_bias_bwd_kernel(
    sorted_key_ptr, sorted_pair_ptr, starts_ptr, dist_ptr, grad_ptr, sums_ptr,
    num_bonds, block_pairs, hops, heads,
    BLOCK_E: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (b, k) owns ``sums[k, b * BLOCK_E : (b + 1) * BLOCK_E]`` (float32): per bond, the sum of ``g_p``
    over the pairs whose hop k is that bond."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_E
    k = tl.program_id(1)
    last = tl.minimum(first + BLOCK_E, num_bonds)
    bonds = first + tl.arange(0, BLOCK_E)
    offs_h = tl.arange(0, BLOCK_H)
    h_in = offs_h < heads
    base = k.to(tl.int64) * num_bonds
    lo = tl.load(starts_ptr + base + first)
    hi = tl.load(starts_ptr + base + last)
    sums = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_Q):
        entries = start + tl.arange(0, BLOCK_Q)
        live = entries < hi
        key = tl.load(sorted_key_ptr + entries, mask=live, other=-1)
        pairs = tl.load(sorted_pair_ptr + entries, mask=live, other=0)
        d = tl.load(dist_ptr + pairs, mask=live, other=0)
        g = tl.load(grad_ptr + _bias_offsets(pairs, offs_h, block_pairs, heads), mask=live[:, None] & h_in[None, :],
                    other=0.0).to(tl.float32)
        g = g * _scale(d, hops)[:, None]
        # A one-hot product sums each bond's rows: exact 0/1 weights, one fixed order; IEEE float32 so g keeps
        # its float32 bits (tf32 would round it to 10 mantissa bits).
        onehot = ((base + bonds)[:, None] == key[None, :]).to(tl.float32)
        sums = tl.dot(onehot, g, sums, input_precision="ieee")
    tl.store(sums_ptr + (base + bonds)[:, None] * heads + offs_h[None, :], sums,
             mask=(bonds < num_bonds)[:, None] & h_in[None, :])


# ----------------------------------------------------------------------------------------------- launchers


def _block_h(heads: int) -> int:
    return max(16, triton.next_power_of_2(heads))  # tl.dot needs every dimension >= 16


def launch_config(heads: int) -> dict:
    """Forward block sizes and warps for H <= MAX_HEADS heads (also what the Hopper compile test lowers)."""
    block_h = _block_h(heads)
    if block_h <= 32:
        return dict(BLOCK_P=64, BLOCK_H=block_h, num_warps=4)
    # 32 pairs a program: float32 (64, 64) tiles spill over 8 warps when block_pairs (P, N^2) is not a multiple
    # of 16, as in most batches, and over 4 warps with K = 1 hop (the loop unrolled).
    return dict(BLOCK_P=32, BLOCK_H=block_h, num_warps=8)


def backward_config(heads: int) -> dict:
    """Backward block sizes and warps (float32 one-hot products: sized so that ptxas spills nothing)."""
    block_h = _block_h(heads)
    if block_h <= 32:
        return dict(BLOCK_E=32, BLOCK_Q=32, BLOCK_H=block_h, num_warps=4)
    return dict(BLOCK_E=16, BLOCK_Q=32, BLOCK_H=block_h, num_warps=8)


def _pair_block(routes: torch.Tensor) -> tuple[int, int]:
    """(pairs, pairs per output block): padded (B, N, N, K) -> N^2 per molecule; packed (P, K) -> all P."""
    pairs = routes[..., 0].numel()
    block = routes.shape[1] * routes.shape[2] if routes.dim() == 4 else routes.shape[0]
    return pairs, max(block, 1)


def _output_shape(routes: torch.Tensor, heads: int) -> tuple:
    if routes.dim() == 4:
        return (routes.shape[0], heads, routes.shape[1], routes.shape[2])
    return (heads, routes.shape[0])


def path_edge_bias_forward(routes: torch.Tensor, distances: torch.Tensor, emb: torch.Tensor,
                           w: torch.Tensor) -> torch.Tensor:
    """routes int32 ``(B, N, N, K)`` / ``(P, K)``, distances int32, emb ``(E, H)``, w ``(K_max, H, H)``, all
    contiguous -> bias ``(B, H, N, N)`` / ``(H, P)`` in emb's dtype."""
    heads, hops = emb.shape[1], routes.shape[-1]
    pairs, block_pairs = _pair_block(routes)
    out = torch.empty(_output_shape(routes, heads), dtype=emb.dtype, device=emb.device)
    if out.numel() == 0:
        return out
    if hops == 0 or emb.shape[0] == 0:
        return out.zero_()
    config = launch_config(heads)
    grid = (triton.cdiv(pairs, config["BLOCK_P"]),)
    precision = "ieee" if emb.dtype == torch.float32 else "tf32"
    _path_edge_bias_fwd_kernel[grid](routes, distances, emb, w, out, pairs, block_pairs, hops, heads,
                                     PRECISION=precision, **config)
    return out


def sort_entries(routes: torch.Tensor, distances: torch.Tensor, num_bonds: int):
    """(sorted keys, their pair indices, starts (K * E + 1,)): the (pair, hop) entries that carry a bond on a
    real path, stable-sorted by ``k * E + bond id``; ``starts[k * E + e]`` is where bond e's hop-k entries begin.
    Entries without a bond get the key ``K * E`` and sort past ``starts[-1]``. No device-to-host read."""
    hops = routes.shape[-1]
    flat = routes.reshape(-1, hops).long()
    valid = (flat >= 0) & (distances.reshape(-1, 1) > 0)
    keys = torch.arange(hops, device=routes.device, dtype=torch.int64) * num_bonds + flat
    keys = torch.where(valid, keys, torch.full_like(keys, hops * num_bonds)).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    starts = torch.searchsorted(sorted_keys, torch.arange(hops * num_bonds + 1, device=routes.device))
    return sorted_keys, order // hops, starts


def path_edge_bias_backward(grad: torch.Tensor, routes: torch.Tensor, distances: torch.Tensor, emb: torch.Tensor,
                            w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d emb ``(E, H)`` in emb's dtype, d w ``(K_max, H, H)`` in w's dtype; rows k >= K are 0)."""
    heads, hops, num_bonds = emb.shape[1], routes.shape[-1], emb.shape[0]
    pairs, block_pairs = _pair_block(routes)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    if pairs == 0 or num_bonds == 0:
        return torch.zeros_like(emb), dw.to(w.dtype)
    config = backward_config(heads)
    sorted_keys, sorted_pairs, starts = sort_entries(routes, distances, num_bonds)
    sums = torch.empty((hops, num_bonds, heads), dtype=torch.float32, device=emb.device)
    _path_edge_bias_bwd_kernel[(triton.cdiv(num_bonds, config["BLOCK_E"]), hops)](
        sorted_keys, sorted_pairs, starts, distances, grad.contiguous(), sums, num_bonds, block_pairs, hops, heads,
        **config)
    # Both gradients are small GEMMs of the per-bond sums S_k: d emb = sum_k S_k W_k^T, d W_k = emb^T S_k.
    demb = torch.bmm(sums, w[:hops].float().transpose(1, 2)).sum(0)
    # Rows no route names are never read by the forward: keep them (NaN, say) out of emb^T S as well.
    named = (starts[1:] > starts[:-1]).view(hops, num_bonds).any(0)
    dw[:hops] = torch.matmul(torch.where(named[:, None], emb.float(), 0.0).t(), sums)
    return demb.to(emb.dtype), dw.to(w.dtype)
