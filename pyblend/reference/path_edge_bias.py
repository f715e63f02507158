"""Edge encoding along the shortest path (Graphormer / MoleBlend "multi_hop"), in plain PyTorch.

For every atom pair (i, j) with a shortest path of ``d_ij >= 1`` hops, ``routes[.., i, j, k]`` is the bond id of
hop k (-1 past the path's end, or past the ``K`` hops kept) and

    bias[h, i, j] = (1 / clamp(d_ij, 1, K)) * sum_{k < K, route_k >= 0} sum_{h'} E[route_k, h'] * W_k[h', h]

and 0 where there is no path (``d_ij <= 0``: the diagonal, unreachable pairs and padding, all marked by
:func:`pyblend.ops.shortest_path_routes`). This is Graphormer's ``multi_hop`` edge encoding with its
``spatial_pos = SPD + 1`` (0 = padding) convention undone: Graphormer divides by ``spatial_pos`` mapped
0 -> 1, 1 -> 1, x -> x - 1, then clamped to ``[0, multi_hop_max_dist]``, which is ``clamp(SPD, 1, K)`` on every
real pair with ``K = multi_hop_max_dist``; its unreachable pairs (SPD = 510) and the diagonal have an all-padding
path, whose embeddings are 0, so their bias is 0 as here.

Readable rather than fast: the ``(pairs, K, H)`` gathered tensor is materialised.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["path_edge_bias"]


def path_edge_bias(routes: Tensor, distances: Tensor, edge_embedding: Tensor, hop_weights: Tensor) -> Tensor:
    """Per-head bias from the bonds along each shortest path.

    Args:
        routes: integer, padded ``(B, N, N, K)`` or packed ``(P, K)``: bond id of hop k, -1 past the path's end.
        distances: integer, ``(B, N, N)`` / ``(P,)``: shortest-path hop counts; ``<= 0`` means no path
            (diagonal 0, unreachable and padding -1).
        edge_embedding: ``(E, H)`` float, one row per bond id.
        hop_weights: ``(K_max, H, H)`` with ``K_max >= K``, the dtype of ``edge_embedding``.

    Returns:
        padded ``(B, H, N, N)`` / packed ``(H, P)`` in the dtype of ``edge_embedding``, computed in float32
        (float64 for float64 inputs), differentiable in ``edge_embedding`` and ``hop_weights``.
    """
    hops = routes.shape[-1]
    compute = torch.float64 if edge_embedding.dtype == torch.float64 else torch.float32
    has_path = distances > 0
    valid = (routes >= 0) & has_path[..., None]                                      # (..., K)
    # Hops past a path's end read an appended zero row (never the embedding: 0 * NaN; and with no bond, E = 0,
    # there is no row 0).
    bonds, heads = edge_embedding.shape
    table = torch.cat([edge_embedding.to(compute), edge_embedding.new_zeros(1, heads, dtype=compute)])
    gathered = table[torch.where(valid, routes.long(), bonds)]                       # (..., K, H)
    summed = torch.einsum("...kg,kgh->...h", gathered, hop_weights[:hops].to(compute))
    divisor = distances.clamp(1, hops).to(compute)
    # where(), not a zero scale: the upstream gradient at a pair without a path is never read (it may be NaN).
    bias = torch.where(has_path[..., None], summed / divisor[..., None], 0.0).to(edge_embedding.dtype)
    if routes.dim() == 4:
        return bias.permute(0, 3, 1, 2)   # (B, N, N, H) -> (B, H, N, N)
    return bias.t()                        # (P, H) -> (H, P)
