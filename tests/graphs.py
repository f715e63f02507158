"""Graph helpers for the tests: batches of networkx graphs as bond-id matrices, and networkx ground truth."""
from __future__ import annotations

import networkx as nx
import torch


def as_batch(graphs: list[nx.Graph], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Graphs with nodes 0..n-1 -> (bond_ids (B, N, N) int32 with edge k of graph b as id k, mask (B, N))."""
    width = max([g.number_of_nodes() for g in graphs] + [0]) if width is None else width
    bond_ids = torch.full((len(graphs), width, width), -1, dtype=torch.int32)
    mask = torch.zeros(len(graphs), width, dtype=torch.bool)
    for b, graph in enumerate(graphs):
        mask[b, :graph.number_of_nodes()] = True
        for k, (u, v) in enumerate(graph.edges()):
            bond_ids[b, u, v] = k
            if not graph.is_directed():
                bond_ids[b, v, u] = k
    return bond_ids, mask


def networkx_distances(graph: nx.Graph, width: int) -> torch.Tensor:
    """(width, width) int32: hop counts, -1 unreachable or outside the graph."""
    out = torch.full((width, width), -1, dtype=torch.int32)
    for source, lengths in nx.all_pairs_shortest_path_length(graph):
        for target, length in lengths.items():
            out[source, target] = length
    return out


def lexicographic_route(graph: nx.Graph, source: int, target: int, max_hops: int,
                        distances: dict | None = None) -> list[int]:
    """Bond ids of the lexicographically smallest shortest path, padded with -1 to max_hops.

    Walks from ``source`` taking, at each step, the smallest neighbour one step closer to ``target`` by
    networkx's distances (pass ``distances = dict(nx.all_pairs_shortest_path_length(graph))`` to reuse them).
    ``brute_force_route`` checks on small graphs that this greedy walk is the lexicographic minimum.
    """
    distances = distances if distances is not None else dict(nx.all_pairs_shortest_path_length(graph))
    route = [-1] * max_hops
    if source == target or target not in distances[source]:
        return route
    path = [source]
    while path[-1] != target:
        here = path[-1]
        # neighbors() follows out-edges on a DiGraph, which is the direction a path takes.
        path.append(min(v for v in graph.neighbors(here) if distances[v].get(target) == distances[here][target] - 1))
    return _bond_ids_of(graph, path, max_hops)


def brute_force_route(graph: nx.Graph, source: int, target: int, max_hops: int) -> list[int]:
    """The lexicographically smallest of ALL shortest paths (exponential: small graphs only)."""
    if source == target or not nx.has_path(graph, source, target):
        return [-1] * max_hops
    return _bond_ids_of(graph, min(nx.all_shortest_paths(graph, source, target)), max_hops)


def _bond_ids_of(graph: nx.Graph, path: list[int], max_hops: int) -> list[int]:
    ids = {edge: k for k, edge in enumerate(graph.edges())}
    route = [-1] * max_hops
    for hop, (u, v) in enumerate(zip(path[:max_hops], path[1:max_hops + 1])):
        route[hop] = ids[(u, v)] if (u, v) in ids else ids[(v, u)]
    return route


def molecule_like(n: int, seed: int) -> nx.Graph:
    """A connected graph with rings and a small diameter (a stand-in for large molecules or pockets)."""
    return nx.connected_watts_strogatz_graph(n, 4, 0.2, seed=seed)


def fused_rings(rows: int, cols: int) -> nx.Graph:
    """Fused hexagons (a polycyclic aromatic skeleton): many equally short paths, so the tie rule matters."""
    return nx.convert_node_labels_to_integers(nx.hexagonal_lattice_graph(rows, cols))


def backend_device(backend: str) -> torch.device:
    """Where a backend's inputs live in the tests: Triton gets CUDA tensors on a GPU machine, else the CPU
    tensors that its interpreter (TRITON_INTERPRET=1, set by conftest) runs on."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def on_backend(op, backend: str, *args, **kwargs):
    """Call ``op(..., backend=backend)`` with tensors moved to the backend's device; results come back on the CPU."""
    device = backend_device(backend)
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    out = op(*map(move, args), **{k: move(v) for k, v in kwargs.items()}, backend=backend)
    if isinstance(out, tuple):
        return tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in out)
    return out.cpu()
