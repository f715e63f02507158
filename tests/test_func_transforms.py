"""The torch.func transforms over the Triton ops (the interpreter on the CPU): ``grad``, ``vjp``, ``jacrev`` and
per-sample gradients (``vmap`` of ``grad``) give what they give on the reference backend, through the ops' own
first-order formulas; differentiating such a gradient again raises the ops' named error.

torch.library's generated autograd.Function has no ``setup_context``, so these transforms refused every Triton
op before (``pyblend.ops._autograd.call`` runs the same formulas through one that has it)."""
import pytest
import torch

from pyblend import ops
from pyblend.nn import DynamicFusion, GaussianBasisBias, LegoBlock, RelationBiasedAttention

from graphs import backend_device
from tolerances import assert_close


def on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


@pytest.fixture(autouse=True)
def no_fallback_warning_noise():
    """vmap runs the ops one sample at a time (they have no batching rule); PyTorch warns about it every call."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


def grads_on_both_backends(objective, inputs, argnums):
    """torch.func.grad of ``objective(backend, *inputs)`` with respect to ``argnums`` on Triton and the
    reference."""
    got = torch.func.grad(lambda *xs: objective("triton", *xs), argnums=argnums)(*inputs)
    want = torch.func.grad(lambda *xs: objective("reference", *xs), argnums=argnums)(*inputs)
    return got, want


def assert_all_close(got, want, names):
    assert len(got) == len(want) == len(names)
    for ours, theirs, name in zip(got, want, names):
        assert torch.isfinite(ours).all(), name
        assert_close(ours, theirs, torch.float32, name)


def chain_bonds(sizes):
    """Padded bond ids (B, N, N) of chain molecules (bond i joins atoms i and i + 1, -1 elsewhere) and the mask."""
    width = max(sizes)
    bonds = torch.full((len(sizes), width, width), -1, dtype=torch.int64)
    for b, size in enumerate(sizes):
        for i in range(size - 1):
            bonds[b, i, i + 1] = bonds[b, i + 1, i] = i
    return bonds, torch.arange(width)[None] < torch.tensor(sizes)[:, None]


def test_relation_attention_grad_vjp_and_jacrev(generator):
    device = backend_device("triton")  # the reference runs there too
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    q, k, v = (torch.randn(2, 5, 2, 8, generator=generator) for _ in range(3))
    bias = torch.randn(2, 2, 5, 5, generator=generator)
    table, index = torch.randn(4, 2, generator=generator), torch.randint(0, 4, (2, 5, 5), generator=generator)
    mask, q, k, v, bias, table, index = on(device, mask, q, k, v, bias, table, index)

    def objective(backend, q, k, v, bias, table):
        out = ops.relation_attention(q, k, v, bias, mask=mask, rel_index=index, rel_table=table, backend=backend)
        return (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum()

    got, want = grads_on_both_backends(objective, (q, k, v, bias, table), (0, 1, 2, 3, 4))
    assert_all_close(got, want, ["dq", "dk", "dv", "dbias", "dtable"])

    upstream = torch.randn(2, 5, 2, 8, generator=generator).to(device)
    pulled = [torch.func.vjp(lambda q: ops.relation_attention(q, k, v, bias, mask=mask, backend=backend), q)[1](
        upstream)[0] for backend in ("triton", "reference")]
    assert_all_close(pulled[:1], pulled[1:], ["vjp dq"])

    def single(backend):
        return lambda q: ops.relation_attention(q, k[:1, :3], v[:1, :3], bias[:1, :, :3, :3], backend=backend)

    jacobians = [torch.func.jacrev(single(backend))(q[:1, :3]) for backend in ("triton", "reference")]
    assert jacobians[0].shape == (1, 3, 2, 8, 1, 3, 2, 8)
    assert_all_close(jacobians[:1], jacobians[1:], ["jacrev"])


def test_per_sample_gradients_of_a_module(generator):
    """The torch.func recipe: functional_call over the parameters, vmap of grad over the samples."""
    device = backend_device("triton")  # the reference runs there too
    layer = RelationBiasedAttention(16, 2).to(device)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x, bias = on(device, torch.randn(3, 4, 16, generator=generator), torch.randn(3, 2, 4, 4, generator=generator))

    def sample_loss(backend, params, x, bias):
        out = torch.func.functional_call(layer, params, (x[None],), {"attn_bias": bias[None], "backend": backend})
        return (out ** 2).mean()

    per_sample = {backend: torch.func.vmap(torch.func.grad(lambda p, x, b: sample_loss(backend, p, x, b)),
                                           in_dims=(None, 0, 0))(params, x, bias)
                  for backend in ("triton", "reference")}
    for name in params:
        assert per_sample["triton"][name].shape == (3, *params[name].shape)
        if name == "k_proj.bias":  # shifts every score of a row alike, which softmax ignores: 0 up to rounding
            assert per_sample["triton"][name].abs().max() < 1e-6 * per_sample["reference"]["q_proj.bias"].abs().max()
            continue
        assert_close(per_sample["triton"][name], per_sample["reference"][name], torch.float32, name)


def test_gaussian_basis_bias_parameter_gradients(generator):
    device = backend_device("triton")  # the reference runs there too
    layer = GaussianBasisBias(4, num_kernels=16, num_pair_types=8).to(device)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    mask = torch.tensor([[True] * 4, [True] * 2 + [False] * 2])
    positions = torch.randn(2, 4, 3, generator=generator)
    types = torch.randint(0, 8, (2, 4, 4, 2), generator=generator)
    mask, positions, types = on(device, mask, positions, types)

    def objective(backend, params, positions):
        layer.backend = backend
        attn, feat = torch.func.functional_call(layer, params, (positions, types, mask))
        return attn.sin().sum() + feat.cos().sum()

    got, want = grads_on_both_backends(objective, (params, positions), (0, 1))
    names = sorted(params)
    assert_all_close([got[0][n] for n in names] + [got[1]], [want[0][n] for n in names] + [want[1]],
                     names + ["positions"])


def test_path_edge_bias_and_outer_product_losses(generator):
    device = backend_device("triton")  # the reference runs there too
    bonds, mask = on(device, *chain_bonds([5, 3]))
    distances, routes = ops.shortest_path_routes(bonds, mask, max_hops=3)
    embedding, hop_weights = on(device, torch.randn(4, 2, generator=generator),
                                torch.randn(3, 2, 2, generator=generator))

    def edge_objective(backend, embedding, hop_weights):
        bias = ops.path_edge_bias(routes, distances, embedding, hop_weights, backend=backend)
        return (bias * torch.linspace(-1, 1, bias.numel(), device=device).view_as(bias)).sum()

    got, want = grads_on_both_backends(edge_objective, (embedding, hop_weights), (0, 1))
    assert_all_close(got, want, ["dembedding", "dhop_weights"])

    row, col, weight, bias, positions = on(
        device, torch.randn(2, 5, 6, generator=generator), torch.randn(2, 5, 4, generator=generator),
        torch.randn(7, 24, generator=generator) * 0.3, torch.randn(7, generator=generator),
        torch.randn(2, 5, 3, generator=generator))
    target = distances.masked_fill(distances < 0, -100)  # SPD classes; unreachable and padding ignored

    def loss_objective(backend, row, col, weight, bias):
        cross_entropy = ops.outer_product_loss(row, col, weight, bias, target, mask=mask, backend=backend)
        cosine = ops.outer_product_cosine_loss(row, col, weight[:3], bias[:3], positions, mask=mask,
                                               backend=backend)
        logits = ops.outer_product_logits(row, col, weight, bias, mask=mask, backend=backend)
        return cross_entropy + cosine + logits.tanh().sum()

    got, want = grads_on_both_backends(loss_objective, (row, col, weight, bias), (0, 1, 2, 3))
    assert_all_close(got, want, ["drow", "dcol", "dweight", "dbias"])


def test_fusion_contrastive_and_lego_modules(generator):
    device = backend_device("triton")  # the reference runs there too
    fusion = DynamicFusion({"a": 6, "b": 4}, 8).to(device)
    block = LegoBlock(6, 2, l_c=4, l_d=8, depth=1, heads=2, head_dim=4).to(device)
    embeddings = dict(zip("ab", on(device, torch.randn(5, 6, generator=generator),
                                   torch.randn(5, 4, generator=generator))))
    present = dict(zip("ab", on(device, torch.tensor([True, True, False, True, True]),
                                torch.tensor([True, False, True, True, True]))))
    tokens = torch.randn(2, 3, 6, generator=generator).to(device)
    fusion_params = {name: p.detach() for name, p in fusion.named_parameters()}
    block_params = {name: p.detach() for name, p in block.named_parameters()}

    def objective(backend, fusion_params, block_params, a):
        fusion.backend = block.backend = backend
        fused, weights = torch.func.functional_call(fusion, fusion_params, ({**embeddings, "a": a}, present))
        contrastive = ops.multi_infonce({"a": a[:, :4], "b": embeddings["b"]}, [("a", "b")], temperature=0.5,
                                        masks=present, backend=backend)
        lego = torch.func.functional_call(block, block_params, (tokens,))
        return fused.square().mean() + weights[:, 0].sum() + contrastive + lego.abs().mean()

    got, want = grads_on_both_backends(objective, (fusion_params, block_params, embeddings["a"]), (0, 1, 2))
    for ours, theirs in zip(got[:2], want[:2]):
        names = sorted(theirs)
        assert_all_close([ours[n] for n in names], [theirs[n] for n in names], names)
    assert_all_close(got[2:], want[2:], ["da"])


def test_gradient_of_a_gradient_names_the_op(generator):
    device = backend_device("triton")  # the reference runs there too
    q, k, v = on(device, *(torch.randn(1, 4, 2, 8, generator=generator) for _ in range(3)))

    def first(q):
        return torch.func.grad(lambda q: ops.relation_attention(q, k, v, backend="triton").square().sum())(q).sum()

    with pytest.raises(RuntimeError, match="relation_attention: the Triton path has first-order gradients only"):
        torch.func.grad(first)(q)
    torch.func.grad(lambda q: torch.func.grad(
        lambda q: ops.relation_attention(q, k, v, backend="reference").square().sum())(q).sum())(q)
