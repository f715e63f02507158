"""Shortest paths and routes: every backend against networkx and against each other, exactly."""

import os
import re
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
import torch

from pyblend import collate, layout, ops
from pyblend.reference import check_routes, shortest_path_routes as reference_routes

from graphs import (as_batch, backend_device, brute_force_route, fused_rings, lexicographic_route, molecule_like,
                    networkx_distances, on_backend)
from hopper import run_compile_script

BACKENDS = ["reference", "cpp", "triton"]


def run(graphs_or_batch, backend, max_hops=None, packed=False):
    bond_ids, mask = graphs_or_batch if isinstance(graphs_or_batch, tuple) else as_batch(graphs_or_batch)
    kwargs = {}
    if packed:
        cu_seqlens, _ = layout.cu_seqlens_from_mask(mask)
        bond_ids, mask = layout.pack_pairs(bond_ids, mask), None
        kwargs["cu_seqlens"] = cu_seqlens
    if max_hops is None:
        return on_backend(ops.shortest_path, backend, bond_ids >= 0, mask, **kwargs), None
    return on_backend(ops.shortest_path_routes, backend, bond_ids, mask, max_hops=max_hops, **kwargs)


def check_against_networkx(graphs, distances, routes, max_hops):
    width = distances.shape[-1]
    for b, graph in enumerate(graphs):
        expected = networkx_distances(graph, width)
        assert torch.equal(distances[b], expected), f"molecule {b}: distances differ from networkx at " \
            f"{torch.nonzero(distances[b] != expected)[:5].tolist()}"
        if routes is None:
            continue
        n = graph.number_of_nodes()
        lengths = dict(nx.all_pairs_shortest_path_length(graph))
        for i in range(n):
            for j in range(n):
                want = lexicographic_route(graph, i, j, max_hops, lengths)
                assert routes[b, i, j].tolist() == want, f"molecule {b}: route {i}->{j}"
        assert (routes[b, n:] == -1).all() and (routes[b, :, n:] == -1).all()


ADVERSARIAL = {
    "single_atom": [nx.empty_graph(1)],
    "two_fragments": [nx.disjoint_union(nx.path_graph(3), nx.cycle_graph(4))],
    "macrocycle_30": [nx.cycle_graph(30)],
    "fused_rings": [fused_rings(2, 3)],
    "mixed_sizes": [nx.empty_graph(1), nx.path_graph(7), nx.cycle_graph(5), fused_rings(1, 2), nx.empty_graph(3)],
    "directed": [nx.gnp_random_graph(12, 0.2, seed=3, directed=True)],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_adversarial_graphs_match_networkx(case, backend, packed):
    graphs = ADVERSARIAL[case]
    distances, routes = run(graphs, backend, max_hops=4, packed=packed)
    if packed:
        _, mask = as_batch(graphs)
        cu_seqlens, width = layout.cu_seqlens_from_mask(mask)
        distances = layout.pad_pairs(distances, cu_seqlens, mask.shape[1], value=-1)
        routes = layout.pad_pairs(routes, cu_seqlens, mask.shape[1], value=-1)
    check_against_networkx(graphs, distances, routes, max_hops=4)
    plain, _ = run(graphs, backend, packed=packed)
    assert torch.equal(plain, run(graphs, backend, max_hops=4, packed=packed)[0])


@pytest.mark.parametrize("graph", [fused_rings(2, 3), nx.gnp_random_graph(12, 0.2, seed=3, directed=True),
                                   nx.disjoint_union(nx.cycle_graph(6), nx.path_graph(3))],
                         ids=["fused_rings", "directed", "fragments"])
def test_the_greedy_oracle_is_the_lexicographic_minimum(graph):
    """The test oracle walks greedily; check by brute force that this is the smallest of all shortest paths."""
    lengths = dict(nx.all_pairs_shortest_path_length(graph))
    for i in graph.nodes:
        for j in graph.nodes:
            assert lexicographic_route(graph, i, j, 6, lengths) == brute_force_route(graph, i, j, 6), (i, j)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 127, 128, 129])
def test_sizes_around_tile_boundaries(n, backend):
    graphs = [molecule_like(n, seed=n) if n > 4 else nx.path_graph(n), nx.path_graph(min(n, 5))]
    distances, routes = run(graphs, backend, max_hops=3)
    bond_ids, mask = as_batch(graphs)
    expected_distances, expected_routes = reference_routes(bond_ids, mask, max_hops=3)
    assert torch.equal(distances, expected_distances)
    assert torch.equal(routes, expected_routes)
    check_against_networkx(graphs, distances, None, 3)


@pytest.mark.full
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("graph", [nx.path_graph(129), nx.cycle_graph(128), fused_rings(5, 5)],
                         ids=["path129", "macrocycle128", "fused_rings_5x5"])
def test_long_and_large_graphs(graph, backend):
    distances, routes = run([graph], backend, max_hops=5)
    check_against_networkx([graph], distances, routes, max_hops=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_is_never_read(backend):
    graphs = [nx.path_graph(4), nx.cycle_graph(6), nx.path_graph(2)]
    bond_ids, mask = as_batch(graphs, width=9)
    clean = run((bond_ids, mask), backend, max_hops=3)
    padded = ~(mask[:, :, None] & mask[:, None, :])
    # Bonds to and between padded atoms, and values no real pair may hold (not even validated there).
    for value in (7, -100, 2 ** 40):
        poisoned = bond_ids.long().masked_fill(padded, value)
        dirty = run((poisoned, mask), backend, max_hops=3)
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1]), value
    assert (clean[0][~mask[:, :, None].expand(-1, -1, 9)] == -1).all(), "padded rows must be -1, diagonal too"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_atoms_inside_a_molecule_and_fully_padded_molecules(backend):
    graph = nx.path_graph(6)
    bond_ids, mask = as_batch([graph, graph, nx.empty_graph(0)], width=6)
    mask[1, 2] = False  # a hole: atom 2 is removed, cutting the path in two
    distances, routes = run((bond_ids, mask), backend, max_hops=2)
    cut = graph.copy()
    cut.remove_node(2)
    expected = torch.full((6, 6), -1, dtype=torch.int32)
    for source, lengths in nx.all_pairs_shortest_path_length(cut):
        for target, length in lengths.items():
            expected[source, target] = length
    assert torch.equal(distances[1], expected)
    assert (distances[2] == -1).all() and (routes[2] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_molecules_far_narrower_than_the_batch_with_holes(backend):
    """Engines may stop at each molecule's last real atom (the C++ engine and the Triton launcher do): what lies
    past it, and holes before it, must still come out exactly as the reference has them."""
    graphs = [molecule_like(10, seed=1), nx.path_graph(4), nx.path_graph(3), nx.cycle_graph(5), nx.path_graph(1),
              nx.empty_graph(0), nx.path_graph(10)]
    bond_ids, mask = as_batch(graphs, width=12)
    mask[1, 3] = False  # the last atom is a hole: the molecule ends at atom 2
    mask[2, 0] = False  # a hole at the first atom
    mask[3, 1:4] = False  # a run of holes inside a ring, the last real atom after it
    mask[6, :9] = False  # one real atom, far from the start
    expected = reference_routes(bond_ids, mask, max_hops=3)
    poisoned = bond_ids.masked_fill(~(mask[:, :, None] & mask[:, None, :]), 0)  # bonds everywhere in the padding
    distances, routes = run((poisoned, mask), backend, max_hops=3)
    assert torch.equal(distances, expected[0]) and torch.equal(routes, expected[1])
    assert torch.equal(run((poisoned, mask), backend)[0], expected[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_max_hops_takes_any_integer_type(backend, packed):
    graphs = [nx.cycle_graph(5), nx.path_graph(3)]
    expected = run(graphs, "reference", max_hops=2, packed=packed)
    for max_hops in (np.int64(2), np.uint8(2)):
        got = run(graphs, backend, max_hops=max_hops, packed=packed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), type(max_hops)
        assert got[1].shape[-1] == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_max_hops_past_int32_is_refused_alike_on_every_backend(backend, packed):
    """max_hops=2**40 failed differently per backend (pybind11's "incompatible function arguments" on C++, the
    allocator elsewhere): past the int32 hop counts every backend holds, one ValueError names the bound."""
    graphs = [nx.path_graph(3)]
    for max_hops in (2 ** 31, 2 ** 40, np.uint64(2 ** 63)):
        with pytest.raises(ValueError, match=re.escape(f"max_hops: expected an int >= 1 and <= MAX_HOPS = "
                                                       f"{2 ** 31 - 1} (int32 hop counts); got {max_hops!r}")):
            run(graphs, backend, max_hops=max_hops, packed=packed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (2, 0)])
def test_empty_batches(shape, backend):
    batch, width = shape
    adjacency = torch.zeros(batch, width, width, dtype=torch.bool)
    assert on_backend(ops.shortest_path, backend, adjacency).shape == (batch, width, width)
    distances, routes = on_backend(ops.shortest_path_routes, backend, torch.full((batch, width, width), -1),
                                   max_hops=3)
    assert routes.shape == (batch, width, width, 3) and distances.dtype == torch.int32
    empty_packed = on_backend(ops.shortest_path, backend, torch.zeros(0, dtype=torch.bool),
                              cu_seqlens=torch.zeros(1, dtype=torch.int32))
    assert empty_packed.shape == (0,)


def test_default_set_matches_networkx_and_backends_agree(default_batch):
    graphs, batch = default_batch
    distances, routes = ops.shortest_path_routes(batch.bond_ids, batch.mask, max_hops=5, backend="cpp")
    nx_graphs = [nx.Graph(list(map(tuple, g.edge_index.T.tolist()))) for g in graphs]
    for b, (graph, nx_graph) in enumerate(zip(graphs, nx_graphs)):
        nx_graph.add_nodes_from(range(graph.num_atoms))
        assert torch.equal(distances[b], networkx_distances(nx_graph, distances.shape[-1])), f"molecule {b}"
    assert_routes_are_shortest_paths(batch, distances, routes)
    reference = ops.shortest_path_routes(batch.bond_ids, batch.mask, max_hops=5, backend="reference")
    assert torch.equal(distances, reference[0]) and torch.equal(routes, reference[1])
    packed = batch.to_packed()
    packed_out = ops.shortest_path_routes(packed.bond_ids, max_hops=5, cu_seqlens=packed.cu_seqlens, backend="cpp")
    assert torch.equal(packed_out[0], layout.pack_pairs(distances, batch.mask))
    # packed bond ids are batch-wide: compare through the padded layout's local ids
    assert torch.equal(packed.to_padded().bond_ids, batch.bond_ids)


def assert_routes_are_shortest_paths(batch, distances, routes):
    for b in range(len(batch)):
        n = int(batch.num_atoms[b])
        try:
            check_routes(batch.bond_ids[b, :n, :n], distances[b, :n, :n], routes[b, :n, :n])
        except AssertionError as failure:
            raise AssertionError(f"molecule {b} ({batch.smiles[b]}): {failure}") from None


def test_check_routes_accepts_other_ties_and_rejects_detours():
    bond_ids, _ = as_batch([nx.cycle_graph(6)])  # bonds: 0:(0,1) 1:(0,5) 2:(1,2) 3:(2,3) 4:(3,4) 5:(4,5)
    distances, routes = ops.shortest_path_routes(bond_ids, max_hops=3)
    assert routes[0, 0, 3].tolist() == [0, 2, 3]  # 0-1-2-3, the smaller of the two ties
    other_tie = routes.clone()
    other_tie[0, 0, 3] = torch.tensor([1, 5, 4])  # 0-5-4-3: as short, the other way round
    check_routes(bond_ids[0], distances[0], other_tie[0])
    detour = routes.clone()
    detour[0, 0, 2, :2] = torch.tensor([1, 5])  # 0-5-4 has two hops but moves away from atom 2
    with pytest.raises(AssertionError, match="route 0->2: hop 0"):
        check_routes(bond_ids[0], distances[0], detour[0])


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_agrees_with_cpp_on_real_molecules(default_batch, backend):
    _, batch = default_batch
    small = slice(0, 12)
    bond_ids, mask = batch.bond_ids[small], batch.mask[small]
    expected = ops.shortest_path_routes(bond_ids, mask, max_hops=5, backend="cpp")
    got = on_backend(ops.shortest_path_routes, backend, bond_ids, mask, max_hops=5)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.full
def test_triton_agrees_with_cpp_on_molecules_with_hydrogens(default_batch_with_hydrogens):
    """The first 100 molecules with hydrogens plus the four largest (up to ~190 atoms: three tiles a side);
    the interpreter needs about a second per molecule, so the whole set is left to the GPU test."""
    graphs, _ = default_batch_with_hydrogens
    largest = sorted(range(len(graphs)), key=lambda i: graphs[i].num_atoms)[-4:]
    packed = collate([graphs[i] for i in [*range(100), *largest]], layout="packed")
    expected, got = (on_backend(ops.shortest_path_routes, backend, packed.bond_ids, max_hops=5,
                                cu_seqlens=packed.cu_seqlens) for backend in ("cpp", "triton"))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_numpy_in_numpy_out():
    bond_ids, mask = as_batch([nx.cycle_graph(5), nx.path_graph(3)])
    distances = ops.shortest_path(bond_ids.numpy() >= 0, mask.numpy())
    assert isinstance(distances, np.ndarray) and distances.dtype == np.int32
    distances, routes = ops.shortest_path_routes(bond_ids.numpy(), mask.numpy(), max_hops=2)
    assert isinstance(routes, np.ndarray) and routes.shape == (2, 5, 5, 2)
    assert np.array_equal(distances, ops.shortest_path(bond_ids >= 0, mask).numpy())


@pytest.mark.parametrize("call, error, words", [
    (lambda: ops.shortest_path(torch.zeros(2, 3, 3)), TypeError, ["adjacency", "bool", "float32"]),
    (lambda: ops.shortest_path(torch.zeros(2, 3, 4, dtype=torch.bool)), ValueError, ["adjacency", "(B, N, N)"]),
    (lambda: ops.shortest_path(torch.zeros(2, 3, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)),
     ValueError, ["mask", "(2, 3)"]),
    (lambda: ops.shortest_path(torch.zeros(2, 3, 3, dtype=torch.bool), torch.ones(2, 3)), TypeError, ["mask"]),
    (lambda: ops.shortest_path(torch.zeros(5, dtype=torch.bool), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32)),
     ValueError, ["4 pairs", "5"]),
    (lambda: ops.shortest_path(torch.zeros(4, dtype=torch.bool), cu_seqlens=torch.tensor([0, 2]),),
     ValueError, ["cu_seqlens", "int32"]),
    (lambda: ops.shortest_path(torch.zeros(4, dtype=torch.bool), cu_seqlens=torch.tensor([1, 3], dtype=torch.int32)),
     ValueError, ["cu_seqlens[0] == 0"]),
    (lambda: ops.shortest_path(torch.zeros(4, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool),
                               cu_seqlens=torch.tensor([0, 2], dtype=torch.int32)), ValueError, ["mask", "packed"]),
    (lambda: ops.shortest_path_routes(torch.full((1, 3, 3), -2)), ValueError, ["bond_ids", "-1"]),
    (lambda: ops.shortest_path_routes(torch.full((1, 3, 3), 2 ** 31)), ValueError, ["bond_ids", "int32", "2147483648"]),
    (lambda: ops.shortest_path_routes(torch.zeros(1, 3, 3, dtype=torch.bool)), TypeError, ["bond_ids"]),
    (lambda: ops.shortest_path_routes(torch.zeros(1, 3, 3, dtype=torch.uint8)), TypeError, ["bond_ids", "uint8"]),
    (lambda: ops.shortest_path_routes(torch.full((1, 3, 3), -1), max_hops=0), ValueError, ["max_hops"]),
    (lambda: ops.shortest_path_routes(torch.full((1, 3, 3), -1), max_hops=np.int64(0)), ValueError, ["max_hops"]),
    (lambda: ops.shortest_path_routes(torch.full((1, 3, 3), -1), max_hops=True), ValueError, ["max_hops", "True"]),
    (lambda: ops.shortest_path_routes(torch.full((1, 3, 3), -1), max_hops=np.bool_(True)), ValueError, ["max_hops"]),
    (lambda: ops.shortest_path_routes(torch.full((1, 3, 3), -1), max_hops=2.0), ValueError, ["max_hops", "2.0"]),
    (lambda: ops.shortest_path(torch.zeros(1, 3, 3, dtype=torch.bool), backend="fast"), ValueError, ["backend"]),
    (lambda: ops.shortest_path([[True]]), TypeError, ["adjacency", "list"]),
    (lambda: ops.shortest_path(torch.zeros(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool,
                                                                                   device="meta")),
     ValueError, ["mask", "meta"]),
])
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="Triton needs CUDA tensors"):
        ops.shortest_path(torch.zeros(1, 2, 2, dtype=torch.bool), backend="triton")


def test_environment_variable_forces_a_backend(monkeypatch):
    """Errors caused by PYBLEND_BACKEND name it: a module's op refusing 'cpp' said only "has no 'cpp' backend"
    to a caller who passed no backend."""
    monkeypatch.setenv("PYBLEND_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"backend \(from the environment variable PYBLEND_BACKEND\) must be one "
                                         r"of .* got 'nonsense'"):
        ops.shortest_path(torch.zeros(1, 2, 2, dtype=torch.bool))
    monkeypatch.setenv("PYBLEND_BACKEND", "cpp")
    with pytest.raises(ValueError, match=r"gated_fusion: has no 'cpp' backend, asked for by backend \(from the "
                                         r"environment variable PYBLEND_BACKEND\)"):
        ops.gated_fusion(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), torch.zeros(2, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    bond_ids, mask = as_batch([nx.cycle_graph(5), nx.path_graph(3)])
    cu_seqlens, _ = layout.cu_seqlens_from_mask(mask)
    packed = layout.pack_pairs(bond_ids, mask)
    device = backend_device(backend)
    bond_ids, mask, cu_seqlens, packed = (x.to(device) for x in (bond_ids, mask, cu_seqlens, packed))
    for args in [(bond_ids >= 0, mask, None, 0, backend), (bond_ids, mask, None, 3, backend),
                 (bond_ids >= 0, None, None, 0, backend), (packed, None, cu_seqlens, 2, backend)]:
        torch.library.opcheck(torch.ops.pyblend.shortest_path, args)


def test_torch_compile_traces_the_op():
    bond_ids, mask = as_batch([nx.cycle_graph(6), nx.path_graph(4)])

    def relation_features(adjacency, mask):
        distances = ops.shortest_path(adjacency, mask, backend="cpp")
        return distances.clamp(min=0).float().sum(-1)

    compiled = torch.compile(relation_features, fullgraph=False)
    assert torch.equal(compiled(bond_ids >= 0, mask), relation_features(bond_ids >= 0, mask))


def test_padded_routes_on_meta_tensors_and_under_fullgraph():
    """The bond-id range check read values: meta inputs failed in it (torch's "Cannot copy out of meta tensor"),
    and a fullgraph compile on the data-dependent comparison. Both now skip it, as the other id checks do."""
    bond_ids, mask = as_batch([nx.cycle_graph(6), nx.path_graph(4)])
    distances, routes = ops.shortest_path_routes(bond_ids.to("meta"), mask.to("meta"), max_hops=3)
    assert distances.is_meta and distances.shape == bond_ids.shape and routes.shape == (*bond_ids.shape, 3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids, mask: ops.shortest_path_routes(ids, mask, max_hops=3), backend="eager",
                             fullgraph=True)
    for got, expected in zip(compiled(bond_ids, mask), ops.shortest_path_routes(bond_ids, mask, max_hops=3)):
        assert torch.equal(got, expected)


FORK_AFTER_THREADS = """
import os, sys
import numpy as np
from pyblend import _C, ops
ids = np.full((64, 8, 8), -1, np.int32)
for i in range(7):
    ids[:, i, i + 1] = ids[:, i + 1, i] = i
expected = ops.shortest_path_routes(ids, max_hops=3)[0]  # the parent's OpenMP team starts here
positions = np.random.default_rng(0).normal(size=(64, 8, 3)).astype(np.float32)
distances = ops.pair_distances(positions)
pid = os.fork()
if pid == 0:
    same = np.array_equal(ops.shortest_path_routes(ids, max_hops=3)[0], expected) and \
        np.array_equal(ops.pair_distances(positions), distances)
    os._exit(0 if same and _C.num_threads() == 1 else 3)
sys.exit(os.waitpid(pid, 0)[1] >> 8)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_the_engine_after_the_parent_did():
    """libgomp is not fork-safe: once the parent had run an OpenMP team, a forked child (a fork Pool, a DataLoader
    worker that sets more threads) waited forever at its first team's barrier. The engine now runs its loops on
    the calling thread in a forked child."""
    from pyblend._extension import extension_available

    if not extension_available():
        pytest.skip("pyblend._C is not built")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    try:
        result = subprocess.run([sys.executable, "-c", FORK_AFTER_THREADS], env=env, capture_output=True,
                                text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child hung in the engine")
    assert result.returncode == 0, result.stderr


HOPPER_COMPILE = """
import torch
from hopper import captured_launches, lower_launch
from pyblend.kernels import shortest_path as kernels

with captured_launches() as captured:
    # Padded and masked, N = 40 atoms: routes over int32 bond ids (32-wide tiles), then distances only over the
    # bool adjacency (64-wide tiles).
    bond_ids = torch.randint(-1, 50, (3, 40, 40), dtype=torch.int32)
    mask = torch.arange(40) < torch.tensor([[40], [23], [1]])
    kernels.shortest_path_padded(bond_ids, mask, 5)
    kernels.shortest_path_padded(bond_ids >= 0, mask, 0)
    # Distances only, packed: molecules of at most 16 atoms get the 16-wide tiles.
    lengths = torch.tensor([12, 7, 1])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    kernels.shortest_path_packed(torch.rand(int((lengths * lengths).sum())) < 0.3, cu_seqlens, 12, 0)
for kernel, args, kwargs in captured:
    ptx, spills, _ = lower_launch(kernel, args, kwargs)
    print("barriers", ptx.count("bar.sync"), "mma", ptx.count("mma"), "spills", spills, "block", kwargs["BLOCK"],
          "routes", kwargs["MAX_HOPS"])
"""


def test_kernel_compiles_for_hopper():
    """Calls the launchers on CPU tensors and lowers each launch to sm_90 as Triton would on the GPU, without a
    GPU, so CI catches what the interpreter cannot (types, layouts, barriers, register spills)."""
    lines = run_compile_script(HOPPER_COMPILE)
    assert len(lines) == 3, lines
    for line in lines:
        barriers, mma, spills = int(line.split()[1]), int(line.split()[3]), int(line.split()[5])
        assert barriers > 0, "levels must be separated by barriers"
        assert mma > 0, "the frontier expansion should use the tensor cores"
        assert spills == 0, f"{line}: registers spill"


HOP_LAUNCHES = """
import torch
from hopper import captured_launches
from pyblend.kernels import shortest_path as kernels

with captured_launches() as captured:
    bond_ids = torch.randint(-1, 9, (2, 6, 6), dtype=torch.int32)
    for max_hops in (3, 5, 6, 40):
        kernels.shortest_path_padded(bond_ids, None, max_hops)
print(*(kwargs["MAX_HOPS"] for _, _, kwargs in captured))
"""


def test_the_kernel_unrolls_no_more_hops_than_a_path_can_have():
    """The hop loop is unrolled: max_hops = 40 compiled a loop of 40 steps (each max_hops a kernel of its own). A
    path among 6 atoms has at most 5 hops: max_hops 5, 6 and 40 share one kernel."""
    assert run_compile_script(HOP_LAUNCHES) == ["3 5 5 5"]


def test_routes_past_the_longest_path_stay_minus_one():
    """A chain of 5 atoms with max_hops = 12: the kernel writes the 4 hops a path can have, the rest stay -1."""
    bond_ids = torch.full((1, 5, 5), -1, dtype=torch.int32)
    for bond in range(4):
        bond_ids[0, bond, bond + 1] = bond_ids[0, bond + 1, bond] = bond
    expected = ops.shortest_path_routes(bond_ids, max_hops=12, backend="reference")
    got = ops.shortest_path_routes(bond_ids.to(backend_device("triton")), max_hops=12, backend="triton")
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    routes = got[1].cpu()
    assert routes.shape[-1] == 12 and (routes[..., 4:] == -1).all() and routes[0, 0, 4, :4].tolist() == [0, 1, 2, 3]


@pytest.mark.gpu
def test_cuda_triton_matches_cpp_on_the_default_set(default_batch_with_hydrogens):
    _, batch = default_batch_with_hydrogens
    expected = ops.shortest_path_routes(batch.bond_ids, batch.mask, max_hops=5, backend="cpp")
    cuda = batch.to("cuda")
    got = ops.shortest_path_routes(cuda.bond_ids, cuda.mask, max_hops=5)
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    packed = cuda.to_packed()
    got_packed = ops.shortest_path(packed.adjacency, cu_seqlens=packed.cu_seqlens)
    assert torch.equal(got_packed.cpu(), layout.pack_pairs(expected[0], batch.mask))
