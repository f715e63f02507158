"""Batched all-pairs shortest paths (and routes) for molecular graphs in Triton.

One program per molecule; the molecule's (n, n) block is walked in BLOCK x BLOCK tiles, so any size works.
Breadth-first search runs for all sources of a row tile at once: at level L the frontier F = (dist == L) times
the adjacency (a tile matmul) marks the atoms reached at L + 1. The distances live in the output buffer: a
level's writes (L + 1) never change what that level reads (== L), so a barrier between levels is the only
synchronisation. Routes follow the smallest-index next hop (see pyblend.reference.shortest_path for the rule).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _is_edge(value, GRAPH_IS_BOND_IDS: tl.constexpr):
    if GRAPH_IS_BOND_IDS:
        return value >= 0
    else:
        return value != 0


@triton.jit
def _pair_tile(dist, i, j, n, stride):
    """Offsets of the (i, j) tile, which of them lie inside the molecule, and their distances (-1 outside)."""
    inside = (i[:, None] < n) & (j[None, :] < n)
    tile = i[:, None] * stride + j[None, :]
    return tile, inside, tl.load(dist + tile, mask=inside, other=-1)


@triton.jit
def _shortest_path_kernel(
    graph_ptr,          # (pairs,) uint8 adjacency or int32 bond ids (-1 = no bond)
    mask_ptr,           # (B, mask_stride) uint8, True = real atom; unused without HAS_MASK
    dist_ptr,           # (pairs,) int32 out, filled with -1 by the launcher
    next_ptr,           # (pairs,) int32 scratch for the next hop; unused without routes
    routes_ptr,         # (pairs, route_width) int32 out, filled with -1 by the launcher
    lengths_ptr,        # (B,) int32 atoms to visit in each molecule
    pair_offsets_ptr,   # (B,) int64 start of each molecule's block
    padded_stride,      # row stride of the padded layout (N); the packed layout uses the molecule's own n
    mask_stride,
    route_width,        # max_hops: the routes' row length; hops past MAX_HOPS stay -1
    GRAPH_IS_BOND_IDS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    MAX_HOPS: tl.constexpr,  # the hops written: at most the longest molecule's atoms - 1 (an unrolled loop)
    BLOCK: tl.constexpr,
):
    molecule = tl.program_id(0)
    n = tl.load(lengths_ptr + molecule)
    start = tl.load(pair_offsets_ptr + molecule)
    if PACKED:
        stride = n
    else:
        stride = padded_stride
    graph = graph_ptr + start
    dist = dist_ptr + start
    offsets = tl.arange(0, BLOCK)

    # Breadth-first search, one row tile of sources at a time.
    for i0 in range(0, n, BLOCK):
        i = i0 + offsets
        real_i = i < n
        if HAS_MASK:
            real_i &= tl.load(mask_ptr + molecule * mask_stride + i, mask=i < n, other=0) != 0
        tl.store(dist + i * stride + i, tl.zeros((BLOCK,), tl.int32), mask=real_i)
        tl.debug_barrier()
        level = 0
        reached = 1
        while reached > 0:
            reached = 0
            for j0 in range(0, n, BLOCK):
                j = j0 + offsets
                real_j = j < n
                if HAS_MASK:
                    real_j &= tl.load(mask_ptr + molecule * mask_stride + j, mask=j < n, other=0) != 0
                hits = tl.zeros((BLOCK, BLOCK), tl.float32)
                for v0 in range(0, n, BLOCK):
                    v = v0 + offsets
                    frontier = tl.load(dist + i[:, None] * stride + v[None, :],
                                       mask=real_i[:, None] & (v[None, :] < n), other=-1) == level
                    edges = _is_edge(tl.load(graph + v[:, None] * stride + j[None, :],
                                             mask=(v[:, None] < n) & real_j[None, :], other=0), GRAPH_IS_BOND_IDS)
                    # 0/1 operands in fp16 with fp32 accumulation count paths exactly.
                    hits += tl.dot(frontier.to(tl.float16), edges.to(tl.float16))
                tile = i[:, None] * stride + j[None, :]
                current = tl.load(dist + tile, mask=real_i[:, None] & real_j[None, :], other=0)
                new = (hits > 0) & (current < 0) & real_i[:, None] & real_j[None, :]
                tl.store(dist + tile, tl.full((BLOCK, BLOCK), 1, tl.int32) + level, mask=new)
                reached += tl.sum(new.to(tl.int32))
            tl.debug_barrier()
            level += 1

    if MAX_HOPS > 0:
        hop_to = next_ptr + start
        # next_hop[i, j] = the smallest neighbour v of i with dist[v, j] == dist[i, j] - 1.
        for i0 in range(0, n, BLOCK):
            i = i0 + offsets
            for j0 in range(0, n, BLOCK):
                j = j0 + offsets
                tile, inside, d_ij = _pair_tile(dist, i, j, n, stride)
                best = tl.full((BLOCK, BLOCK), -1, tl.int32)
                for v in range(0, n):
                    edge_iv = _is_edge(tl.load(graph + i * stride + v, mask=i < n, other=0), GRAPH_IS_BOND_IDS)
                    d_vj = tl.load(dist + v * stride + j, mask=j < n, other=-1)
                    on_path = edge_iv[:, None] & (d_vj[None, :] == d_ij - 1) & (d_ij > 0) & (best < 0)
                    best = tl.where(on_path, v, best)
                tl.store(hop_to + tile, best, mask=inside)
        tl.debug_barrier()

        routes = routes_ptr + start * route_width
        for i0 in range(0, n, BLOCK):
            i = i0 + offsets
            for j0 in range(0, n, BLOCK):
                j = j0 + offsets
                tile, inside, d_ij = _pair_tile(dist, i, j, n, stride)
                at = tl.broadcast_to(i[:, None], (BLOCK, BLOCK))
                for hop in tl.static_range(MAX_HOPS):
                    active = d_ij > hop
                    step = tl.load(hop_to + at * stride + j[None, :], mask=active, other=0)
                    bond = tl.load(graph + at * stride + step, mask=active, other=-1)
                    tl.store(routes + tile * route_width + hop, bond.to(tl.int32), mask=active)
                    at = tl.where(active, step, at)


def _launch_config(longest: int, max_hops: int) -> dict:
    """Tiles and warps that spill nothing (ptxas, sm_90) in any layout, with or without routes: with routes,
    64-wide tiles spill under any warp count (2.4 KB at 4 warps, 100 bytes at 16), so routes stay at 32; and the
    former 2 warps at 16 and 32 and 4 at 64 spilled 4 to 368 bytes where 1, 4 and 8 spill none."""
    block = min(64 if max_hops == 0 else 32, max(16, triton.next_power_of_2(max(longest, 1))))
    return dict(BLOCK=block, num_warps={16: 1, 32: 4, 64: 8}[block])


def _launch(graph, mask, lengths, pair_offsets, padded_stride, longest, max_hops, packed):
    pairs = graph.numel()
    dist = torch.full(graph.shape, -1, dtype=torch.int32, device=graph.device)
    routes = torch.full((*graph.shape, max_hops), -1, dtype=torch.int32, device=graph.device)
    batch = lengths.numel()
    if batch == 0 or pairs == 0:
        return dist, routes
    is_bond_ids = graph.dtype != torch.bool
    graph_arg = graph if is_bond_ids else graph.view(torch.uint8)
    # A shortest path has at most longest - 1 hops; the kernel unrolls its hop loop, so it writes only those (the
    # rest stay -1): a large max_hops compiled a loop of that length, and each max_hops a kernel of its own.
    hops = min(max_hops, max(longest - 1, 0))
    next_hop = torch.empty(pairs if hops > 0 else 1, dtype=torch.int32, device=graph.device)
    mask_arg = mask.view(torch.uint8) if mask is not None else lengths
    _shortest_path_kernel[(batch,)](
        graph_arg, mask_arg, dist, next_hop, routes, lengths, pair_offsets,
        padded_stride, mask.shape[1] if mask is not None else 0, max_hops,
        GRAPH_IS_BOND_IDS=is_bond_ids, HAS_MASK=mask is not None, PACKED=packed, MAX_HOPS=hops,
        **_launch_config(longest, hops),
    )
    return dist, routes


def shortest_path_padded(graph: torch.Tensor, mask: torch.Tensor | None, max_hops: int):
    """``graph (B, N, N)``: bool adjacency or int32 bond ids; ``mask (B, N)`` bool or None.

    Returns ``(dist (B, N, N) int32, routes (B, N, N, max_hops) int32)``; routes need int32 bond ids.
    """
    batch, n = graph.shape[0], graph.shape[1]
    if mask is not None and n > 0:
        # Atoms past the last real one are never visited: lengths = last real index + 1.
        positions = torch.arange(1, n + 1, device=graph.device, dtype=torch.int32)
        lengths = (mask.to(torch.int32) * positions).amax(1).to(torch.int32)
    else:
        lengths = torch.full((batch,), n, dtype=torch.int32, device=graph.device)
    pair_offsets = torch.arange(batch, device=graph.device, dtype=torch.int64) * (n * n)
    return _launch(graph.contiguous(), mask.contiguous() if mask is not None else None, lengths, pair_offsets,
                   n, n, max_hops, packed=False)


def shortest_path_packed(graph: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, max_hops: int):
    """``graph (P,)``: bool adjacency or int32 bond ids, molecule blocks at sum_{j<i} N_j^2 (pyblend.layout).

    Returns ``(dist (P,) int32, routes (P, max_hops) int32)``.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
    counts = lengths.to(torch.int64) ** 2
    pair_offsets = torch.cumsum(counts, 0) - counts
    return _launch(graph.contiguous(), None, lengths, pair_offsets, 0, max_seqlen, max_hops, packed=True)
