"""torch.compile as a molecular model sees it: every batch has its own size (B, N atoms, T, token counts).

After the first change of size PyTorch compiles one graph with symbolic sizes (automatic dynamic shapes), or from
the start with ``dynamic=True``; an op that reads a size into Python (formats it into a message, takes its
bit_length, passes ``generator=None`` to a factory that wants concrete sizes) or reads a tensor on the host
instead fixes it, recompiles for every size or fails. Each case runs several sizes through one compiled function
and counts the compiled frames; outputs match eager.
"""
import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from pyblend import layout, ops

from graphs import backend_device
from tolerances import assert_close


def compile_counted(fn, dynamic=None):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic), counter


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_relation_attention_with_a_dense_bias_compiles_once_for_every_batch_shape(generator, backend):
    """The bias shape check formatted B and N into its message before checking: one compilation per (B, N)."""
    target = backend_device(backend)

    def attend(q, k, v, bias, mask):
        return ops.relation_attention(q, k, v, bias, mask=mask, backend=backend)

    compiled, counter = compile_counted(attend)
    for sizes in ([5, 3, 2], [7, 4], [6, 6, 2, 5]):
        batch, atoms = len(sizes), max(sizes)
        mask = (torch.arange(atoms)[None] < torch.tensor(sizes)[:, None]).to(target)
        q, k, v = (torch.randn(batch, atoms, 2, 8, generator=generator).to(target) for _ in range(3))
        bias = torch.randn(batch, 2, atoms, atoms, generator=generator).to(target)
        torch.testing.assert_close(compiled(q, k, v, bias, mask), attend(q, k, v, bias, mask))
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 3 batch shapes"


def test_float_arguments_under_dynamic_true(generator):
    """``dynamic=True`` turns float arguments into symbolic floats, which math.isfinite refused in the checks."""
    tokens = torch.randn(2, 3, 6, generator=generator)
    latent_weights = [torch.randn(8, 8, generator=generator), torch.randn(16, 6, generator=generator),
                      torch.randn(8, 8, generator=generator)]
    cases = {
        "relation_attention": (lambda q: ops.relation_attention(q, q, q, scale=0.5),
                               torch.randn(2, 5, 2, 8, generator=generator)),
        "gated_fusion": (lambda h: ops.gated_fusion(h, h, h[..., 0], eps=1e-6, gate_scale=2.0)[0],
                         torch.randn(3, 2, 4, generator=generator)),
        "multi_infonce": (lambda x: ops.multi_infonce({"a": x, "b": x.flip(0)}, [("a", "b")], temperature=0.2,
                                                      weights=[1.0]), torch.randn(4, 8, generator=generator)),
        "fourier_cross_attention": (lambda x: ops.fourier_cross_attention(
            x, tokens, *latent_weights, heads=2, temperature=0.5, eps=1e-5),
            torch.randn(2, 4, 8, generator=generator)),
        "merge_latents": (lambda x: ops.merge_latents([x, x.conj()], eps=1e-6),
                          torch.randn(2, 4, 3, dtype=torch.complex64, generator=generator)),
        "sample_blend": (lambda mask: ops.sample_blend(mask, probs=(0.3, 0.3, 0.4)),
                         torch.ones(2, 4, dtype=torch.bool)),
    }
    for name, (fn, x) in cases.items():
        compiled, _ = compile_counted(fn, dynamic=True)
        got = compiled(x)
        if name != "sample_blend":  # a random draw
            torch.testing.assert_close(got, fn(x), msg=name)


@pytest.mark.parametrize("mode", ["pair", "batch", "molecule"])
def test_sample_blend_compiles_across_batch_shapes(generator, mode):
    """``torch.rand(..., generator=None)`` takes concrete sizes only: the second batch shape crashed."""
    compiled, counter = compile_counted(lambda mask: ops.sample_blend(mask, mode=mode))
    for sizes in ([4, 2, 3], [6, 5], [3, 3, 1, 2]):
        mask = torch.arange(max(sizes))[None] < torch.tensor(sizes)[:, None]
        choice = compiled(mask)
        pairs = mask[:, :, None] & mask[:, None, :]
        assert choice.shape == pairs.shape and (choice[~pairs] == 0).all() and (choice[pairs] > 0).all()
    assert counter.frame_count <= 2


def test_packed_relation_attention_and_blend_compile_with_max_seqlen(generator):
    """Packed calls read cu_seqlens on the host when eager; under torch.compile they trust ``max_seqlen`` (the
    host read broke every fullgraph compile of packed relation attention and blend sampling)."""
    target = backend_device("triton")
    lengths = torch.tensor([5, 2, 4])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    atoms, pairs = int(lengths.sum()), int((lengths * lengths).sum())
    q, k, v = (torch.randn(atoms, 2, 8, generator=generator).to(target) for _ in range(3))
    bias = torch.randn(2, pairs, generator=generator).to(target)

    def attend(q, k, v, bias, cu_seqlens):
        return ops.relation_attention(q, k, v, bias, cu_seqlens=cu_seqlens, max_seqlen=5, backend="triton")

    compiled, _ = compile_counted(attend)
    cu_seqlens = cu_seqlens.to(target)
    torch.testing.assert_close(compiled(q, k, v, bias, cu_seqlens), attend(q, k, v, bias, cu_seqlens))
    sample, _ = compile_counted(lambda cu: ops.sample_blend(cu_seqlens=cu, max_seqlen=5))
    assert sample(cu_seqlens).shape == (pairs,)
    with pytest.raises(ValueError, match="max_seqlen: 4 is below the largest molecule"):
        ops.sample_blend(cu_seqlens=cu_seqlens, max_seqlen=4)  # eager calls still check it


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fourier_cross_attention_with_a_token_mask_compiles_once_for_every_token_count(generator, backend):
    """The masked token FFT's length came from bit_length() of the token count: one compilation per count; and
    the reference found each sample's real tokens on the host (a graph break): under torch.compile both take
    every length at once (Bluestein). A sample without tokens; the reference's gradients too."""
    def step(latent, tokens, wq, wkv, wo, mask):
        return ops.fourier_cross_attention(latent, tokens, wq, wkv, wo, heads=2, token_mask=mask, backend=backend)

    def run(fn, leaves, mask):
        out = torch.view_as_real(fn(*leaves, mask))
        if backend == "triton":  # its gradients: tests/test_fourier_cross_attention.py, test_lego.py
            return (out,)
        return (out, *torch.autograd.grad(out.square().sum(), leaves))

    compiled, counter = compile_counted(step)
    weights = [torch.randn(8, 8, generator=generator) / 3, torch.randn(16, 6, generator=generator) / 3,
               torch.randn(8, 8, generator=generator) / 3]
    for batch, tokens in ((3, 7), (4, 9), (2, 12)):
        mask = torch.rand(batch, tokens, generator=generator) < 0.7
        mask[0] = True
        mask[-1] = False
        leaves = [x.requires_grad_() for x in (torch.randn(batch, 4, 8, generator=generator),
                                               torch.randn(batch, tokens, 6, generator=generator), *weights)]
        for got, expected in zip(run(compiled, leaves, mask), run(step, leaves, mask)):
            torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-5)
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 3 token counts"


def _close(got, expected, what):
    """Compiled against eager: the relative error bound of float32 (tests/tolerances.py); most values are
    bit-identical, and the sums whose order torch.compile changes differ in their last bits."""
    assert_close(got, expected, torch.float32, what)


def _batch(sizes):
    """``(cu_seqlens, T, P, max_seqlen)`` of molecules of ``sizes`` atoms."""
    lengths = torch.tensor(sizes)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return cu_seqlens, int(lengths.sum()), int((lengths * lengths).sum()), max(sizes)


# Two batches, the first with a single-atom and an empty molecule. The first's sizes (B, B + 1, T, P, max_seqlen)
# differ from each other and from every fixed size in the tests below: duck sizing would tie equal sizes.
_BATCHES = ([4, 1, 0, 2, 3], [6, 2, 5])


def test_layout_pads_and_unpads_by_gathers_under_fullgraph(generator):
    """pad_atoms and pad_pairs sized a scatter by repeat_interleave of cu_seqlens' lengths and checked the width
    on the host: with max_seqlen they gather, sized by the shapes and max_seqlen, and so do unpad_atoms and
    unpad_pairs (sized by T and P). Bit for bit eager's, one graph for both batch shapes."""
    def convert(atoms, pairs, flags, cu_seqlens, max_seqlen):
        padded_atoms = layout.pad_atoms(atoms, cu_seqlens, max_seqlen, value=float("nan"))
        padded_pairs = layout.pad_pairs(pairs, cu_seqlens, max_seqlen, value=-1)
        return (padded_atoms, padded_pairs, layout.pad_pairs(flags, cu_seqlens, max_seqlen, value=False),
                layout.unpad_atoms(padded_atoms, cu_seqlens, atoms.shape[0]),
                layout.unpad_pairs(padded_pairs, cu_seqlens, pairs.shape[0]))

    compiled, counter = compile_counted(convert, dynamic=True)
    for sizes in _BATCHES:
        cu_seqlens, atoms, pairs, width = _batch(sizes)
        inputs = (torch.randn(atoms, 3, generator=generator), torch.randint(0, 9, (pairs,), generator=generator),
                  torch.rand(pairs, generator=generator) < 0.5, cu_seqlens, width)
        got, expected = compiled(*inputs), convert(*inputs)
        for name, a, b in zip(("atoms", "pairs", "flags", "unpadded atoms", "unpadded pairs"), got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} {sizes}")
        assert torch.equal(got[3], inputs[0]) and torch.equal(got[4], inputs[1])
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 2 batch shapes"


def test_packed_reference_relation_attention_compiles_with_fullgraph(generator):
    """The reference backend's packed relation attention padded its inputs to the longest molecule, read from
    cu_seqlens on the host, and packed its outputs by boolean masks (data-dependent lengths): it pads by gathers
    sized by max_seqlen and packs by gathers sized by T and P. A dense packed bias plus a relation table, with
    the logits, forward and every gradient, one graph for both batch shapes."""
    heads, head_dim, relations = 2, 16, 7

    def attend(q, k, v, bias, rel_table, rel_index, cu_seqlens, max_seqlen):
        # dropout_p given: under dynamic=True the default's float becomes a symbol, and the trace restarts.
        return ops.relation_attention(q, k, v, bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=0.0,
                                      return_logits=True, rel_index=rel_index, rel_table=rel_table,
                                      backend="reference")

    def run(fn, leaves, *constants):
        out, logits = fn(*leaves, *constants)
        return (out, logits, *torch.autograd.grad(out.square().sum() + logits.square().sum(), leaves))

    names = ("out", "logits", "dq", "dk", "dv", "dbias", "dtable")
    compiled, counter = compile_counted(attend, dynamic=True)
    for sizes in _BATCHES:
        cu_seqlens, atoms, pairs, width = _batch(sizes)
        leaves = [torch.randn(*shape, generator=generator).requires_grad_() for shape in (
            (atoms, heads, head_dim), (atoms, heads, head_dim), (atoms, heads, head_dim), (heads, pairs),
            (relations, heads))]
        rel_index = torch.randint(0, relations, (pairs,), generator=generator, dtype=torch.int16)
        constants = (rel_index, cu_seqlens, width)
        for name, got, expected in zip(names, run(compiled, leaves, *constants), run(attend, leaves, *constants)):
            _close(got.detach(), expected.detach(), f"{name} {sizes}")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 2 batch shapes"


def test_reference_relation_attention_dropout_compiles_with_dynamic_sizes(generator):
    """The reference drew its dropout pattern by ``torch.rand(..., generator=None)``, which torch.compile takes
    with concrete sizes only (as sample_blend). Padded and packed, one graph for both batch shapes; the same seed
    draws the same pattern as eager (aot_eager runs the same random ops)."""
    def attend(q, padded_q, mask, cu_seqlens, max_seqlen):
        return (ops.relation_attention(q, q, q, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=0.5,
                                       backend="reference"),
                ops.relation_attention(padded_q, padded_q, padded_q, mask=mask, dropout_p=0.5, backend="reference"))

    compiled, counter = compile_counted(attend, dynamic=True)
    for sizes in _BATCHES:
        cu_seqlens, atoms, _, width = _batch(sizes)
        q = torch.randn(atoms, 2, 16, generator=generator)
        inputs = (q, layout.pad_atoms(q, cu_seqlens, width), layout.mask_from_cu_seqlens(cu_seqlens, width),
                  cu_seqlens, width)
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        torch.manual_seed(seed)
        got = compiled(*inputs)
        torch.manual_seed(seed)
        for name, a, b in zip(("packed", "padded"), got, attend(*inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} {sizes}")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 2 batch shapes"


def test_packed_reference_gaussian_basis_bias_compiles_with_fullgraph(generator):
    """The reference backend's packed Gaussian bias read the longest molecule from cu_seqlens on the host and
    packed its outputs by boolean masks (data-dependent lengths): gathers sized by max_seqlen, T and P instead.
    Both outputs and every gradient, one graph for both batch shapes."""
    kernels, hidden, types, heads = 11, 9, 3, 2

    def bias_and_features(positions, means, stds, mul, bias, w1, b1, w2, b2, pair_types, cu_seqlens, max_seqlen):
        return ops.gaussian_basis_bias(positions, pair_types, means, stds, mul, bias, w1, b1, w2, b2,
                                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend="reference")

    def run(fn, leaves, *constants):
        attn, atom = fn(*leaves, *constants)
        return (attn, atom, *torch.autograd.grad(attn.square().sum() + atom.square().sum(), leaves))

    names = ("attn_bias", "atom_features", "dpositions", "dmeans", "dstds", "dmul", "dbias", "dw1", "db1", "dw2",
             "db2")
    compiled, counter = compile_counted(bias_and_features, dynamic=True)
    parameters = [torch.randn(*shape, generator=generator) for shape in (
        (kernels,), (kernels,), (types, 1), (types, 1), (hidden, kernels), (hidden,), (heads, hidden), (heads,))]
    parameters[0] = parameters[0].abs() * 2  # means: distances are positive
    graphs = []
    for sizes in _BATCHES:
        cu_seqlens, atoms, pairs, width = _batch(sizes)
        leaves = [(torch.randn(atoms, 3, generator=generator) * 2).requires_grad_(),
                  *(x.clone().requires_grad_() for x in parameters)]
        constants = (torch.randint(0, types, (pairs,), generator=generator), cu_seqlens, width)
        for name, got, expected in zip(names, run(compiled, leaves, *constants), run(bias_and_features, leaves,
                                                                                       *constants)):
            _close(got.detach(), expected.detach(), f"{name} {sizes}")
        graphs.append(counter.frame_count)
    # torch 2.11 restarts the first trace once to specialise the float std_eps (dynamic=True), which the counter
    # sees as a second graph; 2.13 does not. What matters: the second batch shape compiles nothing new.
    assert graphs[0] in (1, 2) and graphs[1] == graphs[0], f"graphs compiled after each batch shape: {graphs}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_outer_product_ops_compile_with_fullgraph_and_dynamic_sizes(generator, backend):
    """Packed outer-product calls read cu_seqlens on the host (P = sum N_i^2 sized their work), and the reference
    padded them with helpers sized from its values: under torch.compile P comes from the target's length
    (cross-entropy), a bound from the shapes (the cosine's statistics) or a data-dependent size (the logits), and
    the reference pads by gathers. Forward and every gradient, one graph for every batch shape."""
    d1, d2, classes = 3, 5, 6  # no size equal to a batch-dependent one (duck sizing would tie them)
    device = backend_device(backend)

    def heads(backend, row, col, weight, bias, positions, target, cu_seqlens):
        layout = dict(cu_seqlens=cu_seqlens, max_seqlen=6, backend=backend)
        return (ops.outer_product_loss(row, col, weight, bias, target, groups=2, ignore_index=-100, **layout),
                ops.outer_product_cosine_loss(row, col, weight[:3], bias[:3], positions, **layout),
                ops.outer_product_logits(row, col, weight, bias, **layout))

    def run(fn, leaves, *constants):
        ce, cosine, logits = fn(*leaves, *constants)
        return (ce, cosine, logits, *torch.autograd.grad(ce + 2 * cosine + logits.square().mean(), leaves))

    names = ("cross-entropy", "cosine", "logits", "drow", "dcol", "dweight", "dbias")
    eager = functools.partial(heads, backend)
    compiled, counter = compile_counted(eager, dynamic=True)
    for sizes in ([5, 2, 4], [6, 1, 3, 3]):
        lengths = torch.tensor(sizes)
        atoms, pairs = int(lengths.sum()), int((lengths * lengths).sum())
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device, torch.int32)
        leaves = [(torch.randn(*shape, generator=generator) * scale).to(device).requires_grad_()
                  for shape, scale in (((atoms, d1), 1.0), ((atoms, d2), 1.0), ((classes, d1 * d2), 0.3),
                                       ((classes,), 1.0))]
        positions = torch.randn(atoms, 3, generator=generator).to(device)
        target = torch.randint(0, classes // 2, (pairs, 2), generator=generator)
        target[torch.rand(target.shape, generator=generator) < 0.2] = -100
        constants = (positions, target.to(device), cu_seqlens)
        for name, got, expected in zip(names, run(compiled, leaves, *constants), run(eager, leaves, *constants)):
            _close(got.detach().cpu(), expected.detach().cpu(), f"{name} {sizes}")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 2 batch shapes"


@pytest.mark.parametrize("layout, backend", [("padded", "reference"), ("packed", "reference"), ("packed", "triton")])
def test_moleblend_relation_loss_compiles_with_fullgraph(generator, monkeypatch, layout, backend):
    """MoleBlend's pretraining loss after build_relations (whose shortest paths are a data-pipeline op) in one
    graph: ``bool(known.any())`` read the host, the packed 3D head selected the atoms with a conformer by a boolean
    mask (a length of its own, compared with the positions'), the denoising loss averaged such a selection, and
    the packed blend's length was a size of its own. Eval mode and fixed noise: the compiled loss, its parts and
    every gradient are eager's, for a batch with a molecule without conformer and a single atom, and then for the
    same batch without any conformer (0 where eager mode skips the 3D parts: zero gradients instead of none).
    Packed on the reference backend, its relation attention and Gaussian bias read cu_seqlens on the host."""
    pytest.importorskip("rdkit", reason="MoleBlend is tested on featurized molecules (RDKit)")
    import dataclasses

    from pyblend import collate, featurize_many
    from pyblend.models import MoleBlend, MoleBlendConfig

    device = backend_device(backend)
    graphs, _ = featurize_many(["c1ccccc1O", "CCO", "C"], conformer=True, progress=False)
    torch.manual_seed(0)
    model = MoleBlend(MoleBlendConfig(layers=1, dim=16, heads=1, ffn_dim=16, num_kernels=6, head_width=4,
                                      max_distance=4, max_hops=1, spd_classes=4, dropout=0.0,
                                      attention_dropout=0.0, activation_dropout=0.0)).to(device).eval()
    batch = collate(graphs, layout=layout).to(device)
    cases = []  # with a conformer but for the second molecule; without any
    for has_positions in ([True, False, True], [False] * 3):
        relations = model.build_relations(dataclasses.replace(batch, has_positions=torch.tensor(
            has_positions, device=device)))  # before the backend is forced: shortest paths on their default one
        cases.append((relations, (torch.randn(relations.positions.shape, generator=generator) * 0.2).to(device)))
    monkeypatch.setenv("PYBLEND_BACKEND", backend)

    def loss_and_gradients(fn, relations, noise):
        model.zero_grad(set_to_none=True)
        loss, parts = fn(relations, noise=noise)
        loss.backward()
        return {"loss": loss, **parts, **{name: torch.zeros_like(p) if p.grad is None else p.grad
                                          for name, p in model.named_parameters()}}

    compiled, counter = compile_counted(model.relation_loss)
    for case, (relations, noise) in zip(("mixed", "no conformer"), cases):
        got = loss_and_gradients(compiled, relations, noise)
        expected = loss_and_gradients(model.relation_loss, relations, noise)
        for name, value in expected.items():
            if value.abs().max() == 0:
                assert (got[name] == 0).all(), f"{case}: {name} is not 0"
            else:
                _close(got[name].detach().cpu(), value.detach().cpu(), f"{case}: {name}")
    assert got["geometry"] == 0 and got["denoise"] == 0 and model.geometry_head.out.weight.grad is None
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for one batch shape"


@pytest.mark.parametrize("dynamic", [False, True])
def test_padded_moleblend_pretrain_loss_compiles_with_fullgraph(dynamic):
    """The whole padded pretraining loss in one graph, build_relations included: its shortest paths and routes
    (the bond-id range check skipped under compile) and distances trace, as README's torch.compile notes say.
    Eval mode and one seed for the noise: the compiled loss and its parts are eager's. With dynamic=True the
    blend's broadcast check (``edge_bias.shape[0] in (1, B)``) came out False for equal sizes, one symbolic."""
    pytest.importorskip("rdkit", reason="MoleBlend is tested on featurized molecules (RDKit)")
    from pyblend import collate, featurize_many
    from pyblend.models import MoleBlend, MoleBlendConfig

    graphs, _ = featurize_many(["c1ccccc1O", "CCO", "C"], conformer=True, progress=False)
    batch = collate(graphs, layout="padded")
    torch.manual_seed(0)
    model = MoleBlend(MoleBlendConfig(layers=1, dim=16, heads=1, ffn_dim=16, num_kernels=6, head_width=4,
                                      max_distance=4, max_hops=2, spd_classes=4)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model.pretrain_loss, backend="eager", fullgraph=True, dynamic=dynamic)
    torch.manual_seed(1)
    loss, parts = compiled(batch)
    torch.manual_seed(1)
    expected_loss, expected_parts = model.pretrain_loss(batch)
    _close(loss.detach(), expected_loss.detach(), "loss")
    for name, value in expected_parts.items():
        _close(parts[name].detach(), value.detach(), name)
