"""Edge encoding along the shortest path: the reference against Graphormer's multi_hop computation spelled out on
real molecules, and the Triton kernels (interpreter on the CPU) against the float64 reference, forward and both
gradients.

The molecules cover what the op must get right: paths longer than K (the divisor's clamp), salts (unreachable
pairs, fragments without bonds), a single atom, and padding (every molecule but the largest has fully padded
rows in the padded layout). Every check draws fresh embeddings and weights, puts NaN in rows of the bond table
that no route names and in the upstream gradient wherever there is no path (neither may be read), and runs
with the batch's bond ids shuffled as well as in collate's order (the backward must not rely on a molecule's
bonds being a contiguous id range).
"""
import pytest
import torch

from pyblend import collate, ops
from pyblend.kernels import path_edge_bias as kernels
from pyblend.ops.path_edge_bias import path_edge_bias
from pyblend.reference.path_edge_bias import path_edge_bias as reference_bias

from graphs import backend_device
from hopper import run_compile_script
from tolerances import assert_close

HAS_CUDA = torch.cuda.is_available()
# bf16 arithmetic is wrong in Triton's interpreter: bf16 runs on the GPU only.
INTERPRETER_DTYPES = [torch.float32, torch.float16]
SMILES = [
    "CCO",                          # 3 atoms
    "[Na+].[Cl-]",                  # two fragments, no bond: nothing reachable
    "C",                            # one atom
    "c1ccccc1C(=O)O",               # a ring: ties between shortest paths
    "CCCCCCCCCC",                   # decane: paths of up to 9 hops, longer than K
    "[Na+].CC(=O)[O-]",             # a salt: bonded fragment + an unreachable ion
    "CC(=O)Nc1ccc(O)cc1",           # paracetamol
]
GRADIENTS = ("demb", "dw")


@pytest.fixture(scope="module")
def graphs():
    pytest.importorskip("rdkit", reason="the molecules are featurized with RDKit")
    from pyblend import featurize_many

    graphs, failures = featurize_many(SMILES, progress=False)
    assert not failures
    return graphs


def molecule_routes(graphs, layout: str, hops: int):
    """(routes, distances, cu_seqlens or None, bond_features (E, F)) with batch-wide bond ids in both layouts."""
    batch = collate(graphs, layout=layout)
    if layout == "packed":
        distances, routes = ops.shortest_path_routes(batch.bond_ids, max_hops=hops, cu_seqlens=batch.cu_seqlens)
        return routes, distances, batch.cu_seqlens, batch.bond_features
    distances, routes = ops.shortest_path_routes(batch.bond_ids, batch.mask, max_hops=hops)
    # Padded bond ids are per molecule: offset them to index one (E, H) table of the whole batch.
    first = torch.cumsum(batch.num_bonds, 0) - batch.num_bonds
    routes = torch.where(routes >= 0, routes + first[:, None, None, None].to(routes.dtype), routes)
    features = torch.cat([batch.bond_features[b, :n] for b, n in enumerate(batch.num_bonds.tolist())])
    return routes, distances, None, features


def shuffle_ids(routes, bonds, generator):
    """The same routes with bond ids renamed by a random permutation (scattering each molecule's ids)."""
    rename = torch.randperm(bonds, generator=generator).to(routes.dtype)
    return torch.where(routes >= 0, rename[routes.clamp(min=0).long()], routes), rename


def random_problem(generator, bonds, heads, max_hops, dtype, spare=3):
    """(edge_embedding (bonds + spare, H), hop_weights (K_max, H, H)) rounded to ``dtype``; the spare rows, which
    no route names, hold NaN."""
    emb = torch.randn(bonds + spare, heads, generator=generator, dtype=torch.float64)
    emb[bonds:] = float("nan")
    w = torch.randn(max_hops, heads, heads, generator=generator, dtype=torch.float64) / heads ** 0.5
    return emb.to(dtype), w.to(dtype)


def run(backend, routes, distances, emb, w, grad, cu_seqlens, *, dtype=None):
    """{bias, demb, dw} on the CPU; ``dtype`` converts the float inputs first (the reference in float64)."""
    target = torch.device("cpu") if backend == "reference" else backend_device("triton")
    leaves = [x.detach().to(target, dtype or x.dtype).requires_grad_() for x in (emb, w)]
    cu = None if cu_seqlens is None else cu_seqlens.to(target)
    bias = path_edge_bias(routes.to(target), distances.to(target), *leaves, cu_seqlens=cu, backend=backend)
    (bias.double() * grad.to(target)).sum().backward()
    found = {"bias": bias.detach().cpu()}
    found.update({name: leaf.grad.detach().cpu() for name, leaf in zip(GRADIENTS, leaves)})
    return found


def poisoned_gradient(generator, shape, distances, packed):
    """Upstream gradient (float64) with NaN wherever there is no path, and the same with 0 there."""
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    no_path = (distances <= 0)[None] if packed else (distances <= 0)[:, None]
    no_path = no_path.expand(shape)
    return grad.masked_fill(no_path, float("nan")), grad.masked_fill(no_path, 0.0)


def check(graphs, generator, layout, dtype, heads, hops, max_hops, shuffled):
    routes, distances, cu_seqlens, features = molecule_routes(graphs, layout, hops)
    bonds = features.shape[0]
    if shuffled:
        routes, _ = shuffle_ids(routes, bonds, generator)
    emb, w = random_problem(generator, bonds, heads, max_hops, dtype)
    shape = (routes.shape[0], heads, *routes.shape[1:3]) if layout == "padded" else (heads, routes.shape[0])
    poisoned, clean = poisoned_gradient(generator, shape, distances, layout == "packed")
    got = run("triton", routes, distances, emb, w, poisoned, cu_seqlens)
    received = clean.to(got["bias"].dtype).double()  # the upstream gradient as the op receives it
    expected = run("reference", routes, distances, emb, w, received, cu_seqlens, dtype=torch.float64)
    for name, ref in expected.items():
        assert torch.isfinite(got[name][:bonds] if name == "demb" else got[name]).all(), f"{name}: inf or NaN"
        assert_close(got[name], ref.nan_to_num(0.0) if name == "demb" else ref, dtype, name)
    # No path: exactly 0. Unused hops' matrices and the spare (never named) bond rows: no gradient.
    no_path = (distances <= 0)[:, None].expand(shape) if layout == "padded" else (distances <= 0)[None].expand(shape)
    assert (got["bias"][no_path] == 0).all(), "bias: nonzero where there is no path"
    assert (got["dw"][hops:] == 0).all(), "dw: nonzero for hops >= K"
    assert (got["demb"][bonds:] == 0).all(), "demb: nonzero on bond rows no route names"
    return got


# ------------------------------------------------------------------------------------------- reference


def graphormer_multi_hop(graphs, bond_encoder, hop_weights, heads, multi_hop_max_dist, offset):
    """Graphormer's GraphAttnBias multi_hop branch, spelled as its collator and layer compute it: spatial_pos =
    SPD + 1 with 0 = padding and 510 + 1 for unreachable pairs; edge_input (n_graph, n, n, max_dist, F) holding
    each hop's bond features + 1 (0 = padding, the embedding's padding_idx); hops past multi_hop_max_dist
    dropped. Paths come from our routes (Graphormer's Floyd-Warshall may pick another among equal ones)."""
    batch = collate(graphs)
    distances, routes = ops.shortest_path_routes(batch.bond_ids, batch.mask, max_hops=multi_hop_max_dist)
    n_graph, n_node = batch.mask.shape
    spatial_pos = torch.where(distances >= 0, distances + 1, torch.full_like(distances, 511)).long()
    spatial_pos[~(batch.mask[:, :, None] & batch.mask[:, None, :])] = 0
    features = batch.bond_features + 1 + offset  # Graphormer's convert_to_single_emb shifts each feature column
    edge_input = torch.zeros(n_graph, n_node, n_node, multi_hop_max_dist, features.shape[-1], dtype=torch.long)
    for b in range(n_graph):
        valid = routes[b] >= 0
        edge_input[b][valid] = features[b][routes[b][valid].long()]
    # graphormer_layers.GraphAttnBias, edge_type == "multi_hop"
    spatial_pos_ = spatial_pos.clone()
    spatial_pos_[spatial_pos_ == 0] = 1
    spatial_pos_ = torch.where(spatial_pos_ > 1, spatial_pos_ - 1, spatial_pos_)
    spatial_pos_ = spatial_pos_.clamp(0, multi_hop_max_dist)
    edge = bond_encoder(edge_input).mean(-2)
    max_dist = edge.size(-2)
    flat = edge.permute(3, 0, 1, 2, 4).reshape(max_dist, -1, heads)
    flat = torch.bmm(flat, hop_weights.reshape(-1, heads, heads)[:max_dist, :, :])
    edge = flat.reshape(max_dist, n_graph, n_node, n_node, heads).permute(1, 2, 3, 0, 4)
    return (edge.sum(-2) / spatial_pos_.double().unsqueeze(-1)).permute(0, 3, 1, 2), batch


@pytest.mark.parametrize("hops", [3, 5])
def test_reference_matches_graphormer_multi_hop(graphs, generator, hops):
    """On every real pair the reference is Graphormer's bias (divisor clamp(SPD, 1, K), 0 without a path)."""
    heads, vocabulary = 6, 16
    offset = torch.arange(3) * vocabulary
    bond_encoder = torch.nn.Embedding(3 * vocabulary + 1, heads, padding_idx=0).double()
    torch.nn.init.normal_(bond_encoder.weight[1:], generator=generator)
    hop_weights = torch.randn(5 * heads * heads, 1, generator=generator, dtype=torch.float64)  # edge_dis_encoder
    expected, batch = graphormer_multi_hop(graphs, bond_encoder, hop_weights, heads, hops, offset)

    routes, distances, _, features = molecule_routes(graphs, "padded", hops)
    emb = bond_encoder(features + 1 + offset).mean(1)  # the module's per-bond embedding
    got = reference_bias(routes, distances, emb, hop_weights.reshape(-1, heads, heads))
    real = (batch.mask[:, :, None] & batch.mask[:, None, :])[:, None].expand_as(got)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-12, atol=1e-12)
    assert (got[~real] == 0).all()
    # The pairs that make the divisor matter are present: paths longer than K, and unreachable pairs.
    assert (distances > hops).any() and ((distances < 0) & batch.mask[:, :, None] & batch.mask[:, None, :]).any()


def test_reference_packed_is_padded_packed(graphs, generator):
    from pyblend import layout

    padded_routes, padded_distances, _, features = molecule_routes(graphs, "padded", 4)
    routes, distances, cu_seqlens, packed_features = molecule_routes(graphs, "packed", 4)
    assert torch.equal(features, packed_features)
    emb, w = random_problem(generator, features.shape[0], 5, 4, torch.float64, spare=0)
    padded = reference_bias(padded_routes, padded_distances, emb, w)
    packed = reference_bias(routes, distances, emb, w)
    mask = collate(graphs).mask
    torch.testing.assert_close(packed.t(), layout.pack_pairs(padded.permute(0, 2, 3, 1), mask))


def test_reference_gradcheck_float64(generator):
    routes = torch.tensor([[[[0, 2], [-1, -1]], [[1, -1], [0, 1]]]])  # (1, 2, 2, 2)
    distances = torch.tensor([[[3, 0], [1, 2]]])
    emb = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, w: reference_bias(routes, distances, e, w), (emb, w))


def test_automatic_backend_on_cpu_is_the_reference(graphs, generator):
    if HAS_CUDA:
        pytest.skip("on a GPU machine CPU tensors still go to the reference, but TRITON_INTERPRET is unset")
    routes, distances, _, features = molecule_routes(graphs, "padded", 3)
    emb, w = random_problem(generator, features.shape[0], 4, 3, torch.float32, spare=0)
    assert torch.equal(path_edge_bias(routes, distances, emb, w), reference_bias(routes, distances, emb, w))


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("heads, hops, max_hops, shuffled", [(6, 3, 5, False), (32, 5, 5, True),
                                                              (17, 2, 3, True)])
def test_matches_reference(graphs, generator, dtype, layout, heads, hops, max_hops, shuffled):
    check(graphs, generator, layout, dtype, heads, hops, max_hops, shuffled)


def test_several_bond_blocks_and_entry_chunks(graphs, generator):
    """The backward's segment sums span several bond blocks, and some block's hop range several chunks."""
    heads, hops = 8, 5
    config = kernels.backward_config(heads)
    routes, distances, _, features = molecule_routes(graphs, "padded", hops)
    routes, _ = shuffle_ids(routes, features.shape[0], generator)
    bonds = features.shape[0]
    assert bonds > config["BLOCK_E"]
    _, _, starts = kernels.sort_entries(routes, distances, bonds)
    block_starts = starts[:-1].view(hops, bonds)[:, ::config["BLOCK_E"]]
    block_ends = starts[1:].view(hops, bonds)[:, config["BLOCK_E"] - 1::config["BLOCK_E"]]
    assert (block_ends - block_starts[:, :block_ends.shape[1]]).max() > config["BLOCK_Q"]
    check(graphs, generator, "padded", torch.float32, heads, hops, hops, False)
    check(graphs, generator, "padded", torch.float32, heads, hops, hops, True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_single_atoms_and_salts_only(generator, backend):
    """No bond anywhere (E = 0 is allowed): the bias is 0 and the hop weights get no gradient."""
    pytest.importorskip("rdkit", reason="the molecules are featurized with RDKit")
    from pyblend import featurize_many

    batch = collate(featurize_many(["[Na+].[Cl-]", "C", "[K+].[Br-].[Mg+2]"], progress=False)[0], layout="packed")
    distances, routes = ops.shortest_path_routes(batch.bond_ids, max_hops=3, cu_seqlens=batch.cu_seqlens)
    assert (routes < 0).all()
    for emb_rows in (0, 2):
        emb, w = random_problem(generator, 0, 4, 3, torch.float32, spare=emb_rows)
        grad, _ = poisoned_gradient(generator, (4, routes.shape[0]), distances, True)
        got = run(backend, routes, distances, emb, w, grad, batch.cu_seqlens)
        assert (got["bias"] == 0).all() and (got["dw"] == 0).all() and (got["demb"] == 0).all()


def test_distances_past_int32_divide_by_the_hops(graphs, generator):
    """A path longer than the K routed hops is averaged over K, however long: int64 distances past 2^31 once
    wrapped when narrowed for the kernel (2^31 read as no path)."""
    routes, distances, cu_seqlens, features = molecule_routes(graphs, "packed", 3)
    emb, w = random_problem(generator, features.shape[0], 4, 3, torch.float32)
    grad = torch.randn(4, routes.shape[0], generator=generator, dtype=torch.float64)
    longest = distances >= 3
    assert longest.sum() >= 2
    huge = distances.long().masked_fill(longest, 2 ** 31).index_fill(0, longest.nonzero()[0], 2 ** 32 + 1)
    for backend in ("reference", "triton"):
        expected = run(backend, routes, distances, emb, w, grad, cu_seqlens)
        got = run(backend, routes, huge, emb, w, grad, cu_seqlens)
        for name in expected:
            assert torch.equal(got[name], expected[name]), f"{backend} {name}"


def test_int64_ids_and_strided_tables(graphs, generator):
    """int64 routes and distances, a transposed-storage bond table and hop matrices: bit-identical to int32 and
    contiguous inputs."""
    routes, distances, cu_seqlens, features = molecule_routes(graphs, "packed", 4)
    emb, w = random_problem(generator, features.shape[0], 12, 4, torch.float32, spare=0)
    strided_emb, strided_w = emb.t().contiguous().t(), w.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided_emb.is_contiguous() and not strided_w.is_contiguous()
    grad = torch.randn(12, routes.shape[0], generator=generator, dtype=torch.float64)
    expected = run("triton", routes, distances, emb, w, grad, cu_seqlens)
    got = run("triton", routes.long(), distances.long(), strided_emb, strided_w, grad, cu_seqlens)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_deterministic(graphs, generator):
    routes, distances, cu_seqlens, features = molecule_routes(graphs, "packed", 5)
    routes, _ = shuffle_ids(routes, features.shape[0], generator)
    emb, w = random_problem(generator, features.shape[0], 16, 5, torch.float32, spare=0)
    grad = torch.randn(16, routes.shape[0], generator=generator, dtype=torch.float64)
    first = run("triton", routes, distances, emb, w, grad, cu_seqlens)
    second = run("triton", routes, distances, emb, w, grad, cu_seqlens)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name}: two runs differ"


def test_errors_name_the_argument(graphs, generator):
    routes, distances, cu_seqlens, features = molecule_routes(graphs, "packed", 3)
    padded_routes, padded_distances, _, _ = molecule_routes(graphs, "padded", 3)
    emb, w = random_problem(generator, features.shape[0], 4, 3, torch.float32, spare=0)
    cases = [
        (dict(routes=routes.float()), TypeError, "routes: expected dtype int32, int64"),
        (dict(routes=routes[:, None]), ValueError, "routes: expected shape (P, K) in the packed layout"),
        (dict(routes=routes, cu_seqlens=None), ValueError, "routes: expected shape (B, N, N, K) (a packed"),
        (dict(routes=routes[:-1], distances=distances[:-1]), ValueError, "cu_seqlens: describes"),
        (dict(routes=routes[:, :0]), ValueError, "routes: expected K >= 1"),
        (dict(routes=routes.masked_fill(routes == 0, -2)), ValueError, "routes: expected bond ids >= 0 and -1"),
        (dict(edge_embedding=emb[:-1]), ValueError, f"routes: bond id {features.shape[0] - 1} is out of range"),
        (dict(distances=distances[:-1]), ValueError, "distances: expected shape (P,)"),
        (dict(distances=distances.float()), TypeError, "distances: expected dtype"),
        (dict(routes=padded_routes, distances=padded_distances[:, :-1], cu_seqlens=None), ValueError,
         "distances: expected shape (B, N, N)"),
        (dict(edge_embedding=emb.long()), TypeError, "edge_embedding: expected dtype"),
        (dict(edge_embedding=emb[:, None]), ValueError, "edge_embedding: expected shape (E, H)"),
        (dict(hop_weights=w.double()), TypeError, "hop_weights: expected the dtype of edge_embedding"),
        (dict(hop_weights=w[:, :3]), ValueError, "hop_weights: expected shape (K_max, H, H)"),
        (dict(hop_weights=w[:2]), ValueError, "hop_weights: expected K_max >= K = 3"),
        (dict(cu_seqlens=cu_seqlens.long()), ValueError, "cu_seqlens: expected an int32 tensor"),
        (dict(cu_seqlens=cu_seqlens.flip(0)), ValueError, "cu_seqlens: expected cu_seqlens[0] == 0"),
        (dict(backend="cpp"), ValueError, "has no 'cpp' backend"),
        (dict(edge_embedding=emb.double(), hop_weights=w.double(), backend="triton"), ValueError,
         "float16, bfloat16 or float32"),
        (dict(edge_embedding=torch.zeros(emb.shape[0], 65), hop_weights=torch.zeros(3, 65, 65),
              backend="triton"), ValueError, "H = 65 heads > 64"),
    ]
    for overrides, error, message in cases:
        arguments = dict(routes=routes, distances=distances, edge_embedding=emb, hop_weights=w, cu_seqlens=cu_seqlens)
        arguments.update(overrides)
        with pytest.raises(error) as caught:
            path_edge_bias(arguments.pop("routes"), arguments.pop("distances"), arguments.pop("edge_embedding"),
                           arguments.pop("hop_weights"), **arguments)
        assert message in str(caught.value), f"{overrides}: {caught.value}"
    # The argument named is the one at fault: pytest.raises(match=...) as the house does elsewhere.
    with pytest.raises(ValueError, match="hop_weights"):
        path_edge_bias(routes, distances, emb, w[:1], cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_opcheck(graphs, generator, layout):
    target = backend_device("triton")
    routes, distances, _, features = molecule_routes(graphs, layout, 3)
    emb, w = random_problem(generator, features.shape[0], 8, 4, torch.float32, spare=0)
    args = (routes.to(target), distances.to(target), emb.to(target).requires_grad_(), w.to(target).requires_grad_())
    torch.library.opcheck(torch.ops.pyblend.path_edge_bias.default, args)
    bias = torch.ops.pyblend.path_edge_bias(*args)
    grad = torch.randn(bias.shape, generator=generator).to(target)
    # The backward op's own derivative only raises (no double backward): checked on plain tensors.
    torch.library.opcheck(torch.ops.pyblend.path_edge_bias_backward.default,
                          (grad, *args[:2], args[2].detach(), args[3].detach()))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_torch_compile_traces_the_op(graphs, generator, layout):
    target = backend_device("triton")
    routes, distances, cu_seqlens, features = molecule_routes(graphs, layout, 3)
    routes, distances = routes.to(target), distances.to(target)
    cu = None if cu_seqlens is None else cu_seqlens.to(target)
    emb, w = (x.to(target).requires_grad_() for x in random_problem(generator, features.shape[0], 8, 3,
                                                                    torch.float32, spare=0))

    def objective(emb, w):
        bias = path_edge_bias(routes, distances, emb, w, cu_seqlens=cu, backend="triton")
        per_head = torch.arange(8.0, device=target).view(-1, *[1] * (2 if layout == "padded" else 1))
        return (bias.square() * per_head).sum()

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    expected_value = objective(emb, w)
    expected = torch.autograd.grad(expected_value, (emb, w))
    got_value = compiled(emb, w)
    got = torch.autograd.grad(got_value, (emb, w))
    torch.testing.assert_close(got_value, expected_value)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs)


def test_benchmark_case_checks_every_provider_with_the_kernel(graphs):
    """The GPU case's construction and checks, run small on the CPU with Triton's interpreter."""
    from pyblend.benchmarks import bench_path_edge_bias as bench
    from pyblend.benchmarks.harness import run_case

    case = bench.build_case(graphs, "packed", torch.float32, torch.device("cpu"), backward=True, heads=8,
                            time_budget_s=0.01)
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert set(rows) == {bench.TRITON, bench.EAGER, bench.COMPILED}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    result = list(case.providers[bench.EAGER]())
    result[2] = result[2] * 1.01  # d(hop_weights) off by 1%
    with pytest.raises(AssertionError, match="dhop_weights"):
        case.check(bench.EAGER, result)


# --------------------------------------------------------------------------------------------- compile


HOPPER_COMPILE = """
import torch
from hopper import captured_launches, lower_launch
from pyblend.kernels import path_edge_bias as kernels

# Packed molecules of 20, 11 and 1 atoms: P = 522 pairs, not a multiple of 16 (as in most batches), K = 5 hops.
HOPS, BONDS, PAIRS = 5, 40, 20 * 20 + 11 * 11 + 1
routes = torch.randint(-1, BONDS, (PAIRS, HOPS), dtype=torch.int32)
distances = torch.randint(-1, HOPS + 3, (PAIRS,), dtype=torch.int32)
launches = {}
for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    for heads in (8, 32, 64):
        emb = torch.randn(BONDS, heads, dtype=dtype)
        w = torch.randn(HOPS, heads, heads, dtype=dtype)
        with captured_launches() as captured:
            bias = kernels.path_edge_bias_forward(routes, distances, emb, w)
            kernels.path_edge_bias_backward(torch.randn_like(bias), routes, distances, emb, w)
        for kernel, args, kwargs in captured:
            launches.setdefault((label, heads, kernel.fn.__name__), (kernel, args, kwargs))
for (label, heads, name), (kernel, args, kwargs) in launches.items():
    ptx, spills, sass = lower_launch(kernel, args, kwargs)
    print(label, heads, name, "spills", spills)
"""


def test_kernels_compile_for_hopper_without_spills():
    """Calls the launchers on CPU tensors (bf16 and fp32, H = 8, 32, 64: the Triton path's range; packed) and
    lowers both kernels to sm_90 as Triton would on the GPU, then runs ptxas: the interpreter accepts programs
    the compiler rejects, and a spill is a performance bug."""
    lines = run_compile_script(HOPPER_COMPILE)
    assert len(lines) == 12, lines
    for line in lines:
        assert int(line.split()[4]) == 0, f"{line}: registers spill"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gpu_dtypes(graphs, generator, dtype, layout):
    check(graphs, generator, layout, dtype, 32, 5, 5, True)
