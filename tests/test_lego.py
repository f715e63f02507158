"""MM-Lego: merge_latents and slerp (pyblend.ops.lego_merge), LegoBlock / LegoMerge / LegoFuse (pyblend.nn.lego),
the survival and classification losses, and the c-index / ROC-AUC metrics (pyblend.metrics).

Everything runs on the CPU (automatic backend) with tiny shapes: l_c = l_d = 8, 2 heads x 4. Values are compared
with hand formulas or brute-force loops, never with the code under test.
"""
import copy
import itertools
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from pyblend import set_value_checks
from pyblend.metrics import concordance_index, roc_auc
from pyblend.nn.lego import (
    LegoBlock,
    LegoFuse,
    LegoHead,
    LegoMerge,
    classification_loss,
    lego_merge,
    merge_heads,
    survival_nll_loss,
    survival_risk,
)
from pyblend.ops.lego_merge import merge_latents, slerp
from pyblend.reference.fourier_cross_attention import fourier_cross_attention as reference_step

SMALL = {"l_c": 8, "l_d": 8, "heads": 2, "head_dim": 4}


def assert_near(out, ref, tol, what="output"):
    out, ref = torch.as_tensor(out), torch.as_tensor(ref)
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(torch.view_as_real(out) if out.is_complex() else out).all(), f"{what}: inf or NaN"
    if not out.numel():
        return
    error = (out.to(ref.dtype) - ref).abs()
    excess = error > tol  # ``tol``: a number, or one bound per element
    assert not excess.any(), f"{what}: abs error {error[excess].max().item():.3e} over its bound\n{out}\n{ref}"


def random_complex(generator, *shape, dtype=torch.complex128, low=0.2):
    """Complex values with magnitudes in [low, low + 2) and uniform phases (bounded away from zero)."""
    magnitude = low + 2 * torch.rand(*shape, generator=generator, dtype=torch.float64)
    phase = (2 * torch.rand(*shape, generator=generator, dtype=torch.float64) - 1) * math.pi
    return torch.polar(magnitude, phase).to(dtype)


def hand_harmonic(latents):
    """Harmonic mean of the magnitudes, atan2 circular mean of the phases, no eps (magnitudes > 0)."""
    stacked = torch.stack(latents)
    magnitude = len(latents) / (1 / stacked.abs()).sum(0)
    phase = stacked.angle()
    mean_phase = torch.atan2(phase.sin().sum(0), phase.cos().sum(0))
    return torch.polar(magnitude, mean_phase)


# ------------------------------------------------------------------------------------------ merge_latents

@pytest.mark.parametrize("method", ["harmonic", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_merge_single_latent_is_identity(generator, method, dtype):
    latent = random_complex(generator, 3, 5, 4, dtype=dtype, low=0.0)
    latent[0, 0, 0] = 0
    tol = 1e-5 if dtype == torch.complex64 else 1e-10
    assert_near(merge_latents([latent], method), latent, tol)


@pytest.mark.parametrize("count", [2, 3])
def test_merge_harmonic_matches_hand_formula(generator, count):
    latents = [random_complex(generator, 2, 6, 5) for _ in range(count)]
    assert_near(merge_latents(latents, eps=1e-12), hand_harmonic(latents), 1e-9)
    # The default eps moves the result by O(eps) only.
    assert_near(merge_latents(latents), hand_harmonic(latents), 1e-5)
    # In complex64 each unit phasor carries a rounding of ~6e-8, which moves the angle of their sum by about
    # count * 6e-8 / |sum|: where the phases nearly cancel, the bound grows by that condition number.
    single = [l.to(torch.complex64) for l in latents]
    expected = hand_harmonic(latents)
    resultant = torch.stack([l / l.abs() for l in latents]).sum(0).abs()
    bound = 1e-5 * (count * expected.abs() / resultant).clamp_min(1)
    assert_near(merge_latents(single), expected, bound, "complex64")


def test_merge_harmonic_two_values_by_hand():
    a = torch.tensor([2 + 0j, 1j], dtype=torch.complex128)
    b = torch.tensor([6 + 0j, 3 + 0j], dtype=torch.complex128)
    merged = merge_latents([a, b], eps=1e-12)
    # magnitudes: 2 / (1/2 + 1/6) = 3, 2 / (1 + 1/3) = 1.5; phases: 0, and the mean of pi/2 and 0 = pi/4.
    expected = torch.tensor([3 + 0j, 1.5 * complex(math.cos(math.pi / 4), math.sin(math.pi / 4))],
                            dtype=torch.complex128)
    assert_near(merged, expected, 1e-9)


@pytest.mark.parametrize("method,expected", [("mean", lambda s: s.mean(0)), ("sum", lambda s: s.sum(0))])
def test_merge_mean_and_sum(generator, method, expected):
    latents = [random_complex(generator, 4, 3) for _ in range(3)]
    assert_near(merge_latents(latents, method), expected(torch.stack(latents)), 1e-12)


def test_merge_phases_wrap_around():
    a = torch.polar(torch.ones(2, dtype=torch.float64), torch.tensor([math.pi - 0.1, 0.1], dtype=torch.float64))
    b = torch.polar(torch.ones(2, dtype=torch.float64), torch.tensor([-math.pi + 0.1, -0.1], dtype=torch.float64))
    merged = merge_latents([a, b])
    assert abs(abs(merged[0].angle().item()) - math.pi) < 1e-9, f"+pi-0.1 and -pi+0.1 must merge to pi: {merged}"
    assert abs(merged[1].angle().item()) < 1e-9
    assert_near(merged.abs(), torch.ones(2, dtype=torch.float64), 1e-9, "magnitude")


def test_merge_zero_and_cancelling_latents_are_finite():
    zero = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    other = torch.tensor([0j, 2 + 2j, -1 + 0j], dtype=torch.complex128, requires_grad=True)
    opposite = torch.tensor([0j, 1 + 0j, 1 + 0j], dtype=torch.complex128)
    eps = 1e-6
    merged = merge_latents([zero, other], eps=eps)
    assert torch.isfinite(torch.view_as_real(merged)).all()
    assert merged[0] == 0, "two zeros merge to zero"
    assert 0 <= merged[1].abs() <= eps, "a zero magnitude pulls the harmonic mean to ~0"
    merged.abs().sum().backward()
    for leaf in (zero, other):
        assert torch.isfinite(torch.view_as_real(leaf.grad)).all()
    # -1 and 1: unit phasors cancel -> phase defined as 0, harmonic magnitude 1.
    cancelled = merge_latents([other.detach(), opposite], eps=eps)
    assert abs(cancelled[2] - 1) < 1e-9, cancelled


def test_merge_gradients(generator):
    latents = [random_complex(generator, 2, 3).requires_grad_() for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *ls: merge_latents(list(ls), eps=1e-9), latents)
    for method in ("mean", "sum"):
        assert torch.autograd.gradcheck(lambda *ls, m=method: merge_latents(list(ls), m), latents)


def test_merge_present_selects_latents_per_sample(generator):
    latents = [random_complex(generator, 4, 3, 2) for _ in range(3)]
    present = torch.tensor([[True, True, False, True], [True, False, True, False], [False, True, True, False]])
    for method in ("harmonic", "mean", "sum"):
        merged = merge_latents(latents, method, present=list(present))
        for b in range(4):
            subset = [latents[m][b] for m in range(3) if present[m, b]]
            assert_near(merged[b], merge_latents(subset, method), 1e-10, f"{method} sample {b}")
        assert_near(merge_latents(latents, method, present=present), merged, 0.0, "(M, B) tensor form")


def test_merge_present_takes_numpy_bool_arrays(generator):
    """present=[np.ndarray, ...] (and one (M, B) array) was refused ("got ndarray") while every other mask in
    pyblend takes numpy; bool arrays are now taken, on the latents' device, and anything else is still refused."""
    latents = [random_complex(generator, 4, 3, 2) for _ in range(2)]
    rows = np.array([[True, False, True, True], [False, True, True, False]])
    expected = merge_latents(latents, present=torch.from_numpy(rows))
    assert_near(merge_latents(latents, present=list(rows)), expected, 0.0, "a list of (B,) arrays")
    assert_near(merge_latents(latents, present=rows), expected, 0.0, "one (M, B) array")
    meta = [latent.to("meta") for latent in latents]  # no accelerator here: meta stands for "not the CPU"
    assert merge_latents(meta, present=list(rows)).device.type == "meta"
    with pytest.raises(ValueError, match=r"present\[1\]: expected a bool tensor of shape \(B,\) = \(4,\); got "
                                         r"int64 numpy array of shape \(4,\)"):
        merge_latents(latents, present=[rows[0], rows[1].astype(np.int64)])
    with pytest.raises(ValueError, match=r"present\[0\]: expected a bool tensor of shape \(B,\) = \(4,\); got "
                                         r"bool numpy array of shape \(3,\)"):
        merge_latents(latents, present=[rows[0, :3], rows[1]])
    with pytest.raises(ValueError, match=r"present: expected a bool tensor of shape \(M, B\) = \(2, 4\); got "
                                         r"float64 numpy array of shape \(2, 4\)"):
        merge_latents(latents, present=rows.astype(np.float64))
    with pytest.raises(ValueError, match=r"present\[1\]: expected a bool tensor of shape \(B,\) = \(4,\); got list"):
        merge_latents(latents, present=[rows[0], rows[1].tolist()])


def test_merge_never_reads_unselected_latents(generator):
    """NaN and inf where ``present`` is False: the same result and gradients as finite values there."""
    latents = [random_complex(generator, 3, 4) for _ in range(2)]
    present = torch.tensor([[True, True, False], [False, True, True]])
    poisoned = [latents[0].clone(), latents[1].clone()]
    poisoned[0][2], poisoned[1][0, :2] = complex(float("nan"), 0.0), complex(float("inf"), 1.0)
    for method in ("harmonic", "mean", "sum"):
        results = []
        for inputs in (latents, poisoned):
            leaves = [x.clone().requires_grad_() for x in inputs]
            merged = merge_latents(leaves, method, present=present)
            torch.view_as_real(merged).sum().backward()
            results.append([merged.detach(), *(leaf.grad for leaf in leaves)])
        for index, (clean, dirty) in enumerate(zip(*results)):
            keep = present[index - 1] if index else torch.ones(3, dtype=torch.bool)
            assert torch.equal(dirty[keep], clean[keep]), f"{method}: output {index} reads an unselected latent"


def test_merge_errors():
    a = torch.zeros(2, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="latents: .*empty"):
        merge_latents([])
    with pytest.raises(TypeError, match="latents: expected a list"):
        merge_latents(a)
    with pytest.raises(ValueError, match=r"latents\[1\]: expected shape \(2, 3\)"):
        merge_latents([a, torch.zeros(2, 4, dtype=torch.complex64)])
    with pytest.raises(TypeError, match=r"latents\[1\]: expected dtype torch.complex64"):
        merge_latents([a, a.to(torch.complex128)])
    with pytest.raises(TypeError, match=r"latents\[0\]: expected a complex64 or complex128"):
        merge_latents([a.real])
    with pytest.raises(ValueError, match=r"latents\[1\]: expected a tensor on cpu"):
        merge_latents([a, torch.zeros(2, 3, dtype=torch.complex64, device="meta")])
    with pytest.raises(ValueError, match="method: expected one of"):
        merge_latents([a, a], "median")
    with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
        merge_latents([a, a], eps=0.0)
    with pytest.raises(ValueError, match=r"present\[1\]: expected a bool tensor of shape \(B,\)"):
        merge_latents([a, a], present=[torch.ones(2, dtype=torch.bool), torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="present: expected one"):
        merge_latents([a, a], present=[torch.ones(2, dtype=torch.bool)])


# ------------------------------------------------------------------------------------------------ slerp

def textbook_slerp(a, b, t):
    """Shoemake's SLERP of the unit vectors, rescaled by the linearly interpolated norm (float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    theta = torch.acos((ua @ ub).clamp(-1, 1))
    direction = (math.sin((1 - t) * theta) * ua + math.sin(t * theta) * ub) / math.sin(theta)
    return ((1 - t) * na + t * nb) * direction


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_slerp_generic_matches_textbook(generator, dtype, tol):
    a = torch.randn(3, 4, generator=generator, dtype=torch.float64).to(dtype)
    b = torch.randn(3, 4, generator=generator, dtype=torch.float64).to(dtype)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        out = slerp(a, b, t)
        assert out.dtype == dtype and out.shape == a.shape
        assert_near(out.double().flatten(), textbook_slerp(a, b, t), tol, f"t={t}")
        expected_norm = (1 - t) * a.double().norm() + t * b.double().norm()
        assert abs(out.double().norm() - expected_norm) <= tol * 10, f"t={t}: norm"
    assert_near(slerp(a, b, 0.0), a, tol, "t=0")
    assert_near(slerp(a, b, 1.0), b, tol, "t=1")
    assert_near(slerp(a, b, torch.tensor(0.3, dtype=torch.float64)), slerp(a, b, 0.3), 0.0, "0-dim tensor t")


def test_slerp_orthogonal_midpoint():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 3.0], dtype=torch.float64)
    # norm 2 at t = 1/2, direction at 45 degrees
    assert_near(slerp(a, b, 0.5), torch.tensor([math.sqrt(2), math.sqrt(2)], dtype=torch.float64), 1e-12)


def test_slerp_degenerate_cases_are_finite(generator):
    a = torch.randn(7, generator=generator, dtype=torch.float64)
    zero = torch.zeros(7, dtype=torch.float64)
    for t in (0.0, 0.3, 0.5, 1.0):
        assert_near(slerp(a, a, t), a, 1e-12, f"equal, t={t}")
        assert_near(slerp(a, 3 * a, t), (1 - t + 3 * t) * a, 1e-12, f"parallel, t={t}")
        assert_near(slerp(a, -2 * a, t), (1 - t) * a - 2 * t * a, 1e-12, f"opposite, t={t}")
        assert_near(slerp(zero, a, t), t * a, 1e-12, f"zero a, t={t}")
        assert_near(slerp(a, zero, t), (1 - t) * a, 1e-12, f"zero b, t={t}")
        assert_near(slerp(zero, zero, t), zero, 0.0, f"both zero, t={t}")
    for b in (a.clone(), 3 * a, -2 * a, zero):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        slerp(x, y, 0.4).square().sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
        # Second derivatives too: the norm of a zero tensor had a NaN one.
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        grads = torch.autograd.grad(slerp(y, x, 0.4).square().sum(), (x, y), create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all(), "second derivatives"


def test_slerp_gradients(generator):
    a = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: slerp(x, y, 0.37), (a, b))


def test_slerp_takes_any_real_number_for_t():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = slerp(a, b, 0.25)
    for t in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        torch.testing.assert_close(slerp(a, b, t), expected, msg=repr(t))


def test_slerp_errors():
    a = torch.randn(3)
    with pytest.raises(ValueError, match=r"t: expected a float in \[0, 1\]"):
        slerp(a, a, 1.5)
    with pytest.raises(ValueError, match=r"t: expected a float in \[0, 1\]"):
        slerp(a, a, -0.1)
    with pytest.raises(ValueError, match="t: expected"):
        slerp(a, a, torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"b: expected shape \(3,\)"):
        slerp(a, torch.randn(4), 0.5)
    with pytest.raises(TypeError, match="a: expected a float tensor"):
        slerp(torch.arange(3), a, 0.5)
    with pytest.raises(TypeError, match="b: expected dtype torch.float32 like a"):  # was a ValueError
        slerp(a, a.double(), 0.5)


def test_slerp_checks_eps():
    """eps is compared with 1 -+ cos theta: negative or NaN gave NaN, and from 1 on the parallel and opposite cases
    overlap (eps=5 silently turned every merge into a linear one)."""
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.6, 0.8], dtype=torch.float64)
    for eps in (-1.0, float("nan"), float("inf"), 1.0, 5.0):
        with pytest.raises(ValueError, match=r"eps: expected a finite float in \[0, 1\)"):
            slerp(a, b, 0.5, eps=eps)
    for eps in ("x", None, True, torch.tensor(1e-7)):
        with pytest.raises(TypeError, match=r"eps: expected a float in \[0, 1\)"):
            slerp(a, b, 0.5, eps=eps)
    expected = slerp(a, b, 0.25)
    for eps in (0.0, 0, np.float32(1e-7), np.float64(1e-7)):
        assert_near(slerp(a, b, 0.25, eps=eps), expected, 1e-12, f"eps={eps!r}")
    # eps = 0: exactly parallel and opposite inputs are still the degenerate cases (finite).
    assert_near(slerp(a, 3 * a, 0.5, eps=0.0), 2 * a, 1e-12, "parallel, eps=0")
    assert_near(slerp(a, -a, 0.25, eps=0.0), 0.5 * a, 1e-12, "opposite, eps=0")


def test_slerp_checks_a_cpu_tensor_t_like_a_float():
    """A CPU t is read without a device sync: outside [0, 1] (or NaN) it extrapolated silently."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for value in (1.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"t: expected a value in \[0, 1\]; got a 0-dim tensor holding"):
            slerp(a, b, torch.tensor(value))
    with pytest.raises(ValueError, match=r"t: expected a value in \[0, 1\]"):
        slerp(a.double(), b.double(), torch.tensor(1.5, dtype=torch.float16))
    # A CPU t with tensors elsewhere is read on the CPU too; a meta t has no value to move to the CPU tensors.
    with pytest.raises(ValueError, match=r"t: expected a value in \[0, 1\]"):
        slerp(a.to("meta"), b.to("meta"), torch.tensor(2.0))
    assert slerp(a.to("meta"), b.to("meta"), torch.tensor(0.5)).device.type == "meta"
    with pytest.raises(ValueError, match="t: expected a tensor on cpu like a, or on the CPU; got .* on meta"):
        slerp(a, b, torch.tensor(0.5, device="meta"))
    # Where values are hidden the tensor is trusted, as on an accelerator.
    with set_value_checks(False):
        assert torch.isfinite(slerp(a, b, torch.tensor(1.5))).all()


# -------------------------------------------------------------------------------------------- LegoBlock

def token_block(generator=None, **options):
    """A LegoBlock over 5-wide atom-like features, a Linear encoder to 6-wide tokens, 3 outputs."""
    config = {**SMALL, **options}
    return LegoBlock(6, 3, nn.Sequential(nn.Linear(5, 6), nn.Tanh()), **config)


def vector_block(**options):
    """A LegoBlock over one 10-wide vector per sample (one token), no encoder."""
    return LegoBlock(10, 3, None, **{**SMALL, **options})


def token_inputs(generator, batch=4, tokens=7):
    x = torch.randn(batch, tokens, 5, generator=generator)
    mask = torch.rand(batch, tokens, generator=generator) < 0.7
    mask[:, 0] = True
    return x, mask


def normalize(latent):
    """Step 1 of the spec: divide by the norm over the channel axis."""
    return latent / latent.abs().square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)


def axes(fft_dims):
    return (1, 2) if fft_dims == 2 else (1,)


def manual_block(block, x, mask):
    """The block's forward composed by hand from the reference op and its parameter names."""
    tokens = block.encoder(x) if block.encoder is not None else x
    if tokens.dim() == 2:
        tokens = tokens[:, None]
    state = block.latent.expand(tokens.shape[0], -1, -1)
    for step in range(block.depth):
        layer = block.layers[0 if block.weight_sharing else step]
        att, ff = layer.attention, layer.feed_forward
        state = reference_step(
            state, tokens, att.to_q.weight, att.to_kv.weight, att.to_out.weight, att.to_out.bias,
            heads=block.heads, latent_norm_weight=att.norm.weight, latent_norm_bias=att.norm.bias,
            context_norm_weight=att.context_norm.weight, context_norm_bias=att.context_norm.bias,
            ff_norm_weight=ff.norm.weight, ff_norm_bias=ff.norm.bias, ff_in_weight=ff.w_in.weight,
            ff_in_bias=ff.w_in.bias, ff_out_weight=ff.w_out.weight, ff_out_bias=ff.w_out.bias, token_mask=mask,
            temperature=block.temperature, fft_dims=block.fft_dims, token_fft=block.token_fft,
            inverse=step < block.depth - 1)
    return state


@pytest.mark.parametrize("fft_dims", [1, 2])
@pytest.mark.parametrize("weight_sharing", [True, False])
def test_block_matches_composed_reference(generator, fft_dims, weight_sharing):
    torch.manual_seed(generator.initial_seed())
    block = token_block(fft_dims=fft_dims, weight_sharing=weight_sharing, depth=3)
    assert len(block.layers) == (1 if weight_sharing else 3)
    x, mask = token_inputs(generator)
    with torch.no_grad():
        embedding = block(x, mask, return_embeddings=True)
        expected = manual_block(block, x, mask)
        assert_near(embedding, expected, 1e-6)
        assert_near(block(x, mask), block.head.linear(block.head.norm(expected.real.mean(1))), 1e-6, "logits")


def test_fft_dims_change_the_result(generator):
    torch.manual_seed(generator.initial_seed())
    one = token_block(fft_dims=1)
    two = copy.deepcopy(one)
    two.fft_dims = 2
    x, mask = token_inputs(generator)
    with torch.no_grad():
        assert (one(x, mask, return_embeddings=True) - two(x, mask, return_embeddings=True)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype,complex_dtype", [(torch.float32, torch.complex64), (torch.float64, torch.complex128)])
def test_block_shapes_and_dtypes(generator, dtype, complex_dtype):
    block = vector_block(dtype=dtype)
    v = torch.randn(4, 10, generator=generator, dtype=torch.float64).to(dtype)
    logits = block(v)
    assert logits.shape == (4, 3) and logits.dtype == dtype
    embedding = block(v, return_embeddings=True)
    assert embedding.shape == (4, 8, 8) and embedding.dtype == complex_dtype
    spatial = block(v, return_embeddings=True, final_inverse=True)
    assert_near(spatial, torch.fft.ifftn(embedding, dim=(1, 2)), 1e-5 if dtype == torch.float32 else 1e-12,
                "final_inverse = ifft of the spectrum")


@pytest.mark.parametrize("weight_sharing", [True, False])
def test_block_gradients_reach_every_parameter(generator, weight_sharing):
    block = token_block(weight_sharing=weight_sharing)
    x, mask = token_inputs(generator)
    target = torch.randint(0, 3, (4,), generator=generator)
    classification_loss(block(x, mask), target).backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name}: non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name}: zero gradient"
    assert any(name.startswith("encoder.") for name, _ in block.named_parameters())


def test_masked_block_compiles_fullgraph_on_the_kernels(generator):
    """Ragged token masks (one sample without tokens) under torch.compile(fullgraph=True) on the Triton path,
    forward and gradients equal to eager."""
    torch.manual_seed(0)
    block = LegoBlock(12, 2, l_c=8, l_d=16, depth=2, heads=2, head_dim=8, backend="triton")
    x = torch.randn(3, 6, 12, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    expected = block(x, mask)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
    got = torch.compile(block, backend="aot_eager", fullgraph=True)(x, mask)
    torch.testing.assert_close(got, expected)
    for (name, _), ours, theirs in zip(block.named_parameters(),
                                       torch.autograd.grad(got.square().sum(), list(block.parameters())),
                                       expected_grads):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_merged_blocks_compile_fullgraph_on_the_kernels(generator):
    """LegoMerge and LegoFuse trace whole on the Triton path: the check for a sample with no modality reads flags
    on the host and is skipped while compiling (as the ops' own checks are)."""
    torch.manual_seed(0)
    blocks = [LegoBlock(6, 3, l_c=4, l_d=8, depth=1, heads=2, head_dim=4, backend="triton"),
              LegoBlock(7, 3, l_c=4, l_d=8, depth=1, heads=2, head_dim=4, backend="triton")]
    x = [torch.randn(2, 5, 6, generator=generator), torch.randn(2, 3, 7, generator=generator)]
    for model in (LegoMerge(blocks).eval(), LegoFuse(blocks).eval()):
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(got, model(x), msg=type(model).__name__)


@pytest.mark.parametrize("fft_dims", [1, 2])
def test_skipped_sample_follows_the_spec(generator, fft_dims):
    """An absent sample (present False, or no real token) gets the spectrum of the normalised learned latent:
    every step only normalises it (normalising twice is normalising once)."""
    torch.manual_seed(generator.initial_seed())
    block = token_block(fft_dims=fft_dims)
    x, mask = token_inputs(generator)
    x[1] = float("nan")                        # an absent sample's input is never read
    present = torch.tensor([True, False, True, True])
    mask[3] = False                            # no real token
    with torch.no_grad():
        out = block(x, mask, present, return_embeddings=True)
        expected = torch.fft.fftn(normalize(block.latent[None].to(torch.complex64)), dim=axes(fft_dims))[0]
        assert_near(out[1], expected, 1e-5, "present False")
        assert_near(out[3], expected, 1e-5, "all tokens masked")
        alone = block(x[[0, 2]], mask[[0, 2]], return_embeddings=True)
        assert_near(out[[0, 2]], alone, 1e-5, "the present samples are unaffected")
        assert torch.isfinite(block(x, mask, present)).all()


def test_block_explicit_latent(generator):
    block = vector_block()
    v = torch.randn(3, 10, generator=generator)
    with torch.no_grad():
        default = block(v, return_embeddings=True)
        given = block(v, latent=block.latent.expand(3, -1, -1).clone(), return_embeddings=True)
    assert_near(given, default, 0.0)


def test_block_takes_numpy_masks(generator):
    """mask and present as numpy bool arrays were refused ("got ndarray"), unlike every other mask argument."""
    block = token_block().eval()
    x, mask = token_inputs(generator)
    present = torch.tensor([True, False, True, True])
    want = block(x, mask, present)
    assert torch.equal(block(x, mask.numpy(), present.numpy()), want)


def test_block_errors(generator):
    block = token_block()
    x, mask = token_inputs(generator)
    with pytest.raises(ValueError, match=r"x: expected encoder tokens .* E = input_dim = 10"):
        vector_block()(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"mask: expected a bool tensor of shape \(B, N\) = \(4, 7\)"):
        block(x, mask[:, :3])
    with pytest.raises(ValueError, match=r"present: expected a bool tensor of shape \(B,\) = \(4,\)"):
        block(x, mask, torch.ones(4))
    with pytest.raises(ValueError, match=r"latent: expected shape \(B, l_c, l_d\) = \(4, 8, 8\)"):
        block(x, mask, latent=torch.randn(4, 8, 7))
    with pytest.raises(ValueError, match="final_inverse"):
        block(x, mask, final_inverse=True)
    with pytest.raises(ValueError, match="fft_dims: expected 1"):
        token_block(fft_dims=3)
    with pytest.raises(ValueError, match="temperature"):
        token_block(temperature=0.0)


def test_block_checks_flags_numbers_backend_and_device(generator):
    """Flags went through isinstance(bool) only at construction and not at all in forward (return_embeddings="no"
    was True); numpy ints were refused as sizes; a bad backend waited for the first forward; an input on another
    device failed inside the encoder (or the op) with torch's message naming no argument."""
    for name in ("weight_sharing", "token_fft", "normalize"):
        for value in ("no", None, 1):
            with pytest.raises(TypeError, match=re.escape(f"{name}: expected a bool; got {value!r}")):
                vector_block(**{name: value})
    with pytest.raises(ValueError, match="backend: expected one of"):
        vector_block(backend="bogus")
    torch.manual_seed(generator.initial_seed())
    block = vector_block(heads=np.int64(2), head_dim=np.int32(4), depth=np.int64(2), temperature=np.float32(0.5),
                         fft_dims=np.int64(1), weight_sharing=np.bool_(False))
    assert (type(block.heads), type(block.depth), block.fft_dims, block.weight_sharing) == (int, int, 1, False)
    v = torch.randn(4, 10, generator=generator)
    with torch.no_grad():
        assert block(v).shape == (4, 3)
    with pytest.raises(TypeError, match="return_embeddings: expected a bool"):
        block(v, return_embeddings="no")
    with pytest.raises(TypeError, match="final_inverse: expected a bool"):
        block(v, return_embeddings=True, final_inverse=None)
    # No encoder: the input is the tokens.
    with pytest.raises(ValueError, match=r"x: expected encoder tokens on cpu like the block's parameters; "
                                         r"got .* on meta"):
        block(v.to("meta"))
    x, mask = token_inputs(generator)
    with pytest.raises(ValueError, match=r"x: expected a tensor on cpu like the block's parameters; got .* on meta"):
        token_block()(x.to("meta"), mask)


def test_block_refuses_tokens_of_another_dtype(generator):
    """float64 or float16 tokens in a float32 block (and float32 in a float64 one) went through silently: the op
    projected them in their own dtype, so float64 tokens gave a complex128 latent from a float32 block and float16
    ones a float16 key/value projection. Refused by name as in DynamicFusion, except under autocast, which casts."""
    v = torch.randn(4, 10, generator=generator)
    block = vector_block()
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"x: expected dtype torch.float32 like the block's parameters "
                                            rf"\(under autocast, any float dtype but float64\); got {dtype}"):
            block(v.to(dtype))
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float64 like the block's parameters .*; got "
                                        r"torch.float32"):
        vector_block(dtype=torch.float64)(v)
    # Through an encoder: it is the encoder's output that the block consumes.
    x, mask = token_inputs(generator)
    encoded = LegoBlock(6, 3, nn.Sequential(nn.Linear(5, 6, dtype=torch.float64), nn.Tanh()), **SMALL)
    with pytest.raises(TypeError, match=r"x: the encoder's tokens: expected dtype torch.float32 like the block's "
                                        r"parameters .*; got torch.float64 tensor of shape \(4, 7, 6\)"):
        encoded(x.double(), mask)
    blocks = two_blocks(generator.initial_seed())
    with pytest.raises(TypeError, match=r"block 1: x: expected dtype torch.float32"):
        lego_merge(blocks)([x, v.half()], [mask, None])
    # Autocast casts the projection's inputs to its own dtype; float64 it leaves alone, so it stays refused.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.isfinite(block(v.to(dtype))).all()
        with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 .*; got torch.float64"):
            block(v.double())


# ----------------------------------------------------------------------------------------- LegoMerge

def two_blocks(seed):
    torch.manual_seed(seed)
    return token_block(), vector_block()


def paired_inputs(generator, batch=4):
    x, mask = token_inputs(generator, batch)
    v = torch.randn(batch, 10, generator=generator)
    return [x, v], [mask, None]


@pytest.mark.parametrize("method", ["harmonic", "mean", "sum"])
@pytest.mark.parametrize("head_method", ["slerp", "linear"])
def test_merge_without_training_is_finite(generator, method, head_method):
    blocks = two_blocks(generator.initial_seed())
    merged = lego_merge(blocks, method, head_method)
    assert isinstance(merged, LegoMerge)
    inputs, masks = paired_inputs(generator)
    with torch.no_grad():
        logits = merged(inputs, masks)
        assert logits.shape == (4, 3) and torch.isfinite(logits).all()
        latents = [block(x, m, return_embeddings=True) for block, x, m in zip(blocks, inputs, masks)]
        assert_near(merged(inputs, masks, return_embeddings=True), merge_latents(latents, method), 1e-6,
                    "merged latent")


@pytest.mark.parametrize("method", ["harmonic", "mean"])
@pytest.mark.parametrize("head_method", ["slerp", "linear"])
def test_merge_of_identical_blocks_is_the_block(generator, method, head_method):
    torch.manual_seed(generator.initial_seed())
    block = token_block()
    merged = lego_merge([block, copy.deepcopy(block)], method, head_method)
    x, mask = token_inputs(generator)
    with torch.no_grad():
        assert_near(merged([x, x], [mask, mask]), block(x, mask), 1e-5)


def test_merged_head_is_running_slerp():
    torch.manual_seed(0)
    heads = [vector_block().head for _ in range(3)]
    two = merge_heads(heads[:2], "slerp")
    for name, parameter in two.named_parameters():
        a, b = (dict(h.named_parameters())[name].detach() for h in heads[:2])
        assert_near(parameter.detach(), slerp(a, b, 0.5), 0.0, name)
        assert parameter.requires_grad
    three = merge_heads(heads, "slerp")
    three_linear = merge_heads(heads, "linear")
    for name, parameter in three.named_parameters():
        a, b, c = (dict(h.named_parameters())[name].detach() for h in heads)
        assert_near(parameter.detach(), slerp(slerp(a, b, 0.5), c, 1 / 3), 1e-7, name)
        assert_near(dict(three_linear.named_parameters())[name].detach(), (a + b + c) / 3, 1e-6, name)
    w = heads[0].linear.weight
    assert not torch.equal(three.linear.weight.detach(), w.detach()), "the merged head must not be the first head"


def test_merge_skips_a_missing_modality(generator):
    blocks = two_blocks(generator.initial_seed())
    merged = lego_merge(blocks)
    inputs, masks = paired_inputs(generator)
    inputs[1][2] = float("nan")
    present = [torch.tensor([True, True, True, False]), torch.tensor([True, True, False, True])]
    with torch.no_grad():
        logits = merged(inputs, masks, present)
        assert torch.isfinite(logits).all()
        only_tokens = blocks[0](inputs[0], masks[0], return_embeddings=True)
        only_vector = blocks[1](inputs[1].nan_to_num(), return_embeddings=True)
        # M = 1: the merge returns that block's latent, read by the merged head.
        assert_near(logits[2], merged.head(only_tokens[2:3])[0], 1e-5, "sample without the vector modality")
        assert_near(logits[3], merged.head(only_vector[3:4])[0], 1e-5, "sample without the token modality")
        both = merged.head(merge_latents([only_tokens[:2], only_vector[:2]]))
        assert_near(logits[:2], both, 1e-5, "samples with both")


def test_lego_merge_errors(generator):
    blocks = two_blocks(generator.initial_seed())
    inputs, masks = paired_inputs(generator)
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected latent shape \(l_c, l_d\) = \(8, 8\)"):
        lego_merge([blocks[0], vector_block(l_c=4)])
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected a head Linear\(8, 3\)"):
        lego_merge([blocks[0], LegoBlock(10, 2, **SMALL)])
    with pytest.raises(TypeError, match=r"blocks\[1\]: expected a LegoBlock"):
        lego_merge([blocks[0], nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="blocks: expected at least one"):
        lego_merge([])
    with pytest.raises(ValueError, match="method: expected one of"):
        lego_merge(blocks, "max")
    with pytest.raises(ValueError, match="head_method: expected one of"):
        lego_merge(blocks, head_method="ties")
    merged = lego_merge(blocks)
    with pytest.raises(ValueError, match=r"inputs: expected a list with one input per block \(2\)"):
        merged(inputs[:1])
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have no modality present"):
        merged(inputs, masks, [torch.tensor([True, False, True, True]), torch.tensor([False, False, True, True])])


def test_multi_block_models_check_devices_eps_and_heads(generator):
    """An input on another device failed in the encoder or the op with torch's message; LegoMerge took eps="x" or
    -1 until its first forward; merge_heads([]) was an IndexError and merge_heads of blocks an AttributeError."""
    blocks = two_blocks(generator.initial_seed())
    (x, v), masks = paired_inputs(generator)
    for model in (lego_merge(blocks), LegoFuse(blocks)):
        for index, inputs in ((1, [x, v.to("meta")]), (0, [x.to("meta"), v])):
            with pytest.raises(ValueError, match=rf"block {index}: x: expected (a tensor|encoder tokens) on cpu "
                                                 rf"like the block's parameters; got .* on meta"):
                model(inputs, masks)
        with pytest.raises(TypeError, match="return_embeddings: expected a bool"):
            model([x, v], masks, return_embeddings="no")
    for eps in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
            LegoMerge(blocks, eps=eps)
    for eps in ("x", None, True):
        with pytest.raises(TypeError, match="eps: expected a finite float > 0"):
            lego_merge(blocks, eps=eps)
    assert lego_merge(blocks, eps=np.float32(0.5)).eps == 0.5
    with pytest.raises(ValueError, match="heads: expected at least one LegoHead"):
        merge_heads([])
    with pytest.raises(TypeError, match=r"heads\[1\]: expected a LegoHead .*; pass blocks\[1\]\.head"):
        merge_heads([blocks[0].head, blocks[1]])
    with pytest.raises(ValueError, match=r"heads\[1\]: expected a Linear\(8, 3\) like heads\[0\]"):
        merge_heads([blocks[0].head, LegoHead(8, 2)])
    with pytest.raises(TypeError, match=r"heads\[1\]: expected parameters of dtype torch.float32"):
        merge_heads([blocks[0].head, LegoHead(8, 3, dtype=torch.float64)])


MULTI_MODELS = {"merge": lambda blocks, head_method: lego_merge(blocks, head_method=head_method),
                "fuse stack": lambda blocks, head_method: LegoFuse(blocks, "stack", head_method),
                "fuse weave": lambda blocks, head_method: LegoFuse(blocks, "weave", head_method)}


def hand_merged_head(heads, head_method):
    """The merged head's parameters by hand: slerp at t = 1/2 (two heads) or the mean."""
    merged = {}
    for name, a in heads[0].named_parameters():
        b = dict(heads[1].named_parameters())[name]
        merged[name] = slerp(a.detach(), b.detach(), 0.5) if head_method == "slerp" else (a.detach() + b.detach()) / 2
    return merged


@pytest.mark.parametrize("kind", list(MULTI_MODELS))
@pytest.mark.parametrize("head_method", ["slerp", "linear"])
@pytest.mark.parametrize("order", ["modules", "apply"])
def test_deferred_init_rederives_the_merged_head(generator, kind, head_method, order):
    """Built on the meta device, to_empty(), then reset_parameters() on every submodule (modules() walks parents
    first, Module.apply children first): the merged head came back as nn.Linear's default (0.69 off the mean
    with head_method="linear"). It is derived from the blocks' heads, so resetting re-derives it, after them."""
    with torch.device("meta"):
        model = MULTI_MODELS[kind](two_blocks(generator.initial_seed()), head_method)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))

    def reset(module):
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()

    if order == "modules":
        for module in model.modules():
            reset(module)
    else:
        model.apply(reset)
    left = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not left, f"left uninitialised: {left}"
    expected = hand_merged_head([block.head for block in model.blocks], head_method)
    for name, parameter in model.head.named_parameters():
        assert_near(parameter.detach(), expected[name], 1e-6, name)
    # The model equals the one built directly on the CPU from the same blocks.
    direct = MULTI_MODELS[kind](copy.deepcopy(list(model.blocks)), head_method)
    inputs, masks = paired_inputs(generator)
    with torch.no_grad():
        assert_near(model(inputs, masks), direct(inputs, masks), 0.0, "logits")
    assert repr(model.head) == repr(direct.head) == repr(LegoHead(8, 3))


@pytest.mark.parametrize("kind", list(MULTI_MODELS))
def test_reset_parameters_rederives_the_head_from_the_current_blocks(generator, kind):
    """The multi-block model's own reset_parameters re-derives the head from the blocks as they are (trained
    blocks are not reset: each module resets only what it owns), in place; a deep copy derives from its own
    blocks; blocks left on the meta device are named rather than copied out of."""
    blocks = two_blocks(generator.initial_seed())
    model = MULTI_MODELS[kind](blocks, "linear")
    weight = model.head.linear.weight
    with torch.no_grad():
        model.head.linear.weight.zero_()
        blocks[1].head.linear.weight.add_(1.0)
    before = {name: p.detach().clone() for name, p in model.blocks.named_parameters()}
    model.reset_parameters()
    assert model.head.linear.weight is weight, "reset in place: an optimizer's references must stay valid"
    assert all(torch.equal(p, before[name]) for name, p in model.blocks.named_parameters()), "blocks were reset"
    expected = hand_merged_head([block.head for block in blocks], "linear")
    for name, parameter in model.head.named_parameters():
        assert_near(parameter.detach(), expected[name], 1e-6, name)
    original = model.head.linear.bias.detach().clone()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.blocks[0].head.linear.bias.add_(2.0)
    clone.head.linear.reset_parameters()
    assert_near(clone.head.linear.bias.detach(), (clone.blocks[0].head.linear.bias + blocks[1].head.linear.bias)
                .detach() / 2, 1e-6, "the copy's head from the copy's blocks")
    model.head.linear.reset_parameters()
    assert torch.equal(model.head.linear.bias, original), "the original's head follows the copy's blocks"
    with torch.device("meta"):
        deferred = MULTI_MODELS[kind](two_blocks(0), "slerp")
    deferred.head.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match=r"\(the blocks. heads\) are on the meta device"):
        deferred.head.linear.reset_parameters()


def absent_everywhere(batch=4):
    return torch.zeros(batch, dtype=torch.bool)


def test_merge_none_input_is_absent_from_every_sample(generator):
    """An input of None is the modality absent from every sample: the same result as the input given with
    present all False (the merge leaves the block out), without running that block's encoder."""
    blocks = two_blocks(generator.initial_seed())
    merged = lego_merge(blocks)
    (x, v), masks = paired_inputs(generator)
    with torch.no_grad():
        for inputs, present, name in (([x, None], [None, absent_everywhere()], "vector"),
                                      ([None, v], [absent_everywhere(), None], "tokens")):
            given = [x, v]
            expected = merged(given, masks, present, return_embeddings=True)
            skipped_masks = [m if i is not None else None for m, i in zip(masks, inputs)]
            assert_near(merged(inputs, skipped_masks, return_embeddings=True), expected, 1e-6, f"no {name}")
            # An all-False mask alongside a None input agrees with it.
            assert_near(merged(inputs, skipped_masks, present, return_embeddings=True), expected, 1e-6, name)
        alone = blocks[0](x, masks[0], return_embeddings=True)
        assert_near(merged([x, None], [masks[0], None]), merged.head(alone), 1e-5, "logits from block 0 alone")
    # The skipped block's encoder never runs: no gradient reaches it.
    merged([None, v]).sum().backward()
    assert all(p.grad is None for p in blocks[0].encoder.parameters())
    assert all(p.grad is not None for p in blocks[1].layers.parameters())


def test_none_input_errors(generator):
    blocks = two_blocks(generator.initial_seed())
    (x, v), masks = paired_inputs(generator)
    for model in (lego_merge(blocks), LegoFuse(blocks)):
        with pytest.raises(ValueError, match=r"inputs: every input is None"):
            model([None, None])
        with pytest.raises(ValueError, match=r"masks\[0\]: expected None, as inputs\[0\] is None"):
            model([None, v], masks)
        with pytest.raises(ValueError, match=r"present\[1\]: inputs\[1\] is None .* True for sample\(s\) \[2\]"):
            model([x, None], [masks[0], None], [None, torch.arange(4) == 2])
        with pytest.raises(ValueError, match=r"present\[1\]: expected None or a bool tensor of shape \(B,\) = \(4,\)"):
            model([x, None], [masks[0], None], [None, torch.zeros(3, dtype=torch.bool)])
        with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have no modality present"):
            model([x, None], [masks[0], None], [torch.arange(4) != 1, None])
        # With value checks off the contradiction is not read: the None input wins.
        with torch.no_grad(), set_value_checks(False):
            trusted = model([x, None], [masks[0], None], [None, torch.ones(4, dtype=torch.bool)])
            assert_near(trusted, model([x, None], [masks[0], None]), 0.0, "trusted present")


# ------------------------------------------------------------------------------------------- LegoFuse

def test_fuse_schedules(generator):
    blocks = two_blocks(generator.initial_seed())
    deep = vector_block(depth=3)
    assert LegoFuse(blocks, "stack").schedule() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert LegoFuse(blocks, "weave").schedule() == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert LegoFuse([blocks[0], deep], "weave").schedule() == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]
    with pytest.raises(ValueError, match="mode: expected one of"):
        LegoFuse(blocks, "zip")


def test_fuse_stack_is_blocks_chained(generator):
    blocks = two_blocks(generator.initial_seed())
    fuse = LegoFuse(blocks, "stack")
    inputs, masks = paired_inputs(generator)
    with torch.no_grad():
        handed = blocks[0](inputs[0], masks[0], return_embeddings=True, final_inverse=True)
        expected = blocks[1](inputs[1], latent=handed, return_embeddings=True)
        assert_near(fuse(inputs, masks, return_embeddings=True), expected, 1e-6)
        assert_near(fuse(inputs, masks), fuse.head(expected), 1e-6, "logits from the merged head")


@pytest.mark.parametrize("mode", ["stack", "weave"])
def test_fuse_trains_one_step(generator, mode):
    blocks = two_blocks(generator.initial_seed())
    fuse = LegoFuse(blocks, mode)
    inputs, masks = paired_inputs(generator)
    target = torch.randint(0, 3, (4,), generator=generator)
    before = {name: p.detach().clone() for name, p in fuse.named_parameters()}
    optimizer = torch.optim.SGD(fuse.parameters(), lr=0.1)
    loss = classification_loss(fuse(inputs, masks), target)
    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in fuse.named_parameters():
        # The chain starts from the first block's latent; the merged head replaces the blocks' own heads.
        if name == "blocks.1.latent" or ".head." in name:
            assert parameter.grad is None, name
            continue
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    optimizer.step()
    changed = [name for name, p in fuse.named_parameters() if not torch.equal(p, before[name])]
    assert any(n.startswith("blocks.0.encoder") for n in changed) and any(n.startswith("blocks.1.layers")
                                                                           for n in changed)
    assert any(n.startswith("head.") for n in changed)


@pytest.mark.parametrize("mode", ["stack", "weave"])
def test_fuse_skips_a_missing_modality(generator, mode):
    """A sample without the vector modality: block 1's steps only normalise its latent, so the chain is block 0's
    steps, then a normalisation and the spectrum."""
    blocks = two_blocks(generator.initial_seed())
    fuse = LegoFuse(blocks, mode)
    inputs, masks = paired_inputs(generator)
    inputs[1][1] = float("nan")
    present = [None, torch.tensor([True, False, True, True])]
    with torch.no_grad():
        out = fuse(inputs, masks, present, return_embeddings=True)
        spectrum = blocks[0](inputs[0], masks[0], return_embeddings=True)
        expected = torch.fft.fftn(normalize(torch.fft.ifftn(spectrum, dim=(1, 2))), dim=(1, 2))
        assert_near(out[1], expected[1], 1e-5)
        assert torch.isfinite(fuse(inputs, masks, present)).all()


@pytest.mark.parametrize("mode", ["stack", "weave"])
def test_fuse_none_input_is_absent_from_every_sample(generator, mode):
    """An input of None equals the input given with present all False: its block's steps still run, without
    tokens, so they only normalise the latent (a sample's result does not depend on whether the rest of its batch
    has the modality). The chain starts from blocks[0].latent even when blocks[0]'s input is None."""
    blocks = two_blocks(generator.initial_seed())
    fuse = LegoFuse(blocks, mode)
    (x, v), masks = paired_inputs(generator)
    with torch.no_grad():
        expected = fuse([x, v], masks, [None, absent_everywhere()], return_embeddings=True)
        assert_near(fuse([x, None], [masks[0], None], return_embeddings=True), expected, 1e-6, "no vector")
        expected = fuse([x, v], masks, [absent_everywhere(), None], return_embeddings=True)
        assert_near(fuse([None, v], return_embeddings=True), expected, 1e-6, "no tokens")
        # Not the chain without block 0's steps: the vector block's alone starts from its own latent.
        assert not torch.allclose(expected, blocks[1](v, return_embeddings=True))
    loss = classification_loss(fuse([None, v]), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None for p in blocks[0].encoder.parameters())
    assert blocks[0].latent.grad is None or torch.isfinite(blocks[0].latent.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fuse.parameters() if p.grad is not None)


def test_unpaired_training_then_merge_and_fuse():
    """Each block trains on its own samples (no overlap); at inference a missing modality is skipped."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    count = 24
    x = torch.randn(count, 5, 5, generator=generator)
    v = torch.randn(count, 10, generator=generator)
    labels = ((x[:, :, 0].mean(1) + v[:, 0]) > 0).long()
    token_only, vector_only = torch.arange(0, 12), torch.arange(12, 24)
    token, vector = token_block(), vector_block()
    for block, inputs, rows in ((token, x, token_only), (vector, v, vector_only)):
        optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
        losses = []
        for _ in range(15):
            optimizer.zero_grad()
            loss = classification_loss(block(inputs[rows]), labels[rows])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    has_tokens = torch.zeros(count, dtype=torch.bool)
    has_tokens[:16] = True
    has_vector = torch.zeros(count, dtype=torch.bool)
    has_vector[8:] = True                      # 0-7 tokens only, 8-15 both, 16-23 vector only
    x_seen, v_seen = x.clone(), v.clone()
    x_seen[~has_tokens] = float("nan")
    v_seen[~has_vector] = float("nan")
    merged = lego_merge([token, vector])
    with torch.no_grad():
        logits = merged([x_seen, v_seen], present=[has_tokens, has_vector])
        assert logits.shape == (count, 3) and torch.isfinite(logits).all()
        alone = merged.head(token(x[:8], return_embeddings=True))
        assert_near(logits[:8], alone, 1e-5, "token-only samples")
    fuse = LegoFuse([token, vector], "stack")
    optimizer = torch.optim.Adam(fuse.parameters(), lr=1e-3)
    loss = classification_loss(fuse([x_seen, v_seen], present=[has_tokens, has_vector]), labels)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in fuse.parameters() if p.grad is not None)
    optimizer.step()
    with torch.no_grad():
        assert torch.isfinite(fuse([x_seen, v_seen], present=[has_tokens, has_vector])).all()


# -------------------------------------------------------------------------------------- losses, metrics

def brute_survival_nll(logits, event_bin, censored, alpha):
    """MCAT's nll_loss, sample by sample in probability space."""
    total = 0.0
    for z, y, c in zip(logits.tolist(), event_bin.tolist(), censored.tolist()):
        hazards = [1 / (1 + math.exp(-value)) for value in z]
        survival = [1.0]
        for h in hazards:
            survival.append(survival[-1] * (1 - h))                 # survival[k + 1] = S_k
        uncensored = -(1 - c) * (math.log(survival[y]) + math.log(hazards[y]))
        censored_term = -c * math.log(survival[y + 1])
        total += (1 - alpha) * (uncensored + censored_term) + alpha * uncensored
    return total / len(event_bin)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_survival_nll_matches_brute_force(generator, alpha):
    logits = torch.randn(9, 4, generator=generator, dtype=torch.float64) * 2
    event_bin = torch.randint(0, 4, (9,), generator=generator)
    censored = torch.rand(9, generator=generator) < 0.4
    censored[0], censored[1] = True, False
    loss = survival_nll_loss(logits, event_bin, censored, alpha=alpha)
    assert abs(loss.item() - brute_survival_nll(logits, event_bin, censored.double(), alpha)) < 1e-10
    total = survival_nll_loss(logits, event_bin, censored, alpha=alpha, reduction="sum")
    assert abs(total.item() - 9 * loss.item()) < 1e-9


def test_survival_nll_numpy_alpha(generator):
    """alpha=np.float32(0.4) was refused as "expected a float in [0, 1]"."""
    logits = torch.randn(5, 4, generator=generator)
    event_bin, censored = torch.randint(0, 4, (5,), generator=generator), torch.rand(5, generator=generator) < 0.5
    assert torch.equal(survival_nll_loss(logits, event_bin, censored, alpha=np.float32(0.5)),
                       survival_nll_loss(logits, event_bin, censored, alpha=0.5))


def test_survival_nll_extreme_logits_have_finite_gradients():
    logits = torch.tensor([[60.0, -60.0, 60.0], [-80.0, 80.0, -80.0]], requires_grad=True)
    loss = survival_nll_loss(logits, torch.tensor([2, 0]), torch.tensor([False, True]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_survival_risk_and_errors(generator):
    logits = torch.randn(5, 4, generator=generator)
    hazards = torch.sigmoid(logits)
    assert_near(survival_risk(logits), -torch.cumprod(1 - hazards, dim=1).sum(1), 1e-6)
    with pytest.raises(ValueError, match="event_bin: expected an int32/int64 tensor of shape"):
        survival_nll_loss(logits, torch.zeros(5), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"censored: expected a bool .* \(B,\) = \(5,\)"):
        survival_nll_loss(logits, torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="alpha"):
        survival_nll_loss(logits, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool), alpha=2.0)
    # Found by a bad-input sweep: torch's device error naming no argument; a meta event_bin out of range even
    # returned a number (no value can be read there); survival_risk of a (B,) or numpy input an IndexError or
    # AttributeError.
    with pytest.raises(ValueError, match="event_bin: expected a tensor on cpu like logits"):
        survival_nll_loss(logits, torch.full((5,), 7, device="meta"), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="target: expected a tensor on cpu like logits"):
        classification_loss(logits, torch.zeros(5, dtype=torch.long, device="meta"))
    for bad in (logits[:, 0], logits.numpy()):
        with pytest.raises(ValueError, match=r"logits: expected a float tensor of shape \(B, bins\)"):
            survival_risk(bad)


def test_loss_targets_out_of_range_name_the_argument(generator):
    logits = torch.randn(5, 4, generator=generator)
    event_bin = torch.tensor([0, 3, 1, 2, 0])
    censored = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])
    for value in (4, -1):
        bad = event_bin.clone()
        bad[2] = value
        message = rf"event_bin: expected values in \[0, bins\) = \[0, 4\); event_bin\[2\] = {value} \(1 such entry\)"
        with pytest.raises(ValueError, match=message):
            survival_nll_loss(logits, bad, censored)
    half = censored.clone()
    half[[1, 3]] = 0.5
    with pytest.raises(ValueError, match=r"censored: expected 0 or 1; censored\[1\] = 0.5 \(2 such entries\)"):
        survival_nll_loss(logits, event_bin, half)
    z = torch.randn(5, generator=generator)
    for bad, shown in ((torch.tensor([1, 0, 2, 1, 0]), "2"), (torch.tensor([1, 0, -1, 1, 0]), "-1"),
                       (torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.0]), "nan")):
        with pytest.raises(ValueError, match=rf"target: expected 0 or 1 \(or a probability in \[0, 1\]\) for binary "
                                             rf"logits .*; target\[2\] = {shown} \(1 such entry\)"):
            classification_loss(z[:, None], bad)
    for value in (3, -1, -100):   # -100 would be F.cross_entropy's ignore_index: silently left out of the mean
        with pytest.raises(ValueError, match=rf"target: expected class indices in \[0, K\) = \[0, 3\) for logits "
                                             rf"\(B, K\); target\[4\] = {value}"):
            classification_loss(logits[:, :3], torch.tensor([0, 1, 2, 1, value]))
    with pytest.raises(TypeError, match=r"target: expected 0/1 \(bool or int\) or a probability"):
        classification_loss(z, torch.zeros(5, dtype=torch.complex64))
    # Soft binary labels (probabilities) are a valid binary cross-entropy target.
    soft = torch.tensor([0.5, 0.0, 1.0, 0.9, 0.1], dtype=torch.float64)
    p = torch.sigmoid(z.double())
    expected = -(soft * p.log() + (1 - soft) * (1 - p).log()).mean()
    assert abs(classification_loss(z.double(), soft).item() - expected.item()) < 1e-12


def test_loss_range_checks_are_skipped_where_values_are_hidden(generator):
    logits = torch.randn(5, 4, generator=generator)
    censored = torch.tensor([0.0, 0.5, 1.0, 0.0, 0.0])
    with set_value_checks(False):
        assert torch.isfinite(survival_nll_loss(logits, torch.tensor([0, 3, 1, 2, 0]), censored))
        with pytest.raises((RuntimeError, IndexError)):   # gather's own error: not checked, not a ValueError
            survival_nll_loss(logits, torch.tensor([0, 4, 1, 2, 0]), censored)
        target = torch.tensor([0, 1, 2, 1, -100])
        kept = classification_loss(logits[:4, :3], target[:4])
        assert abs(classification_loss(logits[:, :3], target).item() - kept.item()) < 1e-6
    meta = torch.device("meta")
    assert survival_nll_loss(logits.to(meta), torch.zeros(5, dtype=torch.long, device=meta),
                             censored.to(meta)).is_meta
    assert classification_loss(logits.to(meta), torch.zeros(5, dtype=torch.long, device=meta)).is_meta
    assert classification_loss(logits[:, 0].to(meta), censored.to(meta)).is_meta


def test_classification_loss_matches_hand_formulas(generator):
    logits = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 3, (6,), generator=generator)
    expected = -torch.stack([logits[i].exp()[target[i]].log() - logits[i].exp().sum().log() for i in range(6)]).mean()
    assert abs(classification_loss(logits, target).item() - expected.item()) < 1e-12
    z = torch.randn(6, 1, generator=generator, dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 1, 0, 0])
    p = torch.sigmoid(z[:, 0])
    expected = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert abs(classification_loss(z, y).item() - expected.item()) < 1e-12
    with pytest.raises(TypeError, match="target: expected integer class indices"):
        classification_loss(logits, target.double())


def brute_c_index(risk, time, event):
    score = comparable = 0.0
    for i, j in itertools.permutations(range(len(risk)), 2):
        if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
            comparable += 1
            score += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return score / comparable


def test_concordance_index_matches_brute_force(generator):
    for _ in range(5):
        n = 25
        risk = torch.randint(0, 6, (n,), generator=generator).double().numpy()       # many tied risks
        time = torch.randint(0, 8, (n,), generator=generator).double().numpy()       # many tied times
        event = (torch.rand(n, generator=generator) < 0.6).numpy()
        event[0] = True
        time[0] = -1.0                                                               # one comparable pair at least
        assert abs(concordance_index(risk, time, event) - brute_c_index(risk, time, event)) < 1e-12
    time = np.arange(6.0)
    assert concordance_index(-time, time, np.ones(6, bool)) == 1.0
    assert concordance_index(time, time, np.ones(6, bool)) == 0.0
    assert concordance_index(np.zeros(6), time, np.ones(6, bool)) == 0.5
    assert abs(concordance_index(torch.tensor(-time), torch.tensor(time), torch.ones(6, dtype=torch.bool)) - 1) == 0
    with pytest.raises(ValueError, match="no comparable pair"):
        concordance_index(np.zeros(4), np.arange(4.0), np.zeros(4, bool))
    # 0/1 numbers are events as bools are; anything else was cast to True (R's 1/2 coding made every censored
    # sample an event, the string 'False' too), and a NaN tolerance made every tie a miss.
    assert concordance_index(-time, time, np.ones(6)) == 1.0
    for event in (np.array(["False", "True", "True"]), [2, 1, 1], [float("nan"), 1, 1], [0.5, 1, 1]):
        with pytest.raises(ValueError, match="event: expected bool or 0/1 values"):
            concordance_index([3.0, 2.0, 1.0], [1.0, 2.0, 3.0], event)
    for tolerance in (float("nan"), -1.0, "0"):
        with pytest.raises(ValueError, match="tied_tol: expected a finite float >= 0"):
            concordance_index(np.zeros(6), time, np.ones(6, bool), tied_tol=tolerance)
    # bfloat16 risks (numpy has no such dtype) are read as float64; complex ones are refused, not cut to real.
    assert concordance_index(torch.tensor(-time).bfloat16(), time, np.ones(6, bool)) == 1.0
    with pytest.raises(ValueError, match="risk: expected real numbers; got dtype complex128"):
        concordance_index(time + 1j, time, np.ones(6, bool))
    with pytest.raises(ValueError, match="risk: expected values; got a tensor on the meta device"):
        concordance_index(torch.zeros(6, device="meta"), time, np.ones(6, bool))


def brute_auc(scores, labels):
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_roc_auc_matches_brute_force(generator):
    for _ in range(5):
        scores = torch.randint(0, 5, (30,), generator=generator).double().numpy()   # ties
        labels = (torch.rand(30, generator=generator) < 0.5).long().numpy()
        labels[:2] = [0, 1]
        assert abs(roc_auc(scores, labels) - brute_auc(scores, labels)) < 1e-12
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([True, False, True])) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels: expected bool or 0/1 values; got dtype int64 holding \\[2\\]"):
        roc_auc([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="scores: expected real numbers; got dtype <U1"):
        roc_auc(["a", "b"], [0, 1])
