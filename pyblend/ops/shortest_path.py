"""All-pairs unweighted shortest paths (SPD) and shortest-path routes for batches of molecules.

Backends: Triton (CUDA tensors), the C++ engine (CPU tensors and numpy arrays) and the plain-PyTorch reference;
they agree exactly (semantics and the route tie rule: :mod:`pyblend.reference.shortest_path`). Both entries
accept the padded and the packed layout (:mod:`pyblend.layout`), and numpy arrays (answered with numpy arrays).
Validation reads integer inputs on the host once: these are data-pipeline ops, not a training hot path.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import reference
from .._extension import load_extension
from .._values import values_hidden
from ..layout import check_cu_seqlens, pair_offsets
from ._checks import (SIGNED_INTEGER_DTYPES, as_tensor, check_dtype, check_mask, check_pair_matrix, check_same_device,
                      check_shape, id_range, is_int)
from ._dispatch import choose_backend, cpp_reasons, triton_reasons

__all__ = ["shortest_path", "shortest_path_routes"]

# Routes and distances are int32, and so is every backend's hop count: the C++ engine takes a C int (pybind11
# refuses a larger Python int), the Triton kernel a 32-bit constexpr, and no shortest path has more hops than its
# int32 distance can hold. Past it the backends failed each in its own way (a pybind11 signature error, the
# allocator), never naming max_hops.
MAX_HOPS = torch.iinfo(torch.int32).max


def shortest_path(adjacency, mask=None, *, cu_seqlens=None, backend: str | None = None):
    """All-pairs shortest-path distances (hop counts) of a batch of molecular graphs.

    Args:
        adjacency: bool. Padded ``(B, N, N)``; packed ``(P,)`` with ``cu_seqlens`` (molecule ``i``'s block
            row-major at ``sum_{j<i} N_j^2``). ``adjacency[.., u, v]`` True is an edge u -> v; self loops are
            ignored.
        mask: ``(B, N)`` bool, True = real atom (padded layout only). Default: every atom is real.
        cu_seqlens: ``(B+1,)`` int32, selects the packed layout.
        backend: "triton" | "cpp" | "reference" | None (automatic; ``PYBLEND_BACKEND`` overrides).

    Returns:
        int32 distances shaped like ``adjacency``: 0 on the diagonal of real atoms, -1 for unreachable pairs
        (disconnected fragments) and for every pair touching a padded atom. numpy in, numpy out.
    """
    distances, _ = _run("shortest_path", adjacency, "adjacency", mask, cu_seqlens, 0, backend)
    return distances


def shortest_path_routes(bond_ids, mask=None, *, max_hops: int = 5, cu_seqlens=None, backend: str | None = None):
    """Shortest-path distances and, for every pair, the bond ids along one shortest path.

    Args:
        bond_ids: integer, ``(B, N, N)`` padded or ``(P,)`` packed: the id of the bond u -> v, -1 where there is
            none (the adjacency is ``bond_ids >= 0``). Ids index the batch's bond features, e.g.
            ``MolBatch.bond_ids``.
        mask, cu_seqlens, backend: as in :func:`shortest_path`.
        max_hops: hops kept per route, an int in [1, MAX_HOPS = 2**31 - 1]; longer paths keep their first
            ``max_hops`` bonds. ``routes`` holds ``max_hops`` int32 entries per pair: size it to the molecules.

    Returns:
        ``(distances, routes)``, int32: distances as :func:`shortest_path`; ``routes`` shaped
        ``bond_ids.shape + (max_hops,)`` where ``routes[.., i, j, k]`` is the bond id of hop k (hop 0 leaves i)
        of the shortest path i -> j that always steps to the smallest-index atom still on a shortest path
        (the lexicographically smallest atom sequence), and -1 past its end. Same answer on every backend.
    """
    # Any integral type, numpy's included (hop counts read from arrays and configs); a bool is an int to Python
    # but no hop count. The op schema takes a Python int.
    if not is_int(max_hops) or not 1 <= max_hops <= MAX_HOPS:
        raise ValueError(f"max_hops: expected an int >= 1 and <= MAX_HOPS = {MAX_HOPS} (int32 hop counts); "
                         f"got {max_hops!r}")
    max_hops = int(max_hops)
    return _run("shortest_path_routes", bond_ids, "bond_ids", mask, cu_seqlens, max_hops, backend)


def _run(op: str, graph, graph_name: str, mask, cu_seqlens, max_hops: int, backend: str | None):
    numpy_in = isinstance(graph, np.ndarray)
    graph = as_tensor(graph, graph_name)
    mask = as_tensor(mask, "mask", optional=True)
    cu_seqlens = as_tensor(cu_seqlens, "cu_seqlens", optional=True)
    routes_wanted = max_hops > 0
    if routes_wanted:
        check_dtype(graph, graph_name, SIGNED_INTEGER_DTYPES)  # -1 marks "no bond"
    else:
        check_dtype(graph, graph_name, (torch.bool,))
    check_same_device(graph, graph_name, mask=mask, cu_seqlens=cu_seqlens)

    if cu_seqlens is None:
        check_pair_matrix(graph, graph_name)
    else:
        check_shape(graph, graph_name, (None,), "(P,)")
        check_cu_seqlens(cu_seqlens)
        pairs = int(pair_offsets(cu_seqlens.cpu())[-1])
        if pairs != graph.shape[0]:
            raise ValueError(f"{graph_name}: cu_seqlens describes {pairs} pairs (sum of N_i^2) but "
                             f"{graph_name} holds {graph.shape[0]}")
    check_mask(mask, graph.shape[:2], cu_seqlens)
    if routes_wanted:
        if not values_hidden(graph, mask):  # meta inputs have no ids; compiled, a read would break the graph
            # Ids at padded pairs are never read: any value may stand there.
            bounds = id_range(graph, None if mask is None else mask[:, :, None] & mask[:, None, :], fill=-1)
            if bounds is not None and bounds[0] < -1:
                raise ValueError(f"{graph_name}: expected bond ids >= 0 and -1 for no bond; got {bounds[0]}")
            if bounds is not None and bounds[1] > torch.iinfo(torch.int32).max:
                raise ValueError(f"{graph_name}: bond ids must fit in int32; got {bounds[1]}")
        graph = graph.to(torch.int32)

    chosen = choose_backend(op, backend, graph.device, {
        "triton": lambda: triton_reasons(graph.device),
        "cpp": lambda: cpp_reasons(graph.device),
        "reference": lambda: [],
    })
    distances, routes = torch.ops.pyblend.shortest_path(graph, mask, cu_seqlens, max_hops, chosen)
    if numpy_in:
        return distances.numpy(), routes.numpy() if routes_wanted else None
    return distances, routes if routes_wanted else None


@torch.library.custom_op("pyblend::shortest_path", mutates_args=())
def _shortest_path_op(graph: Tensor, mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_hops: int,
                      backend: str) -> tuple[Tensor, Tensor]:
    """graph: bool adjacency, or int32 bond ids when max_hops > 0. Returns (distances, routes (..., max_hops))."""
    packed = cu_seqlens is not None
    if backend == "triton":
        from ..kernels import shortest_path as kernel

        if packed:
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
            return kernel.shortest_path_packed(graph, cu_seqlens, longest, max_hops)
        return kernel.shortest_path_padded(graph, mask, max_hops)
    if backend == "cpp":
        engine = load_extension()
        adjacency = None if max_hops else graph.numpy()
        bond_ids = graph.numpy() if max_hops else None
        if packed:
            distances, routes = engine.shortest_path_packed(adjacency, bond_ids, cu_seqlens.numpy(), max_hops)
        else:
            distances, routes = engine.shortest_path_padded(
                adjacency, bond_ids, None if mask is None else mask.numpy(), max_hops)
        distances = torch.from_numpy(distances)
        routes = torch.from_numpy(routes) if routes is not None else _no_routes(graph)
        return distances, routes
    if packed:
        if max_hops:
            return reference.shortest_path_routes_packed(graph, cu_seqlens, max_hops)
        return reference.shortest_path_packed(graph, cu_seqlens), _no_routes(graph)
    if max_hops:
        return reference.shortest_path_routes(graph, mask, max_hops)
    return reference.shortest_path(graph, mask), _no_routes(graph)


def _no_routes(graph: Tensor) -> Tensor:
    return torch.empty((*graph.shape, 0), dtype=torch.int32, device=graph.device)


@_shortest_path_op.register_fake
def _(graph, mask, cu_seqlens, max_hops, backend):
    return (graph.new_empty(graph.shape, dtype=torch.int32),
            graph.new_empty((*graph.shape, max_hops), dtype=torch.int32))
