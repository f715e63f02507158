"""Plain-PyTorch all-pairs shortest paths and routes: the ground truth for the C++ and Triton backends.

Semantics shared by every backend:
- ``adjacency[b, u, v]`` True means an edge u -> v (molecular graphs are symmetric); self loops are ignored.
- distances are int32: 0 on the diagonal of real atoms, the hop count between connected real atoms, and -1 for
  unreachable pairs (disconnected fragments, salts) and for every pair that touches a masked atom.
- ``routes[b, i, j, k]`` is the bond id of hop ``k`` of one shortest path from i to j (hop 0 leaves i), -1 past
  the path's end or past ``max_hops``; -1 everywhere for the diagonal, unreachable and masked pairs.
- Tie rule: at every step the path moves to the smallest-index atom that is still on a shortest path to j, so
  the route is the lexicographically smallest atom sequence among the shortest paths.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..layout import mask_from_cu_seqlens, pack_pairs, pad_pairs

__all__ = ["check_routes", "shortest_path", "shortest_path_packed", "shortest_path_routes",
           "shortest_path_routes_packed"]


def _real_edges(adjacency: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    batch, n, _ = adjacency.shape
    real = mask if mask is not None else adjacency.new_ones(batch, n, dtype=torch.bool)
    not_self = ~torch.eye(n, dtype=torch.bool, device=adjacency.device)
    return adjacency & real[:, :, None] & real[:, None, :] & not_self, real


def shortest_path(adjacency: Tensor, mask: Tensor | None = None) -> Tensor:
    """``adjacency (B, N, N)`` bool, ``mask (B, N)`` bool -> distances ``(B, N, N)`` int32 (-1 unreachable)."""
    edges, real = _real_edges(adjacency.bool(), mask)
    batch, n, _ = edges.shape
    frontier = torch.eye(n, dtype=torch.bool, device=edges.device).expand(batch, n, n) & real[:, :, None]
    distances = torch.where(frontier, 0, -1).to(torch.int32)
    level = 0
    # Breadth-first search from every source at once: one boolean matrix product per level.
    while frontier.any():
        reached = torch.bmm(frontier.float(), edges.float()) > 0
        frontier = reached & (distances < 0)
        level += 1
        distances[frontier] = level
    return distances


def shortest_path_routes(bond_ids: Tensor, mask: Tensor | None = None, max_hops: int = 5) -> tuple[Tensor, Tensor]:
    """``bond_ids (B, N, N)`` int (-1 = no bond) -> ``(distances (B, N, N), routes (B, N, N, max_hops))`` int32."""
    bond_ids = bond_ids.long()
    edges, _ = _real_edges(bond_ids >= 0, mask)
    distances = shortest_path(edges, mask)
    batch, n, _ = edges.shape

    next_hop = torch.full_like(distances, -1)
    for v in range(n):  # ascending, so the first hop found for a pair is its smallest candidate
        on_path = edges[:, :, v, None] & (distances[:, v, None, :] == distances - 1) & (distances > 0)
        next_hop[on_path & (next_hop < 0)] = v

    molecule = torch.arange(batch, device=edges.device)[:, None, None]
    target = torch.arange(n, device=edges.device)[None, None, :]
    at = torch.arange(n, device=edges.device)[None, :, None].expand(batch, n, n)
    routes = torch.full((batch, n, n, max_hops), -1, dtype=torch.int32, device=edges.device)
    for hop in range(max_hops):
        active = distances > hop
        step = next_hop[molecule, at, target].clamp(min=0).long()
        routes[..., hop] = torch.where(active, bond_ids[molecule, at, step], -1).to(torch.int32)
        at = torch.where(active, step, at)
    return distances, routes


def shortest_path_packed(adjacency: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Packed form: ``adjacency (P,)`` bool, ``cu_seqlens (B+1,)`` int32 -> distances ``(P,)`` int32."""
    padded = pad_pairs(adjacency.bool(), cu_seqlens, value=False)
    mask = mask_from_cu_seqlens(cu_seqlens, padded.shape[1])
    return pack_pairs(shortest_path(padded, mask), mask)


def shortest_path_routes_packed(bond_ids: Tensor, cu_seqlens: Tensor, max_hops: int = 5) -> tuple[Tensor, Tensor]:
    """Packed form: ``bond_ids (P,)`` -> ``(distances (P,), routes (P, max_hops))`` int32."""
    padded = pad_pairs(bond_ids, cu_seqlens, value=-1)
    mask = mask_from_cu_seqlens(cu_seqlens, padded.shape[1])
    distances, routes = shortest_path_routes(padded, mask, max_hops)
    return pack_pairs(distances, mask), pack_pairs(routes, mask)


def check_routes(bond_ids: Tensor, distances: Tensor, routes: Tensor) -> None:
    """Raise ``AssertionError`` unless ``routes`` are shortest paths of one undirected molecule.

    Accepts any tie rule (peers such as scipy or networkx break ties their own way): every pair i -> j must
    have ``min(d, max_hops)`` hops, each hop a bond leaving the current atom and one step closer to j.

    Args:
        bond_ids: ``(n, n)`` int, -1 = no bond. distances: ``(n, n)`` int. routes: ``(n, n, max_hops)`` int.
    """
    bond_ids, distances, routes = bond_ids.long(), distances.long(), routes.long()
    n, max_hops = distances.shape[0], routes.shape[-1]
    num_bonds = int(bond_ids.max()) + 1 if bond_ids.numel() else 0
    ends = torch.zeros(max(num_bonds, 1), 2, dtype=torch.long)
    u, v = torch.nonzero(bond_ids >= 0, as_tuple=True)
    ends[bond_ids[u, v]] = torch.stack([torch.minimum(u, v), torch.maximum(u, v)], 1)
    hops = (routes >= 0).sum(-1)
    expected_hops = distances.clamp(min=0, max=max_hops)
    if not torch.equal(hops, expected_hops):
        i, j = torch.nonzero(hops != expected_hops)[0].tolist()
        raise AssertionError(f"route {i}->{j} has {hops[i, j]} hops, expected {expected_hops[i, j]}")
    at = torch.arange(n)[:, None].expand(n, n)
    target = torch.arange(n)[None, :].expand(n, n)
    for hop in range(max_hops):
        active = routes[..., hop] >= 0
        bond = ends[routes[..., hop].clamp(min=0)]
        leaves = (bond[..., 0] == at) | (bond[..., 1] == at)
        step = torch.where(bond[..., 0] == at, bond[..., 1], bond[..., 0])
        closer = distances[step, target] == distances - (hop + 1)
        bad = active & ~(leaves & closer)
        if bad.any():
            i, j = torch.nonzero(bad)[0].tolist()
            raise AssertionError(f"route {i}->{j}: hop {hop} (bond {routes[i, j, hop]}) does not leave atom "
                                 f"{at[i, j]} towards {j} along a shortest path")
        at = torch.where(active, step, at)
