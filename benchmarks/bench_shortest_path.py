"""Shortest paths + routes (max 5 hops) on the default molecule set.

Providers: pyblend's C++ engine (padded and packed batches), scipy.sparse.csgraph.shortest_path called per
molecule (routes walked back from its predecessor matrix, vectorised with numpy), networkx per molecule, the
plain-PyTorch reference (batched), and on a GPU the Triton kernel. Batches of 256 molecules as a data loader
makes them; on a GPU also 4096 molecules in one batch. Every provider's distances must equal the reference
exactly; routes must be shortest paths (peers break ties their own way; pyblend's backends must match exactly).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pyblend import ops
from pyblend.layout import pack_pairs
from pyblend.reference import check_routes

from .harness import Case

ENTRY = "shortest_path"
MAX_HOPS = 5
LOADER_BATCH = 256
GPU_BATCH = 4096  # molecules in one batch on a GPU


def _scipy_molecule(csgraph, adjacency, bond_ids):
    distances, predecessors = csgraph.shortest_path(adjacency, method="D", unweighted=True,
                                                    return_predecessors=True)
    n = distances.shape[0]
    reachable = np.isfinite(distances)
    hops = np.where(reachable, distances, -1).astype(np.int32)
    routes = np.full((n, n, MAX_HOPS), -1, dtype=np.int32)
    source = np.broadcast_to(np.arange(n)[:, None], (n, n))
    target = np.broadcast_to(np.arange(n)[None, :], (n, n))
    at = target.copy()
    # Walk every path back from its target; hop index d - 1 - step is the bond (predecessor, at).
    for step in range(int(hops.max(initial=0))):
        hop = hops - 1 - step
        active = hop >= 0
        previous = np.where(active, predecessors[source, np.where(active, at, 0)], 0)
        keep = active & (hop < MAX_HOPS)
        routes[source[keep], target[keep], hop[keep]] = bond_ids[previous[keep], at[keep]]
        at = np.where(active, previous, at)
    return hops, routes


def _networkx_molecule(nx, graph, bond_of, n):
    hops = np.full((n, n), -1, dtype=np.int32)
    routes = np.full((n, n, MAX_HOPS), -1, dtype=np.int32)
    for source, paths in nx.all_pairs_shortest_path(graph):
        for target, path in paths.items():
            hops[source, target] = len(path) - 1
            for k in range(min(len(path) - 1, MAX_HOPS)):
                routes[source, target, k] = bond_of[path[k], path[k + 1]]
    return hops, routes


def _per_molecule_checker(batches, truth):
    """Check a list of per-molecule (distances, routes) numpy pairs against the batched reference."""
    def check(outputs):
        index = 0
        for batch, (distances, _) in zip(batches, truth):
            for b in range(len(batch)):
                n = int(batch.num_atoms[b])
                got_distances, got_routes = outputs[index]
                if not np.array_equal(got_distances, distances[b, :n, :n].numpy()):
                    raise AssertionError(f"molecule {index}: distances differ from the reference")
                check_routes(batch.bond_ids[b, :n, :n], distances[b, :n, :n], torch.from_numpy(got_routes))
                index += 1
    return check


def _batched_checker(truth):
    """Compare batched outputs with the reference's output on the same batches, exactly."""
    def check(outputs):
        for k, ((distances, routes), (expected_distances, expected_routes)) in enumerate(zip(outputs, truth)):
            if not (torch.equal(distances.cpu(), expected_distances) and torch.equal(routes.cpu(), expected_routes)):
                raise AssertionError(f"batch {k}: distances or routes differ from the reference")
    return check


def _packed_truth(batches, truth):
    """The padded truth in the packed layout, whose bond ids count over the whole batch (pyblend.data)."""
    packed = []
    for batch, (distances, routes) in zip(batches, truth):
        bond_start = (torch.cumsum(batch.num_bonds, 0) - batch.num_bonds).to(torch.int32)
        batch_wide = torch.where(routes >= 0, routes + bond_start[:, None, None, None], -1)
        packed.append((pack_pairs(distances, batch.mask), pack_pairs(batch_wide, batch.mask)))
    return packed


def _routes(batches, backend, packed=False):
    if packed:
        return [ops.shortest_path_routes(b.bond_ids, max_hops=MAX_HOPS, cu_seqlens=b.cu_seqlens, backend=backend)
                for b in batches]
    return [ops.shortest_path_routes(b.bond_ids, b.mask, max_hops=MAX_HOPS, backend=backend) for b in batches]


def _loader_name(graphs, hydrogens: bool) -> str:
    return f"default set{' with hydrogens' if hydrogens else ''}: {len(graphs)} molecules in batches of {LOADER_BATCH}"


def _gpu_name(graphs, hydrogens: bool) -> str:
    return f"{len(graphs)} molecules{' with hydrogens' if hydrogens else ''}, one batch"


def _loader_case(context, hydrogens: bool) -> Case:
    from pyblend import collate

    graphs = context.molecules(hydrogens)
    batches = [collate(graphs[i:i + LOADER_BATCH]) for i in range(0, len(graphs), LOADER_BATCH)]
    packed = [b.to_packed() for b in batches]
    truth = _routes(batches, "reference")
    checkers = {"batched": _batched_checker(truth), "packed": _batched_checker(_packed_truth(batches, truth)),
                "per molecule": _per_molecule_checker(batches, truth)}
    providers, kinds, skipped = {}, {}, {}
    providers["pyblend C++ (padded)"], kinds["pyblend C++ (padded)"] = (lambda: _routes(batches, "cpp")), "batched"
    providers["pyblend C++ (packed)"] = lambda: _routes(packed, "cpp", packed=True)
    kinds["pyblend C++ (packed)"] = "packed"
    providers["reference (torch, batched)"] = lambda: _routes(batches, "reference")
    kinds["reference (torch, batched)"] = "batched"

    molecules = [(b, i) for b in batches for i in range(len(b))]
    try:
        import scipy.sparse
        from scipy.sparse import csgraph

        prepared = [(scipy.sparse.csr_matrix(b.adjacency[i, :n, :n].numpy()), b.bond_ids[i, :n, :n].numpy())
                    for b, i in molecules for n in [int(b.num_atoms[i])]]
        providers["scipy csgraph (per molecule)"] = lambda: [_scipy_molecule(csgraph, a, ids) for a, ids in prepared]
        kinds["scipy csgraph (per molecule)"] = "per molecule"
    except ImportError as error:
        skipped["scipy csgraph (per molecule)"] = f"scipy is not installed ({error})"
    try:
        import networkx as nx

        graphs_nx = []
        for b, i in molecules:
            n = int(b.num_atoms[i])
            graph = nx.Graph()
            graph.add_nodes_from(range(n))
            ids = b.bond_ids[i, :n, :n].numpy()
            u, v = np.nonzero(ids >= 0)
            graph.add_edges_from(zip(u.tolist(), v.tolist()))
            graphs_nx.append((graph, {(a, c): int(ids[a, c]) for a, c in zip(u.tolist(), v.tolist())}, n))
        providers["networkx (per molecule)"] = lambda: [_networkx_molecule(nx, *g) for g in graphs_nx]
        kinds["networkx (per molecule)"] = "per molecule"
    except ImportError as error:
        skipped["networkx (per molecule)"] = f"networkx is not installed ({error})"

    return Case(entry=ENTRY, name=_loader_name(graphs, hydrogens), providers=providers,
                check=lambda provider, out: checkers[kinds[provider]](out), units=len(graphs), unit="molecules",
                config={"max_hops": MAX_HOPS, "hydrogens": hydrogens, "batch": LOADER_BATCH},
                targets=[("pyblend C++ (packed)", "scipy csgraph (per molecule)", 50.0)], skipped=skipped,
                time_budget_s=context.time_budget_s)


def _gpu_case(context, hydrogens: bool, count: int) -> Case:
    from pyblend import collate

    graphs = context.molecules(hydrogens)[:count]
    batch = collate(graphs)
    packed = batch.to_packed()
    gpu, gpu_packed = batch.to("cuda"), packed.to("cuda")
    # The reference on the GPU: on the CPU, one batch of 4096 molecules padded to ~120 atoms takes it minutes.
    truth = [tuple(x.cpu() for x in result) for result in _routes([gpu], "reference")]
    packed_truth = _packed_truth([batch], truth)
    providers = {
        "pyblend Triton (padded)": lambda: _routes([gpu], "triton"),
        "pyblend Triton (packed)": lambda: _routes([gpu_packed], "triton", packed=True),
        "pyblend C++ (packed, CPU)": lambda: _routes([packed], "cpp", packed=True),
        "pyblend C++ (padded, CPU)": lambda: _routes([batch], "cpp"),
        "reference (torch on GPU)": lambda: _routes([gpu], "reference"),
    }
    packed_check, padded_check = _batched_checker(packed_truth), _batched_checker(truth)
    return Case(entry=ENTRY, name=_gpu_name(graphs, hydrogens), providers=providers,
                check=lambda provider, out: (packed_check if "packed" in provider else padded_check)(out),
                units=len(graphs), unit="molecules", config={"max_hops": MAX_HOPS, "hydrogens": hydrogens},
                targets=[("pyblend Triton (packed)", "pyblend C++ (packed, CPU)", 10.0),
                         ("pyblend Triton (padded)", "pyblend C++ (padded, CPU)", 10.0)],
                time_budget_s=context.time_budget_s)


def cases(context) -> Iterator[Case]:
    """A generator: each case's batches live only while it is built and run."""
    for hydrogens in (False, True):
        if context.wants(ENTRY, _loader_name(context.molecules(hydrogens), hydrogens)):
            yield _loader_case(context, hydrogens)
    if context.device.type == "cuda":
        for hydrogens in (False, True):
            if context.wants(ENTRY, _gpu_name(context.molecules(hydrogens)[:GPU_BATCH], hydrogens)):
                yield _gpu_case(context, hydrogens, GPU_BATCH)
