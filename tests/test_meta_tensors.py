"""Shape inference without values: every module's forward and backward on the meta device and under
FakeTensorMode (a model built on the meta device for FLOP counting, as Lightning's ``measure_flops`` does;
memory estimators) gives the shapes and dtypes of a real call.

Meta and fake tensors have no values, so the ops take the path they take under torch.compile: value checks
skipped, sizes from shapes and ``max_seqlen`` (``pyblend._values.values_hidden``). Before, the host reads of
those checks (``nonzero``, ``item``, ``repeat_interleave`` without its size) raised."""
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pyblend
from pyblend.models import MoleBlend, MoleBlendConfig
from pyblend.nn import (DynamicFusion, GaussianBasisBias, LegoBlock, MultiPairContrastive, RelationBiasedAttention,
                        RelationBlender)

MASK = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
CU_SEQLENS = torch.tensor([0, 5, 8], dtype=torch.int32)


def module_calls(generator):
    """(name, module factory, positional inputs, keyword inputs): each module in the layouts it has."""
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    ids = torch.randint(0, 3, (2, 5, 5), generator=generator)
    present = {"a": torch.tensor([True, True, False]), "b": torch.tensor([True, False, True])}
    yield "attention, padded", lambda: RelationBiasedAttention(16, 2), (randn(2, 5, 16), randn(2, 2, 5, 5)), \
        dict(mask=MASK, rel_index=ids, rel_table=randn(3, 2))
    yield "attention, packed", lambda: RelationBiasedAttention(16, 2), (randn(8, 16), randn(2, 34)), \
        dict(cu_seqlens=CU_SEQLENS, max_seqlen=5)
    yield "gaussian bias, padded", lambda: GaussianBasisBias(4, num_kernels=8, num_pair_types=16), \
        (randn(2, 5, 3), torch.randint(0, 16, (2, 5, 5, 2), generator=generator), MASK), {}
    yield "gaussian bias, packed", lambda: GaussianBasisBias(4, num_kernels=8, num_pair_types=16), \
        (randn(8, 3), torch.randint(0, 16, (34, 2), generator=generator)), dict(cu_seqlens=CU_SEQLENS, max_seqlen=5)
    yield "dynamic fusion", lambda: DynamicFusion({"a": 4, "b": 6}, 8), \
        ({"a": randn(3, 4), "b": randn(3, 6)}, present), {}
    yield "lego block, token mask", lambda: LegoBlock(6, 2, l_c=4, l_d=8, depth=1, heads=2, head_dim=4), \
        (randn(2, 3, 6), torch.tensor([[True, True, False], [True, False, False]])), {}
    yield "contrastive", lambda: MultiPairContrastive([("a", "b")]), \
        ({"a": randn(3, 8), "b": randn(3, 8)}, present), {}
    yield "blender, packed", lambda: RelationBlender(), (), dict(cu_seqlens=CU_SEQLENS, max_seqlen=5, pairs=34)


def to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)})
    return value


def assert_like(got, want, what):
    got, want = (x if isinstance(x, tuple) else (x,) for x in (got, want))
    assert len(got) == len(want), what
    for ours, theirs in zip(got, want):
        assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype), what


def differentiable(output):
    """A scalar of the first output to differentiate, None when it has no gradient (the blender's choices)."""
    first = output[0] if isinstance(output, tuple) else output
    return first.float().sum() if first.requires_grad else None


def gradient_names(module):
    return sorted(name for name, p in module.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_modules_on_the_meta_device(generator, training):
    for name, factory, args, kwargs in module_calls(generator):
        module = factory().train(training)
        want = module(*args, **kwargs)
        with torch.device("meta"):
            meta = factory().train(training)
        got = meta(*to_device(args, "meta"), **to_device(kwargs, "meta"))
        assert all(x.is_meta for x in (got if isinstance(got, tuple) else (got,)))
        assert_like(got, want, name)
        loss = differentiable(got)
        assert (loss is None) == (differentiable(want) is None), name
        if loss is not None:
            loss.backward()
            differentiable(want).backward()
            assert gradient_names(meta) == gradient_names(module) != [], name
            assert all(p.grad.is_meta for p in meta.parameters() if p.grad is not None), name


def test_modules_under_fake_tensor_mode(generator):
    for name, factory, args, kwargs in module_calls(generator):
        module = factory()
        want = module(*args, **kwargs)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = lambda value: mode.from_tensor(value) if isinstance(value, torch.Tensor) else value  # noqa: E731
            got = module(*(fake(a) if not isinstance(a, dict) else {k: fake(v) for k, v in a.items()} for a in args),
                         **{key: fake(value) for key, value in kwargs.items()})
            assert_like(got, want, name)
            loss = differentiable(got)
            assert (loss is None) == (differentiable(want) is None), name
            if loss is not None:
                loss.backward()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_moleblend_pretraining_loss_on_the_meta_device(layout):
    pytest.importorskip("rdkit", reason="the molecules are featurized with RDKit")
    graphs, failures = pyblend.featurize_many(["CCO", "c1ccccc1O", "CC(=O)N"], conformer=True, progress=False)
    assert not failures
    config = MoleBlendConfig(layers=2, dim=32, heads=4)
    model = MoleBlend(config)
    relations = model.build_relations(pyblend.collate(graphs, layout=layout))
    want, want_parts = model.relation_loss(relations)
    with torch.device("meta"):
        meta = MoleBlend(config)
    got, parts = meta.relation_loss(to_device(relations, "meta"))
    assert got.is_meta and got.shape == want.shape and sorted(parts) == sorted(want_parts)
    got.backward()
    grads = [p.grad for p in meta.parameters() if p.grad is not None]
    assert grads and all(grad.is_meta for grad in grads)
