"""Fused Gaussian-basis bias: the reference against a re-implementation of the public GaussianLayer + NonLinear,
the Triton kernels (interpreter on the CPU) against the float64 reference (both outputs, every gradient), and
the GaussianBasisBias module.

Every check draws fresh inputs, poisons padded atoms with NaN (and padded pairs with out-of-range type ids) and
compares against the float64 reference computed from the same rounded inputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from pyblend.kernels.gaussian_basis_bias import _launch_config
from pyblend.layout import pack_atoms, pack_pairs
from pyblend.nn.gaussian_basis_bias import GaussianBasisBias
from pyblend.ops.gaussian_basis_bias import gaussian_basis_bias
from pyblend.reference.gaussian_basis_bias import gaussian_basis_bias as reference

from allocations import Allocations
from graphs import backend_device
from hopper import run_compile_script
from tolerances import assert_close

HAS_CUDA = torch.cuda.is_available()
# bf16 arithmetic is wrong in Triton's interpreter: bf16 runs on the GPU only.
INTERPRETER_DTYPES = [torch.float32, torch.float16]
PARAMETERS = ("means", "stds", "mul", "bias", "w1", "b1", "w2", "b2")
GRADIENTS = ("dpositions",) + tuple("d" + name for name in PARAMETERS)
NUM_TYPES = 7


def random_problem(generator, sizes, kernels=16, hidden=16, heads=4, two_types=True, width=None, holes=False):
    """Padded float64 problem: positions (B, N, 3) with NaN at padded atoms, pair types (B, N, N[, 2]) with
    out-of-range ids at padded pairs, mask (B, N), and the eight parameters (plausible magnitudes: the
    Gaussians overlap the distances, the MLP keeps activations O(1)). ``holes``: real atoms not a prefix."""
    width = width or max(max(sizes), 1)
    batch = len(sizes)
    if holes:
        mask = torch.zeros(batch, width, dtype=torch.bool)
        for b, size in enumerate(sizes):
            mask[b, torch.randperm(width, generator=generator)[:size]] = True
    else:
        mask = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
    positions = torch.randn(batch, width, 3, generator=generator, dtype=torch.float64) * 1.5
    positions[~mask] = float("nan")
    shape = (batch, width, width, 2) if two_types else (batch, width, width)
    types = torch.randint(0, NUM_TYPES, shape, generator=generator)
    pairs = mask[:, :, None] & mask[:, None, :]
    types[~pairs] = 10**6  # never read
    params = dict(
        means=torch.rand(kernels, generator=generator, dtype=torch.float64) * 4,
        stds=(torch.rand(kernels, generator=generator, dtype=torch.float64) * 2 + 0.3)
        * torch.where(torch.rand(kernels, generator=generator) < 0.3, -1.0, 1.0).double(),  # |stds| matters
        mul=1 + 0.3 * torch.randn(NUM_TYPES, 1, generator=generator, dtype=torch.float64),
        bias=0.3 * torch.randn(NUM_TYPES, 1, generator=generator, dtype=torch.float64),
        w1=torch.randn(hidden, kernels, generator=generator, dtype=torch.float64) / math.sqrt(kernels) * 2,
        b1=0.5 * torch.randn(hidden, generator=generator, dtype=torch.float64),
        w2=torch.randn(heads, hidden, generator=generator, dtype=torch.float64) / math.sqrt(hidden),
        b2=0.5 * torch.randn(heads, generator=generator, dtype=torch.float64),
    )
    return positions, types, mask, params


def packed_form(positions, types, mask):
    """The packed layout of a padded problem with prefix masks: (positions (T, 3), types (P[, 2]), cu_seqlens)."""
    counts = mask.sum(1)
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(counts, 0)
    return pack_atoms(positions, mask), pack_pairs(types, mask), cu


def run(backend, positions, types, params, dtype, *, mask=None, cu_seqlens=None, grads=None, generator=None,
        std_eps=1e-2, use=("attn", "feat")):
    """Outputs and gradients {name: CPU tensor} with every float input cast to ``dtype``; ``grads`` are the
    upstream gradients of (attn_bias, atom_features) (drawn from ``generator`` if None, returned under "upstream")."""
    target = torch.device("cpu") if backend == "reference" else backend_device(backend)
    leaves = [positions.detach().to(target, dtype).requires_grad_()]
    leaves += [params[name].detach().to(target, dtype).requires_grad_() for name in PARAMETERS]
    move = lambda x: None if x is None else x.to(target)  # noqa: E731
    if backend == "reference":
        attn, feat = reference(leaves[0], types, *leaves[1:], mask=mask, cu_seqlens=cu_seqlens, std_eps=std_eps)
    else:
        attn, feat = gaussian_basis_bias(leaves[0], types.to(target), *leaves[1:], mask=move(mask),
                                         cu_seqlens=move(cu_seqlens), std_eps=std_eps, backend=backend)
    if grads is None:
        grads = (torch.randn(attn.shape, generator=generator, dtype=torch.float64),
                 torch.randn(feat.shape, generator=generator, dtype=torch.float64))
    objective = 0
    if "attn" in use:
        objective = objective + (attn.double() * grads[0].to(target)).sum()
    if "feat" in use:
        objective = objective + (feat.double() * grads[1].to(target)).sum()
    objective.backward()
    found = {"attn_bias": attn.detach().cpu(), "atom_features": feat.detach().cpu(), "upstream": grads}
    # A parameter the used output does not depend on (the MLP's, for the features alone) has no gradient: None.
    found.update({name: None if leaf.grad is None else leaf.grad.detach().cpu()
                  for name, leaf in zip(GRADIENTS, leaves)})
    return found


def compare(got, expected, dtype, atom_mask=None):
    for name, ref in expected.items():
        if name == "upstream":
            continue
        out = got[name]
        if ref is None or out is None:
            assert out is None and ref is None, f"{name}: {'no' if out is None else 'a'} gradient, against " \
                f"{'none' if ref is None else 'one'} on the reference"
            continue
        if name == "dpositions" and atom_mask is not None:
            assert (out[~atom_mask] == 0).all(), "dpositions: nonzero at padded atoms"
            out, ref = out[atom_mask], ref[atom_mask]
        assert_close(out, ref, dtype, name)


def check_against_reference(generator, sizes, dtype, packed=False, two_types=True, holes=False, **options):
    positions, types, mask, params = random_problem(generator, sizes, two_types=two_types, holes=holes, **options)
    if packed:
        positions, types, cu = packed_form(positions, types, mask)
        kwargs, atom_mask = dict(cu_seqlens=cu), None
    else:
        kwargs, atom_mask = dict(mask=mask), mask
    rounded = {name: x.to(dtype).double() for name, x in params.items()}
    got = run("triton", positions, types, params, dtype, generator=generator, **kwargs)
    received = tuple(g.to(dtype).double() for g in got["upstream"])  # as the op receives them, in its dtype
    expected = run("reference", positions.to(dtype).double(), types, rounded, torch.float64, grads=received,
                   **kwargs)
    assert got["attn_bias"].dtype == dtype and got["atom_features"].dtype == dtype
    compare(got, expected, dtype, atom_mask)
    return got, expected


# ------------------------------------------------------------------------------------------- reference


def public_layers(positions, types, mask, params, std_eps):
    """The public GaussianLayer + NonLinear (Uni-Mol / Transformer-M), written out on (B, N, N, K), float64:
    pair distances of all atoms, mul/bias embeddings summed over the pair's ids, K Gaussians, Linear-GELU-Linear,
    then Transformer-M's masking: bias of padded keys dropped, features of padded j zeroed and summed over j."""
    pos = torch.where(mask[..., None], positions, 0.0)
    dist = (pos.unsqueeze(1) - pos.unsqueeze(2)).norm(dim=-1)
    types = torch.where((mask[:, :, None] & mask[:, None, :])[..., None] if types.dim() == 4 else
                        mask[:, :, None] & mask[:, None, :], types, 0)
    mul = F.embedding(types, params["mul"])
    add = F.embedding(types, params["bias"])
    if types.dim() == 4:
        mul, add = mul.sum(dim=-2), add.sum(dim=-2)
    x = (mul * dist.unsqueeze(-1) + add).expand(-1, -1, -1, params["means"].shape[0])
    std = params["stds"].abs() + std_eps
    # The public code writes pi = 3.14159; math.pi here, as the op documents.
    g = torch.exp(-0.5 * ((x - params["means"]) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
    out = F.linear(F.gelu(F.linear(g, params["w1"], params["b1"])), params["w2"], params["b2"])
    padding = ~mask
    feat = g.masked_fill(padding[:, None, :, None], 0.0).sum(dim=-2)
    return out.permute(0, 3, 1, 2), feat


@pytest.mark.parametrize("two_types, std_eps", [(True, 1e-2), (False, 1e-5)])
def test_reference_matches_public_layers(generator, two_types, std_eps):
    """Transformer-M (two ids, 1e-2) and Uni-Mol (one id, 1e-5) semantics, the diagonal included."""
    positions, types, mask, params = random_problem(generator, [9, 4, 1], two_types=two_types)
    attn, feat = reference(positions, types, *params.values(), mask=mask, std_eps=std_eps)
    want_attn, want_feat = public_layers(positions, types, mask, params, std_eps)
    pairs = mask[:, None, :, None] & mask[:, None, None, :]
    torch.testing.assert_close(attn[pairs.expand_as(attn)], want_attn[pairs.expand_as(attn)], rtol=1e-12, atol=1e-12)
    assert (attn[~pairs.expand_as(attn)] == 0).all()
    torch.testing.assert_close(feat[mask], want_feat[mask], rtol=1e-12, atol=1e-12)
    assert (feat[~mask] == 0).all()


def test_reference_packed_equals_padded(generator):
    positions, types, mask, params = random_problem(generator, [6, 1, 3])
    attn, feat = reference(positions, types, *params.values(), mask=mask)
    packed_positions, packed_types, cu = packed_form(positions, types, mask)
    packed_attn, packed_feat = reference(packed_positions, packed_types, *params.values(), cu_seqlens=cu)
    torch.testing.assert_close(packed_attn, pack_pairs(attn.permute(0, 2, 3, 1), mask).t(), rtol=0, atol=0)
    torch.testing.assert_close(packed_feat, feat[mask], rtol=0, atol=0)


def test_reference_gradcheck_float64(generator):
    positions, types, mask, params = random_problem(generator, [4, 2], kernels=4, hidden=3, heads=2)
    positions = positions.nan_to_num().requires_grad_()
    leaves = [params[name].requires_grad_() for name in PARAMETERS]
    assert torch.autograd.gradcheck(lambda p, *w: reference(p, types, *w, mask=mask), (positions, *leaves))


def test_reference_second_derivatives_float64(generator):
    """Training on forces differentiates d(bias)/d(positions) again: finite through the zero-length diagonal."""
    positions, types, mask, params = random_problem(generator, [3, 2], kernels=3, hidden=3, heads=2)
    positions = positions.nan_to_num().requires_grad_()
    w1 = params.pop("w1").requires_grad_()
    assert torch.autograd.gradgradcheck(lambda p, w1: reference(p, types, w1=w1, mask=mask, **params),
                                        (positions, w1))


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("two_types", [True, False], ids=["two_ids", "one_id"])
def test_matches_reference(generator, dtype, packed, two_types):
    """Ragged molecules: 13 atoms (two i tiles), a single atom, an empty molecule, 6 atoms."""
    check_against_reference(generator, [13, 1, 0, 6], dtype, packed=packed, two_types=two_types)


def test_mask_with_holes_and_wider_mlp(generator):
    """Real atoms scattered through the padded width, K = 24 (not a power of two), K_hidden = 72 (several hidden
    chunks), H = 5."""
    check_against_reference(generator, [5, 9, 0], torch.float32, holes=True, width=11, kernels=24, hidden=72,
                            heads=5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_float32_tiles_of_wide_mlps(generator, packed):
    """float32 launches take their own tiles where K > 128 (hidden chunks of 16 in the forward and pairs kernels)
    or H > 64 (4 x 4 pair tiles in the forward and weights kernels): K = 130, K_hidden = 40 (not a multiple of the
    chunk), H = 66, molecules of 9, 6 and 1 atoms (ragged 4-row tiles)."""
    for kernel, tiles in (("forward", dict(BLOCK_I=4, BLOCK_C=16)), ("pairs", dict(BLOCK_I=4, BLOCK_C=16)),
                          ("weights", dict(BLOCK_I=4))):
        config = _launch_config(kernel, 9, 130, 40, 66, torch.float32)
        assert {name: config[name] for name in tiles} == tiles, f"{kernel}: {config}"
    check_against_reference(generator, [9, 6, 1], torch.float32, packed=packed, kernels=130, hidden=40, heads=66)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_half_precision_tiles_past_128_kernels(generator, packed):
    """16-bit weights with K > 128 take half-height pair tiles (4 x 4) in every kernel: K = 130 (past a 128 block),
    K_hidden = 40, molecules of 9, 6 and 1 atoms."""
    for kernel in ("forward", "pairs", "weights"):
        assert _launch_config(kernel, 9, 130, 40, 5, torch.float16)["BLOCK_I"] == 4, kernel
    check_against_reference(generator, [9, 6, 1], torch.float16, packed=packed, kernels=130, hidden=40, heads=5)


def test_single_output_gradients(generator):
    """Gradients through the bias alone and through the atom features alone."""
    positions, types, mask, params = random_problem(generator, [7, 3])
    for use in (("attn",), ("feat",)):
        got = run("triton", positions, types, params, torch.float32, mask=mask, use=use, generator=generator)
        expected = run("reference", positions, types, params, torch.float64, mask=mask, use=use,
                       grads=got["upstream"])
        compare(got, expected, torch.float32, mask)


def test_padding_does_not_leak_and_is_deterministic(generator):
    """NaN positions and out-of-range ids at padding: bit-identical to zero-filled padding, and run to run."""
    positions, types, mask, params = random_problem(generator, [10, 3, 0])
    pairs = mask[:, :, None] & mask[:, None, :]
    clean_positions = torch.where(mask[..., None], positions, 0.0)
    clean_types = torch.where(pairs[..., None], types, 0)
    first = run("triton", positions, types, params, torch.float32, mask=mask, generator=generator)
    second = run("triton", positions, types, params, torch.float32, mask=mask, grads=first["upstream"])
    clean = run("triton", clean_positions, clean_types, params, torch.float32, mask=mask, grads=first["upstream"])
    for name, value in first.items():
        if name == "upstream":
            continue
        assert torch.isfinite(value).all(), f"{name}: not finite"
        assert torch.equal(value, second[name]), f"{name}: not deterministic"
        assert torch.equal(value, clean[name]), f"{name}: depends on what padding holds"
    padded_pairs = ~pairs[:, None].expand_as(first["attn_bias"])
    assert (first["attn_bias"][padded_pairs] == 0).all()
    assert (first["atom_features"][~mask] == 0).all()


def test_automatic_backend_on_cpu_is_the_reference(generator):
    if HAS_CUDA:
        pytest.skip("on a GPU machine CPU tensors still go to the reference, but TRITON_INTERPRET is unset")
    positions, types, mask, params = random_problem(generator, [5, 2])
    params = {name: x.float() for name, x in params.items()}
    ours = gaussian_basis_bias(positions.float(), types, *params.values(), mask=mask)
    theirs = reference(positions.float(), types, *params.values(), mask=mask)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_triton_path_allocates_no_pair_features(generator, packed):
    """Forward and backward: no tensor with a third of the elements of the (B, N, N, K) features (the recorder
    does see them: the reference path trips it)."""
    positions, types, mask, params = random_problem(generator, [20, 17], kernels=32, hidden=32, heads=4)
    positions = torch.where(mask[..., None], positions, 0.0)
    kwargs = dict(mask=mask)
    if packed:
        positions, types, cu = packed_form(positions, types, mask)
        kwargs = dict(cu_seqlens=cu)
    features = 2 * 20 * 20 * 32
    target = backend_device("triton")
    leaves = [positions.float().to(target).requires_grad_()]
    leaves += [params[name].float().to(target).requires_grad_() for name in PARAMETERS]
    kwargs = {k: v.to(target) for k, v in kwargs.items()}
    for backend in ("reference", "triton"):
        with Allocations() as record:
            attn, feat = gaussian_basis_bias(leaves[0], types.to(target), *leaves[1:], **kwargs, backend=backend)
            (attn.sum() + feat.square().sum()).backward()
        if backend == "reference":
            assert max(record.sizes) >= features, "the recorder missed the features"
        else:
            assert max(record.sizes) < features / 3, \
                f"a tensor of {max(record.sizes)} elements ((B, N, N, K): {features})"


# ------------------------------------------------------------------------------------- torch.compile


def op_arguments(generator, packed, target):
    positions, types, mask, params = random_problem(generator, [6, 3])
    positions = torch.where(mask[..., None], positions, 0.0)
    cu = None
    if packed:
        positions, types, cu = packed_form(positions, types, mask)
        mask = None
    leaves = [positions.float().to(target).requires_grad_()]
    leaves += [params[name].float().to(target).reshape(-1 if name in ("mul", "bias") else params[name].shape)
               .detach().requires_grad_() for name in PARAMETERS]
    move = lambda x: None if x is None else x.to(target)  # noqa: E731
    return leaves, types.to(target), move(mask), move(cu), 6 if packed else positions.shape[1]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck(generator, packed):
    target = backend_device("triton")
    leaves, types, mask, cu, width = op_arguments(generator, packed, target)
    arguments = (leaves[0], types, *leaves[1:], mask, cu, width, 1e-2)
    torch.library.opcheck(torch.ops.pyblend.gaussian_basis_bias.default, arguments)
    attn, feat = torch.ops.pyblend.gaussian_basis_bias(*arguments)
    dattn, dfeat = torch.randn_like(attn), torch.randn_like(feat)
    plain = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in arguments)
    # The backward op's own derivative only raises (no double backward): checked on plain tensors.
    torch.library.opcheck(torch.ops.pyblend.gaussian_basis_bias_backward.default, (dattn, dfeat, *plain))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_torch_compile_traces_the_op(generator, packed):
    target = backend_device("triton")
    leaves, types, mask, cu, _ = op_arguments(generator, packed, target)

    def objective(positions, means, stds, mul, bias, w1, b1, w2, b2):
        attn, feat = gaussian_basis_bias(positions, types, means, stds, mul, bias, w1, b1, w2, b2, mask=mask,
                                         cu_seqlens=cu, max_seqlen=6 if packed else None, backend="triton")
        return attn.square().sum() + (feat * torch.arange(feat.shape[-1], device=feat.device)).sum()

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(objective(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs)


# ------------------------------------------------------------------------------------------ validation


def test_numpy_scalar_std_eps(generator):
    """np.float32 std_eps was refused by the op and the module as "expected a finite float > 0"."""
    import numpy as np

    positions, types, mask, params = random_problem(generator, [4, 3])
    params = {name: x.float() for name, x in params.items()}
    positions = positions.float()
    got = gaussian_basis_bias(positions, types, mask=mask, **params, std_eps=np.float32(1e-2), backend="reference")
    want = gaussian_basis_bias(positions, types, mask=mask, **params, std_eps=float(np.float32(1e-2)),
                               backend="reference")
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(got, want))
    assert GaussianBasisBias(4, num_kernels=8, num_pair_types=16, std_eps=np.float32(1e-5)).std_eps == \
        float(np.float32(1e-5))


def test_errors_name_the_argument(generator):
    positions, types, mask, params = random_problem(generator, [4, 3])
    positions = positions.float().nan_to_num()
    params = {name: x.float() for name, x in params.items()}
    packed_positions, packed_types, cu = packed_form(positions, types, mask)
    cases = [
        (dict(positions=positions[0]), ValueError, "positions: expected the padded layout (B, N, 3)"),
        (dict(positions=positions.long()), TypeError, "positions: expected dtype"),
        (dict(pair_types=types.float()), TypeError, "pair_types: expected dtype"),
        (dict(pair_types=types[..., :1]), ValueError, "pair_types: expected the padded shape"),
        (dict(pair_types=types[:, :3]), ValueError, "pair_types: expected the padded shape"),
        (dict(pair_types=torch.where(mask[:, :, None, None] & mask[:, None, :, None], types, 0) + NUM_TYPES - 1),
         ValueError, f"pair_types: expected ids in [0, {NUM_TYPES})"),
        (dict(means=params["means"][:5]), ValueError, "means: expected shape (K,)"),
        (dict(stds=params["stds"].double()), TypeError, "stds: expected the dtype of w1"),
        (dict(mul=params["mul"][:, None]), ValueError, "mul: expected shape (n_types, 1)"),
        (dict(bias=params["bias"][:3]), ValueError, "bias: expected shape (n_types, 1)"),
        (dict(w1=params["w1"][0]), ValueError, "w1: expected shape (K_hidden, K)"),
        (dict(b1=params["b1"][:2]), ValueError, "b1: expected shape (K_hidden,)"),
        (dict(w2=params["w2"][:, :3]), ValueError, "w2: expected shape (H, K_hidden)"),
        (dict(b2=params["b2"][:1]), ValueError, "b2: expected shape (H,)"),
        (dict(mask=mask.float()), TypeError, "mask: expected dtype bool"),
        (dict(mask=mask[:, :2]), ValueError, "mask: expected shape (B, N)"),
        (dict(std_eps=0.0), ValueError, "std_eps: expected a finite float > 0"),
        (dict(max_seqlen=9), ValueError, "max_seqlen: the padded layout reads N"),
        (dict(positions=packed_positions, pair_types=packed_types, cu_seqlens=cu, mask=None, max_seqlen=2),
         ValueError, "max_seqlen: expected an int >= the longest molecule"),
        (dict(positions=packed_positions, pair_types=packed_types[:-1], cu_seqlens=cu, mask=None), ValueError,
         "pair_types: expected the packed shape (P,) or (P, 2)"),
        (dict(positions=packed_positions, pair_types=packed_types, cu_seqlens=cu), ValueError,
         "mask: the packed layout"),
        (dict(positions=packed_positions, pair_types=packed_types, cu_seqlens=cu.long(), mask=None), ValueError,
         "cu_seqlens: expected an int32 tensor"),
        (dict(positions=positions, cu_seqlens=cu, mask=None), ValueError, "positions: expected the packed layout"),
        (dict(backend="cpp"), ValueError, "has no 'cpp' backend"),
        (dict(positions=positions.double(), **{n: params[n].double() for n in PARAMETERS}, backend="triton"),
         ValueError, "float16, bfloat16 or float32"),
    ]
    for overrides, error, message in cases:
        arguments = dict(positions=positions, pair_types=types, **params, mask=mask)
        arguments.update(overrides)
        ordered = [arguments.pop(name) for name in ("positions", "pair_types", *PARAMETERS)]
        with pytest.raises(error) as caught:
            gaussian_basis_bias(*ordered, **arguments)
        assert message in str(caught.value), f"{overrides.keys()}: {caught.value}"


# --------------------------------------------------------------------------------------------- module


def public_state_dict(generator, heads, kernels, num_types, unimol=False):
    """A state dict with the public names: Transformer-M's NonLinear (layer1/2) or Uni-Mol's NonLinearHead
    (linear1/2) for gbf_proj. The stds stay >= 0.3 as in random_problem (the public init draws U(0, 3)): a
    Gaussian of std s amplifies the float32 rounding of its argument by about |x - mean| / s^2, so a std near 0.01
    alone took the float32 bias past its bound (1.2e-5 at seed 3864420466), which is conditioning, not mapping."""
    linear = ("linear1", "linear2") if unimol else ("layer1", "layer2")
    return {
        "gbf.means.weight": torch.rand(1, kernels, generator=generator) * 3,
        "gbf.stds.weight": 0.3 + torch.rand(1, kernels, generator=generator) * 2.7,
        "gbf.mul.weight": 1 + 0.2 * torch.randn(num_types, 1, generator=generator),
        "gbf.bias.weight": 0.2 * torch.randn(num_types, 1, generator=generator),
        f"gbf_proj.{linear[0]}.weight": torch.randn(kernels, kernels, generator=generator) / kernels**0.5,
        f"gbf_proj.{linear[0]}.bias": 0.1 * torch.randn(kernels, generator=generator),
        f"gbf_proj.{linear[1]}.weight": torch.randn(heads, kernels, generator=generator) / kernels**0.5,
        f"gbf_proj.{linear[1]}.bias": 0.1 * torch.randn(heads, generator=generator),
    }


@pytest.mark.parametrize("unimol", [False, True], ids=["transformer_m", "unimol"])
def test_module_loads_public_state_dict(generator, unimol):
    mode, std_eps = ("single", 1e-5) if unimol else ("sum2", 1e-2)
    layer = GaussianBasisBias(4, num_kernels=16, num_pair_types=NUM_TYPES, std_eps=std_eps, pair_type_mode=mode)
    state = public_state_dict(generator, 4, 16, NUM_TYPES, unimol=unimol)
    layer.load_state_dict(dict(state), strict=True)
    assert sorted(layer.state_dict()) == sorted(k.replace("linear", "layer") for k in state)
    positions, types, mask, _ = random_problem(generator, [6, 2], two_types=not unimol)
    positions = positions.float()
    attn, feat = layer(positions, types, mask)
    linear = ("linear1", "linear2") if unimol else ("layer1", "layer2")
    params = {"means": state["gbf.means.weight"].view(-1), "stds": state["gbf.stds.weight"].view(-1),
              "mul": state["gbf.mul.weight"], "bias": state["gbf.bias.weight"],
              "w1": state[f"gbf_proj.{linear[0]}.weight"], "b1": state[f"gbf_proj.{linear[0]}.bias"],
              "w2": state[f"gbf_proj.{linear[1]}.weight"], "b2": state[f"gbf_proj.{linear[1]}.bias"]}
    want_attn, want_feat = public_layers(positions.double(), types, mask, {k: v.double() for k, v in params.items()},
                                         std_eps)
    pairs = (mask[:, None, :, None] & mask[:, None, None, :]).expand_as(attn)
    assert_close(attn[pairs], want_attn[pairs], torch.float32, "attn_bias")
    assert_close(feat[mask], want_feat[mask], torch.float32, "atom_features")


def test_module_inits_shapes_and_repr(generator):
    layer = GaussianBasisBias(4, num_kernels=16, num_pair_types=NUM_TYPES, hidden=8, backend="triton")
    gbf = layer.gbf
    assert gbf.means.weight.shape == (1, 16) and gbf.stds.weight.shape == (1, 16)
    assert ((gbf.means.weight >= 0) & (gbf.means.weight <= 3)).all()
    assert (gbf.mul.weight == 1).all() and (gbf.bias.weight == 0).all() and gbf.mul.weight.shape == (NUM_TYPES, 1)
    assert layer.gbf_proj.layer1.weight.shape == (8, 16) and layer.gbf_proj.layer2.weight.shape == (4, 8)
    assert "num_heads=4, num_kernels=16, num_pair_types=7, hidden=8, std_eps=0.01, pair_type_mode='sum2'" in \
        repr(layer)
    positions, types, mask, _ = random_problem(generator, [5, 3])
    positions = torch.where(mask[..., None], positions, 0.0).float()
    packed_positions, packed_types, cu = packed_form(positions, types, mask)
    attn, feat = layer(packed_positions, packed_types, cu_seqlens=cu, max_seqlen=5)
    assert attn.shape == (4, 25 + 9) and feat.shape == (8, 16)
    (attn.sum() + feat.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    layer.backend = "reference"
    ref_attn, ref_feat = layer(packed_positions, packed_types, cu_seqlens=cu, max_seqlen=5)
    assert_close(attn, ref_attn, torch.float32, "attn_bias")
    assert_close(feat, ref_feat, torch.float32, "atom_features")
    with pytest.raises(ValueError, match="pair_types: pair_type_mode='sum2' expects"):
        layer(positions, types[..., 0], mask)
    # Inputs on another device than the module: the op's message blamed the parameters ("means: ... like
    # positions").
    with pytest.raises(ValueError, match="positions: expected a tensor on cpu like the module's parameters; got"):
        layer(positions.to("meta"), types.to("meta"), mask.to("meta"))
    with pytest.raises(ValueError, match="pair_type_mode: expected one of"):
        GaussianBasisBias(4, pair_type_mode="pairs")
    # Refused at construction (they used to fail only at the first forward, or unnamed: float('x')).
    for std_eps in (0, -1e-2, float("nan"), "x"):
        with pytest.raises(ValueError, match="std_eps: expected a finite float > 0"):
            GaussianBasisBias(4, std_eps=std_eps)
    with pytest.raises(ValueError, match="backend: expected one of .'triton', 'reference'. .* got 'gpu'"):
        GaussianBasisBias(4, backend="gpu")


# --------------------------------------------------------------------------------------------- compile


HOPPER_COMPILE = """
import torch
from hopper import captured_launches, case_dtype, lower_launch
from pyblend.kernels import gaussian_basis_bias as kernels

TYPES = 7
for dtype_name, num_kernels, hidden, heads, max_seqlen in SHAPES:
    dtype = case_dtype(dtype_name)
    lengths = torch.tensor([max_seqlen, max_seqlen // 2 + 1, 1])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    atoms, pairs = int(lengths.sum()), int((lengths * lengths).sum())
    mask = torch.arange(max_seqlen)[None, :] < lengths[:, None]
    # means, stds, mul, bias (flattened, as the op passes them), w1, b1, w2, b2
    weights = [torch.randn(*shape, dtype=dtype) for shape in ((num_kernels,), (num_kernels,), (TYPES,), (TYPES,),
                                                              (hidden, num_kernels), (hidden,), (heads, hidden),
                                                              (heads,))]
    launches = {}
    for packed in (True, False):
        if packed:
            positions, types = torch.randn(atoms, 3), torch.randint(0, TYPES, (pairs, 2))
            layout = (None, cu_seqlens, max_seqlen, 1e-2)
        else:
            positions = torch.randn(len(lengths), max_seqlen, 3)
            types = torch.randint(0, TYPES, (len(lengths), max_seqlen, max_seqlen, 2))
            layout = (mask, None, max_seqlen, 1e-2)
        with captured_launches() as captured:
            attn, feat = kernels.gaussian_basis_bias_forward(positions, types, *weights, *layout)
            kernels.gaussian_basis_bias_backward(torch.randn_like(attn), torch.randn_like(feat), positions, types,
                                                 *weights, *layout)
        for kernel, args, kwargs in captured:
            launches.setdefault((kernel.fn.__name__, packed), (kernel, args, kwargs))
    for (name, packed), (kernel, args, kwargs) in launches.items():
        ptx, spills, sass = lower_launch(kernel, args, kwargs)
        print(name, "mma", ptx.count("mma"), "spills", spills, "packed", packed, dtype_name, num_kernels, hidden, heads,
              max_seqlen)
"""


# (dtype, K, K_hidden, H, N). float32 has its own tiles and warps (its IEEE dots run on the FMA units): the full
# tier covers each of its branches (K <= 64 with 4 warps for 16-bit, H = 128, K = 256) and a ragged MLP; also
# 16-bit and TF32 at K = 256 (half-height pair tiles), and TF32 at K = 128, also at H = 128.
FLOAT32_SWEEP = [(32, 32, 8, 64), (64, 64, 16, 64), (128, 128, 64, 64), (128, 128, 128, 64), (256, 256, 32, 64),
                 (256, 256, 128, 64), (24, 72, 5, 11), (128, 128, 32, 4)]


@pytest.mark.parametrize("shapes", [
    pytest.param([("bfloat16", 128, 128, 32, 64), ("float32", 128, 128, 32, 64)], id="K128-H32"),
    pytest.param([("float32", *shape) for shape in FLOAT32_SWEEP] + [("float16", 128, 128, 32, 64)]
                 + [(name, 256, 256, heads, 64) for name in ("bfloat16", "tf32") for heads in (32, 64, 128)]
                 + [("tf32", 128, 128, heads, 64) for heads in (32, 128)], id="sweep",
                 marks=pytest.mark.full)])
def test_kernels_compile_for_hopper_without_spills(shapes):
    """Calls the launchers on CPU tensors (fp32 positions, weights of the given dtype, two type ids; (dtype, K,
    K_hidden, H, N) in ``shapes``; padded with a mask and packed, every gradient) and lowers the four kernels to
    sm_90 as Triton would on the GPU, then runs ptxas: the interpreter accepts programs the compiler rejects, a
    spill is a performance bug, and 16-bit MLPs must run on the tensor cores (float32 ones are IEEE FMAs unless
    TF32 is allowed)."""
    lines = run_compile_script(f"SHAPES = {shapes!r}\n" + HOPPER_COMPILE)
    assert len(lines) == 8 * len(shapes), lines
    for line in lines:
        words = line.split()
        if "positions" not in words[0] and words[7] != "float32":
            assert int(words[2]) > 0, f"{line}: the MLP should use the tensor cores"
        assert int(words[4]) == 0, f"{line}: registers spill"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gpu_dtypes(generator, dtype, packed):
    check_against_reference(generator, [130, 64, 33, 7, 1], dtype, packed=packed, kernels=128, hidden=128, heads=32)
