"""Multi-pair InfoNCE: the Triton kernels (interpreter on the CPU) and the reference against float64.

Every check draws fresh inputs, poisons absent samples with NaN, and compares the loss and every gradient
(each embedding, a learnable temperature) with the float64 reference.
"""

import math
import re

import numpy as np
import pytest
import torch

from pyblend import ops, reference
from pyblend.reference.multi_infonce import local_multi_infonce

from graphs import backend_device
from hopper import run_compile_script
from tolerances import RELATIVE_ERROR, assert_close, assert_close_to_sum, relative_error

HAS_CUDA = torch.cuda.is_available()
# bf16 arithmetic is wrong in Triton's interpreter: bf16 runs on the GPU only.
INTERPRETER_DTYPES = [torch.float32, torch.float16]


def random_embeddings(generator, batch, dims, dtype, masks=None, scale=1.0):
    """{name: (B, d)} with NaN in the rows a mask calls absent (they must never be read)."""
    out = {}
    for name, dim in dims.items():
        x = torch.randn(batch, dim, generator=generator, dtype=torch.float64) * scale
        if masks is not None and name in masks:
            x[~masks[name]] = float("nan")
        out[name] = x.to(dtype)
    return out


def random_mask(generator, batch, keep=0.7):
    return torch.rand(batch, generator=generator) < keep


def run(backend, embeddings, pairs, *, temperature=0.1, masks=None, dtype=None, **options):
    """Loss and gradients {name: tensor on the CPU}; ``dtype`` converts the inputs first (the reference in
    float64). A tensor temperature is a leaf whose gradient is returned as "dtemperature"."""
    target = torch.device("cpu") if backend == "reference" else backend_device("triton")
    leaves = {name: x.detach().to(target, dtype or x.dtype).requires_grad_() for name, x in embeddings.items()}
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().to(target, torch.float64 if dtype == torch.float64 else torch.float32)
        temperature.requires_grad_()
    if masks is not None:
        masks = {name: m.to(target) for name, m in masks.items()}
    fn = reference.multi_infonce if backend == "reference" else ops.multi_infonce
    if backend != "reference":
        options["backend"] = backend
    loss = fn(leaves, pairs, temperature=temperature, masks=masks, **options)
    loss.backward()
    found = {"loss": loss.detach().cpu()}
    found.update({f"d{name}": leaf.grad.detach().cpu() for name, leaf in leaves.items()})
    if isinstance(temperature, torch.Tensor):
        found["dtemperature"] = temperature.grad.detach().cpu()
    return found


def compare(got, expected, dtype, masks=None, low_precision=None):
    """Compare on present samples (absent ones must get exactly 0). With ``low_precision`` (the reference run
    in ``dtype``), an error above the table's bound still passes when it is within 3x PyTorch's own error
    (flash-attn's rule): near-tied logits of size ~1e4 make the softmax itself ill-conditioned."""
    for name, ref in expected.items():
        out = got[name]
        torch_result = None if low_precision is None else low_precision[name]
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert torch.isfinite(out).all(), f"{name}: inf or NaN"
        modality = name[1:]
        if masks is not None and modality in masks:
            absent = ~masks[modality]
            assert (out[absent] == 0).all(), f"{name}: nonzero gradient at absent samples"
            out, ref = out[~absent], ref[~absent]
            torch_result = None if torch_result is None else torch_result[~absent]
        if ref.norm() == 0:
            assert out.abs().max() < 10 * RELATIVE_ERROR[dtype], f"{name}: expected zeros, got {out.abs().max()}"
            continue
        if torch_result is not None:
            ours, theirs = relative_error(out, ref), relative_error(torch_result, ref)
            if ours <= 3 * theirs:
                assert torch.isfinite(out).all(), f"{name}: inf or NaN"
                continue
        assert_close(out, ref, dtype, name)


def check_against_reference(embeddings, pairs, dtype, against_torch=False, **options):
    got = run("triton", embeddings, pairs, **options)
    expected = run("reference", embeddings, pairs, dtype=torch.float64, **options)
    low = run("reference", embeddings, pairs, **options) if against_torch else None
    compare(got, expected, dtype, options.get("masks"), low)
    return got, expected


# ------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("batch, dim", [(1, 16), (7, 24), (33, 16), (130, 24)])
def test_one_pair_matches_reference(generator, batch, dim, dtype):
    embeddings = random_embeddings(generator, batch, {"graph": dim, "text": dim}, dtype)
    temperature = torch.tensor(0.05 + 0.1 * torch.rand((), generator=generator).item())
    check_against_reference(embeddings, [("graph", "text")], dtype, temperature=temperature)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_unnormalized_float_temperature(generator, dtype):
    embeddings = random_embeddings(generator, 45, {"a": 32, "b": 32}, dtype, scale=0.3)
    check_against_reference(embeddings, [("a", "b")], dtype, temperature=0.5, normalize=False)


@pytest.mark.parametrize("dim", [512, 600, 1024])
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_wide_embeddings(generator, dim, dtype):
    """Up to 1024 features on Triton: (16, 1024) tiles past 512, and widths past 512 that are not multiples of 16
    (600) zero-padded to one (the gradients come back cut to 600); absent samples in both modalities. Also held
    to 3x PyTorch's own error in the dtype (flash-attn's rule): the temperature's gradient sums B^2 terms that
    can cancel to near 0 (seed 384444737 at d = 1024: float32 torch 5.3e-5 from float64, ours 3.5e-5)."""
    masks = {"conformer": random_mask(generator, 40), "text": random_mask(generator, 40)}
    embeddings = random_embeddings(generator, 40, {"conformer": dim, "text": dim}, dtype, masks)
    check_against_reference(embeddings, [("conformer", "text")], dtype, against_torch=True, masks=masks,
                            temperature=torch.tensor(0.1))


@pytest.mark.parametrize("dim", [48, 100, 200])
def test_float32_tiles(generator, dim):
    """float32 launches take their own tiles ((32, 64) at d = 48, (16, 128) and (16, 256) past it): several row
    and column blocks, a partial last one, absent samples in both modalities."""
    batch = 37
    masks = {"a": random_mask(generator, batch), "b": random_mask(generator, batch)}
    embeddings = random_embeddings(generator, batch, {"a": dim, "b": dim}, torch.float32, masks)
    check_against_reference(embeddings, [("a", "b")], torch.float32, masks=masks, temperature=torch.tensor(0.1))


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_three_modalities_masks_and_weights(generator, dtype):
    """Missing samples in two modalities, three pairs with weights, one pair with nothing in common."""
    batch = 37
    masks = {"graph": random_mask(generator, batch), "pocket": torch.arange(batch) < 15,
             "text": torch.arange(batch) >= 15}
    masks["graph"][:3] = True
    dims = {"graph": 24, "conformer": 24, "pocket": 24, "text": 24}
    embeddings = random_embeddings(generator, batch, dims, dtype, masks)
    pairs = [("graph", "conformer"), ("conformer", "pocket"), ("pocket", "text"), ("graph", "text")]
    weights = [0.4, 0.3, 0.2, 0.1]
    got, expected = check_against_reference(embeddings, pairs, dtype, masks=masks, weights=weights,
                                            temperature=torch.tensor(0.07))
    # pocket and text share no sample: their pair adds exactly 0.
    without = run("reference", embeddings, [p for p in pairs if p != ("pocket", "text")], dtype=torch.float64,
                  masks=masks, weights=[0.4, 0.3, 0.1], temperature=0.07)
    torch.testing.assert_close(expected["loss"], without["loss"])


def test_pair_with_nothing_in_common_is_zero(generator):
    masks = {"a": torch.arange(9) < 4, "b": torch.arange(9) >= 4}
    embeddings = random_embeddings(generator, 9, {"a": 16, "b": 16}, torch.float32, masks)
    got = run("triton", embeddings, [("a", "b")], masks=masks, temperature=torch.tensor(0.1))
    assert got["loss"] == 0
    for name in ("da", "db", "dtemperature"):
        assert (got[name] == 0).all(), name


def test_default_weights_are_equal(generator):
    embeddings = random_embeddings(generator, 20, {"a": 16, "b": 16, "c": 16}, torch.float32)
    pairs = [("a", "b"), ("b", "c"), ("a", "c")]
    got = run("triton", embeddings, pairs)
    expected = run("reference", embeddings, pairs, dtype=torch.float64, weights=[1 / 3] * 3)
    compare(got, expected, torch.float32)


def test_large_logits_are_stable(generator):
    """Unnormalised inputs of norm ~30 at temperature 0.01: logits ~1e4-1e5, no overflow, still the reference
    (within 1e-5, or 3x float32 PyTorch's own error when two logits of a row nearly tie)."""
    embeddings = random_embeddings(generator, 70, {"a": 16, "b": 16}, torch.float32, scale=30 / 4)
    masks = {"a": random_mask(generator, 70, 0.8)}
    embeddings["a"][~masks["a"]] = float("nan")
    got, _ = check_against_reference(embeddings, [("a", "b")], torch.float32, temperature=torch.tensor(0.01),
                                     normalize=False, masks=masks, against_torch=True)
    assert got["loss"] > 100


def test_float16_gradients_of_long_embeddings(generator):
    """Normalised float16 embeddings of norm ~8000: the backward's dot weights dS_ij / ||y_j|| (~1e-6 here, and as
    small at B = 16k for unit-size embeddings) were rounded to float16 below its normal range, and the temperature's
    gradient (float32) was off by 0.12. Now within the bound; the embeddings' own gradients are float16 values
    near 1e-6, as imprecise in PyTorch's float16 result, so they are held to 3x its error."""
    embeddings = random_embeddings(generator, 32, {"a": 64, "b": 64}, torch.float16, scale=1000.0)
    got, expected = check_against_reference(embeddings, [("a", "b")], torch.float16, against_torch=True,
                                            temperature=torch.tensor(0.1))
    assert_close(got["dtemperature"], expected["dtemperature"], torch.float16, "dtemperature")


def test_float16_all_zero_row_leaves_the_other_gradients_exact(generator):
    """An all-zero normalised float16 row has inverse norm 1/eps = 1e12: its backward weight was the peak each
    float16 tile's weights were divided by, so every other weight rounded to 0 and the other modality's gradient
    came out 82% off (finite, silently wrong). The zero rows' own gradients (~1e12, as F.normalize's at 0) overflow
    float16 in PyTorch too and are not compared."""
    embeddings = random_embeddings(generator, 40, {"a": 16, "b": 16}, torch.float16)
    embeddings["a"][2] = 0
    embeddings["b"][33] = 0  # in another tile of rows, for the columns' kernel
    got = run("triton", embeddings, [("a", "b")])
    expected = run("reference", embeddings, [("a", "b")], dtype=torch.float64)
    assert_close(got["loss"], expected["loss"], torch.float16, "loss")
    for name, zero_row in (("da", 2), ("db", 33)):
        others = torch.arange(40) != zero_row
        assert_close(got[name][others], expected[name][others], torch.float16, name)


def test_float16_all_zero_gathered_row_in_the_rectangular_backward(generator):
    """The distributed path's kernels take the same weight scales: a zero gathered row (scale 1/eps) leaves dx
    exact."""
    target = backend_device("triton")
    x = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    y = torch.randn(40, 16, generator=generator, dtype=torch.float64)
    y[5] = 0
    x_scale = 1 / (x.norm(dim=-1) * 0.1)
    y_scale = 1 / y.norm(dim=-1).clamp(min=1e-12)
    upstream = torch.randn(6, generator=generator, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    expected = ((leaf @ y.T) * x_scale[:, None] * y_scale[None, :]).logsumexp(1)
    (expected_dx,) = torch.autograd.grad((expected * upstream).sum(), leaf)
    ours = x.to(target, torch.float16).requires_grad_()
    got = torch.ops.pyblend.multi_infonce_row_lse(ours, y.to(target, torch.float16), x_scale.to(target).float(),
                                                  y_scale.to(target).float(), None, None)
    (dx,) = torch.autograd.grad((got * upstream.to(target).float()).sum(), ours)
    assert_close(dx.cpu(), expected_dx, torch.float16, "dx")


def test_nan_in_absent_rows_does_not_leak_and_is_deterministic(generator):
    batch = 50
    masks = {"a": random_mask(generator, batch), "b": random_mask(generator, batch)}
    poisoned = random_embeddings(generator, batch, {"a": 24, "b": 24}, torch.float32, masks)
    clean = {name: torch.where(masks[name][:, None], x, 0.0) for name, x in poisoned.items()}
    first = run("triton", poisoned, [("a", "b")], masks=masks, temperature=torch.tensor(0.1))
    second = run("triton", poisoned, [("a", "b")], masks=masks, temperature=torch.tensor(0.1))
    zeros = run("triton", clean, [("a", "b")], masks=masks, temperature=torch.tensor(0.1))
    for name in first:
        assert torch.isfinite(first[name]).all(), name
        assert torch.equal(first[name], second[name]), f"{name}: not deterministic"
        assert torch.equal(first[name], zeros[name]), f"{name}: depends on the absent rows' values"


def test_reference_gradcheck_float64(generator):
    masks = {"a": torch.tensor([True, True, False, True, True])}
    a = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, t: reference.multi_infonce({"a": a, "b": b}, [("a", "b")], temperature=t, masks=masks),
        (a, b, t))


def test_reference_second_derivatives_at_a_zero_row(generator):
    """An all-zero present embedding: F.normalize's norm has a NaN second derivative there."""
    a = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    a[1] = 0
    a.requires_grad_()
    b = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = reference.multi_infonce({"a": a, "b": b}, [("a", "b")], temperature=t)
    (grad_a,) = torch.autograd.grad(loss, a, create_graph=True)
    grad_a.square().sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(t.grad)


def test_reference_matches_cross_entropy(generator):
    """The reference spelled with F.cross_entropy on the present samples."""
    a, b = torch.randn(2, 12, 8, generator=generator, dtype=torch.float64)
    present = random_mask(generator, 12)
    present[0] = True
    x = torch.nn.functional.normalize(a[present], dim=-1)
    y = torch.nn.functional.normalize(b[present], dim=-1)
    logits = x @ y.T / 0.1
    target = torch.arange(len(x))
    expected = (torch.nn.functional.cross_entropy(logits, target) +
                torch.nn.functional.cross_entropy(logits.T, target)) / 2
    got = reference.multi_infonce({"a": a, "b": b}, [("a", "b")], masks={"a": present}, temperature=0.1)
    torch.testing.assert_close(got, expected)


def test_automatic_backend_on_cpu_is_the_reference(generator):
    if HAS_CUDA:
        pytest.skip("on a GPU machine CPU tensors still go to the reference, but TRITON_INTERPRET is unset")
    embeddings = random_embeddings(generator, 6, {"a": 8, "b": 8}, torch.float32)
    torch.testing.assert_close(ops.multi_infonce(embeddings, [("a", "b")]),
                               reference.multi_infonce(embeddings, [("a", "b")]))


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(generator, masked):
    target = backend_device("triton")
    x = torch.randn(11, 8, generator=generator).to(target).requires_grad_()
    y = torch.randn(11, 8, generator=generator).to(target).requires_grad_()
    x_scale = (torch.rand(11, generator=generator) + 0.5).to(target).requires_grad_()
    y_scale = (torch.rand(11, generator=generator) + 0.5).to(target).requires_grad_()
    present = random_mask(generator, 11).to(target) if masked else None
    torch.library.opcheck(torch.ops.pyblend.multi_infonce_lse.default, (x, y, x_scale, y_scale, present))
    row_lse, col_lse = torch.ops.pyblend.multi_infonce_lse(x, y, x_scale, y_scale, present)
    grads = (torch.randn(11, generator=generator).to(target), torch.randn(11, generator=generator).to(target))
    # The backward op's own derivative only raises (no double backward): checked on plain tensors.
    inputs = (x, y, x_scale, y_scale, present, row_lse, col_lse)
    torch.library.opcheck(torch.ops.pyblend.multi_infonce_lse_backward.default,
                          (*grads, *(None if t is None else t.detach() for t in inputs)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_traces_the_op(generator, backend):
    target = backend_device(backend)
    masks = {"b": random_mask(generator, 19).to(target)}
    a = torch.randn(19, 16, generator=generator).to(target).requires_grad_()
    b = torch.randn(19, 16, generator=generator).to(target).requires_grad_()
    t = torch.tensor(0.1, device=target, requires_grad=True)

    def loss(a, b, t):
        return ops.multi_infonce({"a": a, "b": b}, [("a", "b")], temperature=t, masks=masks, backend=backend)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(loss(a, b, t), (a, b, t))
    got = torch.autograd.grad(compiled(a, b, t), (a, b, t))
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs)


# ------------------------------------------------------------------------------------------- validation


def test_errors_name_the_argument(generator):
    a = torch.randn(4, 8, generator=generator)
    cases = [
        (dict(pairs=[("a", "c")]), ValueError, "pairs: modality 'c'"),
        (dict(pairs=[]), ValueError, "pairs: expected a non-empty list"),
        (dict(embeddings={"a": a, "b": torch.randn(5, 8)}), ValueError, "embeddings['b']: expected batch size B = 4"),
        (dict(embeddings={"a": a, "b": torch.randn(4, 6)}), ValueError,
         "embeddings['a'] has d = 8 and embeddings['b'] has d = 6"),
        (dict(embeddings={"a": a, "b": a.half()}), TypeError, "embeddings['b']: expected the dtype"),
        (dict(embeddings={"a": a, "b": a.long()}), TypeError, "embeddings['b']: expected dtype"),
        (dict(embeddings={"a": a, "b": a[0]}), ValueError, "embeddings['b']: expected shape (B, d)"),
        (dict(masks={"a": torch.ones(4)}), TypeError, "masks['a']: expected dtype bool"),
        (dict(masks={"a": torch.ones(5, dtype=torch.bool)}), ValueError, "masks['a']: expected shape (B,)"),
        (dict(masks={"z": torch.ones(4, dtype=torch.bool)}), ValueError, "masks: modality 'z'"),
        (dict(temperature=0.0), ValueError, "temperature: expected a finite float > 0"),
        (dict(temperature=torch.tensor(-1.0)), ValueError, "temperature: expected a finite value > 0"),
        (dict(temperature=torch.tensor([0.1])), TypeError, "temperature: expected a float or a 0-dim"),
        # Was "expected a tensor on cpu (or the CPU)".
        (dict(temperature=torch.tensor(0.1, device="meta")), ValueError,
         "temperature: expected a tensor on the CPU, as the embeddings; got"),
        (dict(weights=[1.0, 2.0]), ValueError, "weights: expected one weight per pair (1); got 2"),
        (dict(weights=["x"]), TypeError, "weights: expected finite floats"),
        (dict(weights=[float("nan")]), ValueError, "weights: expected finite floats; got nan"),
        (dict(backend="cpp"), ValueError, "has no 'cpp' backend"),
        (dict(embeddings={"a": a.double(), "b": a.double()}, backend="triton"), ValueError,
         "float16, bfloat16 or float32"),
    ]
    for overrides, error, message in cases:
        arguments = dict(embeddings={"a": a, "b": a.clone()}, pairs=[("a", "b")])
        arguments.update(overrides)
        embeddings, pairs = arguments.pop("embeddings"), arguments.pop("pairs")
        with pytest.raises(error) as caught:
            ops.multi_infonce(embeddings, pairs, **arguments)
        assert message in str(caught.value), f"{overrides}: {caught.value}"


def test_self_pairs_empty_widths_and_non_dicts_are_refused(generator):
    """A modality paired with itself, or d = 0, gave a loss with nothing to contrast (log(B) for d = 0); a list
    of masks failed in dict() with "dictionary update sequence element #0"; normalize="no" ran as True."""
    a, b = (torch.randn(4, 8, generator=generator) for _ in range(2))
    with pytest.raises(ValueError, match=r"pairs: pair \('a', 'a'\) pairs modality 'a' with itself"):
        ops.multi_infonce({"a": a, "b": b}, [("a", "b"), ("a", "a")])
    with pytest.raises(ValueError, match=r"embeddings\['a'\]: expected shape \(B, d\) with d >= 1"):
        ops.multi_infonce({"a": a[:, :0], "b": b[:, :0]}, [("a", "b")])
    with pytest.raises(ValueError, match=r"embeddings\['c'\]: expected shape \(B, d\) with d >= 1"):
        ops.multi_infonce({"a": a, "b": b, "c": b[:, :0]}, [("a", "b")])
    # A modality in no pair (a typo, a forgotten pair) was validated and then dropped without a word, its mask too.
    with pytest.raises(ValueError, match=r"embeddings: modality 'c' is in no pair \(the pairs use \['a', 'b'\]\)"):
        ops.multi_infonce({"a": a, "b": b, "c": b}, [("a", "b")], masks={"c": torch.ones(4, dtype=torch.bool)})
    from pyblend.nn.contrastive import MultiPairContrastive

    with pytest.raises(ValueError, match=r"embeddings: modality 'c' is in no pair"):
        MultiPairContrastive([("a", "b")])({"a": a, "b": b, "c": b})
    # A pair listed twice (or reversed) silently doubled its weight.
    for pairs in ([("a", "b"), ("a", "b")], [("a", "b"), ("b", "a")]):
        with pytest.raises(ValueError, match=re.escape(f"pairs: {pairs[1]!r} repeats ('a', 'b')")):
            ops.multi_infonce({"a": a, "b": b}, pairs)
        with pytest.raises(ValueError, match="repeats"):
            MultiPairContrastive(pairs)
    for masks in ([torch.ones(4, dtype=torch.bool)], "a"):
        with pytest.raises(TypeError, match="masks: expected None or a dict"):
            ops.multi_infonce({"a": a, "b": b}, [("a", "b")], masks=masks)
    with pytest.raises(TypeError, match="embeddings: expected a non-empty dict"):
        ops.multi_infonce([a, b], [("a", "b")])
    for value in ("no", None, 1):
        with pytest.raises(TypeError, match="normalize: expected a bool"):
            ops.multi_infonce({"a": a, "b": b}, [("a", "b")], normalize=value)


def test_numpy_scalars_are_accepted(generator):
    """weights=[np.float32(1)] was "expected finite floats", temperature=np.float32(.5) "expected a finite float"."""
    embeddings = random_embeddings(generator, 6, {"a": 8, "b": 8}, torch.float32)
    expected = ops.multi_infonce(embeddings, [("a", "b")], weights=[1.0], temperature=0.5, normalize=True)
    got = ops.multi_infonce(embeddings, [("a", "b")], weights=[np.float32(1)], temperature=np.float32(0.5),
                            normalize=np.bool_(True))
    assert torch.equal(got, expected)
    with pytest.raises(TypeError, match="weights: expected finite floats"):
        ops.multi_infonce(embeddings, [("a", "b")], weights=[np.bool_(True)])


# --------------------------------------------------------------------------------------------- compile


HOPPER_COMPILE = """
import torch
from hopper import captured_launches, case_dtype, lower_launch
from pyblend.kernels import multi_infonce as kernels

for dim, batch, columns, dtype_name in CASES:
    dtype = case_dtype(dtype_name)
    # The square path's batch, or the distributed path's local rows (an eighth) against the batch gathered.
    rows = batch if columns else batch // 8
    x = torch.randn(rows, dim, dtype=dtype)
    y = torch.randn(batch, dim, dtype=dtype)
    x_scale, y_scale = torch.rand(rows) + 0.5, torch.rand(batch) + 0.5
    col_present = torch.rand(batch) < 0.9
    with captured_launches() as captured:
        if columns:
            row_lse, col_lse = kernels.multi_infonce_lse_forward(x, y, x_scale, y_scale, col_present)
            kernels.multi_infonce_lse_backward(torch.randn(rows), torch.randn(batch), x, y, x_scale, y_scale,
                                               col_present, row_lse, col_lse)
        else:
            row_present = col_present[:rows]
            row_lse = kernels.multi_infonce_row_lse_forward(x, y, x_scale, y_scale, row_present, col_present)
            kernels.multi_infonce_row_lse_backward(torch.randn(rows), x, y, x_scale, y_scale, row_present,
                                                   col_present, row_lse)
    for kernel, args, kwargs in captured:
        ptx, spills, _ = lower_launch(kernel, args, kwargs)
        print(dim, kernel.fn.__name__, "mma", ptx.count("mma"), "spills", spills, "batch", batch, "columns",
              columns, dtype_name)
"""


# (d, B, square): square with B = 4096, or rectangular with 512 local rows against 4096 gathered.
COMPILE_SHAPES = [(24, 4096, True), (128, 4096, True), (512, 4096, True), (128, 4096, False), (512, 4096, False)]
# float32 in the quick tier: the widest square case, where its three kernels differ in warps.
QUICK_FLOAT32 = (512, 4096, True)
# float32's other tiles: (32, 64) over 8 warps, and 16 rows for small batches (the rectangular one has 2 rows).
FLOAT32_TILES = [(64, 4096, True), (24, 16, True), (64, 16, False)]
# Past 512 features: (16, 1024) tiles over 8 warps, unpipelined; 600 is padded to 608 (unaligned, it spilled).
WIDE_SHAPES = [(1024, 4096, True), (600, 4096, False), (768, 16, True), (1000, 4096, True)]


# float16's backward differs from bfloat16's (it rescales each tile's dot weights): the widest square and
# rectangular 16-bit tiles in the quick tier.
QUICK_FLOAT16 = [(512, 4096, True), (512, 4096, False), (1024, 4096, True)]


@pytest.mark.parametrize("cases", [
    pytest.param([(*shape, "bfloat16") for shape in COMPILE_SHAPES + WIDE_SHAPES[:1]]
                 + [(*QUICK_FLOAT32, "float32")], id="bf16+f32-d512"),
    pytest.param([(*shape, "float16") for shape in QUICK_FLOAT16], id="f16-d512"),
    pytest.param([(*shape, "float32") for shape in COMPILE_SHAPES + FLOAT32_TILES + WIDE_SHAPES
                  if shape != QUICK_FLOAT32]
                 + [(*shape, "tf32") for shape in COMPILE_SHAPES + WIDE_SHAPES]
                 + [(*shape, "bfloat16") for shape in WIDE_SHAPES[1:]]
                 + [(*shape, "float16") for shape in COMPILE_SHAPES + WIDE_SHAPES if shape not in QUICK_FLOAT16],
                 id="f32+tf32+f16", marks=pytest.mark.full)])
def test_kernels_compile_for_hopper_without_spills(cases):
    """Calls the launchers on CPU tensors (masked; (d, B, square, dtype) in ``cases``) and lowers the three kernels
    to sm_90 as Triton would on the GPU, then runs ptxas: the interpreter accepts programs the compiler rejects, and
    a spill is a performance bug. 16-bit and TF32 matmuls run on the tensor cores; float32's IEEE ones run on the
    FMA units, each thread holding whole operand rows, with launch configurations of their own."""
    lines = run_compile_script(f"CASES = {cases!r}\n" + HOPPER_COMPILE)
    assert len(lines) == 3 * len(cases), lines
    for line in lines:
        words = line.split()
        assert int(words[3]) > 0 or words[10] == "float32", f"{line}: the matmuls should use the tensor cores"
        assert int(words[5]) == 0, f"{line}: registers spill"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [512, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dtypes(generator, dtype, dim):
    batch = 300
    masks = {"graph": random_mask(generator, batch, 0.9), "pocket": random_mask(generator, batch, 0.5)}
    embeddings = random_embeddings(generator, batch, {"graph": dim, "text": dim, "pocket": dim}, dtype, masks)
    check_against_reference(embeddings, [("graph", "text"), ("graph", "pocket"), ("text", "pocket")], dtype,
                            masks=masks, weights=[0.5, 0.25, 0.25], temperature=torch.tensor(0.1))


# ------------------------------------------------------------------------------------- rectangular kernels


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rows, cols", [(1, 16), (5, 70), (37, 74), (70, 3)])
def test_row_lse_rectangular_matches_torch(generator, rows, cols, masked):
    """The distributed path's op: local rows (M, d) against gathered columns (N, d), row log-sum-exps only,
    forward and backward (every input's gradient) against float64 torch; one case at d = 600, which the
    launchers pad to 608."""
    target = backend_device("triton")
    dim = 600 if (rows, cols) == (5, 70) else 24  # 600: padded to 608 features (past 512, not a multiple of 16)
    x = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    y = torch.randn(cols, dim, generator=generator, dtype=torch.float64)
    # Scales as the loss passes them, 1 / (||x|| * temperature) and 1 / ||y|| (here times 0.5 to 1.5), so the
    # logits stay below ~30. Raw scales of 1 to 9 on unnormalised 600-wide rows gave logits of several hundred,
    # where float32 rounding of the dot products alone moves the gradients by 1e-5: torch's own float32 dx missed
    # the bound (1.26e-5 against float64, generator seed 1989444363), and so did ours (1.19e-5).
    temperature = torch.rand(rows, generator=generator, dtype=torch.float64) * 0.2 + 0.05
    x_scale = 1 / (x.norm(dim=-1) * temperature)
    y_scale = (torch.rand(cols, generator=generator, dtype=torch.float64) + 0.5) / y.norm(dim=-1)
    col_present = random_mask(generator, cols) if masked else None
    row_present = random_mask(generator, rows) if masked else None
    if masked:
        x[~row_present] = float("nan")
        y[~col_present] = float("nan")
    upstream = torch.randn(rows, generator=generator, dtype=torch.float64)

    live_rows = torch.ones(rows, dtype=torch.bool) if row_present is None else row_present
    live_cols = torch.ones(cols, dtype=torch.bool) if col_present is None else col_present

    def torch_scores(x, y, x_scale, y_scale):
        x = torch.where(live_rows[:, None], x, 0.0)
        y = torch.where(live_cols[:, None], y, 0.0)
        s = (x @ y.T) * x_scale[:, None] * y_scale[None, :]
        return s.masked_fill(~(live_rows[:, None] & live_cols[None, :]), float("-inf"))

    def torch_row_lse(x, y, x_scale, y_scale):
        s = torch_scores(x, y, x_scale, y_scale)
        keep = live_rows & live_cols.any()
        return torch.where(keep, torch.where(keep[:, None], s, 0.0).logsumexp(1), 0.0)

    inputs = [t.clone().requires_grad_() for t in (x, y, x_scale, y_scale)]
    expected = torch_row_lse(*inputs)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)

    ours = [t.detach().to(target, torch.float32).requires_grad_() for t in (x, y, x_scale, y_scale)]
    masks = [None if m is None else m.to(target) for m in (row_present, col_present)]
    got = torch.ops.pyblend.multi_infonce_row_lse(*ours, *masks)
    got_grads = torch.autograd.grad((got * upstream.to(target, torch.float32)).sum(), ours)
    # dy_scale[j] = sum_i upstream_i p_ij s_ij / y_scale_j sums terms of both signs over the rows; with one live
    # column they can cancel to 1/650 of their magnitude (seen), so its error is measured against that magnitude.
    scores = torch_scores(x, y, x_scale, y_scale)
    terms = upstream.abs()[:, None] * scores.softmax(1).nan_to_num() * scores.nan_to_num(posinf=0, neginf=0).abs()
    dy_scale_magnitude = terms.sum(0) / y_scale
    assert_close(got.cpu(), expected, torch.float32, "row_lse")
    for name, ours_grad, theirs in zip(("dx", "dy", "dx_scale", "dy_scale"), got_grads, expected_grads):
        ours_grad = ours_grad.cpu()
        assert torch.isfinite(ours_grad).all(), f"{name}: inf or NaN"
        if theirs.norm() == 0:
            assert (ours_grad == 0).all(), f"{name}: expected zeros"
        elif name == "dy_scale":
            assert_close_to_sum(ours_grad, torch.nan_to_num(theirs), dy_scale_magnitude, torch.float32, name)
        else:
            assert_close(ours_grad, torch.nan_to_num(theirs), torch.float32, name)


def test_local_shares_add_up_to_the_loss(generator):
    """Without processes: the reference's per-rank shares over 3 emulated ranks sum to the single-process loss
    (value and gradient)."""
    ranks, local = 3, 11
    batch = ranks * local
    masks = {"a": random_mask(generator, batch), "c": random_mask(generator, batch)}
    embeddings = random_embeddings(generator, batch, {"a": 8, "b": 8, "c": 8}, torch.float64, masks)
    safe = {n: torch.where(masks[n][:, None], x, 0.0) if n in masks else x for n, x in embeddings.items()}
    leaves = {n: x.clone().requires_grad_() for n, x in safe.items()}
    pairs, weights = [("a", "b"), ("b", "c"), ("a", "c")], [0.5, 0.25, 0.25]
    total = sum(local_multi_infonce(
        {n: x[r * local:(r + 1) * local] for n, x in leaves.items()}, leaves, pairs, offset=r * local,
        weights=weights, temperature=0.1, gathered_masks=masks) for r in range(ranks))
    leaves_full = {n: x.clone().requires_grad_() for n, x in safe.items()}
    expected = reference.multi_infonce(leaves_full, pairs, weights=weights, temperature=0.1, masks=masks)
    torch.testing.assert_close(total, expected)
    total.backward()
    expected.backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, leaves_full[name].grad)


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_rectangular(generator, masked):
    target = backend_device("triton")
    x = torch.randn(7, 8, generator=generator).to(target).requires_grad_()
    y = torch.randn(19, 8, generator=generator).to(target).requires_grad_()
    x_scale = (torch.rand(7, generator=generator) + 0.5).to(target).requires_grad_()
    y_scale = (torch.rand(19, generator=generator) + 0.5).to(target).requires_grad_()
    present = random_mask(generator, 19).to(target) if masked else None
    row_present = None if present is None else present[5:12]
    torch.library.opcheck(torch.ops.pyblend.multi_infonce_row_lse.default,
                          (x, y, x_scale, y_scale, row_present, present))
    row_lse = torch.ops.pyblend.multi_infonce_row_lse(x, y, x_scale, y_scale, row_present, present)
    grad = torch.randn(7, generator=generator).to(target)
    inputs = (x, y, x_scale, y_scale, row_present, present, row_lse)
    torch.library.opcheck(torch.ops.pyblend.multi_infonce_row_lse_backward.default,
                          (grad, *(None if t is None else t.detach() for t in inputs), True))


# ------------------------------------------------------------------------------------------------ module


def test_module_learnable_temperature_gets_gradient(generator):
    from pyblend.nn.contrastive import MultiPairContrastive

    masks = {"pocket": random_mask(generator, 21)}
    embeddings = random_embeddings(generator, 21, {"graph": 16, "text": 16, "pocket": 16}, torch.float32, masks)
    pairs = [("graph", "text"), ("graph", "pocket")]
    module = MultiPairContrastive(pairs, [0.7, 0.3], temperature=0.07, learnable_temperature=True,
                                  backend="triton")
    assert isinstance(module.logit_scale, torch.nn.Parameter)
    torch.testing.assert_close(module.logit_scale.detach(), torch.tensor(torch.log(torch.tensor(1 / 0.07)).item()))
    loss = module(embeddings, masks)
    loss.backward()
    assert module.logit_scale.grad is not None and module.logit_scale.grad != 0
    # The same as the op with temperature = exp(-logit_scale).
    scale = torch.tensor(module.logit_scale.item(), requires_grad=True)
    expected = ops.multi_infonce(embeddings, pairs, weights=[0.7, 0.3], temperature=torch.exp(-scale), masks=masks,
                                 backend="reference")
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.logit_scale.grad, scale.grad, rtol=1e-4, atol=1e-5)


def test_module_temperature_cap(generator):
    """max_logit_scale: an initial learnable temperature below exp(-max_logit_scale) is refused (it would run at
    the cap with a gradient of exactly 0, and the repr said the initial one); at the cap exactly the gradient
    passes; past it (after an optimizer step) it is 0 and the repr shows the clamped temperature in use, and
    clamping the parameter in place (open_clip's loop) makes it learnable again."""
    from pyblend.nn.contrastive import MultiPairContrastive

    masks = {"pocket": random_mask(generator, 21)}
    embeddings = random_embeddings(generator, 21, {"graph": 16, "pocket": 16}, torch.float32, masks)
    pairs = [("graph", "pocket")]
    with pytest.raises(ValueError, match=r"temperature: expected at least exp\(-max_logit_scale\) = 0\.01 for a "
                                         r"learnable temperature .*; got 0\.001"):
        MultiPairContrastive(pairs, temperature=0.001, learnable_temperature=True)
    with pytest.raises(ValueError, match=r"exp\(-max_logit_scale\) = 0\.1 .*; got 0\.07"):
        MultiPairContrastive(pairs, temperature=0.07, learnable_temperature=True, max_logit_scale=math.log(10))
    # No clamp, or a fixed temperature (never clamped): any temperature.
    free = MultiPairContrastive(pairs, temperature=0.001, learnable_temperature=True, max_logit_scale=None)
    assert math.isclose(float(free.temperature.detach()), 0.001, rel_tol=1e-6)
    assert MultiPairContrastive(pairs, temperature=0.001).temperature == 0.001
    with pytest.raises(ValueError, match="max_logit_scale: expected a finite float or None; got inf"):
        MultiPairContrastive(pairs, learnable_temperature=True, max_logit_scale=math.inf)

    # 0.01 starts at the cap exactly (log(100) rounds up in float32, as the forward compares): it learns.
    module = MultiPairContrastive(pairs, temperature=0.01, learnable_temperature=True, backend="reference")
    assert "temperature=0.01 (learnable, max_logit_scale=4.605)" in repr(module), repr(module)
    module(embeddings, masks).backward()
    assert module.logit_scale.grad != 0
    # In float64 the float32-rounded start lies past log(100): it must still count as at the cap.
    doubled = MultiPairContrastive(pairs, temperature=0.01, learnable_temperature=True, backend="reference").double()
    doubled({name: x.double() for name, x in embeddings.items()}, masks).backward()
    assert doubled.logit_scale.grad != 0
    # Past the cap (as an optimizer step may take it): the temperature in use is the cap's, the gradient 0.
    with torch.no_grad():
        module.logit_scale.fill_(7.0)
    module.logit_scale.grad = None
    module(embeddings, masks).backward()
    assert module.logit_scale.grad == 0
    torch.testing.assert_close(module.temperature.detach(), torch.tensor(0.01))
    assert "temperature=0.01 (learnable" in repr(module), repr(module)
    # open_clip's clamp of the parameter after the step: back at the cap, where the gradient passes.
    with torch.no_grad():
        module.logit_scale.clamp_(max=module.max_logit_scale)
    module.logit_scale.grad = None
    module(embeddings, masks).backward()
    assert module.logit_scale.grad != 0


def test_module_fixed_temperature_has_no_parameters(generator):
    from pyblend.nn.contrastive import MultiPairContrastive

    module = MultiPairContrastive([("a", "b")])
    assert list(module.parameters()) == [] and module.temperature == 0.1
    embeddings = random_embeddings(generator, 9, {"a": 8, "b": 8}, torch.float32)
    torch.testing.assert_close(module(embeddings), reference.multi_infonce(embeddings, [("a", "b")]))
    assert "temperature=0.1 (fixed)" in repr(module)


def test_module_projections(generator):
    """MolBind's heads: Linear(d_in, 512) per listed modality, then the op's L2 normalisation; NaN in absent rows
    reaches neither the loss nor the heads' gradients."""
    from pyblend.nn.contrastive import MultiPairContrastive

    batch = 13
    masks = {"text": random_mask(generator, batch)}
    embeddings = random_embeddings(generator, batch, {"graph": 30, "text": 48, "conformer": 20}, torch.float32,
                                   masks)
    pairs = [("graph", "text"), ("conformer", "text"), ("graph", "conformer")]
    module = MultiPairContrastive(pairs, [0.25, 0.25, 0.5], projections={"graph": 30, "text": 48, "conformer": 20},
                                  learnable_temperature=True, backend="triton")
    projected = module.project(embeddings, masks)
    for name in embeddings:
        assert projected[name].shape == (batch, 512), name
        assert module.projections[name].weight.shape == (512, embeddings[name].shape[1])
    loss = module(embeddings, masks)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    expected = reference.multi_infonce(
        {name: x.detach() for name, x in module.project(embeddings, masks).items()}, pairs,
        weights=[0.25, 0.25, 0.5], temperature=module.temperature.detach(), masks=masks)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    text = repr(module)
    assert "graph-text: 0.25" in text and "learnable" in text and "projection_dim=512" in text, text


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_module_compiles(generator, backend):
    from pyblend.nn.contrastive import MultiPairContrastive

    target = backend_device(backend)
    masks = {"b": random_mask(generator, 17).to(target)}
    embeddings = {name: torch.randn(17, width, generator=generator).to(target)
                  for name, width in (("a", 12), ("b", 20))}
    module = MultiPairContrastive([("a", "b")], projections={"a": 12, "b": 20}, projection_dim=16,
                                  learnable_temperature=True, backend=backend).to(target)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(module(embeddings, masks), list(module.parameters()))
    got = torch.autograd.grad(compiled(embeddings, masks), list(module.parameters()))
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs)


def test_module_with_some_heads_under_autocast(generator):
    """Under autocast the heads give bfloat16 while a modality without a head keeps float32: the module takes
    them to one dtype (the op refuses a mix), and its loss follows the float32 one closely."""
    from pyblend.nn.contrastive import MultiPairContrastive

    torch.manual_seed(0)
    module = MultiPairContrastive([("a", "b"), ("b", "c")], projections={"a": 5, "b": 7}, projection_dim=8)
    embeddings = {"a": torch.randn(6, 5, generator=generator), "b": torch.randn(6, 7, generator=generator),
                  "c": torch.randn(6, 8, generator=generator)}
    expected = module(embeddings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(embeddings)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 3e-2 * expected.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_module_validates():
    from pyblend.nn.contrastive import MultiPairContrastive

    with pytest.raises(ValueError, match="weights: expected one weight per pair"):
        MultiPairContrastive([("a", "b")], [0.5, 0.5])
    with pytest.raises(ValueError, match="temperature: expected a finite float > 0"):
        MultiPairContrastive([("a", "b")], temperature=0)
    with pytest.raises(ValueError, match="projections\\['a'\\]"):
        MultiPairContrastive([("a", "b")], projections={"a": 0})
    with pytest.raises(ValueError, match="gather"):
        MultiPairContrastive([("a", "b")], gather="yes")


def test_module_refuses_at_construction_what_would_fail_or_go_unused():
    from pyblend.nn.contrastive import MultiPairContrastive

    pairs = [("a", "b")]
    with pytest.raises(ValueError, match=r"pairs: pair \('a', 'a'\) pairs modality 'a' with itself"):
        MultiPairContrastive([("a", "a")])
    with pytest.raises(ValueError, match="projections: modality 'z' is in no pair"):
        MultiPairContrastive(pairs, projections={"a": 3, "z": 3})
    for dim in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="projection_dim: expected the heads' output width"):
            MultiPairContrastive(pairs, projections={"a": 3}, projection_dim=dim)
    for weights in ("ab", "a", 1.0, [None], [True]):
        with pytest.raises(TypeError, match="weights: expected"):
            MultiPairContrastive(pairs, weights)
    with pytest.raises(ValueError, match="weights: expected finite floats; got nan"):
        MultiPairContrastive(pairs, [float("nan")])
    with pytest.raises(ValueError, match="backend: expected one of"):
        MultiPairContrastive(pairs, backend="bogus")
    for name in ("normalize", "learnable_temperature"):
        with pytest.raises(TypeError, match=f"{name}: expected a bool; got 'no'"):
            MultiPairContrastive(pairs, **{name: "no"})
    module = MultiPairContrastive(pairs, [np.float32(1)], temperature=np.float32(0.5),
                                  projections={"a": np.int64(3)}, projection_dim=np.int64(8),
                                  normalize=np.bool_(True))
    assert module.weights == [1.0] and module.fixed_temperature == 0.5 and module.normalize is True
    assert module.projections["a"].weight.shape == (8, 3)


def test_module_checks_head_inputs_before_the_heads(generator):
    """A head's input of the wrong width, dtype or device, or a bad mask, failed inside the head's matmul or
    torch.where with torch's message, before the op's checks could name the modality."""
    from pyblend.nn.contrastive import MultiPairContrastive

    module = MultiPairContrastive([("a", "b")], projections={"a": 5}, projection_dim=8)
    embeddings = {"a": torch.randn(6, 5, generator=generator), "b": torch.randn(6, 8, generator=generator)}
    mask = torch.ones(6, dtype=torch.bool)
    cases = [
        (dict(embeddings, a=torch.randn(6, 4)), None, ValueError,
         r"embeddings\['a'\]: expected shape \(B, d_in\) = \(\?, 5\), the input width of projections\['a'\]"),
        (dict(embeddings, a=torch.randn(6)), None, ValueError, r"embeddings\['a'\]: expected shape \(B, d_in\)"),
        (dict(embeddings, a=embeddings["a"].double()), None, TypeError,
         r"embeddings\['a'\]: expected dtype torch.float32 like projections\['a'\]'s weight"),
        (dict(embeddings, a=torch.ones(6, 5, dtype=torch.int64)), None, TypeError,
         r"embeddings\['a'\]: expected a float tensor"),
        (dict(embeddings, a=embeddings["a"].to("meta")), None, ValueError,
         r"embeddings\['a'\]: expected a tensor on cpu like projections\['a'\]"),
        (embeddings, {"a": torch.ones(6)}, TypeError, r"masks\['a'\]: expected dtype bool"),
        (embeddings, {"a": mask[:5]}, ValueError, r"masks\['a'\]: expected shape \(B,\)"),
        (embeddings, {"a": mask.to("meta")}, ValueError, r"masks\['a'\]: expected a tensor on cpu"),
        ([embeddings["a"], embeddings["b"]], None, TypeError, "embeddings: expected a dict"),
        (embeddings, [mask], TypeError, "masks: expected None or a dict"),
    ]
    for inputs, masks, error, message in cases:
        with pytest.raises(error, match=message):
            module(inputs, masks)
    expected = module(embeddings, {"a": mask})
    torch.testing.assert_close(module(embeddings, {"a": mask.numpy()}), expected)
