"""Dynamic gated fusion: the Triton kernels (interpreter on the CPU) and the reference against float64, and the
DynamicFusion module.

Every check draws fresh inputs, poisons missing modalities with NaN, and compares the three outputs (fused,
weights, entropy) and the three gradients (h, gate logits, score logits) under random upstream gradients of all
three outputs with the float64 reference.
"""
import copy
import math

import numpy as np
import pytest
import torch

from pyblend import ops, reference
from pyblend.nn import DynamicFusion

from graphs import backend_device
from hopper import run_compile_script
from tolerances import RELATIVE_ERROR, assert_close, assert_close_to_sum

HAS_CUDA = torch.cuda.is_available()
# bf16 arithmetic is wrong in Triton's interpreter: bf16 runs on the GPU only.
INTERPRETER_DTYPES = [torch.float32, torch.float16]
OUTPUTS = ("fused", "weights", "entropy")
GRADIENTS = ("dh", "dgate", "dscore")


def random_mask(generator, batch, modalities, keep=0.6):
    """(B, M) bool with at least one present modality per sample."""
    mask = torch.rand(batch, modalities, generator=generator) < keep
    first = torch.randint(0, modalities, (batch,), generator=generator)
    mask[torch.arange(batch), first] |= ~mask.any(1)
    return mask


def random_inputs(generator, batch, modalities, channels, dtype, present=None, gate_spread=2.0):
    """(h, gate_logits, score_logits) rounded to ``dtype``, NaN in missing slots (they must never be read)."""
    h = torch.randn(batch, modalities, channels, generator=generator, dtype=torch.float64)
    gate = torch.randn(batch, modalities, channels, generator=generator, dtype=torch.float64) * gate_spread
    score = torch.randn(batch, modalities, generator=generator, dtype=torch.float64) * 2
    if present is not None:
        h[~present] = float("nan")
        gate[~present] = float("nan")
        score[~present] = float("nan")
    return h.to(dtype), gate.to(dtype), score.to(dtype)


def upstream(generator, batch, modalities, channels):
    return (torch.randn(batch, channels, generator=generator, dtype=torch.float64),
            torch.randn(batch, modalities, generator=generator, dtype=torch.float64),
            torch.randn(batch, generator=generator, dtype=torch.float64))


def run(backend, inputs, present, grads, *, dtype=None, **options):
    """Outputs and gradients {name: CPU tensor, or None for no gradient}; ``dtype`` converts the inputs first (the
    reference in float64); an output whose upstream gradient in ``grads`` is None stays out of the loss."""
    target = torch.device("cpu") if backend == "reference" else backend_device("triton")
    leaves = [x.detach().to(target, dtype or x.dtype).requires_grad_() for x in inputs]
    mask = None if present is None else present.to(target)
    if backend == "reference":
        outputs = reference.gated_fusion(*leaves, mask, **options)
    else:
        outputs = ops.gated_fusion(*leaves, mask, backend=backend, **options)
    objective = sum((out.double() * g.to(target)).sum() for out, g in zip(outputs, grads) if g is not None)
    objective.backward()
    found = {name: out.detach().cpu() for name, out in zip(OUTPUTS, outputs)}
    found.update({name: None if leaf.grad is None else leaf.grad.detach().cpu()
                  for name, leaf in zip(GRADIENTS, leaves)})
    return found


def compare(got, expected, dtype, present=None, magnitudes=None):
    """``magnitudes`` {name: what its rounding error scales with} (see :func:`magnitudes`): measured against it."""
    magnitudes = magnitudes or {}
    for name, ref in expected.items():
        out = got[name]
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert torch.isfinite(out).all(), f"{name}: inf or NaN"
        if present is not None and name in ("dh", "dgate", "dscore", "weights"):
            assert (out[~present] == 0).all(), f"{name}: nonzero at missing modalities"
        if ref.abs().max() < 1e-6:  # M = 1: weights 1, entropy -log(1 + eps), no score gradient
            assert (out.double() - ref).abs().max() < 10 * RELATIVE_ERROR[dtype], f"{name}: {out} != {ref}"
            continue
        if name in magnitudes:
            assert_close_to_sum(out, ref, magnitudes[name], dtype, name)
            continue
        assert_close(out, ref, dtype, name)


def magnitudes(inputs, present, received, expected, gate_scale=1.0, eps=1e-8):
    """What the rounding errors of the score gradient and the entropy scale with, in float64.

    dscore_m = w_m (g_m - sum_k w_k g_k), g_m = dfused . gated_m + dweights_m - dentropy (log(w_m + eps) +
    w_m / (w_m + eps)): a difference that cancels (float32 C = 1024, seed 92: g_1 - g_2 was 1/160 of the terms,
    and dscore's relative error 1.8e-5). Its magnitude is w_m (T_m + sum_k w_k T_k), T_m the sum of g_m's terms'
    absolute values. entropy = -sum_m w_m log(w_m + eps) has no cancellation but is ill-conditioned near one-hot
    weights: a rounding u of a computed w_m moves its term by u w_m |log(w_m + eps) + 1| (0.9e-5 at seed 106,
    w = (0.0013, 0.9987)). A sample with one modality has w = 1 exactly, so nothing to add there.
    """
    h, gate, _ = (x.double() for x in inputs)
    dfused, dweights, dentropy = received
    weights = expected["weights"]
    keep = torch.ones_like(weights, dtype=torch.bool) if present is None else present
    h, gate = (torch.where(keep[..., None], x, 0.0) for x in (h, gate))
    gated = gate_scale * torch.softmax(gate, dim=-1) * h                               # eq. 1-2
    log_w = torch.where(keep, torch.log(weights + eps), 0.0)
    terms = ((dfused[:, None, :] * gated).abs().sum(-1) + dweights.abs()
             + dentropy.abs()[:, None] * (log_w.abs() + weights / (weights + eps)))
    score = torch.where(keep, weights * (terms + (weights * terms).sum(1, keepdim=True)), 0.0)
    several = keep.sum(1) > 1
    entropy = expected["entropy"].abs() + torch.where(several, (weights * (log_w + 1).abs()).sum(1), 0.0)
    return {"dscore": score, "entropy": entropy}


def check_against_reference(generator, batch, modalities, channels, dtype, masked=True, **options):
    present = random_mask(generator, batch, modalities) if masked else None
    inputs = random_inputs(generator, batch, modalities, channels, dtype, present)
    grads = upstream(generator, batch, modalities, channels)
    got = run("triton", inputs, present, grads, **options)
    # The op receives each upstream gradient in its output's dtype (float16 for `fused`): the reference gets the same
    # values. dscore is a softmax backward, w_m (g_m - sum_k w_k g_k), whose difference can cancel to 1/60 of its
    # terms, enough to make float16's rounding of the upstream gradient alone a 3% error (seed 3029).
    received = tuple(g.to(got[name].dtype).double() for g, name in zip(grads, OUTPUTS))
    expected = run("reference", inputs, present, received, dtype=torch.float64, **options)
    compare(got, expected, dtype, present, magnitudes(inputs, present, received, expected, **options))
    return got, expected, present


# ------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("batch, modalities, channels", [
    (1, 1, 16), (7, 2, 24), (130, 4, 16), (1, 4, 24), (7, 1, 24), (130, 2, 24), (7, 4, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(generator, batch, modalities, channels, dtype, masked):
    scale = float(channels) if batch % 2 else 1.0  # the paper's scale and the rescaled gate
    check_against_reference(generator, batch, modalities, channels, dtype, masked, gate_scale=scale)


@pytest.mark.parametrize("batch, modalities, channels", [(9, 3, 768), (5, 2, 1024)])
def test_wide_embeddings(generator, batch, modalities, channels):
    """C = 768 (SMI-TED's width) and 1024 (SELFIES-TED's), some modalities missing."""
    check_against_reference(generator, batch, modalities, channels, torch.float32)


def test_non_contiguous_inputs(generator):
    """Strided views of (M, B, C) storage and a transposed mask."""
    batch, modalities, channels = 11, 3, 20
    present = random_mask(generator, batch, modalities)
    h, gate, score = random_inputs(generator, batch, modalities, channels, torch.float32, present)
    views = (h.transpose(0, 1).contiguous().transpose(0, 1), gate.transpose(0, 1).contiguous().transpose(0, 1),
             score.t().contiguous().t())
    mask = present.t().contiguous().t()
    assert not views[0].is_contiguous() and not mask.is_contiguous()
    grads = upstream(generator, batch, modalities, channels)
    got = run("triton", views, mask, grads)
    expected = run("reference", (h, gate, score), present, grads, dtype=torch.float64)
    compare(got, expected, torch.float32, present)


def test_saturated_gates_and_scores(generator):
    """Logits of size ~1e3: the softmaxes stay finite (max-subtracted) and match the reference."""
    present = random_mask(generator, 17, 3)
    h, gate, score = random_inputs(generator, 17, 3, 24, torch.float32, present, gate_spread=300.0)
    score = score * 300
    grads = upstream(generator, 17, 3, 24)
    got = run("triton", (h, gate, score), present, grads)
    expected = run("reference", (h, gate, score), present, grads, dtype=torch.float64)
    for name in got:
        assert torch.isfinite(got[name]).all(), name
    for name in ("fused", "weights", "dh"):
        assert_close(got[name], expected[name], torch.float32, name)


def test_missing_modalities_do_not_leak_and_are_deterministic(generator):
    """NaN in every missing slot (h, gate and score logits): bit-identical to zero-filled inputs, twice."""
    batch, modalities, channels = 40, 4, 24
    present = random_mask(generator, batch, modalities, keep=0.5)
    poisoned = random_inputs(generator, batch, modalities, channels, torch.float32, present)
    clean = tuple(torch.where(present[..., None] if x.dim() == 3 else present, x, 0.0) for x in poisoned)
    grads = upstream(generator, batch, modalities, channels)
    first = run("triton", poisoned, present, grads)
    second = run("triton", poisoned, present, grads)
    zeros = run("triton", clean, present, grads)
    for name in first:
        assert torch.isfinite(first[name]).all(), name
        assert torch.equal(first[name], second[name]), f"{name}: not deterministic"
        assert torch.equal(first[name], zeros[name]), f"{name}: depends on the missing modalities' values"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_weights_are_zero_when_missing_and_sum_to_one(generator, backend):
    batch, modalities = 33, 4
    present = random_mask(generator, batch, modalities, keep=0.4)
    present[0] = torch.tensor([False, False, True, False])  # a single modality: weight exactly 1
    inputs = random_inputs(generator, batch, modalities, 16, torch.float32, present)
    target = backend_device(backend)
    fused, weights, entropy = ops.gated_fusion(*(x.to(target) for x in inputs), present.to(target),
                                               backend=backend)
    weights, entropy = weights.cpu(), entropy.cpu()
    assert weights.dtype == torch.float32 and fused.dtype == torch.float32
    assert (weights[~present] == 0).all()
    assert (weights[present] > 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(batch))
    assert weights[0, 2] == 1
    assert abs(entropy[0]) < 1e-7
    counts = present.sum(1).double()
    assert (entropy >= -1e-6).all() and (entropy.double() <= counts.log() + 1e-5).all()


def test_weights_and_entropy_alone_give_h_and_the_gate_no_gradient(generator):
    """A loss of the modality weights and entropy alone: the reference's score gradient, and no gradient (None,
    not zeros) for h and the gate logits, which reach only the fused output, as autograd gives the reference."""
    present = random_mask(generator, 6, 3)
    inputs = random_inputs(generator, 6, 3, 16, torch.float32, present)
    grads = (None, *upstream(generator, 6, 3, 16)[1:])
    got = run("triton", inputs, present, grads)
    expected = run("reference", inputs, present, grads, dtype=torch.float64)
    for name in ("dh", "dgate"):
        assert got[name] is None and expected[name] is None, name
    assert_close(got["dscore"][present], expected["dscore"][present], torch.float32, "dscore")


def test_all_equal_gate_with_rescale_is_the_weighted_mean(generator):
    """gate_scale = C and equal gate logits: g = 1/C, x~ = h, fused = sum_m s_m h_m."""
    h = torch.randn(5, 3, 16, generator=generator)
    score = torch.randn(5, 3, generator=generator)
    fused, weights, _ = ops.gated_fusion(h, torch.zeros_like(h), score, gate_scale=16.0, backend="triton")
    torch.testing.assert_close(fused, (weights[..., None] * h).sum(1))
    torch.testing.assert_close(weights, torch.softmax(score, 1))
    paper, _, _ = ops.gated_fusion(h, torch.zeros_like(h), score, backend="triton")
    torch.testing.assert_close(paper * 16, fused)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sample_without_modality_is_an_error_naming_it(generator, backend):
    present = random_mask(generator, 9, 3)
    present[4] = False
    inputs = random_inputs(generator, 9, 3, 16, torch.float32)
    with pytest.raises(ValueError, match=r"present: sample 4 of the batch has no present modality"):
        ops.gated_fusion(*inputs, present, backend=backend)
    present[7] = False
    with pytest.raises(ValueError, match=r"samples \[4, 7\]"):
        ops.gated_fusion(*inputs, present, backend=backend)


def test_reference_gradcheck_float64(generator):
    present = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    h = torch.randn(3, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(3, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    score = torch.randn(3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, gate, score: reference.gated_fusion(h, gate, score, present, gate_scale=2.0), (h, gate, score))


def test_reference_spelled_per_sample(generator):
    """The reference against the paper's formulas written per sample over the present modalities only."""
    present = random_mask(generator, 6, 3)
    h, gate, score = (x.double() for x in random_inputs(generator, 6, 3, 8, torch.float64, present))
    fused, weights, entropy = reference.gated_fusion(h, gate, score, present, eps=1e-8)
    for b in range(6):
        keep = present[b]
        s = torch.softmax(score[b, keep], 0)
        gated = torch.softmax(gate[b, keep], -1) * h[b, keep]          # eq. 1-2
        torch.testing.assert_close(fused[b], (s[:, None] * gated).sum(0))  # eq. 3
        torch.testing.assert_close(weights[b, keep], s)
        torch.testing.assert_close(entropy[b], -(s * torch.log(s + 1e-8)).sum())  # eq. 4


def test_automatic_backend_on_cpu_is_the_reference(generator):
    if HAS_CUDA:
        pytest.skip("on a GPU machine CPU tensors still go to the reference, but TRITON_INTERPRET is unset")
    inputs = random_inputs(generator, 6, 2, 16, torch.float32)
    for ours, theirs in zip(ops.gated_fusion(*inputs), reference.gated_fusion(*inputs)):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(generator, masked):
    target = backend_device("triton")
    present = random_mask(generator, 13, 3).to(target) if masked else None
    h, gate, score = (x.to(target).requires_grad_() for x in random_inputs(generator, 13, 3, 20, torch.float32))
    torch.library.opcheck(torch.ops.pyblend.gated_fusion.default, (h, gate, score, present, 2.0, 1e-8))
    _, weights, _ = torch.ops.pyblend.gated_fusion(h, gate, score, present, 2.0, 1e-8)
    grads = tuple(g.float().to(target) for g in upstream(generator, 13, 3, 20))
    # The backward op's own derivative only raises (no double backward): checked on plain tensors.
    torch.library.opcheck(torch.ops.pyblend.gated_fusion_backward.default,
                          (*grads, h.detach(), gate.detach(), score.detach(), present, weights.detach(), 2.0, 1e-8))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_traces_the_op(generator, backend):
    target = backend_device(backend)
    present = random_mask(generator, 19, 3).to(target)
    leaves = [x.to(target).requires_grad_() for x in random_inputs(generator, 19, 3, 16, torch.float32)]

    def objective(h, gate, score):
        fused, weights, entropy = ops.gated_fusion(h, gate, score, present, backend=backend)
        return fused.square().sum() + (weights * torch.arange(3.0, device=target)).sum() - entropy.sum()

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(objective(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs)


def test_numpy_scalar_eps_and_gate_scale(generator):
    """np.float32 eps / gate_scale were refused as "expected a finite float"; they give what Python floats give."""
    inputs = random_inputs(generator, 4, 2, 8, torch.float32)
    for backend in ("reference", "triton"):
        target = backend_device(backend)
        on = [x.to(target) for x in inputs]
        got = ops.gated_fusion(*on, eps=np.float32(1e-6), gate_scale=np.float32(2.0), backend=backend)
        want = ops.gated_fusion(*on, eps=float(np.float32(1e-6)), gate_scale=2.0, backend=backend)
        for ours, theirs in zip(got, want):
            assert torch.equal(ours, theirs), backend


def test_errors_name_the_argument(generator):
    h, gate, score = random_inputs(generator, 4, 2, 8, torch.float32)
    cases = [
        (dict(h=h[0]), ValueError, "h: expected shape (B, M, C)"),
        (dict(h=h.long()), TypeError, "h: expected dtype"),
        (dict(gate_logits=gate[:, :, :4]), ValueError, "gate_logits: expected shape (B, M, C) like h"),
        (dict(gate_logits=gate.half()), TypeError, "gate_logits: expected the dtype of h"),
        (dict(score_logits=score[:, :1]), ValueError, "score_logits: expected shape (B, M) like h"),
        (dict(present=torch.ones(4, 2)), TypeError, "present: expected dtype bool"),
        (dict(present=torch.ones(4, 3, dtype=torch.bool)), ValueError, "present: expected shape (B, M)"),
        (dict(eps=0.0), ValueError, "eps: expected a finite float > 0"),
        (dict(gate_scale=float("inf")), ValueError, "gate_scale: expected a finite float"),
        (dict(backend="cpp"), ValueError, "has no 'cpp' backend"),
        (dict(h=h.double(), gate_logits=gate.double(), score_logits=score.double(), backend="triton"),
         ValueError, "float16, bfloat16 or float32"),
        (dict(h=torch.zeros(4, 2, 5000), gate_logits=torch.zeros(4, 2, 5000), backend="triton"), ValueError,
         "width C = 5000 > 4096"),
    ]
    for overrides, error, message in cases:
        arguments = dict(h=h, gate_logits=gate, score_logits=score)
        arguments.update(overrides)
        with pytest.raises(error) as caught:
            ops.gated_fusion(arguments.pop("h"), arguments.pop("gate_logits"), arguments.pop("score_logits"),
                             **arguments)
        assert message in str(caught.value), f"{overrides}: {caught.value}"


# --------------------------------------------------------------------------------------------- module

DIMS = {"smiles": 12, "selfies": 20, "graph": 7}


def module_inputs(generator, batch, dims=DIMS, keep=0.6):
    present = random_mask(generator, batch, len(dims), keep)
    embeddings, masks = {}, {}
    for index, (name, width) in enumerate(dims.items()):
        x = torch.randn(batch, width, generator=generator)
        x[~present[:, index]] = float("nan")
        embeddings[name], masks[name] = x, present[:, index]
    return embeddings, masks


def test_module_shapes_and_repr(generator):
    torch.manual_seed(0)
    fusion = DynamicFusion(DIMS, 16, entropy_weight=0.1, backend="triton")
    embeddings, masks = module_inputs(generator, 10)
    fused, weights = fusion(embeddings, masks)
    assert fused.shape == (10, 16) and weights.shape == (10, 3)
    assert fusion.last_entropy.shape == (10,) and fusion.last_present.shape == (10, 3)
    assert torch.equal(fusion.last_present, torch.stack(list(masks.values()), 1))
    assert torch.isfinite(fused).all()
    assert "input_dims={'smiles': 12, 'selfies': 20, 'graph': 7}, dim=16, entropy_weight=0.1" in repr(fusion)
    # The reference backend agrees.
    fusion.backend = "reference"
    again, weights_again = fusion(embeddings, masks)
    torch.testing.assert_close(again, fused)
    torch.testing.assert_close(weights_again, weights)


def test_module_missing_modalities_never_reach_parameters(generator):
    """NaN in missing rows and a modality left out of the dict: every parameter gradient finite, and the same as
    with zeros in the missing rows."""
    torch.manual_seed(0)
    fusion = DynamicFusion(DIMS, 16, backend="triton")
    embeddings, masks = module_inputs(generator, 12)
    del embeddings["graph"], masks["graph"]
    orphans = ~(masks["smiles"] | masks["selfies"])  # had only the graph
    embeddings["smiles"][orphans] = torch.randn(int(orphans.sum()), DIMS["smiles"], generator=generator)
    masks["smiles"] |= orphans

    def gradients(inputs):
        fusion.zero_grad()
        fusion.loss(inputs, masks).backward()
        return {name: p.grad.clone() for name, p in fusion.named_parameters() if p.grad is not None}

    poisoned = gradients(embeddings)
    clean = gradients({name: torch.where(masks[name][:, None], x, 0.0) for name, x in embeddings.items()})
    assert "project.graph.weight" not in poisoned  # never used
    for name, grad in poisoned.items():
        assert torch.isfinite(grad).all(), name
        assert torch.equal(grad, clean[name]), name


# bf16 on the reference path only (the interpreter computes bf16 wrong); float16 also on the Triton kernels.
@pytest.mark.parametrize("backend, dtype", [("reference", torch.bfloat16), ("triton", torch.float16)])
def test_module_under_autocast_with_a_modality_left_out(generator, backend, dtype):
    """Under autocast the projections come out 16-bit: a modality left out of the dict gets a 16-bit placeholder
    too (a float32 one promoted h to float32 and the op refused the 16-bit gate logits). Left out is the same as
    given and absent from every sample, forward and backward."""
    torch.manual_seed(0)
    fusion = DynamicFusion(DIMS, 16, backend=backend)
    embeddings, _ = module_inputs(generator, 6, keep=1.0)
    some = {name: embeddings[name] for name in ("smiles", "selfies")}
    absent = {"graph": torch.zeros(6, dtype=torch.bool)}

    def run(inputs, present):
        fusion.zero_grad()
        with torch.autocast("cpu", dtype):
            fused, weights = fusion(inputs, present)
            loss = fusion.objective(fused, inputs, present)
        (fused.float().sum() + loss).backward()
        grads = {name: p.grad.clone() for name, p in fusion.named_parameters() if p.grad is not None}
        return fused, weights, grads

    fused, weights, grads = run(some, None)
    given, given_weights, given_grads = run(embeddings, absent)
    assert fused.dtype == dtype and torch.isfinite(fused).all()
    assert torch.equal(weights[:, 2], torch.zeros(6)) and torch.allclose(weights.sum(1), torch.ones(6))
    assert torch.equal(fused, given) and torch.equal(weights, given_weights)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        if not name.endswith(".graph.weight") and not name.endswith(".graph.bias"):
            assert torch.equal(grad, given_grads[name]), name


def test_module_loss_is_reconstruction_minus_entropy(generator):
    """Eq. 5 with the diversity-promoting sign, and the reconstruction over present samples only."""
    fusion = DynamicFusion(DIMS, 8, entropy_weight=0.5)
    embeddings, masks = module_inputs(generator, 9)
    total = fusion.loss(embeddings, masks)
    fused, _ = fusion(embeddings, masks)
    terms = []
    for name, x in embeddings.items():
        keep = masks[name]
        terms.append(((fusion.decode[name](fused[keep]) - x[keep]) ** 2).mean())
    expected = torch.stack(terms).mean() - 0.5 * fusion.last_entropy.mean()
    torch.testing.assert_close(total, expected)
    # A larger entropy weight pushes the score logits towards equal weights: its gradient raises the entropy.
    h = torch.randn(6, 3, 8, generator=generator)
    score = torch.randn(6, 3, generator=generator, requires_grad=True)
    _, _, entropy = ops.gated_fusion(h, torch.zeros_like(h), score)
    (-entropy.mean()).backward()
    with torch.no_grad():
        _, _, after = ops.gated_fusion(h, torch.zeros_like(h), score - 0.1 * score.grad)
    assert after.mean() > entropy.mean()


def test_module_objective_reuses_the_last_forward_only(generator):
    """The objective reads the last forward's entropy: before any forward, or with another batch's output, it
    says so; an empty batch gives 0; copies (an EMA, a best model) start without the cached forward."""
    fusion = DynamicFusion(DIMS, 8, entropy_weight=0.5)
    embeddings, masks = module_inputs(generator, 6)
    with pytest.raises(RuntimeError, match="objective: reuses the entropy of this module's last forward"):
        fusion.objective(torch.zeros(6, 8), embeddings, masks)
    fused, _ = fusion(embeddings, masks)
    copied = copy.deepcopy(fusion)
    assert copied.last_entropy is None and fusion.last_entropy is not None
    fusion.objective(fused, embeddings, masks).backward()
    fusion({name: x[:4] for name, x in embeddings.items()}, {name: m[:4] for name, m in masks.items()})
    with pytest.raises(ValueError, match=r"fused: expected the \(B, dim\) output of this module's last forward, "
                                         r"B = 4"):
        fusion.objective(fused, embeddings, masks)
    empty = {name: x[:0] for name, x in embeddings.items()}
    fused, _ = fusion(empty)
    loss = fusion.objective(fused, empty)
    assert loss.item() == 0.0
    loss.backward()


def test_module_dropout_is_reproducible_and_keeps_one_modality(generator):
    fusion = DynamicFusion(DIMS, 8, modality_dropout=0.7).train()
    embeddings, masks = module_inputs(generator, 200, keep=0.8)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    outputs = [fusion(embeddings, masks, generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
    kept = fusion.last_present
    for ours, theirs in zip(*outputs):
        assert torch.equal(ours, theirs)
    present = torch.stack(list(masks.values()), 1)
    assert kept.any(1).all(), "a sample lost every modality"
    assert not (kept & ~present).any(), "dropout added a modality"
    dropped = (present & ~kept).sum() / present.sum()
    assert 0.4 < dropped < 0.8, f"dropped fraction {dropped:.2f} for p = 0.7"
    _, weights = outputs[0]
    assert (weights[~kept] == 0).all()
    fusion.eval()
    fusion(embeddings, masks)
    assert torch.equal(fusion.last_present, present), "dropout in eval mode"


def test_module_loss_decreases(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    fusion = DynamicFusion(DIMS, 16, modality_dropout=0.2, backend="triton")
    embeddings, masks = module_inputs(generator, 48, keep=0.7)
    optimizer = torch.optim.Adam(fusion.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = fusion.loss(embeddings, masks)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    fusion.eval()
    assert all(math.isfinite(x) for x in losses)
    assert fusion.loss(embeddings, masks).item() < 0.8 * losses[0], losses


def test_module_compiles(generator):
    torch.manual_seed(0)
    fusion = DynamicFusion(DIMS, 16, backend="triton")
    embeddings, masks = module_inputs(generator, 10)

    def step(embeddings, masks):
        fused, weights = fusion(embeddings, masks)
        return fused.sum() + weights.sum() + fusion.loss(embeddings, masks)

    compiled = torch.compile(step, backend="aot_eager")
    expected_value = step(embeddings, masks)
    expected = torch.autograd.grad(expected_value, list(fusion.parameters()), allow_unused=True)
    got_value = compiled(embeddings, masks)
    got = torch.autograd.grad(got_value, list(fusion.parameters()), allow_unused=True)
    torch.testing.assert_close(got_value, expected_value)
    for ours, theirs in zip(got, expected):
        if theirs is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs)


def test_module_errors(generator):
    embeddings, masks = module_inputs(generator, 5)
    fusion = DynamicFusion(DIMS, 8)
    cases = [
        (lambda: DynamicFusion({}, 8), ValueError, "input_dims: expected a non-empty dict"),
        (lambda: DynamicFusion({"a": 0}, 8), ValueError, "input_dims['a']: expected a positive int"),
        (lambda: DynamicFusion(DIMS, 0), ValueError, "dim: expected a positive int"),
        (lambda: DynamicFusion(DIMS, 8, modality_dropout=1.0), ValueError, "modality_dropout: expected a float"),
        (lambda: DynamicFusion(DIMS, 8, entropy_weight=-1.0), ValueError, "entropy_weight: expected"),
        (lambda: fusion({}), TypeError, "embeddings: expected a non-empty dict"),
        (lambda: fusion({"text": torch.zeros(5, 3)}), ValueError, "embeddings['text']: unknown modality"),
        (lambda: fusion({"smiles": torch.zeros(5, 3)}), ValueError,
         "embeddings['smiles']: expected shape (B, d_m) = (?, 12)"),
        (lambda: fusion({"smiles": torch.zeros(5, 12), "graph": torch.zeros(4, 7)}), ValueError,
         "embeddings['graph']: expected batch size B = 5"),
        (lambda: fusion(embeddings, {"smiles": torch.ones(5)}), ValueError, "present['smiles']: expected a bool"),
        (lambda: fusion({"smiles": embeddings["smiles"]}, {"graph": masks["graph"]}), ValueError,
         "present['graph']: modality 'graph' is not in embeddings"),
        (lambda: fusion({"smiles": torch.zeros(5, 12)}, {"smiles": torch.arange(5) != 2}), ValueError,
         "present: sample 2 of the batch has no present modality"),
        # A seed for a generator: an AttributeError from inside the dropout in training, ignored in eval.
        (lambda: fusion.eval()(embeddings, masks, generator=42), TypeError,
         "generator: expected a torch.Generator or None; got 42"),
        # fused of another dtype or device: torch's matmul error from the decoders, naming no argument.
        (lambda: fusion.reconstruction_loss(torch.zeros(5, 8, dtype=torch.float64), embeddings, masks), TypeError,
         "fused: expected dtype torch.float32 like the module's parameters"),
        (lambda: fusion.reconstruction_loss(torch.zeros(5, 8, device="meta"), embeddings, masks), ValueError,
         "fused: expected a tensor on cpu like the module's parameters"),
    ]
    for make, error, message in cases:
        with pytest.raises(error) as caught:
            make()
        assert message in str(caught.value), f"{message!r} not in {caught.value}"


def test_module_names_an_embedding_of_another_dtype_or_device(generator):
    """An embedding whose dtype or device differs from the parameters failed in project[m]'s matmul with torch's
    "mat1 and mat2 must have the same dtype" (or its device error), naming no modality."""
    embeddings, masks = module_inputs(generator, 5)
    fusion = DynamicFusion(DIMS, 8)
    wide = {**embeddings, "graph": embeddings["graph"].double()}
    with pytest.raises(TypeError, match=r"embeddings\['graph'\]: expected dtype torch.float32 like the module's "
                                        r"parameters \(under autocast, any float dtype but float64\); got "
                                        r"torch.float64"):
        fusion(wide, masks)
    with pytest.raises(TypeError, match=r"embeddings\['graph'\]: expected dtype torch.float32"):
        fusion.reconstruction_loss(torch.zeros(5, 8), wide, masks)
    with pytest.raises(ValueError, match=r"embeddings\['smiles'\]: expected a tensor on cpu like the module's "
                                         r"parameters; got .* on meta"):
        fusion({name: x.to("meta") for name, x in embeddings.items()})
    # Under autocast the projections cast their inputs themselves, but never a float64 one.
    with torch.autocast("cpu", torch.bfloat16):
        fused, _ = fusion({**embeddings, "graph": embeddings["graph"].half()}, masks)
        assert fused.dtype == torch.bfloat16 and torch.isfinite(fused).all()
        with pytest.raises(TypeError, match=r"embeddings\['graph'\]: expected dtype torch.float32"):
            fusion(wide, masks)


def test_module_flags_numbers_and_backend_at_construction():
    """bias="no" built biases (nn.Linear reads it as truthy), numpy ints and floats were refused, a bad backend
    waited for the first forward."""
    for name in ("rescale_gate", "bias"):
        for value in ("no", None, 1):
            with pytest.raises(TypeError, match=f"{name}: expected a bool; got {value!r}"):
                DynamicFusion(DIMS, 8, **{name: value})
    with pytest.raises(ValueError, match="backend: expected one of"):
        DynamicFusion(DIMS, 8, backend="bogus")
    fusion = DynamicFusion({"a": np.int64(3), "b": np.int32(4)}, np.int64(8), entropy_weight=np.float32(0.5),
                           modality_dropout=np.float64(0.25), eps=np.float32(1e-6), bias=np.bool_(False))
    assert fusion.input_dims == {"a": 3, "b": 4} and type(fusion.dim) is int and fusion.project["a"].bias is None
    with pytest.raises(ValueError, match="dim: expected a positive int"):
        DynamicFusion(DIMS, np.float64(8.0))


# --------------------------------------------------------------------------------------------- compile


HOPPER_COMPILE = """
import torch
from hopper import captured_launches, lower_launch
from pyblend.kernels import gated_fusion as kernels

# 64 samples: past the launch configuration's 32-row cap on BLOCK_B, so every C gets its large-batch tiles.
BATCH, MODALITIES = 64, 3
for channels in (24, 768, 1024, 4096):
    h, gate = (torch.randn(BATCH, MODALITIES, channels, dtype=torch.bfloat16) for _ in range(2))
    score = torch.randn(BATCH, MODALITIES, dtype=torch.bfloat16)
    present = torch.rand(BATCH, MODALITIES) < 0.7
    with captured_launches() as captured:
        fused, weights, entropy = kernels.gated_fusion_forward(h, gate, score, present, 1.0, 1e-8)
        kernels.gated_fusion_backward(torch.randn_like(fused), torch.randn_like(weights), torch.randn_like(entropy),
                                      h, gate, score, present, weights, 1.0, 1e-8)
    for kernel, args, kwargs in captured:
        ptx, spills, _ = lower_launch(kernel, args, kwargs)
        print(channels, kernel.fn.__name__, "spills", spills)
"""


def test_kernels_compile_for_hopper_without_spills():
    """Calls the launchers on CPU tensors (bf16, masked, M = 3, C = 24, 768, 1024, 4096; B = 64, past the 32-row
    tile cap) and lowers both kernels to sm_90 as Triton would on the GPU, then runs ptxas: the interpreter accepts
    programs the compiler rejects, and a spill is a performance bug."""
    lines = run_compile_script(HOPPER_COMPILE)
    assert len(lines) == 8, lines
    for line in lines:
        assert int(line.split()[3]) == 0, f"{line}: registers spill"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels", [24, 768, 1024])
def test_gpu_dtypes(generator, dtype, channels):
    check_against_reference(generator, 300, 3, channels, dtype)
    check_against_reference(generator, 130, 4, channels, dtype, masked=False, gate_scale=float(channels))
