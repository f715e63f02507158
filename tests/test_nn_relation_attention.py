"""RelationBiasedAttention: Graphormer / Uni-Mol checkpoints load and give their outputs, the relation table equals
the dense bias, packed equals padded, bad inputs are refused by name, and a small model compiles."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from pyblend import layout
from pyblend.nn import RelationBiasedAttention, bias_from_relations, convert_unimol_state_dict

from tolerances import assert_close

F64 = torch.float64


def randn(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator, dtype=F64) * scale


def padding_mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def graphormer_state_dict(generator, embed_dim, with_bias=True):
    """Random weights under Graphormer's own names (a GraphormerGraphEncoderLayer's ``self_attn.``)."""
    state = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        state[f"self_attn.{name}.weight"] = randn(generator, embed_dim, embed_dim, scale=embed_dim ** -0.5)
        if with_bias:
            state[f"self_attn.{name}.bias"] = randn(generator, embed_dim, scale=0.1)
    return state


def flat(grads):
    """All gradients as one vector: k_proj.bias's is 0 up to rounding (softmax ignores a per-row constant), so
    it is compared at the scale of the others, not against itself."""
    return torch.cat([g.flatten() for g in grads])


def checkpoint_slice(checkpoint, prefix="self_attn."):
    return {key.removeprefix(prefix): value for key, value in checkpoint.items() if key.startswith(prefix)}


def graphormer_attention(state, num_heads, query, attn_bias, key_padding_mask):
    """Graphormer's MultiheadAttention.forward, written out: time first ``query (N, B, C)``, ``attn_bias
    (B, H, N, N)``, ``key_padding_mask (B, N)`` True = PADDING. Returns ``(N, B, C)``."""
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads

    def linear(name, x):
        bias = state.get(f"{name}.bias")
        return x @ state[f"{name}.weight"].T + (0 if bias is None else bias)

    q = linear("q_proj", query) * head_dim ** -0.5
    k = linear("k_proj", query)
    v = linear("v_proj", query)
    q = q.contiguous().view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    weights = torch.bmm(q, k.transpose(1, 2))
    if attn_bias is not None:
        weights = weights + attn_bias.reshape(bsz * num_heads, tgt_len, tgt_len)
    weights = weights.view(bsz, num_heads, tgt_len, tgt_len)
    weights = weights.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    # Graphormer takes the softmax in float32 (`.float()`): an upcast for fp16/bf16; float64 stays float64 here.
    probs = torch.softmax(weights.view(bsz * num_heads, tgt_len, tgt_len), dim=-1)
    attn = torch.bmm(probs, v).transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
    return linear("out_proj", attn)


def unimol_attention(state, num_heads, query, key_padding_mask, attn_bias, scaling_factor=1.0):
    """Uni-Mol's SelfMultiheadAttention.forward (Uni-Core), written out: batch first ``query (B, N, C)``,
    ``attn_bias (B*H, N, N)``, ``key_padding_mask`` True = PADDING. Returns ``(out (B, N, C), logits (B*H, N, N))``
    (the ``return_attn`` logits: bias added, -inf at padded keys)."""
    bsz, tgt_len, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    scaling = (head_dim * scaling_factor) ** -0.5
    q, k, v = (query @ state["in_proj.weight"].T + state["in_proj.bias"]).chunk(3, dim=-1)

    def heads(x):
        return x.view(bsz, -1, num_heads, head_dim).transpose(1, 2).contiguous().view(bsz * num_heads, -1, head_dim)

    q, k, v = heads(q) * scaling, heads(k), heads(v)
    weights = torch.bmm(q, k.transpose(1, 2)).view(bsz, num_heads, tgt_len, tgt_len)
    weights = weights.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = weights.view(bsz * num_heads, tgt_len, tgt_len) + attn_bias
    o = torch.bmm(torch.softmax(weights, dim=-1), v)
    o = o.view(bsz, num_heads, tgt_len, head_dim).transpose(1, 2).contiguous().view(bsz, tgt_len, embed_dim)
    return o @ state["out_proj.weight"].T + state["out_proj.bias"], weights


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("with_bias", [True, False])
def test_graphormer_checkpoint_loads_one_to_one_and_matches(generator, with_bias):
    embed_dim, heads, lengths = 24, 3, [7, 4, 1]
    width = max(lengths)
    checkpoint = graphormer_state_dict(generator, embed_dim, with_bias)
    own = checkpoint_slice(checkpoint)
    module = RelationBiasedAttention(embed_dim, heads, bias=with_bias, dtype=F64)
    assert set(module.state_dict()) == set(own)
    module.load_state_dict(own, strict=True)

    mask = padding_mask(lengths, width)
    x = randn(generator, len(lengths), width, embed_dim)
    attn_bias = randn(generator, len(lengths), heads, width, width)
    expected = graphormer_attention(own, heads, x.transpose(0, 1), attn_bias, ~mask)
    out = module(x, attn_bias, mask=mask)
    assert out.shape == x.shape
    assert_close(out[mask], expected.transpose(0, 1)[mask], F64, "output on real rows")


@pytest.mark.parametrize("scaling_factor", [1.0, 2.0, np.float32(2.0)])  # numpy's was refused as not a float
def test_unimol_checkpoint_maps_and_matches(generator, scaling_factor):
    embed_dim, heads, lengths = 16, 4, [6, 3]
    width, batch = max(lengths), len(lengths)
    prefix = "encoder.layers.2.self_attn."
    checkpoint = {
        f"{prefix}in_proj.weight": randn(generator, 3 * embed_dim, embed_dim, scale=embed_dim ** -0.5),
        f"{prefix}in_proj.bias": randn(generator, 3 * embed_dim, scale=0.1),
        f"{prefix}out_proj.weight": randn(generator, embed_dim, embed_dim, scale=embed_dim ** -0.5),
        f"{prefix}out_proj.bias": randn(generator, embed_dim, scale=0.1),
        "encoder.layers.2.fc1.weight": randn(generator, 2, 2),  # the rest of a whole-model checkpoint
    }
    module = RelationBiasedAttention.from_unimol_state_dict(checkpoint, heads, prefix=prefix,
                                                            scaling_factor=scaling_factor)
    assert module.q_proj.weight.dtype == F64
    assert module.scaling == pytest.approx((embed_dim // heads * scaling_factor) ** -0.5)
    chunks = checkpoint[f"{prefix}in_proj.weight"].chunk(3)
    for proj, chunk in zip((module.q_proj, module.k_proj, module.v_proj), chunks):
        assert torch.equal(proj.weight, chunk)

    mask = padding_mask(lengths, width)
    x = randn(generator, batch, width, embed_dim)
    attn_bias = randn(generator, batch * heads, width, width)  # Uni-Mol's flattened layout
    state = checkpoint_slice(checkpoint, prefix)
    expected, expected_logits = unimol_attention(state, heads, x, ~mask, attn_bias, scaling_factor)
    out, logits = module(x, attn_bias, mask=mask, return_logits=True)
    assert_close(out[mask], expected[mask], F64, "output on real rows")
    pairs = (mask[:, :, None] & mask[:, None, :])[:, None].expand(-1, heads, -1, -1)
    assert_close(logits[pairs], expected_logits.view(batch, heads, width, width)[pairs], F64, "logits")


def test_convert_unimol_state_dict_keys():
    c = 8
    converted = convert_unimol_state_dict({"in_proj.weight": torch.zeros(3 * c, c), "in_proj.bias": torch.zeros(3 * c),
                                           "a.in_proj.weight": torch.zeros(3 * c, c), "out_proj.bias": torch.zeros(c)})
    assert list(converted) == ["q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias",
                               "v_proj.bias", "a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight",
                               "out_proj.bias"]
    assert all(v.shape[0] == c for v in converted.values())
    with pytest.raises(ValueError, match=r"in_proj.weight: expected shape \(3C, C\)"):
        convert_unimol_state_dict({"in_proj.weight": torch.zeros(10, 4)})


def test_graphormer_initialisation_and_repr():
    """One seed gives Graphormer's parameters: its MultiheadAttention (fairseq's) makes k_proj, v_proj, q_proj,
    out_proj as nn.Linear, then redraws their weights Xavier-uniform in that order (gain 1/sqrt(2) but for out)
    and zeroes out_proj's bias. The q, k, v draws were once handed to k, v, q."""
    torch.manual_seed(7)
    graphormer = {name: torch.nn.Linear(48, 48) for name in ("k_proj", "v_proj", "q_proj", "out_proj")}
    for name in ("k_proj", "v_proj", "q_proj"):
        torch.nn.init.xavier_uniform_(graphormer[name].weight, gain=1 / math.sqrt(2))
    torch.nn.init.xavier_uniform_(graphormer["out_proj"].weight)
    torch.nn.init.zeros_(graphormer["out_proj"].bias)
    torch.manual_seed(7)
    module = RelationBiasedAttention(48, 8, dropout=0.1)
    for name, linear in graphormer.items():
        assert torch.equal(getattr(module, name).weight, linear.weight), f"{name}.weight"
        assert torch.equal(getattr(module, name).bias, linear.bias), f"{name}.bias"
    assert [name for name, _ in module.named_parameters()][::2] == [f"{name}.weight" for name in graphormer]
    for value in ("no", None, 1):
        with pytest.raises(TypeError, match=f"bias: expected a bool; got {value!r}"):
            RelationBiasedAttention(48, 8, bias=value)
    text = repr(module)
    assert "embed_dim=48, num_heads=8, head_dim=6, dropout=0.1, bias=True" in text


# ------------------------------------------------------------------------------------------- forms and layouts


@pytest.mark.parametrize("packed", [False, True])
def test_relation_table_equals_dense_bias(generator, packed):
    embed_dim, heads, relations, lengths = 12, 3, 9, [5, 2, 4]
    width, batch = max(lengths), len(lengths)
    module = RelationBiasedAttention(embed_dim, heads, dtype=F64)
    mask = padding_mask(lengths, width)
    x = randn(generator, batch, width, embed_dim)
    rel_index = torch.randint(0, relations, (batch, width, width), generator=generator, dtype=torch.int32)
    table = randn(generator, relations, heads).requires_grad_()
    extra = randn(generator, 1, heads, width, width)  # a float bias, broadcast over the batch, on top
    weights = randn(generator, batch, width, embed_dim)[mask]
    if packed:
        cu_seqlens, max_seqlen = layout.cu_seqlens_from_mask(mask)
        x_in, rel_in = x[mask], layout.pack_pairs(rel_index, mask)
        extra_in = layout.pack_pairs(extra.expand(batch, -1, -1, -1).permute(0, 2, 3, 1), mask).T
        kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    else:
        x_in, rel_in, extra_in, kwargs = x, rel_index, extra, {"mask": mask}

    def run(**forms):
        out = module(x_in, **forms, **kwargs)
        real = out if packed else out[mask]
        (grad,) = torch.autograd.grad((real * weights).sum(), table)
        return real, grad

    out_table, grad_table = run(attn_bias=extra_in, rel_index=rel_in, rel_table=table)
    out_dense, grad_dense = run(attn_bias=extra_in + bias_from_relations(rel_in, table))
    assert_close(out_table, out_dense, F64, "output")
    assert_close(grad_table, grad_dense, F64, "rel_table gradient")


def test_bias_from_relations_shapes():
    table = torch.arange(6.0).view(3, 2)
    index = torch.tensor([[[0, 2], [1, 0]]])
    dense = bias_from_relations(index, table)
    assert dense.shape == (1, 2, 2, 2) and dense[0, 1, 0, 1] == table[2, 1]
    assert bias_from_relations(index.flatten(), table).shape == (2, 4)
    with pytest.raises(TypeError, match="rel_index: expected an integer tensor"):
        bias_from_relations(index.float(), table)
    with pytest.raises(ValueError, match="rel_index: expected a tensor on meta like rel_table"):
        bias_from_relations(index, table.to("meta"))  # was torch's indexing error, naming neither


def test_packed_equals_padded(generator):
    embed_dim, heads, lengths = 20, 4, [6, 1, 0, 3]
    width, batch = max(lengths), len(lengths)
    module = RelationBiasedAttention(embed_dim, heads, dtype=F64)
    mask = padding_mask(lengths, width)
    x = randn(generator, batch, width, embed_dim)
    bias = randn(generator, batch, heads, width, width)
    cu_seqlens, max_seqlen = layout.cu_seqlens_from_mask(mask)
    packed_bias = layout.pack_pairs(bias.permute(0, 2, 3, 1), mask).T  # (H, P)
    weights = randn(generator, int(mask.sum()), embed_dim)
    params = list(module.parameters())

    out_padded, logits_padded = module(x, bias, mask=mask, return_logits=True)
    out_packed, logits_packed = module(x[mask], packed_bias, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                       return_logits=True)
    assert out_packed.shape == (int(mask.sum()), embed_dim) and logits_packed.shape == packed_bias.shape
    assert_close(out_packed, out_padded[mask], F64, "output")
    assert_close(logits_packed, layout.pack_pairs(logits_padded.permute(0, 2, 3, 1), mask).T, F64, "logits")
    grads_padded = torch.autograd.grad((out_padded[mask] * weights).sum(), params)
    grads_packed = torch.autograd.grad((out_packed * weights).sum(), params)
    assert_close(flat(grads_packed), flat(grads_padded), F64, "parameter gradients")


def test_triton_backend_matches_float64(generator):
    # CUDA where there is one, else Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    embed_dim, heads, relations, lengths = 16, 2, 5, [5, 1, 3]
    width, batch = max(lengths), len(lengths)
    module = RelationBiasedAttention(embed_dim, heads, device=device)
    mask = padding_mask(lengths, width).to(device)
    x = randn(generator, batch, width, embed_dim).float().to(device)
    bias = randn(generator, batch, 1, width, width).float().to(device)
    rel_index = torch.randint(0, relations, (batch, width, width), generator=generator).to(device)
    table = randn(generator, relations, heads).float().to(device).requires_grad_()
    weights = randn(generator, int(mask.sum()), embed_dim).float().to(device)

    def run(layer, dtype, backend):
        table_in = table.detach().to(dtype).requires_grad_()
        out = layer(x.to(dtype), bias.to(dtype), mask=mask, rel_index=rel_index, rel_table=table_in,
                    backend=backend)
        grads = torch.autograd.grad((out[mask] * weights.to(dtype)).sum(), [table_in, *layer.parameters()])
        return out[mask], flat(grads)

    out, grads = run(module, torch.float32, "triton")
    out64, grads64 = run(module.double(), F64, "reference")
    assert_close(out, out64, torch.float32, "triton output")
    assert_close(grads, grads64, torch.float32, "triton gradients (rel_table, parameters)")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nan_padding_reaches_no_parameter_gradient(generator, backend):
    """Padded rows of x filled with NaN: the projections ran on them, and 0 * NaN made every projection's weight
    gradient NaN while the output stayed clean."""
    embed_dim, heads, lengths = 16, 2, [5, 3]
    module = RelationBiasedAttention(embed_dim, heads)
    mask = padding_mask(lengths, max(lengths))
    x = randn(generator, len(lengths), max(lengths), embed_dim).float()
    weights = randn(generator, int(mask.sum()), embed_dim).float()

    def gradients(padding_value):
        x_in = x.masked_fill(~mask[..., None], padding_value)
        out = module(x_in, mask=mask, backend=backend)
        return out[mask], flat(torch.autograd.grad((out[mask] * weights).sum(), list(module.parameters())))

    out, grads = gradients(float("nan"))
    out_zero, grads_zero = gradients(0.0)
    assert torch.isfinite(grads).all()
    assert torch.equal(out, out_zero) and torch.equal(grads, grads_zero)


def test_dropout_only_in_training(generator):
    embed_dim, heads = 16, 2
    module = RelationBiasedAttention(embed_dim, heads, dropout=0.5, dtype=F64)
    x = randn(generator, 2, 5, embed_dim)
    plain = RelationBiasedAttention(embed_dim, heads, dtype=F64)
    plain.load_state_dict(module.state_dict())
    module.eval()
    assert torch.equal(module(x), plain(x))
    module.train()
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    first = module(x, generator=torch.Generator().manual_seed(seed))
    again = module(x, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(first, again), "the same generator state must give the same dropout"
    assert not torch.allclose(first, plain(x)), "training mode must drop attention probabilities"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_activation_checkpointing_recomputes_the_same_dropout(generator, backend):
    """torch.utils.checkpoint reruns the forward in the backward with torch's RNG state restored: the dropout seed
    the op draws from it must repeat, so outputs and gradients equal the uncheckpointed ones exactly."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    layer = RelationBiasedAttention(16, 2, dropout=0.3, device=device)
    x = randn(generator, 2, 5, 16).float().to(device).requires_grad_()
    bias = randn(generator, 2, 2, 5, 5).float().to(device)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(seed)
        attend = lambda x: layer(x, bias, backend=backend)  # noqa: E731
        out = torch.utils.checkpoint.checkpoint(attend, x, use_reentrant=False) if checkpointed else attend(x)
        results.append((out, *torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])))
    for plain, recomputed in zip(*results):
        assert torch.equal(plain, recomputed)
    assert not torch.equal(results[0][0], layer.eval()(x, bias, backend=backend)), "dropout must be on"


# ------------------------------------------------------------------------------------------------- refusals


def test_bad_inputs_are_refused_by_name():
    module = RelationBiasedAttention(16, 4)
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(4\)"):
        RelationBiasedAttention(10, 4)
    with pytest.raises(ValueError, match=r"padded \(B, N, C\).*shape \(2, 3, 4, 16\)"):
        module(torch.randn(2, 3, 4, 16))
    with pytest.raises(ValueError, match=r"padded \(B, N, C\).*shape \(5, 16\)"):
        module(torch.randn(5, 16))  # packed without cu_seqlens
    with pytest.raises(ValueError, match=r"packed \(T, C\) since cu_seqlens.*shape \(1, 5, 16\)"):
        module(torch.randn(1, 5, 16), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"embed_dim = 16.*shape \(2, 5, 12\)"):
        module(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="rel_index and rel_table come together"):
        module(torch.randn(2, 5, 16), rel_index=torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Uni-Mol's \(B\*H, N, N\) = \(8, 5, 5\)"):
        module(torch.randn(2, 5, 16), torch.randn(6, 5, 5))
    with pytest.raises(ValueError, match=r"in_proj.weight: expected shape \(3C, C\)"):
        RelationBiasedAttention.from_unimol_state_dict({"in_proj.weight": torch.zeros(16, 16)}, 4)
    with pytest.raises(ValueError, match="num_heads: expected a positive int; got 0"):
        RelationBiasedAttention.from_unimol_state_dict({"in_proj.weight": torch.zeros(48, 16)}, 0)
    with pytest.raises(TypeError, match="attn_bias: expected a torch.Tensor or numpy.ndarray, got list"):
        module(torch.randn(2, 5, 16), [[0.0]])
    # These failed inside nn.Linear or float() without naming the argument, or were accepted (scaling_factor 0
    # divided by zero, -1 made scaling complex).
    with pytest.raises(ValueError, match="embed_dim: expected a positive int; got True"):
        RelationBiasedAttention(True, 1)
    with pytest.raises(ValueError, match="scaling: expected None or a finite float; got 'a'"):
        RelationBiasedAttention(16, 4, scaling="a")
    for factor in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scaling_factor: expected a finite float > 0"):
            RelationBiasedAttention.from_unimol_state_dict({"in_proj.weight": torch.zeros(48, 16)}, 4,
                                                           scaling_factor=factor)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 like the module's parameters .under "
                                        r"autocast, any float dtype but float64.; got torch.float64"):
        module(torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected a tensor on cpu like the module's parameters; got .* on meta"):
        module(torch.randn(2, 5, 16, device="meta"))
    # A numpy bias is taken, as by the op.
    x, bias = torch.randn(2, 5, 16), torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(module(x, bias.numpy()), module(x, bias))
    # Under autocast the projections cast x themselves: another dtype is fine there.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(x.bfloat16(), backend="reference").shape == x.shape


# ------------------------------------------------------------------------------------------------ torch.compile


class TinyModel(nn.Module):
    """Embedding -> 2 x (relation-biased attention + residual + LayerNorm) -> masked mean -> Linear."""

    def __init__(self, vocab=11, embed_dim=16, heads=4, relations=7):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed_dim)
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(relations, heads)) for _ in range(2)])
        self.layers = nn.ModuleList([RelationBiasedAttention(embed_dim, heads) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(2)])
        self.head = nn.Linear(embed_dim, 1)

    def forward(self, tokens, mask, rel_index, bias):
        x = self.embed(tokens)
        for layer, norm, table in zip(self.layers, self.norms, self.tables):
            x = norm(x + layer(x, bias, mask=mask, rel_index=rel_index, rel_table=table, backend="reference"))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled).squeeze(-1)


def compile_inputs(generator):
    lengths = [5, 3, 4]
    mask = padding_mask(lengths, 5)
    tokens = torch.randint(0, 11, (3, 5), generator=generator)
    rel_index = torch.randint(0, 7, (3, 5, 5), generator=generator)
    bias = torch.randn(3, 4, 5, 5, generator=generator, dtype=F64)
    return tokens, mask, rel_index, bias


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_small_model_compiles_and_matches_eager(generator, compiler):
    # fullgraph: no graph break anywhere, the op included. "eager": Dynamo's trace run as is; "aot_eager": also
    # the traced backward; "inductor": C++ generated for the CPU (needs the C compiler `make test` needs anyway),
    # forward only: compiling the backward too costs ~30 s on 2 cores and aot_eager already checks its trace.
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = TinyModel().double()
    inputs = compile_inputs(generator)
    params = list(model.parameters())
    torch.compiler.reset()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    backward = compiler != "inductor"
    with torch.set_grad_enabled(backward):
        expected = model(*inputs)
        out = compiled(*inputs)
    assert_close(out, expected, F64, f"{compiler} output")
    if backward:
        grads = torch.autograd.grad(out.square().sum(), params)
        expected_grads = torch.autograd.grad(expected.square().sum(), params)
        assert_close(flat(grads), flat(expected_grads), F64, f"{compiler} parameter gradients")
