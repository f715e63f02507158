"""Relation-biased attention: the Triton kernel (interpreter on the CPU) and the reference against float64.

Every check draws fresh inputs, poisons padding with NaN, and compares outputs and all gradients (q, k, v,
bias, rel_table) with the float64 reference. Low-precision results must also stay within 3x the error of the
same computation done by PyTorch in that precision (flash-attn's rule).
"""

import pytest
import torch
import triton
import triton.language as tl

from pyblend import layout, ops, reference
from pyblend.kernels.relation_attention import _atom_offsets, _sequence

from allocations import Allocations
from graphs import backend_device
from hopper import run_compile_script
from tolerances import RELATIVE_ERROR, assert_close, relative_error

HAS_CUDA = torch.cuda.is_available()
# bf16 arithmetic is wrong in Triton's interpreter: bf16 runs on the GPU only.
INTERPRETER_DTYPES = [torch.float32, torch.float16]


def device():
    return backend_device("triton")


def random_padded(generator, sizes, heads, head_dim, dtype, width=None):
    """q, k, v (B, N, H, D) and mask; padded atoms hold NaN, which must never be read."""
    width = width or max(sizes)
    mask = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
    tensors = []
    for _ in range(3):
        x = torch.randn(len(sizes), width, heads, head_dim, generator=generator, dtype=torch.float64)
        x[~mask] = float("nan")
        tensors.append(x.to(dtype))
    return (*tensors, mask)


def random_bias(generator, shape, mask, dtype):
    bias = torch.randn(shape, generator=generator, dtype=torch.float64)
    if mask is not None:  # poison pairs touching a padded atom
        pairs = (mask[:, :, None] & mask[:, None, :])[:, None].expand(-1, shape[1], -1, -1)
        bias = torch.where(pairs if shape[0] > 1 else pairs.all(0, keepdim=True), bias, float("nan"))
    return bias.to(dtype)


def run(backend, q, k, v, bias=None, *, grad_seed=0, rel_table=None, upstream_dtypes=None, **options):
    """Forward + backward with a fixed random upstream gradient; returns {name: tensor} on the CPU.
    ``upstream_dtypes`` (one per output) rounds the upstream gradients as an op with outputs of those dtypes
    receives them, so that a float64 reference sees the same values."""
    target = torch.device("cpu") if backend == "reference" else device()
    leaves = {name: x.detach().to(target).requires_grad_() for name, x in (("q", q), ("k", k), ("v", v))}
    if bias is not None:
        leaves["bias"] = bias.detach().to(target).requires_grad_()
    if rel_table is not None:
        leaves["rel_table"] = rel_table.detach().to(target).requires_grad_()
        options["rel_table"] = leaves["rel_table"]
    options = {key: value.to(target) if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    fn = reference.relation_attention if backend == "reference" else ops.relation_attention
    if backend != "reference":
        options["backend"] = backend
    result = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("bias"), **options)
    outputs = list(result) if options.get("return_logits") else [result]
    upstream = torch.Generator().manual_seed(grad_seed)
    received = upstream_dtypes or [o.dtype for o in outputs]
    grads = [torch.randn(o.shape, generator=upstream, dtype=torch.float64).to(dtype).to(target, o.dtype)
             for o, dtype in zip(outputs, received)]
    torch.autograd.backward(outputs, grads)
    found = {"out": outputs[0]}
    if len(outputs) > 1:
        found["logits"] = outputs[1]
    found.update({f"d{name}": leaf.grad for name, leaf in leaves.items()})
    return {name: x.detach().cpu() for name, x in found.items()}


def in_dtype(dtype, *tensors):
    return [None if t is None else t.to(dtype) if t.is_floating_point() else t for t in tensors]


def compare(got, expected, dtype, low_precision=None, mask=None):
    """Compare dicts of results on real atoms; with ``low_precision`` (torch's own result in ``dtype``) also
    require the error to stay within 3x PyTorch's plus the error of the exact result stored in ``dtype`` (as
    flash-attn's tests add an atol of the reference's own rounding): on small problems torch's 16-bit error can
    fall below one rounding of the output (fp16, 7 atoms: torch 1.9e-4, ours 5.8e-4, one fp16 rounding ~3e-4),
    which a kernel rounding P and dS to 16 bits for its matmuls cannot match 3x over."""
    for name, ref in expected.items():
        out = got[name]
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert not torch.isnan(out).any(), f"{name}: NaN"
        if mask is not None and name in ("out", "dq", "dk", "dv"):
            out, ref = out[mask], ref[mask]
            torch_result = None if low_precision is None else low_precision[name][mask]
        else:
            torch_result = None if low_precision is None else low_precision[name]
        if ref.norm() == 0:  # e.g. dq of one-atom molecules: rounding is all there is to compare
            assert out.abs().max() < 10 * RELATIVE_ERROR[dtype], f"{name}: expected zeros, got {out.abs().max()}"
            continue
        assert_close(out, ref, dtype, name)
        if torch_result is not None:
            ours, theirs = relative_error(out, ref), relative_error(torch_result, ref)
            stored = relative_error(ref.to(dtype), ref)
            assert ours <= 3 * theirs + stored, \
                f"{name}: error {ours:.2e} > 3x torch's {theirs:.2e} + {stored:.2e} (the exact result in {dtype})"


def check_against_reference(generator, dtype, q, k, v, bias=None, rel_table=None, mask=None, **options):
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    if mask is not None:
        options["mask"] = mask
    got = run("triton", q, k, v, bias, grad_seed=seed, rel_table=rel_table, **options)
    wide = in_dtype(torch.float64, q, k, v, bias, rel_table)
    received = [got[name].dtype for name in ("out", "logits") if name in got]
    expected = run("reference", *wide[:4], grad_seed=seed, rel_table=wide[4], upstream_dtypes=received, **options)
    low = None
    if dtype != torch.float32:
        low = run("reference", q, k, v, bias, grad_seed=seed, rel_table=rel_table, **options)
    compare(got, expected, dtype, low, mask)
    return got, expected


# ------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("atoms", [1, 7, 33, 64, 127, 130])
def test_padded_sizes(generator, atoms, dtype):
    sizes = [atoms, max(1, atoms // 2), 1]
    q, k, v, mask = random_padded(generator, sizes, heads=2, head_dim=24, dtype=dtype)
    bias = random_bias(generator, (3, 2, atoms, atoms), mask, dtype)
    check_against_reference(generator, dtype, q, k, v, bias, mask=mask)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 64])
def test_head_dims(generator, head_dim, dtype):
    q, k, v, mask = random_padded(generator, [33, 20], heads=2, head_dim=head_dim, dtype=dtype)
    bias = random_bias(generator, (2, 2, 33, 33), mask, dtype)
    check_against_reference(generator, dtype, q, k, v, bias, mask=mask, return_logits=True)


@pytest.mark.full
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 64])
@pytest.mark.parametrize("atoms", [1, 7, 33, 64, 127, 130])
def test_sizes_by_head_dims(generator, atoms, head_dim, dtype):
    q, k, v, mask = random_padded(generator, [atoms, max(1, atoms - 5)], heads=3, head_dim=head_dim, dtype=dtype)
    bias = random_bias(generator, (2, 3, atoms, atoms), mask, dtype)
    check_against_reference(generator, dtype, q, k, v, bias, mask=mask)


@pytest.mark.parametrize("shape", ["1HNN", "B1NN", "11NN", "expanded over heads"])
def test_broadcast_bias(generator, shape):
    dtype = torch.float32
    q, k, v, mask = random_padded(generator, [9, 17, 4], heads=3, head_dim=16, dtype=dtype)
    full = (3, 3, 17, 17)
    if shape == "expanded over heads":
        bias = random_bias(generator, (3, 1, 17, 17), mask, dtype).expand(full)
        assert bias.stride(1) == 0
    else:
        sizes = {"1HNN": (1, 3, 17, 17), "B1NN": (3, 1, 17, 17), "11NN": (1, 1, 17, 17)}[shape]
        # A bias shared across the batch cannot be NaN-poisoned: some molecule reads every pair.
        bias = random_bias(generator, sizes, mask if sizes[0] > 1 else None, dtype)
    got, _ = check_against_reference(generator, dtype, q, k, v, bias, mask=mask)
    assert got["dbias"].shape == bias.shape


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("bias_heads", ["H", "1", None])
def test_packed_ragged_batch(generator, dtype, bias_heads):
    sizes = [5, 1, 33, 7, 64, 2]
    heads = 2
    q, k, v, mask = random_padded(generator, sizes, heads, 24, dtype)
    cu_seqlens, max_seqlen = layout.cu_seqlens_from_mask(mask)
    pairs = int(layout.pair_offsets(cu_seqlens)[-1])
    packed = [layout.pack_atoms(x, mask) for x in (q, k, v)]
    bias = None
    if bias_heads is not None:
        bias = torch.randn(heads if bias_heads == "H" else 1, pairs, generator=generator).to(dtype)
    relations = torch.randint(0, 12, (pairs,), generator=generator, dtype=torch.int16)
    table = torch.randn(12, heads, generator=generator).to(dtype)
    check_against_reference(generator, dtype, *packed, bias, rel_table=table, cu_seqlens=cu_seqlens,
                            max_seqlen=max_seqlen, rel_index=relations, return_logits=True)


def test_packed_with_strided_cu_seqlens(generator):
    """cu_seqlens as a view with stride 2 (every other entry of a longer tensor): the kernels read its values,
    not its memory."""
    q, k, v, mask = random_padded(generator, [3, 1, 5], heads=2, head_dim=8, dtype=torch.float32)
    cu_seqlens, max_seqlen = layout.cu_seqlens_from_mask(mask)
    strided = torch.stack([cu_seqlens, torch.full_like(cu_seqlens, 99)], dim=1).flatten()[::2]
    assert not strided.is_contiguous() and torch.equal(strided, cu_seqlens)
    check_against_reference(generator, torch.float32, *(layout.pack_atoms(x, mask) for x in (q, k, v)),
                            cu_seqlens=strided, max_seqlen=max_seqlen)


def test_packed_equals_padded(generator):
    dtype = torch.float32
    sizes = [13, 1, 40, 6]
    q, k, v, mask = random_padded(generator, sizes, 2, 16, dtype)
    bias = random_bias(generator, (4, 2, 40, 40), mask, dtype)
    padded = run("triton", q, k, v, bias, mask=mask, return_logits=True)
    cu_seqlens, max_seqlen = layout.cu_seqlens_from_mask(mask)
    pairs = mask[:, :, None] & mask[:, None, :]
    packed_bias = bias.permute(1, 0, 2, 3)[:, pairs]
    packed = run("triton", *(layout.pack_atoms(x, mask) for x in (q, k, v)), packed_bias,
                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, return_logits=True)
    # Different upstream gradients would differ; run() draws them from the same seed over different shapes,
    # so compare the forward here and the backward through the reference checks above.
    torch.testing.assert_close(packed["out"], layout.pack_atoms(padded["out"], mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed["logits"], padded["logits"].permute(1, 0, 2, 3)[:, pairs], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("index_dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_relation_table(generator, index_dtype, with_bias):
    dtype = torch.float32
    q, k, v, mask = random_padded(generator, [21, 8, 3], heads=4, head_dim=8, dtype=dtype)
    relations = torch.randint(0, 40, (3, 21, 21), generator=generator).to(index_dtype)
    relations[~(mask[:, :, None] & mask[:, None, :])] = -1  # ids at padded pairs are never read (255 in uint8)
    table = torch.randn(40, 4, generator=generator).to(dtype)
    bias = random_bias(generator, (1, 4, 21, 21), None, dtype) if with_bias else None
    got, _ = check_against_reference(generator, dtype, q, k, v, bias, rel_table=table, mask=mask,
                                     rel_index=relations)
    # Relation ids nobody uses get exactly zero gradient.
    used = torch.zeros(40, dtype=torch.bool)
    used[relations[mask[:, :, None] & mask[:, None, :]].long()] = True
    assert (got["drel_table"][~used] == 0).all()


@pytest.mark.parametrize("packed", [True, False])
def test_table_gradient_with_ids_far_apart(generator, packed):
    """Ids in two clusters far apart, as MoleBlend's (distances first, the unreachable and virtual-token ids at the
    table's end): d(rel_table) skips the empty chunks between them and still matches the reference. Ragged
    lengths: 40 and 33 atoms take 2 x 2 gradient tiles, 9 and 1 take one."""
    sizes = [40, 9, 1, 33]
    q, k, v, mask = random_padded(generator, sizes, heads=2, head_dim=8, dtype=torch.float32)
    pair_mask = mask[:, :, None] & mask[:, None, :]
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 60, 61])
    relations = ids[torch.randint(0, len(ids), pair_mask.shape, generator=generator)].to(torch.int8)
    table = torch.randn(62, 2, generator=generator)
    if packed:
        cu_seqlens, max_seqlen = layout.cu_seqlens_from_mask(mask)
        got, _ = check_against_reference(generator, torch.float32, *(layout.pack_atoms(x, mask) for x in (q, k, v)),
                                         rel_table=table, rel_index=relations[pair_mask], cu_seqlens=cu_seqlens,
                                         max_seqlen=max_seqlen)
    else:
        relations[~pair_mask] = -1  # never read
        got, _ = check_against_reference(generator, torch.float32, q, k, v, rel_table=table, mask=mask,
                                         rel_index=relations)
    unused = torch.ones(62, dtype=torch.bool)
    unused[ids] = False
    assert (got["drel_table"][unused] == 0).all() and (got["drel_table"][ids] != 0).all()


@pytest.mark.parametrize("head_dim", [100, 128])
def test_table_gradient_over_head_dimension_slices(generator, head_dim):
    """float32 at D > 64: the table-gradient kernel sums Q K^T and dO V^T over 64-wide slices of the head
    dimension (whole 32 x 128 tiles spilled 5.5 KB); at D = 100 the second slice is partly masked. Two tiles a
    side for the 37-atom molecule."""
    from pyblend.kernels import relation_attention as kernels

    config = kernels._launch_config("table", 37, head_dim, torch.float32)
    assert config.get("D_STEP", config["BLOCK_D"]) < config["BLOCK_D"], config
    q, k, v, mask = random_padded(generator, [37, 5, 1], heads=2, head_dim=head_dim, dtype=torch.float32)
    relations = torch.randint(0, 30, (3, 37, 37), generator=generator, dtype=torch.int16)
    relations[~(mask[:, :, None] & mask[:, None, :])] = -1
    table = torch.randn(30, 2, generator=generator)
    check_against_reference(generator, torch.float32, q, k, v, rel_table=table, mask=mask, rel_index=relations)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ids_outside_the_table_add_nothing_under_compile(generator, backend, dtype):
    """torch.compile skips the id range check (reading ids would break the graph): ids outside [0, R) then add no
    bias and get no gradient on both backends, as a dense bias with zeros there. -16 and below reach the table
    gradient's first relation chunk below 0, which once wrote before its buffer. int64 ids 2^32 + 1 and
    3 - 2^32 once became rows 1 and 3 when the kernels narrowed them to int32 before the range test."""
    target = backend_device(backend)
    q, k, v, mask = random_padded(generator, [7, 5], heads=2, head_dim=8, dtype=torch.float32)
    q, k, v = (x.nan_to_num().to(target) for x in (q, k, v))
    ids = torch.randint(0, 20, (2, 7, 7), generator=generator, dtype=dtype)
    ids[0, 1, 2], ids[0, 3, 3], ids[1, 0, 4], ids[1, 2, 1] = -16, -40, 20, 1000
    if dtype == torch.int64:
        ids[0, 4, 4], ids[1, 3, 3] = 2**32 + 1, 3 - 2**32
    known = (ids >= 0) & (ids < 20)
    table = torch.randn(20, 2, generator=generator)

    def attend(table, dense):
        if dense:
            bias = torch.where(known[:, None], table[ids.clamp(0, 19)].permute(0, 3, 1, 2), 0.0).to(target)
            out = ops.relation_attention(q, k, v, bias, mask=mask.to(target), backend=backend)
        else:
            out = ops.relation_attention(q, k, v, mask=mask.to(target), rel_index=ids.to(target), rel_table=table,
                                         backend=backend)
        return (out * torch.linspace(-1, 1, out.numel(), device=target).view(out.shape)).sum()

    leaf = table.to(target).requires_grad_()
    got = torch.autograd.grad(torch.compile(attend, backend="aot_eager", fullgraph=True)(leaf, False), leaf)[0]
    expected_leaf = table.to(target).requires_grad_()
    expected = torch.autograd.grad(attend(expected_leaf, True), expected_leaf)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_table_equals_dense_bias(generator):
    q, k, v, mask = random_padded(generator, [15, 9], heads=2, head_dim=16, dtype=torch.float32)
    relations = torch.randint(0, 7, (2, 15, 15), generator=generator, dtype=torch.int32)
    table = torch.randn(7, 2, generator=generator)
    by_table = run("triton", q, k, v, rel_table=table, rel_index=relations, mask=mask)
    dense = run("triton", q, k, v, reference.bias_from_relations(relations, table), mask=mask)
    torch.testing.assert_close(by_table["out"], dense["out"], rtol=1e-6, atol=1e-6)
    # d(rel_table)[r, h] sums the dense bias gradient over the pairs with relation r.
    expected = torch.zeros(7, 2, dtype=torch.float64)
    expected.index_add_(0, relations.flatten().long(), dense["dbias"].permute(0, 2, 3, 1).reshape(-1, 2).double())
    torch.testing.assert_close(by_table["drel_table"].double(), expected, rtol=1e-5, atol=1e-6)


def test_table_form_allocates_no_dense_bias(generator):
    batch, atoms, heads = 2, 40, 8
    q, k, v, mask = random_padded(generator, [40, 31], heads=heads, head_dim=8, dtype=torch.float32)
    q, k, v = (x.nan_to_num().requires_grad_() for x in (q, k, v))
    relations = torch.randint(0, 30, (batch, atoms, atoms), generator=generator, dtype=torch.int8)
    table = torch.randn(30, heads, generator=generator, requires_grad=True)
    with Allocations() as record:
        out = ops.relation_attention(q, k, v, rel_index=relations, rel_table=table, mask=mask, backend="triton")
        out.sum().backward()
    dense = batch * heads * atoms * atoms
    assert max(record.sizes) < dense // 4, f"a tensor of {max(record.sizes)} elements (dense bias: {dense})"
    assert table.grad is not None and torch.isfinite(table.grad).all()


# ------------------------------------------------------------------------------- padding and edge cases


def test_padded_rows_and_dead_rows_give_zeros(generator):
    dtype = torch.float32
    q, k, v, mask = random_padded(generator, [6, 1, 5], heads=2, head_dim=8, dtype=dtype)
    mask[2] = False  # a molecule with no atom at all
    bias = random_bias(generator, (3, 2, 6, 6), mask, dtype)
    bias[0, 1, 2, :] = float("-inf")  # a row whose every key is excluded by the bias
    got = run("triton", q, k, v, bias, mask=mask)
    expected = run("reference", *in_dtype(torch.float64, q, k, v, bias), mask=mask)
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{name}: not finite"
    assert (got["out"][~mask] == 0).all() and (got["out"][0, 2, 1] == 0).all()
    assert (got["dq"][~mask] == 0).all() and (got["dk"][~mask] == 0).all() and (got["dv"][~mask] == 0).all()
    compare(got, expected, dtype, mask=mask)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_at_a_real_atom_or_pair_reaches_the_output(generator, backend):
    """NaN in a real atom's q or k, or in the bias at a real pair, makes the outputs of the rows that read it NaN,
    as torch's softmax does; a +inf bias too (inf - inf). Such rows used to count as rows with no live key and came
    out as zeros, hiding the NaN. Every other row keeps its value; padding holds NaN and is still never read."""
    q, k, v, mask = random_padded(generator, [5, 4], heads=2, head_dim=8, dtype=torch.float32)
    bias = random_bias(generator, (2, 2, 5, 5), mask, torch.float32)
    clean = run(backend, q, k, v, bias, mask=mask)["out"]
    q[0, 1, 0, 3] = float("nan")  # molecule 0, head 0: row 1
    k[1, 2, 1, 0] = float("nan")  # molecule 1, head 1: key 2, read by every row
    bias[0, 1, 3, 0] = float("inf")  # molecule 0, head 1: row 3
    out = run(backend, q, k, v, bias, mask=mask)["out"]
    poisoned = torch.zeros(out.shape[:3], dtype=torch.bool)
    poisoned[0, 1, 0] = poisoned[1, :4, 1] = poisoned[0, 3, 1] = True
    assert torch.isnan(out[poisoned]).all()
    untouched = ~poisoned & mask[:, :, None]
    torch.testing.assert_close(out[untouched], clean[untouched], rtol=0, atol=0)
    assert (out[~mask] == 0).all()


def test_rows_whose_every_logit_is_huge(generator):
    """A row masked by a finite -1e9 bias on every key (the masked_fill(-1e9) idiom): its output is the mean of v,
    and the backward must recompute probabilities 1/N, as torch's float32 softmax does. Stored as one float32,
    the log-sum-exp -1e9 + log N rounded to -1e9 and made every probability 1 (gradients N times too large)."""
    q, k, v, _ = random_padded(generator, [6, 6], heads=2, head_dim=8, dtype=torch.float32)
    bias = torch.randn(2, 2, 6, 6, generator=generator)
    bias[0, 1, 2, :] = -1e9
    bias[1, 0, :, :] = bias[1, 0, :, :] - 1e7  # a whole head offset: log N is below a float32 ulp of 1e7 too
    got = run("triton", q, k, v, bias)
    expected = run("reference", q, k, v, bias)  # float32: the logits themselves lose q.k at this size
    torch.testing.assert_close(got["out"][0, 2, 1], v[0, :, 1].mean(0))
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float32_bias_of_minus_1e9_with_float16_inputs(generator, backend):
    """With float16 q, k, v and a float32 bias, a row at -1e9 on every key is a row of equal logits (the mean of
    v), not an empty row: the reference used to cast the bias to float16, where -1e9 is -inf, and output zeros."""
    q, k, v, _ = random_padded(generator, [5], heads=2, head_dim=8, dtype=torch.float16)
    bias = torch.randn(1, 2, 5, 5, generator=generator)
    bias[0, 1, 3, :] = -1e9
    got = run(backend, q, k, v, bias)
    # float32 logits, as the kernel's: at -1e9 they lose q.k (a float64 reference would keep it).
    expected = run("reference", q.float(), k.float(), v.float(), bias, upstream_dtypes=[torch.float16])
    torch.testing.assert_close(got["out"][0, 3, 1], v[0, :, 1].mean(0), rtol=2e-3, atol=2e-3)
    compare(got, expected, torch.float16)


def test_single_atom_molecule(generator):
    q, k, v, mask = random_padded(generator, [1], heads=3, head_dim=16, dtype=torch.float32)
    got = run("triton", q, k, v, mask=mask)
    # One key: the probability is 1, so the output is v and q, k get no gradient (up to rounding).
    torch.testing.assert_close(got["out"], v)
    assert got["dq"].abs().max() < 1e-6 and got["dk"].abs().max() < 1e-6
    torch.testing.assert_close(got["dv"], run("reference", q.double(), k.double(), v.double(), mask=mask)["dv"].float())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch(backend):
    for q in (torch.empty(0, 5, 2, 8), torch.empty(3, 0, 2, 8)):
        out = ops.relation_attention(q, q, q, backend=backend)
        assert out.shape == q.shape
    for cu_seqlens in ([0], [0, 0]):
        q = torch.empty(0, 2, 8)
        out = ops.relation_attention(q, q, q, cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
                                     max_seqlen=0, backend=backend)
        assert out.shape == q.shape


@triton.jit
def _token_offsets_probe(out_ptr, cu_seqlens_ptr, pair_offsets_ptr, row_stride, BLOCK: tl.constexpr):
    """Writes the offsets of rows 0 .. BLOCK-1 of packed molecule b = program id, as the kernels compute them."""
    b = tl.program_id(0).to(tl.int64)
    atoms, _, _ = _sequence(b, cu_seqlens_ptr, pair_offsets_ptr, BLOCK, True)
    rows = tl.arange(0, BLOCK)
    # Packed, the launcher passes the token stride as the molecule stride.
    offsets = _atom_offsets(atoms, 0, rows, tl.arange(0, 1), row_stride, row_stride, 0, 1)
    tl.store(out_ptr + b * BLOCK + rows[:, None], offsets)


def test_packed_token_offsets_are_64_bit():
    """Every per-atom load and store of the kernels goes through ``_sequence`` and ``_atom_offsets``: a packed
    token index times the row stride must not wrap at 2^31 (a molecule starting at token 2^30, 768 elements a row:
    it wrapped to offset 0, another molecule's rows)."""
    where = device()
    first = 2 ** 30
    cu_seqlens = torch.tensor([0, first, first + 4], dtype=torch.int32, device=where)
    pair_offsets = torch.zeros(3, dtype=torch.int64, device=where)
    out = torch.zeros(2, 4, 1, dtype=torch.int64, device=where)
    _token_offsets_probe[(2,)](out, cu_seqlens, pair_offsets, 768, BLOCK=4)
    assert out[1, :, 0].tolist() == [row * 768 for row in range(first, first + 4)]


def test_atoms_too_far_apart_for_32_bits_are_copied_contiguous():
    """Within a molecule the kernels compute atom index x stride in 32 bits; a view where that passes 2^31 (a
    sequence-first (N, B, H, D) q, a pair-first (N, N, B, H) bias permuted to (B, H, N, N), each of 2^31+ elements)
    is copied contiguous first. (Stand-ins with those strides: the real views would take 4 GiB.)"""
    from pyblend.kernels.relation_attention import _within_int32_offsets

    class View:
        def __init__(self, strides):
            self.strides = strides

        def stride(self, dim):
            return self.strides[dim]

        def contiguous(self):
            return "a contiguous copy"

    contiguous = torch.empty(2, 5, 3, 8)
    assert _within_int32_offsets(contiguous, 5, (-3,)) is contiguous
    sequence_first = View({-3: 2 ** 24 * 24})  # B = 2^24 molecules of 3 heads x 8
    assert _within_int32_offsets(sequence_first, 6, (-3,)) is sequence_first  # 5 * 2^24 * 24 < 2^31
    assert _within_int32_offsets(sequence_first, 7, (-3,)) == "a contiguous copy"  # 6 * 2^24 * 24 >= 2^31
    pair_first = View({-2: 7 * 2 ** 24 * 8, -1: 2 ** 24 * 8})  # (N=7, N, B=2^24, H=8) permuted
    assert _within_int32_offsets(pair_first, 2, (-2, -1)) is pair_first  # 7 * 2^27 < 2^31
    assert _within_int32_offsets(pair_first, 7, (-2, -1)) == "a contiguous copy"  # 6 * 7 * 2^27 >= 2^31


def test_a_permuted_bias_and_relation_ids_give_the_contiguous_result(generator):
    """The copy path's inputs: a pair-first bias and relation ids permuted into place (small here, so read in
    place) agree with contiguous copies of themselves."""
    q, k, v, mask = random_padded(generator, [6, 4], heads=2, head_dim=8, dtype=torch.float32)
    bias = torch.randn(6, 6, 2, 2, generator=generator).permute(2, 3, 0, 1)  # (N, N, B, H) -> (B, H, N, N)
    rel_index = torch.randint(0, 5, (6, 6, 2), generator=generator).permute(2, 0, 1)
    rel_table = torch.randn(5, 2, generator=generator)
    permuted = ops.relation_attention(q, k, v, bias, mask=mask, rel_index=rel_index, rel_table=rel_table,
                                      backend="triton")
    copied = ops.relation_attention(q, k, v, bias.contiguous(), mask=mask, rel_index=rel_index.contiguous(),
                                    rel_table=rel_table, backend="triton")
    torch.testing.assert_close(permuted, copied, rtol=0, atol=0)


def test_noncontiguous_inputs(generator):
    """q, k, v as views of one fused projection, as a model makes them."""
    fused = torch.randn(2, 11, 3, 2, 16, generator=generator)
    q, k, v = fused.unbind(2)
    assert not q.is_contiguous()
    check_against_reference(generator, torch.float32, q, k, v, torch.randn(2, 2, 11, 11, generator=generator))


def test_logits_gradient_flows_back(generator):
    """A Uni-Mol-style layer feeds S to the next layer; its gradient must reach q, k and the bias."""
    q, k, v, mask = random_padded(generator, [12, 7], heads=2, head_dim=8, dtype=torch.float32)
    bias = random_bias(generator, (2, 2, 12, 12), mask, torch.float32)
    got, _ = check_against_reference(generator, torch.float32, q, k, v, bias, mask=mask, return_logits=True)
    pairs = (mask[:, :, None] & mask[:, None, :])[:, None].expand_as(got["logits"])
    assert (got["logits"][~pairs] == 0).all()


@pytest.mark.parametrize("used", ["out", "logits"])
def test_gradients_through_one_output_alone(generator, used):
    """With return_logits, a loss of the output alone or the logits alone: the reference's gradients, and none
    (None, not zeros) for v when only the logits are used, as autograd gives on the reference."""
    q, k, v, mask = random_padded(generator, [9, 5], heads=2, head_dim=8, dtype=torch.float32)
    bias = random_bias(generator, (2, 2, 9, 9), mask, torch.float32)
    upstream = torch.randn((2, 9, 2, 8) if used == "out" else (2, 2, 9, 9), generator=generator,
                           dtype=torch.float64)
    found = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        target = torch.device("cpu") if backend == "reference" else device()
        leaves = [x.detach().to(target, dtype).requires_grad_() for x in (q, k, v, bias)]
        if backend == "reference":
            out, logits = reference.relation_attention(*leaves, mask=mask, return_logits=True)
        else:
            out, logits = ops.relation_attention(*leaves, mask=mask.to(target), return_logits=True, backend=backend)
        (out if used == "out" else logits).backward(upstream.to(target, dtype))
        found[backend] = [None if x.grad is None else x.grad.cpu() for x in leaves]
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), found["triton"], found["reference"]):
        assert (got is None) == (want is None), f"{name}: {got is None=} but {want is None=} on the reference"
        if want is not None:
            real = mask if name != "dbias" else (mask[:, :, None] & mask[:, None, :])[:, None].expand_as(want)
            assert_close(got[real], want[real], torch.float32, name)
    assert (found["reference"][2] is None) == (used == "logits")


# ------------------------------------------------------------------------------------------- dropout


def _seed_of(generator_seed):
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(generator_seed)).item())


def test_dropout_matches_reference_with_the_kernel_pattern(generator):
    from pyblend.kernels.relation_attention import dropout_keep

    q, k, v, mask = random_padded(generator, [19, 10], heads=2, head_dim=16, dtype=torch.float32)
    bias = random_bias(generator, (2, 2, 19, 19), mask, torch.float32)
    got = run("triton", q, k, v, bias, mask=mask, dropout_p=0.3, generator=torch.Generator().manual_seed(5))
    keep = dropout_keep((2, 2, 19, 19), 0.3, _seed_of(5), device()).cpu()
    expected = run("reference", *in_dtype(torch.float64, q, k, v, bias), mask=mask, dropout_p=0.3,
                   dropout_keep=keep)
    compare(got, expected, torch.float32, mask=mask)


def test_dropout_statistics_and_reproducibility(generator):
    from pyblend.kernels.relation_attention import dropout_keep

    keep = dropout_keep((4, 8, 64, 64), 0.25, _seed_of(11), device()).cpu()
    kept, count = keep.double().mean().item(), keep.numel()
    sigma = (0.75 * 0.25 / count) ** 0.5
    assert abs(kept - 0.75) < 5 * sigma, f"kept {kept:.4f}, expected 0.75 +- {5 * sigma:.4f}"
    # Rows and heads are not correlated: every (row) keeps close to 75%.
    per_row = keep.double().mean(-1).flatten()
    assert per_row.std().item() < 3 * (0.75 * 0.25 / 64) ** 0.5

    q, k, v, mask = random_padded(generator, [16, 9], heads=2, head_dim=8, dtype=torch.float32)
    first = run("triton", q, k, v, mask=mask, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    again = run("triton", q, k, v, mask=mask, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    other = run("triton", q, k, v, mask=mask, dropout_p=0.5, generator=torch.Generator().manual_seed(4))
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name}: same seed, different result"
    assert not torch.equal(first["out"], other["out"])
    # The expectation of dropout is no dropout: average many seeds.
    plain = run("triton", q, k, v, mask=mask)["out"]
    average = sum(run("triton", q, k, v, mask=mask, dropout_p=0.5,
                      generator=torch.Generator().manual_seed(s))["out"] for s in range(24)) / 24
    assert relative_error(average[mask], plain[mask].double()) < 0.3


def test_reference_backend_dropout_is_reproducible(generator):
    q, k, v, mask = random_padded(generator, [10, 4], heads=2, head_dim=8, dtype=torch.float32)
    q, k, v = (x.nan_to_num() for x in (q, k, v))
    a = ops.relation_attention(q, k, v, mask=mask, dropout_p=0.4, generator=torch.Generator().manual_seed(1),
                               backend="reference")
    b = ops.relation_attention(q, k, v, mask=mask, dropout_p=0.4, generator=torch.Generator().manual_seed(1),
                               backend="reference")
    assert torch.equal(a, b)


def test_backward_is_deterministic(generator):
    q, k, v, mask = random_padded(generator, [30, 12, 25], heads=2, head_dim=16, dtype=torch.float32)
    bias = random_bias(generator, (1, 1, 30, 30), None, torch.float32)
    relations = torch.randint(0, 9, (3, 30, 30), generator=generator, dtype=torch.int8)
    table = torch.randn(9, 2, generator=generator)
    first = run("triton", q, k, v, bias, mask=mask, rel_index=relations, rel_table=table)
    second = run("triton", q, k, v, bias, mask=mask, rel_index=relations, rel_table=table)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical calls"


# ------------------------------------------------------------------------------- reference backend, ops


def test_reference_backend_matches_float64(generator):
    q, k, v, mask = random_padded(generator, [9, 4], heads=2, head_dim=8, dtype=torch.float32)
    bias = random_bias(generator, (1, 2, 9, 9), None, torch.float32)
    relations = torch.randint(0, 5, (2, 9, 9), generator=generator, dtype=torch.int16)
    table = torch.randn(5, 2, generator=generator)
    leaves = [x.nan_to_num().requires_grad_() for x in (q, k, v, bias, table)]
    out, logits = ops.relation_attention(*leaves[:4], mask=mask, rel_index=relations, rel_table=leaves[4],
                                         return_logits=True, backend="reference")
    (out.square().sum() + logits.sum()).backward()
    wide = [x.detach().double().requires_grad_() for x in leaves]
    ref_out, ref_logits = reference.relation_attention(*wide[:4], mask=mask, rel_index=relations,
                                                       rel_table=wide[4], return_logits=True)
    (ref_out.square().sum() + ref_logits.sum()).backward()
    assert_close(out[mask], ref_out[mask], torch.float32, "out")
    for ours, theirs, name in zip(leaves, wide, ["dq", "dk", "dv", "dbias", "drel_table"]):
        assert_close(ours.grad, theirs.grad, torch.float32, name)


def test_reference_gradcheck_float64(generator):
    q, k, v, mask = random_padded(generator, [4, 2], heads=2, head_dim=3, dtype=torch.float64)
    q, k, v = (x.nan_to_num().requires_grad_() for x in (q, k, v))
    bias = torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: reference.relation_attention(*x, mask=mask), (q, k, v, bias))


def test_automatic_backend_on_cpu_is_the_reference(generator):
    q = torch.randn(1, 5, 2, 8, generator=generator)
    if HAS_CUDA:
        pytest.skip("on a GPU machine CPU tensors still go to the reference, but TRITON_INTERPRET is unset")
    out = ops.relation_attention(q, q, q)
    torch.testing.assert_close(out, reference.relation_attention(q, q, q))


@pytest.mark.parametrize("return_logits", [False, True])
def test_opcheck(generator, return_logits):
    q, k, v, mask = random_padded(generator, [5, 3], heads=2, head_dim=8, dtype=torch.float32)
    target = device()
    q, k, v, mask = (x.nan_to_num().to(target) for x in (q, k, v, mask))
    bias = torch.randn(1, 2, 5, 5, generator=generator).to(target)
    relations = torch.randint(0, 4, (2, 5, 5), generator=generator, dtype=torch.int16).to(target)
    table = torch.randn(4, 2, generator=generator).to(target)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), bias.requires_grad_(), relations,
            table.requires_grad_(), mask, None, 5, 0.3, 0.0, 0, return_logits)
    torch.library.opcheck(torch.ops.pyblend.relation_attention.default, args)
    out, lse, logits = torch.ops.pyblend.relation_attention(*args)
    plain = [x.detach() if isinstance(x, torch.Tensor) else x for x in args]
    q, k, v, bias, relations, table, mask = plain[:7]
    grad_logits = torch.randn_like(logits) if return_logits else None
    # The backward op's own derivative only raises (no double backward): checked on plain tensors.
    torch.library.opcheck(torch.ops.pyblend.relation_attention_backward.default,
                          (torch.randn_like(out), grad_logits, q, k, v, out.detach(), lse.detach(), bias, relations,
                           table, mask, None, 5, 0.3, 0.0, 0, True, True))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_traces_the_op(generator, backend):
    q, k, v, mask = random_padded(generator, [6, 4], heads=2, head_dim=8, dtype=torch.float32)
    target = backend_device(backend)
    q, k, v = (x.nan_to_num().to(target).requires_grad_() for x in (q, k, v))
    bias = torch.randn(2, 2, 6, 6, generator=generator).to(target).requires_grad_()
    mask = mask.to(target)

    def layer(q, k, v, bias):
        return ops.relation_attention(q, k, v, bias, mask=mask, backend=backend).relu().sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(layer(q, k, v, bias), (q, k, v, bias))
    got = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------- validation


def test_errors_name_the_argument(generator):
    q = torch.randn(2, 5, 2, 8, generator=generator)
    cases = [
        (dict(k=torch.randn(2, 6, 2, 8)), ValueError, "k: expected the shape of q"),
        (dict(v=q.half()), TypeError, "v: expected the dtype of q"),
        (dict(bias=torch.randn(2, 3, 5, 5)), ValueError, "bias: expected shape (B|1, H|1, N, N)"),
        (dict(bias=torch.randn(2, 2, 5, 5).long()), TypeError, "bias: expected dtype"),
        (dict(mask=torch.ones(2, 5)), TypeError, "mask: expected dtype bool"),
        (dict(rel_index=torch.zeros(2, 5, 5, dtype=torch.int8)), ValueError, "rel_table: rel_index and rel_table"),
        (dict(rel_index=torch.full((2, 5, 5), 3, dtype=torch.int8), rel_table=torch.randn(3, 2)), ValueError,
         "rel_index: expected ids in [0, 3)"),
        (dict(rel_index=torch.zeros(2, 5, 5, dtype=torch.int8), rel_table=torch.randn(3, 4)), ValueError,
         "rel_table: expected shape (R, H)"),
        (dict(rel_index=torch.zeros(2, 5, 5), rel_table=torch.randn(3, 2)), TypeError, "rel_index: expected dtype"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(q=q[..., :0], k=q[..., :0], v=q[..., :0]), ValueError, "q: expected a head width D >= 1"),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), ValueError, "q: expected the packed layout"),
        (dict(backend="cpp"), ValueError, "has no 'cpp' backend"),
        # The padded layout's width is q's: a max_seqlen used to be overwritten unchecked.
        (dict(max_seqlen=99), ValueError, "max_seqlen: the padded layout's width is q.shape[1] = 5; got 99"),
        (dict(return_logits="no"), TypeError, "return_logits: expected a bool; got 'no'"),
        (dict(return_logits=None), TypeError, "return_logits: expected a bool"),
        (dict(dropout_p=0.1, generator=123), TypeError, "generator: expected a torch.Generator or None; got 123"),
    ]
    for overrides, error, message in cases:
        arguments = dict(q=q, k=q, v=q)
        arguments.update(overrides)
        positional = [arguments.pop(name) for name in ("q", "k", "v")]
        with pytest.raises(error) as caught:
            ops.relation_attention(*positional, **arguments)
        assert message in str(caught.value), f"{overrides}: {caught.value}"


def test_numpy_scalars_are_accepted(generator):
    """scale=np.float32(0.3) and dropout_p=np.float32(0.1) were refused as "expected a finite float" (np.float64,
    a subclass of float, passed); on both backends they now give what the Python floats give."""
    import numpy as np

    from pyblend.nn import RelationBiasedAttention

    q, k, v = (torch.randn(2, 5, 2, 8, generator=generator) for _ in range(3))
    for backend in ("reference", "triton"):
        target = torch.device("cpu") if backend == "reference" else device()
        inputs = [x.to(target) for x in (q, k, v)]
        for scale, dropout_p in ((np.float32(0.3), np.float32(0.25)), (np.int64(1), np.float64(0.25))):
            got = ops.relation_attention(*inputs, scale=scale, dropout_p=dropout_p, backend=backend,
                                         generator=torch.Generator(target).manual_seed(1))
            want = ops.relation_attention(*inputs, scale=float(scale), dropout_p=float(dropout_p), backend=backend,
                                          generator=torch.Generator(target).manual_seed(1))
            assert torch.equal(got, want), (backend, scale, dropout_p)
        with pytest.raises(ValueError, match="scale: expected a finite float; got np.True_"):
            ops.relation_attention(*inputs, scale=np.bool_(True), backend=backend)
    module = RelationBiasedAttention(16, 2, dropout=np.float32(0.1), scaling=np.float32(0.5))
    assert (module.dropout, module.scaling) == (float(np.float32(0.1)), 0.5)


def test_numpy_max_seqlen_is_accepted(generator):
    """A packed max_seqlen=np.int64(5) was refused as "expected an int >= the longest molecule (5)", with value
    checks on and off (the compiled path)."""
    import numpy as np

    import pyblend

    q, k, v = (torch.randn(8, 2, 8, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0, 5, 8], dtype=torch.int32)
    bias = torch.randn(2, 25 + 9, generator=generator)
    want = ops.relation_attention(q, k, v, bias, cu_seqlens=cu_seqlens, max_seqlen=5)
    for checks in (True, False):
        with pyblend.set_value_checks(checks):
            got = ops.relation_attention(q, k, v, bias, cu_seqlens=cu_seqlens, max_seqlen=np.int64(5))
        assert torch.equal(got, want), checks


def test_packed_errors(generator):
    q = torch.randn(7, 2, 8, generator=generator)
    cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"bias: expected shape \(H\|1, P\) = \(2 or 1, 25\)"):
        ops.relation_attention(q, q, q, torch.randn(2, 24), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="cu_seqlens: describes 7 atoms but the input holds 6"):
        ops.relation_attention(q[:6], q[:6], q[:6], cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="max_seqlen"):
        ops.relation_attention(q, q, q, cu_seqlens=cu_seqlens, max_seqlen=3)
    with pytest.raises(ValueError, match="mask: the packed layout"):
        ops.relation_attention(q, q, q, cu_seqlens=cu_seqlens, mask=torch.ones(2, 4, dtype=torch.bool))


def test_triton_refuses_float64_with_a_reason():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        ops.relation_attention(q, q, q, backend="triton")


# --------------------------------------------------------------------------------------------- compile


# Packed molecules of N, N / 2 + 1 and 1 atoms, H = 32, and a relation table of 67 rows, per (N, D, dtype) of
# SHAPES; each script below goes on inside the loop.
COMPILE_PROBLEMS = """
import torch
from hopper import captured_launches, lower_launch
from pyblend.kernels import relation_attention as kernels

HEADS, RELATIONS = 32, 67
for max_seqlen, head_dim, dtype_name in SHAPES:
    dtype = getattr(torch, dtype_name)
    lengths = torch.tensor([max_seqlen, max_seqlen // 2 + 1, 1])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    atoms, pairs = int(lengths.sum()), int((lengths * lengths).sum())
    q, k, v = (torch.randn(atoms, HEADS, head_dim, dtype=dtype) for _ in range(3))
    rel_index = torch.randint(0, RELATIONS, (pairs,), dtype=torch.int8)
    table = torch.randn(RELATIONS, HEADS, dtype=dtype)
"""


HOPPER_COMPILE = COMPILE_PROBLEMS + """    launches = {}
    # Every feature on, packed; a per-head bias (dBias written by the dK/dV kernel), then one broadcast over heads
    # (its own reduction kernel).
    for bias in (torch.randn(HEADS, pairs, dtype=dtype), torch.randn(1, pairs, dtype=dtype)):
        problem = (bias, rel_index, table, None, cu_seqlens, max_seqlen, head_dim ** -0.5, 0.1, 7)
        with captured_launches() as captured:
            out, lse, logits = kernels.relation_attention_forward(q, k, v, *problem, True)
            kernels.relation_attention_backward(torch.randn_like(out), torch.randn_like(logits), q, k, v, out, lse,
                                                *problem, True, True)
        for kernel, args, kwargs in captured:
            launches.setdefault((kernel.fn.__name__, kwargs.get("WRITE_DBIAS")), (kernel, args, kwargs))
    for (name, _), (kernel, args, kwargs) in sorted(launches.items(), key=lambda item: str(item[0])):
        ptx, spills, sass = lower_launch(kernel, args, kwargs)
        wide = sum(sass.count(op) for op in ("LDG.E.128", "LDGSTS.E.BYPASS.128", "LDGSTS.E.128"))
        print(name, "mma", ptx.count("mma"), "spills", spills, "wide_loads", wide, max_seqlen, head_dim, dtype_name)
"""


# Kernels whose per-atom tiles are (32, D) over 4 warps for D = 24 and N > 16: 8 elements a thread, so 16-byte
# loads once each row is known to start 16-byte aligned (the bias and table kernels spread their tiles wider).
ATOM_TILE_KERNELS = {"_relation_attention_fwd_kernel", "_relation_attention_bwd_q_kernel",
                     "_relation_attention_bwd_kv_kernel"}


SWEEP = [(16, 8), (512, 8), (130, 24), (16, 64), (512, 64), (16, 128), (512, 128)]


@pytest.mark.parametrize("shapes", [
    pytest.param([(64, 24, "bfloat16"), (64, 24, "float32")], id="N64-D24"),
    pytest.param([(n, d, dtype) for dtype in ("bfloat16", "float32") for n, d in SWEEP] + [(130, 24, "float16")],
                 id="sweep", marks=pytest.mark.full)])
def test_kernels_compile_for_hopper_without_spills(shapes):
    """Calls the launchers on CPU tensors (packed, every feature on; (N, D, dtype) in ``shapes``) and lowers each
    kernel they launch to sm_90 as Triton would on the GPU, then runs ptxas: the interpreter accepts programs the
    compiler rejects, a register spill is a performance bug, and a kernel needing more shared memory than a block
    has fails only on the GPU. 16-bit matmuls run on the tensor cores (float32 ones are IEEE FMAs unless TF32 is
    allowed), and bf16 per-atom tiles (q, k, v, dO) load 16 bytes at a time, D = 24 included."""
    lines = run_compile_script(f"SHAPES = {shapes!r}\n" + HOPPER_COMPILE)
    assert len(lines) == 6 * len(shapes), lines
    for line in lines:
        words = line.split()
        assert int(words[2]) > 0 or words[9] == "float32", f"{line}: the matmuls should use the tensor cores"
        assert int(words[4]) == 0, f"{line}: registers spill"
        if words[0] in ATOM_TILE_KERNELS and int(words[7]) > 16 and int(words[8]) == 24 and words[9] != "float32":
            assert int(words[6]) > 0, f"{line}: the per-atom tiles should load 16 bytes per instruction"


def one_feature_set_compile(problem: str, bias_grad: bool, table_grad: bool) -> str:
    """A compile script over SHAPES for one feature set, no logits: ``problem`` builds the launchers' problem tuple
    (bias, rel_index, rel_table, mask, cu_seqlens, max_seqlen, scale, dropout_p, seed) from COMPILE_PROBLEMS'
    tensors; one line per launched kernel, its spill bytes third."""
    return COMPILE_PROBLEMS + f"""    problem = {problem}
    with captured_launches() as captured:
        out, lse, _ = kernels.relation_attention_forward(q, k, v, *problem, False)
        kernels.relation_attention_backward(torch.randn_like(out), None, q, k, v, out, lse, *problem, {bias_grad},
                                            {table_grad})
    for kernel, args, kwargs in captured:
        print(kernel.fn.__name__, "spills", lower_launch(kernel, args, kwargs)[1], max_seqlen, head_dim, dtype_name)
"""


def assert_no_spills(shapes, script: str, kernels_per_shape: int) -> None:
    lines = run_compile_script(f"SHAPES = {shapes!r}\n" + script)
    assert len(lines) == kernels_per_shape * len(shapes), lines
    for line in lines:
        assert int(line.split()[2]) == 0, f"{line}: registers spill"


@pytest.mark.full
def test_relation_table_alone_compiles_for_hopper_without_spills():
    """The table form as MoleBlend's SPD channel uses it: no dense bias, no dropout, no logits (other constexpr
    branches than the every-feature sweep, and float32's table kernel spilled there: 276 bytes at D = 64, 5.5 KB
    at D = 128)."""
    shapes = [(130, 24, "bfloat16"), (512, 32, "bfloat16"), (130, 64, "bfloat16"), (130, 64, "float32"),
              (512, 64, "float32"), (130, 24, "float32"), (130, 40, "float32"), (130, 128, "float32"),
              (512, 100, "float32")]
    script = one_feature_set_compile(
        "(None, rel_index, table, None, cu_seqlens, max_seqlen, head_dim ** -0.5, 0.0, 0)", False, True)
    assert_no_spills(shapes, script, kernels_per_shape=4)


def test_uint8_relation_ids_compile_for_hopper_without_spills():
    """uint8 ids take their own branch (widened before the range check: their dtype holds no -1, which Triton
    refused to compare them with)."""
    script = one_feature_set_compile(
        "(None, rel_index.to(torch.uint8), table, None, cu_seqlens, max_seqlen, head_dim ** -0.5, 0.0, 0)",
        False, True)
    assert_no_spills([(130, 24, "bfloat16")], script, kernels_per_shape=4)


@pytest.mark.full
def test_dense_bias_with_dropout_compiles_for_hopper_without_spills():
    """A per-head dense bias with dropout, no table, no logits (float32's forward spilled 16-44 bytes there at
    D = 72-256, its dK/dV 8 bytes at D = 64)."""
    shapes = [(130, 24, "float32"), (512, 64, "float32"), (130, 96, "float32"), (512, 128, "float32"),
              (130, 32, "bfloat16")]
    script = one_feature_set_compile(
        "(torch.randn(HEADS, pairs, dtype=dtype), None, None, None, cu_seqlens, max_seqlen, head_dim ** -0.5, 0.1, 7)",
        True, False)
    assert_no_spills(shapes, script, kernels_per_shape=3)


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 64])
def test_gpu_dtypes(generator, dtype, head_dim):
    sizes = [130, 64, 33, 7, 1]
    q, k, v, mask = random_padded(generator, sizes, heads=4, head_dim=head_dim, dtype=dtype)
    bias = random_bias(generator, (5, 4, 130, 130), mask, dtype)
    check_against_reference(generator, dtype, q, k, v, bias, mask=mask, return_logits=True)
    cu_seqlens, max_seqlen = layout.cu_seqlens_from_mask(mask)
    pairs = int(layout.pair_offsets(cu_seqlens)[-1])
    relations = torch.randint(0, 64, (pairs,), generator=generator, dtype=torch.int8)
    table = torch.randn(64, 4, generator=generator).to(dtype)
    check_against_reference(generator, dtype, *(layout.pack_atoms(x, mask) for x in (q, k, v)),
                            torch.randn(1, pairs, generator=generator).to(dtype), rel_table=table,
                            rel_index=relations, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


@pytest.mark.gpu
def test_gpu_default_set_sizes(generator, default_batch_with_hydrogens):
    _, batch = default_batch_with_hydrogens
    mask = batch.mask[:64]
    width = int(mask.sum(1).max())
    mask = mask[:, :width]
    q, k, v, _ = random_padded(generator, mask.sum(1).tolist(), heads=8, head_dim=24, dtype=torch.bfloat16,
                               width=width)
    bias = random_bias(generator, (64, 8, width, width), mask, torch.bfloat16)
    check_against_reference(generator, torch.bfloat16, q, k, v, bias, mask=mask)
