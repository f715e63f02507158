"""Outer-product relation heads fused with their losses: the reference against the public MoleBlend head
(explicit outer product + nn.Linear, F.cross_entropy, F.cosine_similarity), and the Triton kernels (interpreter on
the CPU) against the float64 reference, forward and every gradient.

Every check draws fresh inputs, puts NaN in padded atoms' row/col/positions entries (they must never be read),
and compares the loss and the gradients of row, col, weight and bias.
"""
import pytest
import torch
import torch.nn.functional as F

from pyblend.layout import cu_seqlens_from_mask, pack_atoms, pack_pairs
from pyblend.ops import outer_product as ops
from pyblend.reference import outer_product as reference

from allocations import Allocations
from graphs import backend_device
from hopper import run_compile_script
from tolerances import assert_close

# bf16 arithmetic is wrong in Triton's interpreter: bf16 runs on the GPU only.
INTERPRETER_DTYPES = [torch.float32, torch.float16]
IGNORE = -100
GRADIENTS = ("drow", "dcol", "dweight", "dbias")


class Problem:
    """Inputs in float64 (rounded to ``dtype``), padded with NaN at padded atoms, and their packed form."""

    def __init__(self, generator, sizes, d1, d2, classes, dtype, *, groups=1, width=None, logit_scale=1.0):
        self.sizes, self.dtype, self.groups, self.classes = sizes, dtype, groups, classes
        batch, width = len(sizes), width or max(sizes)
        self.mask = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]

        def draw(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype).double()

        self.row = draw(batch, width, d1)
        self.col = draw(batch, width, d2)
        self.weight = draw(classes, d1 * d2, scale=logit_scale / (d1 * d2) ** 0.5)
        self.bias = draw(classes)
        self.positions = draw(batch, width, 3)
        for x in (self.row, self.col, self.positions):
            x[~self.mask] = float("nan")
        per_group = classes // groups
        target = torch.randint(0, per_group, (batch, width, width, groups), generator=generator)
        target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE  # unreachable, past the path
        target[:, torch.arange(width), torch.arange(width)] = IGNORE  # the diagonal
        target[~(self.mask[:, :, None] & self.mask[:, None, :])] = 10_000  # padding: ignored whatever it holds
        self.target = target if groups > 1 else target[..., 0]
        self.cu_seqlens, self.max_seqlen = cu_seqlens_from_mask(self.mask)

    def inputs(self, packed):
        """(row, col, positions, target, layout keywords) in the padded or the packed layout."""
        if packed:
            atoms = [pack_atoms(x, self.mask) for x in (self.row, self.col, self.positions)]
            return (*atoms, pack_pairs(self.target, self.mask),
                    dict(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen))
        return self.row, self.col, self.positions, self.target, dict(mask=self.mask)


def run(problem, loss, backend, packed, *, dtype=None, bias=True, upstream=None, reduction="pairs"):
    """{"out": loss or logits, "drow", "dcol", "dweight", "dbias"} on the CPU; ``dtype`` (default the problem's)
    converts the float inputs first."""
    dtype = dtype or problem.dtype
    device = backend_device(backend)
    row, col, positions, target, layout = problem.inputs(packed)
    leaves = [x.detach().to(device, dtype, copy=True).requires_grad_()
              for x in (row, col, problem.weight, problem.bias)]
    if not bias:
        leaves[3] = None
    layout = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in layout.items()}
    if loss == "ce":
        out = ops.outer_product_loss(*leaves, target.to(device), groups=problem.groups, ignore_index=IGNORE,
                                     backend=backend, **layout)
        objective = out * 1.7
    elif loss == "cos":
        out = ops.outer_product_cosine_loss(*leaves, positions.to(device, dtype), backend=backend,
                                            reduction=reduction, **layout)
        objective = out * 1.7
    else:
        out = ops.outer_product_logits(*leaves, backend=backend, **layout)
        objective = (out.double() * upstream.to(device)).sum()
    objective.backward()
    found = {"out": out.detach().cpu()}
    found.update({name: leaf.grad.detach().cpu() for name, leaf in zip(GRADIENTS, leaves) if leaf is not None})
    return found


def cosine_with_rounded_partials(problem, packed, bias=True):
    """The cosine loss and its gradients (as :func:`run` returns them) in float64 with the one rounding the
    kernels make by design: a 16-bit tl.dot takes 16-bit operands, so ``row @ W_c`` is rounded to the input dtype
    before its product with ``col``. The reference cannot see that rounding, and the cosine's gradient amplifies it
    where a prediction is near zero: the gradient goes as 1 / |p| and its error as rounding / |p|^2. A float16
    draw of [9, 6] atoms then failed 1e-2 about once in 120 (drow: 1.08e-2 at seed 3753308078, where the
    smallest |p| was 1/90 of the median). The GPU test's 20k pairs in bf16 (8-bit mantissas) would meet such
    pairs in most draws."""
    leaves = [x.nan_to_num().clone().requires_grad_() for x in (problem.row, problem.col, problem.weight, problem.bias)]
    row, col, weight, bias_leaf = leaves
    partial = torch.einsum("bia,cae->bice", row, weight.unflatten(1, (row.shape[-1], col.shape[-1])))
    partial = partial + (partial.to(problem.dtype).double() - partial).detach()  # rounded, gradient unchanged
    logits = torch.einsum("bice,bje->bijc", partial, col) + (bias_leaf if bias else 0)
    out = reference.cosine_loss_of_logits(logits, problem.positions.nan_to_num(), problem.mask)
    (out * 1.7).backward()  # as run() weights it
    found = {"out": out.detach()}
    for name, leaf in zip(GRADIENTS, leaves[:3 + bias]):
        found[name] = pack_atoms(leaf.grad, problem.mask) if packed and name in ("drow", "dcol") else leaf.grad
    return found


def check(problem, loss, packed, *, bias=True, upstream=None):
    got = run(problem, loss, "triton", packed, bias=bias, upstream=upstream)
    if upstream is not None:  # the logits' upstream gradient as the op receives it, in the logits' dtype
        upstream = upstream.to(got["out"].dtype).double()
    if loss == "cos" and problem.dtype != torch.float32:
        expected = cosine_with_rounded_partials(problem, packed, bias)
    else:
        expected = run(problem, loss, "reference", packed, dtype=torch.float64, bias=bias, upstream=upstream)
    if loss != "logits":
        assert got["out"].dtype == torch.float32 and got["out"].shape == ()
    for name, ref in expected.items():
        out = got[name]
        if name in ("drow", "dcol"):  # padded atoms: exactly 0 (the reference's NaN-free zeros too)
            atoms = problem.mask if not packed else torch.ones(out.shape[0], dtype=torch.bool)
            assert (out[~atoms] == 0).all(), f"{name}: nonzero at padded atoms"
        assert_close(out, ref, problem.dtype, name)
    return got


def upstream_for(generator, problem, packed):
    pairs = int((torch.tensor(problem.sizes) ** 2).sum()) if packed else None
    width = problem.mask.shape[1]
    shape = (pairs, problem.classes) if packed else (len(problem.sizes), width, width, problem.classes)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------------------- the reference


def test_reference_is_the_public_head(generator):
    """Per molecule: the flattened outer product through nn.Linear, F.cross_entropy over the kept targets with
    G softmaxes, and 1 - F.cosine_similarity over the pairs whose target pos_j - pos_i is not zero (the public
    code's mask: i != j, and here two coincident atoms), in both layouts."""
    problem = Problem(generator, [5, 3], 3, 4, 6, torch.float64, groups=2)
    problem.positions[0, 3] = problem.positions[0, 1]
    head = torch.nn.Linear(12, 6).double()
    with torch.no_grad():
        head.weight.copy_(problem.weight)
        head.bias.copy_(problem.bias)
    logits, kept, ce_targets, cos_terms = [], [], [], []
    for b, n in enumerate(problem.sizes):
        row, col, pos = problem.row[b, :n], problem.col[b, :n], problem.positions[b, :n]
        outer = (row[:, None, :, None] * col[None, :, None, :]).reshape(n, n, 12)
        mol = head(outer)
        logits.append(mol)
        target = problem.target[b, :n, :n]
        keep = target != IGNORE
        kept.append(mol.reshape(n, n, 2, 3)[keep])
        ce_targets.append(target[keep])
        pred = mol[..., :3]
        delta = pos[None, :, :] - pos[:, None, :]
        off = ~(delta == 0).all(-1)
        cos_terms.append(1 - F.cosine_similarity(pred[off], delta[off], dim=-1))
    expected_ce = F.cross_entropy(torch.cat(kept), torch.cat(ce_targets))
    expected_cos = torch.cat(cos_terms).mean()
    for packed in (False, True):
        row, col, positions, target, layout = problem.inputs(packed)
        got = reference.outer_product_logits(row, col, problem.weight, problem.bias, **layout)
        if packed:
            torch.testing.assert_close(got, torch.cat([x.reshape(-1, 6) for x in logits]))
        else:
            for b, n in enumerate(problem.sizes):
                torch.testing.assert_close(got[b, :n, :n], logits[b])
            assert (got[~(problem.mask[:, :, None] & problem.mask[:, None, :])] == 0).all()
        ce = reference.outer_product_loss(row, col, problem.weight, problem.bias, target, groups=2,
                                          ignore_index=IGNORE, **layout)
        torch.testing.assert_close(ce, expected_ce)
        cos = reference.outer_product_cosine_loss(row, col, problem.weight[:3], problem.bias[:3], positions, **layout)
        torch.testing.assert_close(cos, expected_cos)


def test_reference_gradcheck_float64(generator):
    problem = Problem(generator, [3, 2], 2, 3, 3, torch.float64)
    row, col, positions, target, layout = problem.inputs(True)
    leaves = tuple(x.clone().requires_grad_() for x in (row, col, problem.weight, problem.bias))
    target = target.clone()
    target[0] = 1  # at least the diagonal pair of atom 0 is kept
    assert torch.autograd.gradcheck(lambda *a: reference.outer_product_loss(*a, target, **layout), leaves)
    assert torch.autograd.gradcheck(lambda *a: reference.outer_product_cosine_loss(*a, positions, **layout), leaves)


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("classes, groups", [(5, 1), (12, 3)])
def test_cross_entropy_matches_reference(generator, dtype, packed, classes, groups):
    problem = Problem(generator, [7, 11], 6, 5, classes, dtype, groups=groups)
    check(problem, "ce", packed, bias=groups == 1)


def test_reference_molecule_reduction_is_the_public_codes(generator):
    """reduction="molecules": each molecule's mean of 1 - cos over its pairs with pos_j != pos_i, then the mean
    over the molecules that have such a pair (the public compute_3d_blending_loss); a one-atom molecule, an empty
    one and one whose three atoms coincide count for nothing. Both layouts; an unknown reduction is refused by
    name."""
    problem = Problem(generator, [5, 1, 3, 0, 3], 3, 4, 3, torch.float64)
    problem.positions[4, 1:3] = problem.positions[4, 0]
    per_molecule = []
    for b, n in enumerate(problem.sizes):
        row, col, pos = problem.row[b, :n], problem.col[b, :n], problem.positions[b, :n]
        pred = (row[:, None, :, None] * col[None, :, None, :]).reshape(n, n, 12) @ problem.weight.T + problem.bias
        delta = pos[None, :, :] - pos[:, None, :]
        off = ~(delta == 0).all(-1)
        if not off.any():
            continue
        per_molecule.append((1 - F.cosine_similarity(pred[off], delta[off], dim=-1)).mean())
    expected = torch.stack(per_molecule).mean()
    for packed in (False, True):
        row, col, positions, _, layout = problem.inputs(packed)
        got = reference.outer_product_cosine_loss(row, col, problem.weight, problem.bias, positions,
                                                  reduction="molecules", **layout)
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="reduction: expected 'pairs' or 'molecules'; got 'mean'"):
        ops.outer_product_cosine_loss(row, col, problem.weight, problem.bias, positions, reduction="mean", **layout)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cosine_per_molecule_matches_reference(generator, packed):
    """The kernels' per-molecule sums and counts, and one loss-sum gradient per molecule in both backward
    kernels: ragged molecules (one of a single atom, one empty, one whose atoms all coincide, so without a pair
    to count, and two coincident atoms in the last) against the float64 reference."""
    problem = Problem(generator, [9, 1, 6, 0, 13, 4], 4, 8, 3, torch.float32)
    problem.positions[2, :6] = problem.positions[2, 0]
    problem.positions[4, 7] = problem.positions[4, 2]
    got = run(problem, "cos", "triton", packed, reduction="molecules")
    expected = run(problem, "cos", "reference", packed, dtype=torch.float64, reduction="molecules")
    pairs = run(problem, "cos", "triton", packed)
    assert not torch.allclose(got["out"], pairs["out"]), "the two reductions weigh the molecules differently"
    for name, ref in expected.items():
        assert_close(got[name], ref, torch.float32, name)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cosine_matches_reference_with_coincident_atoms(generator, dtype, packed):
    problem = Problem(generator, [9, 6], 4, 8, 3, dtype)
    problem.positions[0, 3] = problem.positions[0, 5]  # a zero delta: not counted, no gradient through that pair
    got = check(problem, "cos", packed)
    assert all(torch.isfinite(g).all() for g in got.values())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cosine_nan_position_at_a_real_atom_makes_the_loss_nan(generator, packed):
    """A NaN coordinate at a real atom is not a coincident atom: its pairs count and the loss is NaN on both
    backends and reductions (counting pairs by dd > 0 used to leave the atom out quietly). The padded atoms hold
    NaN throughout and are still never read."""
    problem = Problem(generator, [9, 6], 4, 8, 3, torch.float32)
    for backend in ("triton", "reference"):
        assert torch.isfinite(run(problem, "cos", backend, packed)["out"])
    problem.positions[1, 2, 0] = float("nan")
    for backend in ("triton", "reference"):
        for reduction in ("pairs", "molecules"):
            assert torch.isnan(run(problem, "cos", backend, packed, reduction=reduction)["out"]), (backend, reduction)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_logits_and_their_gradients_match_reference(generator, dtype, packed):
    problem = Problem(generator, [8, 3], 4, 6, 5, dtype)
    upstream = upstream_for(generator, problem, packed)
    got = check(problem, "logits", packed, upstream=upstream)
    assert got["out"].dtype == dtype


@pytest.mark.parametrize("loss", ["ce", "cos", "logits"])
@pytest.mark.parametrize("d1, d2", [(20, 12), (40, 20)])
def test_float32_launch_tiles_match_reference(generator, loss, d1, d2):
    """The launchers pad the features with zeros to one square tile (20 x 12 -> 32 x 32, 40 x 20 -> 64 x 64);
    float32 takes its own configurations past 16 atoms: 32-pair tiles at 32 features, 16 at 64; the padding's
    gradients are cut off. Ragged molecules over several tiles, a partial last one, in both layouts."""
    classes, groups = {"ce": (4, 2), "cos": (3, 1), "logits": (3, 1)}[loss]
    problem = Problem(generator, [5, 33], d1, d2, classes, torch.float32, groups=groups)
    for packed in (False, True):
        upstream = upstream_for(generator, problem, packed) if loss == "logits" else None
        check(problem, loss, packed, upstream=upstream)


def test_non_contiguous_inputs(generator):
    """Strided views: row/col from (d, T) storage, the weight as the transpose of (d1 d2, C) storage, a strided
    bias and a transposed target."""
    problem = Problem(generator, [6, 9], 4, 5, 6, torch.float32, groups=2)
    row, col, _, target, layout = problem.inputs(True)
    weight = problem.weight.float()
    bias = torch.stack([problem.bias.float(), torch.full((6,), float("nan"))], 1)[:, 0]
    views = [row.float().t().contiguous().t(), col.float().t().contiguous().t(), weight.t().contiguous().t(), bias]
    assert not any(x.is_contiguous() for x in views)
    target = target.t().contiguous().t()
    leaves = [x.detach().requires_grad_() for x in views]
    loss = ops.outer_product_loss(*leaves, target, groups=2, ignore_index=IGNORE, backend="triton", **layout)
    loss.backward()
    leaves64 = [x.detach().double().requires_grad_() for x in views]
    expected = reference.outer_product_loss(*leaves64, target, groups=2, ignore_index=IGNORE, **layout)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), torch.float32, "loss")
    for name, ours, theirs in zip(GRADIENTS, leaves, leaves64):
        assert_close(ours.grad, theirs.grad, torch.float32, name)


def test_everything_ignored_is_zero_with_zero_gradients(generator):
    problem = Problem(generator, [5, 4], 4, 4, 6, torch.float32, groups=2)
    problem.target[problem.target != 10_000] = IGNORE
    for packed in (False, True):
        got = run(problem, "ce", "triton", packed)
        assert got["out"].item() == 0.0
        for name in GRADIENTS:
            assert (got[name] == 0).all(), name


def test_large_logits_are_stable(generator):
    """Logits ~1e3-1e4 (exp overflows float32 past 88): the log-sum-exp is max-subtracted; the loss and gradients
    match float64 at the float32 bound. Draws are kept only where no pair has two classes within 10 of each other:
    near a tie the softmax of float32 logits of size 1e4 is itself off by ~1e-3 relative (representation error,
    in torch's float32 too), which no float32 implementation can meet at 1e-5."""
    for _ in range(50):
        problem = Problem(generator, [7, 10], 4, 4, 5, torch.float32, logit_scale=3e3)
        row, col, _, _, layout = problem.inputs(False)
        logits = reference.outer_product_logits(row, col, problem.weight, problem.bias, **layout)
        top = logits[problem.mask[:, :, None] & problem.mask[:, None, :]].topk(2, dim=-1).values
        if ((top[..., 0] - top[..., 1]) > 10).all() and logits.abs().max() > 3e3:
            break
    else:
        pytest.fail("no well-separated draw in 50")
    got = check(problem, "ce", False)
    assert got["out"].item() > 100
    problem = Problem(generator, [7, 10], 4, 4, 3, torch.float32, logit_scale=3e3)
    check(problem, "cos", True)  # scale-invariant: well conditioned at any size


@pytest.mark.parametrize("loss", ["ce", "cos"])
def test_padding_single_atoms_and_empty_molecules(generator, loss):
    """One-atom molecules, a molecule with no atom (a fully padded row), NaN in every padded entry: matches the
    reference, bit-identical to zero-filled padding, and bit-identical run to run."""
    classes = 6 if loss == "ce" else 3
    problem = Problem(generator, [1, 6, 1, 4], 5, 4, classes, torch.float32, groups=2 if loss == "ce" else 1,
                      width=7)
    problem.mask[3] = False  # molecule 3: no atom at all
    for x in (problem.row, problem.col, problem.positions):
        x[3] = float("nan")
    first = check(problem, loss, False)
    second = run(problem, loss, "triton", False)
    for x in (problem.row, problem.col, problem.positions):
        x[~problem.mask] = 0.0
    zeros = run(problem, loss, "triton", False)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name}: not deterministic"
        assert torch.equal(first[name], zeros[name]), f"{name}: depends on padded entries"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batches_give_zero(generator, backend):
    """Padded B = 0 or N = 0, packed T = 0: no target, so 0 (the target check once failed to reshape them)."""
    device = backend_device(backend)
    weight, bias = torch.randn(6, 12, generator=generator).to(device), torch.randn(6, generator=generator).to(device)
    cases = [((0, 5), dict()), ((2, 0), dict()), ((0,), dict(cu_seqlens=torch.tensor([0, 0], dtype=torch.int32),
                                                             max_seqlen=0))]
    for atoms, layout in cases:
        layout = {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in layout.items()}
        row, col = (torch.randn(*atoms, d, device=device, requires_grad=True) for d in (3, 4))
        pairs = atoms[:1] if "cu_seqlens" in layout else (*atoms, atoms[-1])
        target = torch.zeros(pairs, dtype=torch.long, device=device)
        loss = ops.outer_product_loss(row, col, weight, bias, target, backend=backend, **layout)
        cosine = ops.outer_product_cosine_loss(row, col, weight[:3], bias[:3], torch.randn(*atoms, 3, device=device),
                                               backend=backend, **layout)
        assert loss.item() == 0.0 and cosine.item() == 0.0, atoms
        (loss + cosine).backward()


def test_reference_cosine_takes_predictions_past_float32s_squared_range(generator):
    """|prediction| |delta| > 1.8e19 overflowed the reference's rsqrt(|p|^2 |d|^2) to a cosine of 0."""
    problem = Problem(generator, [5, 3], 4, 4, 3, torch.float32, logit_scale=1e18)
    row, col, positions, _, layout = problem.inputs(False)
    args = (problem.weight, problem.bias, positions)
    got = reference.outer_product_cosine_loss(row.float(), col.float(), *(x.float() for x in args), **layout)
    expected = reference.outer_product_cosine_loss(row, col, *args, **layout)
    assert_close(got, expected, torch.float32, "loss")


def test_single_atom_molecules_only_give_zero(generator):
    problem = Problem(generator, [1, 1], 4, 4, 3, torch.float32)
    for packed in (False, True):
        got = run(problem, "cos", "triton", packed)
        assert got["out"].item() == 0.0
        assert all((got[name] == 0).all() for name in GRADIENTS)


def test_persistent_programs_agree(generator):
    """The rows backward's partials: one program for every item or one per item give the same gradients (with a
    different loss-sum gradient per molecule, as ``reduction="molecules"`` gives)."""
    from pyblend.kernels import outer_product as kernel

    problem = Problem(generator, [9, 5, 12], 4, 6, 6, torch.float32, groups=2)
    row, col, _, target, layout = problem.inputs(True)
    row, col, weight, bias = (x.float() for x in (row, col, problem.weight, problem.bias))
    start = layout["cu_seqlens"][:-1].contiguous()
    length = (layout["cu_seqlens"][1:] - layout["cu_seqlens"][:-1]).contiguous()
    pair_start = torch.tensor([0, 81, 106], dtype=torch.int64)
    target = target.reshape(-1, 2)
    stats, _, counts = kernel.outer_product_forward(row, col, weight, bias, target, None, start, length, pair_start,
                                                    12, target.shape[0], kernel.MODE_CROSS_ENTROPY, 2, IGNORE)
    assert counts.shape == (3,)
    scale = (1 / counts).float()
    results = [kernel.outer_product_backward(scale, row, col, weight, bias, target, None, start, length, pair_start,
                                             stats, 12, kernel.MODE_CROSS_ENTROPY, 2, IGNORE, programs=programs)
               for programs in (1, 3)]
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_loss_path_allocates_no_per_pair_logits_or_outer_products(generator):
    """Forward + backward of both losses: nothing of (pairs, C) or (pairs, d1 d2) elements; the reference, run
    under the same recorder, does allocate them (so the recorder sees such tensors). Molecules of 40 atoms: the
    float32 weight partials, (programs, C, 16, 16) whatever the batch (d = 4 padded to one 16-wide tile), stay
    under half the (pairs, C) logits."""
    problem = Problem(generator, [40, 37], 4, 4, 12, torch.float32, groups=3)
    pairs = 2 * 40 * 40
    limit = pairs * min(12, 16) // 2
    for backend in ("triton", "reference"):
        for loss in ("ce", "cos"):
            if loss == "cos":
                problem.weight, problem.bias = problem.weight[:3], problem.bias[:3]
            with Allocations() as record:
                run(problem, loss, backend, False)
            largest = max(record.sizes)
            if backend == "triton":
                assert largest <= limit, f"{loss}: a tensor of {largest} elements ((pairs, C) = {pairs * 12})"
            else:
                assert largest >= pairs * 3, f"{loss}: the recorder missed the reference's logits"
        problem = Problem(generator, [40, 37], 4, 4, 12, torch.float32, groups=3)


def test_automatic_backend_on_cpu_is_the_reference(generator):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine CPU tensors still go to the reference, but TRITON_INTERPRET is unset")
    problem = Problem(generator, [4, 3], 3, 3, 4, torch.float32)
    row, col, _, target, layout = problem.inputs(False)
    args = (row.float(), col.float(), problem.weight.float(), problem.bias.float())
    torch.testing.assert_close(ops.outer_product_loss(*args, target, ignore_index=IGNORE, **layout),
                               reference.outer_product_loss(*args, target, ignore_index=IGNORE, **layout))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_numpy_integer_arguments(generator, backend):
    """groups=np.int64(2) and ignore_index=np.int64(-100) were refused as no int."""
    import numpy as np

    problem = Problem(generator, [4, 3], 3, 2, 6, torch.float32, groups=2)
    row, col, _, target, layout = problem.inputs(False)
    arguments = (row.float(), col.float(), problem.weight.float(), problem.bias.float(), target)
    want = ops.outer_product_loss(*arguments, groups=2, ignore_index=IGNORE, backend=backend, **layout)
    got = ops.outer_product_loss(*arguments, groups=np.int64(2), ignore_index=np.int64(IGNORE), backend=backend,
                                 **layout)
    assert torch.equal(got, want)


def test_errors_name_the_argument(generator):
    problem = Problem(generator, [4, 3], 3, 2, 6, torch.float32, groups=2)
    row, col, positions, target, layout = problem.inputs(False)
    row, col, positions = row.float(), col.float(), positions.float()
    weight, bias = problem.weight.float(), problem.bias.float()
    base = dict(row=row, col=col, weight=weight, bias=bias, target=target, groups=2, ignore_index=IGNORE, **layout)
    bad_target = target.clone()
    bad_target[1, 2, 0, 1] = 3
    # -100 in uint8 is 156: compared in the target's dtype it passed the range check and the kernel took it as a
    # class, adding its log-sum-exp to the loss.
    wrapped = target.clamp(0, 2).to(torch.uint8)
    wrapped[1, 2, 0, 1] = 156
    cases = [
        (dict(row=row[0]), ValueError, r"row: expected the padded layout \(B, N, d1\)"),
        (dict(row=row.long()), TypeError, "row: expected dtype"),
        (dict(col=col[:, :3]), ValueError, r"col: expected shape \(B, N, d2\)"),
        (dict(col=col.half()), TypeError, "col: expected the dtype of row"),
        (dict(weight=weight[:, :5]), ValueError, r"weight: expected shape \(C, d1 \* d2\) = \(\?, 6\)"),
        (dict(bias=bias[:4]), ValueError, r"bias: expected shape \(C,\)"),
        (dict(mask=layout["mask"].int()), TypeError, "mask: expected dtype bool"),
        (dict(groups=4), ValueError, "groups: expected a positive int dividing C = 6"),
        (dict(ignore_index=2**40), ValueError, "ignore_index: expected an int32"),
        (dict(target=target.float()), TypeError, "target: expected dtype"),
        (dict(target=target[..., 0]), ValueError, r"target: expected shape \(B, N, N, G\)"),
        (dict(target=bad_target), ValueError, r"target: expected values in \[0, 3\).*target\[1, 2, 0, 1\] = 3"),
        (dict(target=wrapped, ignore_index=-100), ValueError, r"target: expected values in \[0, 3\).*\] = 156"),
        (dict(target=wrapped, ignore_index=-100, backend="triton"), ValueError, r"target: expected values in.* = 156"),
        (dict(max_seqlen=9), ValueError, "max_seqlen: the padded layout"),
        (dict(backend="cpp"), ValueError, "has no 'cpp' backend"),
        (dict(row=row.double(), col=col.double(), weight=weight.double(), bias=bias.double(), backend="triton"),
         ValueError, "float16, bfloat16 or float32"),
        (dict(row=torch.zeros(2, 4, 65), weight=torch.zeros(6, 130), bias=None, backend="triton"), ValueError,
         "at most 64 features"),
    ]
    for overrides, error, message in cases:
        arguments = dict(base, **overrides)
        with pytest.raises(error, match=message):
            ops.outer_product_loss(arguments.pop("row"), arguments.pop("col"), arguments.pop("weight"),
                                   arguments.pop("bias"), **arguments)
    packed_row, packed_col, packed_positions, packed_target, packed_layout = problem.inputs(True)
    with pytest.raises(ValueError, match="cu_seqlens: describes 7 atoms but the input holds 6"):
        ops.outer_product_logits(packed_row[:6].float(), packed_col[:6].float(), weight, bias, **packed_layout)
    with pytest.raises(ValueError, match="max_seqlen: expected an int >= the longest molecule"):
        ops.outer_product_logits(packed_row.float(), packed_col.float(), weight, bias,
                                 cu_seqlens=packed_layout["cu_seqlens"], max_seqlen=2)
    with pytest.raises(ValueError, match="cu_seqlens: packed outer_product_logits returns .* a meta tensor"):
        ops.outer_product_logits(*(x.float().to("meta") for x in (packed_row, packed_col, weight, bias)),
                                 cu_seqlens=packed_layout["cu_seqlens"].to("meta"), max_seqlen=4)
    with pytest.raises(ValueError, match=r"weight: the cosine loss predicts a 3-vector"):
        ops.outer_product_cosine_loss(row, col, weight, bias, positions, **layout)
    with pytest.raises(ValueError, match=r"positions: expected shape \(B, N, 3\)"):
        ops.outer_product_cosine_loss(row, col, weight[:3], bias[:3], positions[..., :2], **layout)
    with pytest.raises(TypeError, match="positions: expected a tensor"):
        ops.outer_product_cosine_loss(row, col, weight[:3], bias[:3], **layout)


def _custom_op_arguments(generator, mode, per_molecule=False):
    problem = Problem(generator, [5, 3], 4, 4, 6 if mode != 2 else 3, torch.float32, groups=2 if mode == 1 else 1)
    device = backend_device("triton")
    row, col, positions, target, layout = problem.inputs(True)
    row, col, weight, bias = (x.float().to(device).requires_grad_() for x in
                              (row, col, problem.weight, problem.bias))
    cu = layout["cu_seqlens"].to(device)
    start, length = cu[:-1].contiguous(), (cu[1:] - cu[:-1]).contiguous()
    pair_start = torch.tensor([0, 25], dtype=torch.int64, device=device)
    common = (start, length, pair_start, 5, 34)
    if mode == 0:
        return (row, col, weight, bias, None, *common)
    aux = target.reshape(34, 2).to(device) if mode == 1 else positions.float().to(device)
    return (row, col, weight, bias, aux, None, *common, mode, 2 if mode == 1 else 1, IGNORE, per_molecule)


@pytest.mark.parametrize("mode, per_molecule", [(0, False), (1, False), (2, False), (2, True)],
                         ids=["logits", "cross-entropy", "cosine", "cosine per molecule"])
def test_opcheck(generator, mode, per_molecule):
    arguments = _custom_op_arguments(generator, mode, per_molecule)
    op = torch.ops.pyblend.outer_product_logits if mode == 0 else torch.ops.pyblend.outer_product_loss
    torch.library.opcheck(op.default, arguments)
    # The backward op's own derivative only raises (no double backward): checked on plain tensors.
    plain = [x.detach() if isinstance(x, torch.Tensor) else x for x in arguments]
    row, col, weight, bias = plain[:4]
    if mode == 0:
        aux, mask, start, length, pair_start, max_n, pairs = None, *plain[4:10]
        grad = torch.randn(pairs, weight.shape[0], generator=generator).to(row.device)
        stats, groups, ignore_index = None, 1, 0
    else:
        aux, mask, start, length, pair_start, max_n, pairs, _, groups, ignore_index, _ = plain[4:]
        _, stats, counts = op(*plain)
        grad = torch.full(counts.shape, 0.3, device=row.device)
    torch.library.opcheck(torch.ops.pyblend.outer_product_backward.default,
                          (grad, row, col, weight, bias, aux, mask, start, length, pair_start, stats, max_n, mode,
                           groups, ignore_index))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_traces_the_ops(generator, backend):
    problem = Problem(generator, [6, 4], 4, 4, 6, torch.float32, groups=2)
    device = backend_device(backend)
    row, col, positions, target, layout = problem.inputs(False)
    mask = layout["mask"].to(device)
    leaves = [x.float().to(device).requires_grad_() for x in (row, col, problem.weight, problem.bias)]
    target, positions = target.to(device), positions.float().to(device)

    def objective(row, col, weight, bias):
        ce = ops.outer_product_loss(row, col, weight, bias, target, groups=2, ignore_index=IGNORE, mask=mask,
                                    backend=backend)
        cos = ops.outer_product_cosine_loss(row, col, weight[:3], bias[:3], positions, mask=mask, backend=backend)
        return ce + 0.5 * cos

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(objective(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs)


# --------------------------------------------------------------------------------------------- compile


HOPPER_COMPILE = """
import torch
from hopper import captured_launches, case_dtype, lower_launch
from pyblend.kernels import outer_product as kernels

IGNORE = -100
for d1, d2, classes, mode, groups, width, packed, dtype_name in CASES:
    dtype = case_dtype(dtype_name)
    # Two molecules, the second 5/8 as wide as the first (N): padded as the ops pass it (B molecules of width N
    # flattened to (B N, d) atoms, with a mask), or packed (no mask).
    lengths = torch.tensor([width, width * 5 // 8])
    widths = lengths if packed else torch.full((2,), width)
    mask = None if packed else (torch.arange(width)[None, :] < lengths[:, None]).reshape(-1)
    atoms, pairs = int(widths.sum()), int((widths ** 2).sum())
    layout = (mask, (widths.cumsum(0) - widths).int(), widths.int(), (widths ** 2).cumsum(0) - widths ** 2)
    row, col = torch.randn(atoms, d1, dtype=dtype), torch.randn(atoms, d2, dtype=dtype)
    weight = torch.randn(classes, d1 * d2, dtype=dtype)
    bias = torch.randn(classes, dtype=dtype)
    # The cross-entropy's int64 targets (Q, G), the cosine's float32 positions (A, 3); the logits have none.
    aux = {0: None, 1: torch.randint(0, classes // groups, (pairs, groups)), 2: torch.randn(atoms, 3)}[mode]
    with captured_launches() as captured:
        out = kernels.outer_product_forward(row, col, weight, bias, aux, *layout, width, pairs, mode, groups, IGNORE)
        # The logits' gradient comes in their dtype; a loss's backward reads its stats and the float32 loss
        # gradient over the count.
        grad, stats = (torch.randn_like(out), None) if mode == 0 else (torch.ones(1), out[0])
        kernels.outer_product_backward(grad, row, col, weight, bias, aux, *layout, stats, width, mode, groups,
                                       IGNORE)
    for kernel, args, kwargs in captured:
        ptx, spills, _ = lower_launch(kernel, args, kwargs)
        print(f"d={d1}x{d2},C={classes},N={width},{'packed' if packed else 'padded'}", kernel.fn.__name__,
              "mma", ptx.count("mma"), "spills", spills, dtype_name)
"""


# (d1, d2, C, mode, G): the SPD head (C = 11), the edge head (C = 120, G = 5), the 3D head (C = 3, cosine) and the
# plain logits (C = 11) at d = 32; the largest supported loss (d = 64, C = 128) and the logits at d = 64.
HEADS = [(32, 32, 11, 1, 1), (32, 32, 120, 1, 5), (32, 32, 3, 2, 1), (32, 32, 11, 0, 1), (64, 64, 128, 1, 1),
         (64, 64, 11, 0, 1)]
# Unequal and non-power-of-two widths, which the launchers pad to a square tile (unpadded, they spilled: up to 324
# bytes in float32's rows backward at d = 40, 4-36 bytes with TF32 and bf16). Still spilling a few scalars, so
# not listed: TF32's packed cols backward at 64 features (4 bytes), and 16-feature tiles with TF32 or bf16
# (4-12 bytes in the forward or the rows backward).
UNEQUAL = [(64, 32, 11, 1, 1), (64, 32, 3, 2, 1), (32, 64, 11, 0, 1), (40, 40, 11, 1, 1), (24, 24, 120, 1, 5),
           (48, 16, 3, 2, 1)]


@pytest.mark.parametrize("cases", [
    pytest.param([(*head, 64, False, "bfloat16") for head in HEADS]
                 + [(*HEADS[1], 64, False, "float32"), (*HEADS[5], 64, False, "float32")], id="quick"),
    pytest.param([(*head, 64, False, "float32") for head in HEADS if head not in (HEADS[1], HEADS[5])]
                 + [(*head, width, packed, "float32") for head in HEADS for width, packed in ((16, False), (64, True))]
                 + [(*head, 64, packed, "float32") for head in UNEQUAL for packed in (False, True)]
                 + [(*head, 64, False, name) for head in UNEQUAL for name in ("tf32", "bfloat16")]
                 + [(*head, 64, False, "tf32") for head in HEADS], id="float32", marks=pytest.mark.full)])
def test_kernels_compile_for_hopper_with_tensor_cores_and_no_spills(cases):
    """The three kernels as the launchers launch them, forward and backward, lowered to sm_90 with the GPU's
    run-time specialisation and through ptxas: no register spills, and tensor-core mma for 16-bit and TF32 inputs
    (float32's IEEE dots run on the FMA units, with launch configurations of their own). Quick: every head in bf16,
    padded and masked, N = 64, and float32's configurations at d = 32 (the edge head) and d = 64 (the logits). Full:
    float32 for every head, also at N = 16 (16-pair tiles) and packed (no mask), unequal and non-power-of-two
    widths (padded to a square tile), and with TF32 allowed."""
    lines = run_compile_script(f"CASES = {cases!r}\n" + HOPPER_COMPILE)
    assert len(lines) == 3 * len(cases), lines
    for line in lines:
        words = line.split()
        assert int(words[3]) > 0 or words[6] == "float32", f"{line}: no tensor-core mma"
        assert int(words[5]) == 0, f"{line}: registers spill"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("loss", ["ce", "cos"])
def test_gpu_moleblend_shapes(generator, dtype, loss):
    """d1 = d2 = 32; the SPD head (C = 11) and the edge head (C = 120, G = 5), the 3D head; ragged molecules."""
    sizes = [1, 7, 33, 64, 127, 20]
    if loss == "ce":
        for classes, groups in ((11, 1), (120, 5)):
            problem = Problem(generator, sizes, 32, 32, classes, dtype, groups=groups)
            for packed in (False, True):
                check(problem, "ce", packed)
    else:
        problem = Problem(generator, sizes, 32, 32, 3, dtype)
        for packed in (False, True):
            check(problem, "cos", packed)
