"""Edge encoding along the shortest path (Graphormer / MoleBlend multi-hop edge bias) on real molecule batches:
the Triton kernels against the reference.

Workloads (GPU, H = 32 heads, K = 5 hops, bfloat16): batches of the default molecule set's real graphs, their
routes from :func:`pyblend.ops.shortest_path_routes` (computed once, outside the timing): the first 256 molecules
with heavy atoms, packed (the layout relation attention's varlen path reads) and padded, and the first 128 with
hydrogens, packed; each forward and forward+backward (gradients of the bond embeddings and the hop matrices).
``--quick``: the heavy-atom packed batch only.

Providers: pyblend Triton; the reference (``pyblend.reference.path_edge_bias``: gathers the ``(pairs, K, H)``
tensor and contracts it with einsum) in eager mode and under ``torch.compile``.

Check before timing: the bias and both gradients against a float64 reference computed once on the device
(relative error < 2e-2 in bfloat16, 1e-4 in float32).

Bytes that must move: the routes and distances read (``P * (4 K + 4)``) and the bias written (``P * H * 2``);
forward+backward adds the upstream gradient read and the routes and distances read again. FLOPs: ``2 P K H^2``
forward, twice that more backward (``P`` = pairs of the layout, padding included for padded).

On the CPU (no Triton timing: its interpreter is far too slow), one small float32 case (64 molecules, H = 8,
forward+backward) times the eager and compiled reference.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .harness import Case, first_runs

ENTRY = "path_edge_bias"
TRITON, EAGER, COMPILED = "pyblend Triton", "reference eager", "reference torch.compile"
HEADS, HOPS = 32, 5
HEAVY_BATCH, HYDROGEN_BATCH = 256, 128
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
MODES = {False: "forward", True: "forward+backward"}


def _problem(graphs, layout: str, heads: int, hops: int, dtype: torch.dtype, device: torch.device):
    """(routes, distances, cu_seqlens, edge_embedding, hop_weights) on ``device``; batch-wide bond ids."""
    from pyblend import collate, ops

    batch = collate(graphs, layout=layout)
    if layout == "packed":
        distances, routes = ops.shortest_path_routes(batch.bond_ids, max_hops=hops, cu_seqlens=batch.cu_seqlens)
        cu_seqlens = batch.cu_seqlens.to(device)
    else:
        distances, routes = ops.shortest_path_routes(batch.bond_ids, batch.mask, max_hops=hops)
        first = torch.cumsum(batch.num_bonds, 0) - batch.num_bonds  # padded ids are per molecule
        routes = torch.where(routes >= 0, routes + first[:, None, None, None].to(routes.dtype), routes)
        cu_seqlens = None
    bonds = int(batch.num_bonds.sum())
    generator = torch.Generator().manual_seed(bonds * 7 + heads)
    emb = torch.randn(bonds, heads, generator=generator).to(device, dtype).requires_grad_()
    weights = (torch.randn(hops, heads, heads, generator=generator) / heads ** 0.5).to(device, dtype).requires_grad_()
    return routes.to(device), distances.to(device), cu_seqlens, emb, weights


def _provider(bias_fn: Callable, routes, distances, emb, weights, grad, backward: bool) -> Callable[[], tuple]:
    def run():
        bias = bias_fn(routes, distances, emb, weights)
        if not backward:
            return (bias.detach(),)
        return (bias.detach(), *torch.autograd.grad(bias, (emb, weights), grad))
    return run



def case_name(graphs, layout: str, dtype: torch.dtype, backward: bool, heads: int = HEADS, hops: int = HOPS,
              label: str = "") -> str:
    sizes = [graph.num_atoms for graph in graphs]
    pairs = sum(n * n for n in sizes) if layout == "packed" else len(sizes) * max(sizes) ** 2
    return (f"{label}{', ' if label else ''}{len(sizes)} molecules, {layout} ({pairs} pairs), H={heads} K={hops} "
            f"{str(dtype).split('.')[-1]}, {MODES[backward]}")


def build_case(graphs, layout: str, dtype: torch.dtype, device: torch.device, backward: bool = True,
               heads: int = HEADS, hops: int = HOPS, label: str = "", targets: list | None = None,
               time_budget_s: float = 5.0, triton: bool = True) -> Case:
    from pyblend.ops.path_edge_bias import path_edge_bias
    from pyblend.reference.path_edge_bias import path_edge_bias as reference_bias

    routes, distances, cu_seqlens, emb, weights = _problem(graphs, layout, heads, hops, dtype, device)
    pairs = routes[..., 0].numel()
    shape = (routes.shape[0], heads, *routes.shape[1:3]) if layout == "padded" else (heads, pairs)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(pairs)).to(device, dtype)

    # Ground truth once, in float64 on the device.
    leaves = [x.detach().double().requires_grad_() for x in (emb, weights)]
    expected_bias = reference_bias(routes, distances, *leaves)
    expected = [expected_bias.detach(), *torch.autograd.grad(expected_bias, leaves, grad.double())]
    names = ("bias", "dedge_embedding", "dhop_weights")[:3 if backward else 1]

    providers, skipped, candidates = {}, {}, {}
    if triton:
        candidates[TRITON] = lambda r, d, e, w: path_edge_bias(r, d, e, w, cu_seqlens=cu_seqlens, backend="triton")
    else:
        skipped[TRITON] = "needs a CUDA device"
    candidates[EAGER] = reference_bias
    candidates[COMPILED] = torch.compile(reference_bias)
    ran, failed, _ = first_runs({name: _provider(fn, routes, distances, emb, weights, grad, backward)
                                 for name, fn in candidates.items()}, device, required=TRITON)
    providers.update(ran)
    skipped.update(failed)
    tolerance = TOLERANCE[dtype]

    def check(provider: str, result) -> None:
        for name, got, want in zip(names, result, expected):
            error = ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()
            if not error < tolerance:
                raise AssertionError(f"{name}: relative error {error:.2e} against the float64 reference")

    element = torch.finfo(dtype).bits // 8
    pair_bytes = pairs * (4 * hops + 4)
    moved = pair_bytes + pairs * heads * element
    if backward:
        moved += pair_bytes + pairs * heads * element
    flops = 2 * pairs * hops * heads * heads * (3 if backward else 1)
    molecules = len(graphs)
    config = {"layout": layout, "molecules": molecules, "atoms": sum(g.num_atoms for g in graphs), "pairs": pairs,
              "bonds": emb.shape[0], "heads": heads, "hops": hops, "dtype": str(dtype).split(".")[-1],
              "mode": MODES[backward]}
    name = case_name(graphs, layout, dtype, backward, heads, hops, label)
    return Case(entry=ENTRY, name=name, providers=providers, check=check, units=molecules, unit="molecules",
                config=config, targets=targets or [], skipped=skipped, time_budget_s=time_budget_s,
                bytes_moved=dict.fromkeys([*providers, *skipped], moved), flops=flops)


def cases(context) -> Iterator[Case]:
    """A generator: each case's tensors live only while it is built and run."""
    budget = context.time_budget_s
    if context.device.type != "cuda":
        graphs, label = context.molecules(False)[:64], "default set, heavy atoms (CPU)"
        if context.wants(ENTRY, case_name(graphs, "packed", torch.float32, True, heads=8, label=label)):
            yield build_case(graphs, "packed", torch.float32, context.device, backward=True, heads=8, label=label,
                             time_budget_s=budget, triton=False)
        return
    sets = [("default set, heavy atoms", False, HEAVY_BATCH, "packed"),
            ("default set, heavy atoms", False, HEAVY_BATCH, "padded"),
            ("default set, with hydrogens", True, HYDROGEN_BATCH, "packed")]
    if context.quick:
        sets = sets[:1]
    for label, hydrogens, count, layout in sets:
        graphs = context.molecules(hydrogens)[:count]
        for backward in (False, True):
            if not context.wants(ENTRY, case_name(graphs, layout, torch.bfloat16, backward, label=label)):
                continue
            torch._dynamo.reset()  # the previous case's compiled peers are done with
            torch.cuda.empty_cache()
            yield build_case(graphs, layout, torch.bfloat16, context.device, backward=backward, label=label,
                             time_budget_s=budget)
