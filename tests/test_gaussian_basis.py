"""Pair distances and Gaussian-basis features: the C++ engine against the float64 reference, gradients."""
import math

import numpy as np
import pytest
import torch

from pyblend import layout, ops, reference

from tolerances import assert_close


def random_molecules(generator, sizes, dtype=torch.float32):
    width = max(sizes)
    pos = torch.randn(len(sizes), width, 3, generator=generator, dtype=torch.float64) * 3
    mask = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
    pos[~mask] = float("nan")  # padding is poisoned: it must never be read
    return pos.to(dtype), mask


def gaussian_parameters(generator, kernels=128, types=64, dtype=torch.float32):
    means = torch.rand(kernels, generator=generator, dtype=torch.float64) * 3
    stds = torch.rand(kernels, generator=generator, dtype=torch.float64) * 3 - 1.5  # negative widths too
    mul = 1 + 0.2 * torch.randn(types, 1, generator=generator, dtype=torch.float64)
    bias = 0.2 * torch.randn(types, 1, generator=generator, dtype=torch.float64)
    return [p.to(dtype) for p in (means, stds, mul, bias)]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_distances_padded_and_packed(generator, backend, dtype):
    pos, mask = random_molecules(generator, [1, 7, 33, 64, 5], dtype)
    distances = ops.pair_distances(pos, mask, backend=backend)
    clean = torch.where(mask[..., None], pos, 0).double()
    # Differences, not torch.cdist: cdist's matrix-product formula loses ~1e-10 in float64.
    expected = (clean[:, :, None] - clean[:, None]).norm(dim=-1) * (mask[:, :, None] & mask[:, None, :])
    assert_close(distances, expected, dtype, "padded distances")
    assert (distances[~(mask[:, :, None] & mask[:, None, :])] == 0).all()
    cu_seqlens, _ = layout.cu_seqlens_from_mask(mask)
    packed = ops.pair_distances(layout.pack_atoms(pos, mask), cu_seqlens=cu_seqlens, backend=backend)
    assert_close(packed, layout.pack_pairs(expected, mask), dtype, "packed distances")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_float64_distances_with_a_strided_mask_or_cu_seqlens(generator, backend):
    """A strided mask or cu_seqlens made the C++ engine's float overload take float64 positions (pybind11 tried it
    first, converting the mask and the positions together): the distances came back float32."""
    pos, mask = random_molecules(generator, [4, 7, 2], torch.float64)
    pos = pos + 1000  # far from the origin, where float32 keeps about 4 decimals of a distance
    strided_mask = torch.zeros(2 * mask.shape[0], mask.shape[1], dtype=torch.bool)[::2]
    strided_mask.copy_(mask)
    expected = ops.pair_distances(pos, mask, backend="reference")
    distances = ops.pair_distances(pos, strided_mask, backend=backend)
    assert distances.dtype == torch.float64
    assert_close(distances, expected, torch.float64, "padded distances")
    cu_seqlens, _ = layout.cu_seqlens_from_mask(mask)
    strided = torch.zeros(2 * cu_seqlens.numel(), dtype=cu_seqlens.dtype)[::2]
    strided.copy_(cu_seqlens)
    packed = ops.pair_distances(layout.pack_atoms(pos, mask), cu_seqlens=strided, backend=backend)
    assert packed.dtype == torch.float64
    assert_close(packed, layout.pack_pairs(expected, mask), torch.float64, "packed distances")


@pytest.mark.parametrize("types_per_pair", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_gaussian_basis_matches_float64_reference(generator, dtype, types_per_pair):
    pos, mask = random_molecules(generator, [7, 33, 12], dtype)
    distances = ops.pair_distances(pos, mask)
    shape = distances.shape + ((types_per_pair,) if types_per_pair > 1 else ())
    types = torch.randint(0, 64, shape, generator=generator)
    params = gaussian_parameters(generator, dtype=dtype)
    got = ops.gaussian_basis(distances, types, *params, backend="cpp")
    expected = reference.gaussian_basis(distances.double(), types, *[p.double() for p in params])
    assert got.dtype == dtype
    assert_close(got, expected, dtype, "gaussian features")


@pytest.mark.parametrize("backend", ["cpp", "reference", None])
@pytest.mark.parametrize("types_per_pair", [1, 2])
@pytest.mark.parametrize("layout_name, sizes", [("padded", []), ("padded", [0, 0]), ("packed", []),
                                                ("packed", [0, 0])])
def test_empty_batches(generator, backend, types_per_pair, layout_name, sizes):
    """A batch without pairs (no molecules, or only empty ones) gives features of shape distances.shape + (K,)
    on every backend, as a data loader's last, empty shard would."""
    pos, mask = torch.zeros(len(sizes), 0, 3), torch.zeros(len(sizes), 0, dtype=torch.bool)
    if layout_name == "padded":
        distances = ops.pair_distances(pos, mask, backend=backend)
        assert distances.shape == (len(sizes), 0, 0)
    else:
        cu_seqlens = torch.zeros(len(sizes) + 1, dtype=torch.int32)
        distances = ops.pair_distances(torch.zeros(0, 3), cu_seqlens=cu_seqlens, backend=backend)
        assert distances.shape == (0,)
    types = torch.zeros(distances.shape + ((types_per_pair,) if types_per_pair > 1 else ()), dtype=torch.long)
    params = gaussian_parameters(generator, kernels=6, types=4)
    features = ops.gaussian_basis(distances, types, *params, backend=backend)
    assert features.shape == (*distances.shape, 6) and features.dtype == torch.float32
    as_numpy = ops.gaussian_basis(distances.numpy(), types.numpy(), *[p.numpy() for p in params], backend=backend)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.shape == (*distances.shape, 6)


def test_gaussian_basis_formula_by_hand():
    # x = mul * d + bias = 2 * 1.5 + 0.5 = 3.5; width = |-0.99| + 0.01 = 1; z = (3.5 - 3) / 1
    expected = math.exp(-0.5 * 0.25) / math.sqrt(2 * math.pi)
    args = (torch.tensor([1.5]), torch.tensor([1]), torch.tensor([3.0]), torch.tensor([-0.99]),
            torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.5]))
    for backend in ("cpp", "reference"):
        assert ops.gaussian_basis(*args, backend=backend).item() == pytest.approx(expected, rel=1e-6)
    # two types per pair are summed (Transformer-M): mul 2 + 2, bias 0.5 + 0.5 -> x = 4 * 1.5 + 1 = 7
    summed = ops.gaussian_basis(args[0], torch.tensor([[1, 1]]), *args[2:])
    assert summed.item() == pytest.approx(math.exp(-0.5 * 16) / math.sqrt(2 * math.pi), rel=1e-6)


def test_reference_gradients_float64(generator):
    pos, mask = random_molecules(generator, [4, 3], torch.float64)
    pos = torch.where(mask[..., None], pos, 0.0).requires_grad_(True)
    types = torch.randint(0, 6, (2, 4, 4, 2), generator=generator)
    params = [p.requires_grad_(True) for p in gaussian_parameters(generator, kernels=5, types=6,
                                                                  dtype=torch.float64)]

    def features(pos, means, stds, mul, bias):
        # The diagonal (d = 0) has no derivative in pos; keep only distinct pairs.
        off_diagonal = ~torch.eye(4, dtype=torch.bool)
        distances = ops.pair_distances(pos + 0.0, mask)
        return ops.gaussian_basis(distances, types, means, stds, mul, bias)[:, off_diagonal]

    assert torch.autograd.gradcheck(features, (pos, *params))


def test_reference_second_derivatives_float64(generator):
    """A gradient of a gradient (training on forces) through the distances, the diagonal's zero vectors included:
    torch's norm has a NaN second derivative at zero, which made every entry of d2/dpos2 NaN."""
    pos, mask = random_molecules(generator, [4, 3], torch.float64)
    pos = torch.where(mask[..., None], pos, 0.0).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda p: ops.pair_distances(p, mask, backend="reference"), (pos,))


def test_nan_padding_never_reaches_gradients(generator):
    pos, mask = random_molecules(generator, [5, 2], torch.float32)
    pos.requires_grad_(True)
    distances = ops.pair_distances(pos, mask)
    means, stds, mul, bias = gaussian_parameters(generator, kernels=8, types=4)
    features = ops.gaussian_basis(distances, torch.zeros_like(distances, dtype=torch.long), means, stds, mul, bias)
    features.sum().backward()
    assert torch.isfinite(distances).all() and torch.isfinite(features).all()
    assert torch.isfinite(pos.grad).all()
    assert (pos.grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_precision(generator, dtype):
    pos, mask = random_molecules(generator, [9, 20], torch.float32)
    distances = ops.pair_distances(pos, mask)
    types = torch.randint(0, 64, distances.shape, generator=generator)
    params = [p.to(dtype) for p in gaussian_parameters(generator)]
    distances = distances.to(dtype)
    # The reference sees the same rounded inputs: the bound is on the op's own error, not on the inputs'.
    expected = reference.gaussian_basis(distances.double(), types, *[p.double() for p in params])
    got = ops.gaussian_basis(distances, types, *params)
    assert got.dtype == dtype
    assert_close(got, expected, dtype, "half-precision features")


def test_automatic_dispatch_keeps_autograd(generator):
    distances = torch.rand(3, 3, generator=generator, requires_grad=True)
    params = gaussian_parameters(generator, kernels=4, types=2)
    out = ops.gaussian_basis(distances, torch.zeros(3, 3, dtype=torch.long), *params)
    assert out.grad_fn is not None, "an input requiring grad must take the differentiable path"
    with pytest.raises(ValueError, match="requires grad"):
        ops.gaussian_basis(distances, torch.zeros(3, 3, dtype=torch.long), *params, backend="cpp")
    with torch.no_grad():
        assert ops.gaussian_basis(distances, torch.zeros(3, 3, dtype=torch.long), *params).grad_fn is None


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_zero_dimensional_numpy_distance(generator, backend):
    """One distance as a 0-d numpy array is one pair, as a 0-d tensor is: numpy's ascontiguousarray made it 1-d, so
    the features came back (1, K) and two types per pair, shape (2,), were refused."""
    params = gaussian_parameters(generator, kernels=5, types=3, dtype=torch.float64)
    distance, types = torch.tensor(1.5, dtype=torch.float64), torch.tensor([0, 2])
    for pair_types in (types[0], types):
        expected = ops.gaussian_basis(distance, pair_types, *params, backend="reference")
        features = ops.gaussian_basis(distance.numpy(), pair_types.numpy(), *[p.numpy() for p in params],
                                      backend=backend)
        assert isinstance(features, np.ndarray) and features.shape == (5,)
        assert_close(torch.from_numpy(features), expected, torch.float64, "features of one pair")


def test_numpy_arrays_in_the_other_byte_order(generator):
    """An array not in this machine's byte order (big-endian data read from a file, say) was refused by torch.from_numpy's own error, which names no
    argument; its values are now read as they are."""
    pos, mask = random_molecules(generator, [3, 4], torch.float64)
    expected = ops.pair_distances(pos.numpy(), mask.numpy())
    swapped = pos.numpy().astype(pos.numpy().dtype.newbyteorder("S"))
    assert not swapped.dtype.isnative
    np.testing.assert_array_equal(ops.pair_distances(swapped, mask.numpy()), expected)


def test_numpy_in_numpy_out(generator):
    pos, mask = random_molecules(generator, [3, 4], torch.float64)
    distances = ops.pair_distances(pos.numpy(), mask.numpy())
    assert isinstance(distances, np.ndarray) and distances.dtype == np.float64
    params = [p.numpy() for p in gaussian_parameters(generator, kernels=6, types=3, dtype=torch.float64)]
    features = ops.gaussian_basis(distances, np.zeros(distances.shape, dtype=np.int64), *params)
    assert isinstance(features, np.ndarray) and features.shape == (2, 4, 4, 6)


@pytest.mark.parametrize("call, error, words", [
    (lambda p: ops.pair_distances(torch.zeros(2, 3, 2)), ValueError, ["pos", "(B, N, 3)"]),
    (lambda p: ops.pair_distances(torch.zeros(2, 3, 3, dtype=torch.long)), TypeError, ["pos", "int64"]),
    (lambda p: ops.pair_distances(torch.zeros(2, 3, 3), torch.ones(2, 2, dtype=torch.bool)), ValueError, ["mask"]),
    (lambda p: ops.pair_distances(torch.zeros(5, 3), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)),
     ValueError, ["cu_seqlens", "4 atoms", "5"]),
    (lambda p: ops.gaussian_basis(torch.zeros(2, 2), torch.full((2, 2), 64), *p), ValueError,
     ["pair_types", "[0, 64)", "64"]),
    (lambda p: ops.gaussian_basis(torch.zeros(2, 2), torch.zeros(2, 3, dtype=torch.long), *p), ValueError,
     ["pair_types", "(2, 2)"]),
    (lambda p: ops.gaussian_basis(torch.zeros(2, 2), torch.zeros(2, 2), *p), TypeError, ["pair_types"]),
    (lambda p: ops.gaussian_basis(torch.zeros(2), torch.zeros(2, dtype=torch.long), p[0], p[1][:3], p[2], p[3]),
     ValueError, ["stds", "(K,)"]),
    (lambda p: ops.gaussian_basis(torch.zeros(2), torch.zeros(2, dtype=torch.long), p[0], p[1], p[2],
                                  p[3][:5]), ValueError, ["bias", "num_types"]),
    (lambda p: ops.gaussian_basis(torch.zeros(2).double(), torch.zeros(2, dtype=torch.long), *p, backend="cpp"),
     ValueError, ["one dtype"]),
])
def test_bad_input_is_named(generator, call, error, words):
    params = gaussian_parameters(generator)
    with pytest.raises(error) as info:
        call(params)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_meta_inputs_give_meta_features_and_skip_the_range_check(generator):
    """Every input on the meta device (shape inference, FLOP counting) raised "Tensor.item() cannot be called on
    meta tensors" from the pair_types range check: where values are hidden it is skipped, as in the other ops."""
    params = [p.to("meta") for p in gaussian_parameters(generator, kernels=8, types=3)]
    distances = torch.empty(2, 4, 4, device="meta")
    for types in (torch.empty(2, 4, 4, dtype=torch.long, device="meta"),
                  torch.empty(2, 4, 4, 2, dtype=torch.int32, device="meta")):
        out = ops.gaussian_basis(distances, types, *params)
        assert out.device.type == "meta" and out.shape == (2, 4, 4, 8) and out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"pair_types: expected shape \(2, 4, 4\)"):
        ops.gaussian_basis(distances, torch.empty(2, 4, 3, dtype=torch.long, device="meta"), *params)


def test_first_call_in_a_compiled_region_loads_the_engine(generator, monkeypatch):
    """The C++ engine not yet loaded (no eager call before): choosing the backend inside torch.compile used to
    import it there, which Dynamo refuses, so fullgraph compiles of the padded data-pipeline ops failed."""
    from pyblend import _extension

    monkeypatch.setattr(_extension, "_MODULE", None)
    positions, mask = random_molecules(generator, [5, 3])
    adjacency = torch.rand(2, 5, 5, generator=generator) < 0.4
    types = torch.randint(0, 64, (2, 5, 5), generator=generator)
    params = gaussian_parameters(generator, kernels=8)

    def relations(positions, adjacency, mask):
        distances = ops.pair_distances(positions, mask)
        return (distances, ops.gaussian_basis(distances, types, *params),
                ops.shortest_path(adjacency | adjacency.mT, mask))

    torch._dynamo.reset()
    compiled = torch.compile(relations, backend="eager", fullgraph=True)
    for got, expected in zip(compiled(positions, adjacency, mask), relations(positions, adjacency, mask)):
        assert torch.equal(got, expected)


def test_opcheck_cpp_ops(generator):
    pos, mask = random_molecules(generator, [3, 5], torch.float32)
    pos = torch.where(mask[..., None], pos, 0.0)
    cu_seqlens, _ = layout.cu_seqlens_from_mask(mask)
    torch.library.opcheck(torch.ops.pyblend.pair_distances_cpp, (pos, mask, None))
    torch.library.opcheck(torch.ops.pyblend.pair_distances_cpp, (layout.pack_atoms(pos, mask), None, cu_seqlens))
    distances = ops.pair_distances(pos, mask)
    means, stds, mul, bias = gaussian_parameters(generator, kernels=8, types=4)
    types = torch.randint(0, 4, (2, 5, 5, 2), generator=generator)
    torch.library.opcheck(torch.ops.pyblend.gaussian_basis_cpp,
                          (distances, types, means, stds, mul.reshape(-1), bias.reshape(-1)))
