"""Deferred initialisation of the nn modules, as FSDP and meta-device loaders do it: build on the meta device,
``to_empty()``, then ``reset_parameters()`` on every submodule that has one (parents before children, as
``modules()`` walks them). Every parameter must come back initialised as at construction, not left as whatever
memory ``to_empty()`` gave (NaN here) nor reset to a child's generic default."""
import math

import pytest
import torch

from pyblend.nn import GaussianBasisBias, LegoBlock, MultiPairContrastive, RelationBiasedAttention


def reset_everything(factory):
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))
    for submodule in module.modules():
        if hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()
    left = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    assert not left, f"left uninitialised: {left}"
    return module


def test_relation_biased_attention():
    layer = reset_everything(lambda: RelationBiasedAttention(48, 8))
    xavier = math.sqrt(6 / (48 + 48))
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj):  # Graphormer's gain 1/sqrt(2), not the default
        assert 0.8 * xavier / math.sqrt(2) < proj.weight.abs().max() <= xavier / math.sqrt(2)
        assert proj.bias.abs().max() <= 1 / math.sqrt(48)  # nn.Linear's default
    assert layer.out_proj.weight.abs().max() > 0.8 * xavier and (layer.out_proj.bias == 0).all()


@pytest.mark.parametrize("order", ["modules", "reversed"])
def test_gaussian_basis_bias_keeps_the_public_init_in_any_order(order):
    with torch.device("meta"):
        module = GaussianBasisBias(4, num_kernels=8, num_pair_types=16)
    module = module.to_empty(device="cpu")
    children = list(module.modules())
    for submodule in children if order == "modules" else reversed(children):
        if hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()
    gbf = module.gbf
    for table in (gbf.means, gbf.stds):  # U(0, 3), not nn.Embedding's N(0, 1)
        assert ((table.weight >= 0) & (table.weight <= 3)).all()
    assert (gbf.mul.weight == 1).all() and (gbf.bias.weight == 0).all()


def test_learnable_temperature_and_latent():
    contrastive = reset_everything(lambda: MultiPairContrastive([("a", "b")], temperature=0.07,
                                                                learnable_temperature=True))
    assert math.isclose(float(contrastive.temperature), 0.07, rel_tol=1e-6)
    block = reset_everything(lambda: LegoBlock(6, 2, l_c=4, l_d=8, depth=1, heads=2, head_dim=4))
    assert block.latent.std() > 0.3  # N(0, 1) again



@pytest.mark.parametrize("cls, args, kwargs", [
    pytest.param(GaussianBasisBias, (4,), dict(num_kernels=8, num_pair_types=16), id="GaussianBasisBias"),
    pytest.param(MultiPairContrastive, ([("a", "b")],), dict(learnable_temperature=True, projections={"a": 6},
                                                              projection_dim=4), id="MultiPairContrastive"),
    pytest.param(RelationBiasedAttention, (16, 2), {}, id="RelationBiasedAttention"),
    pytest.param(LegoBlock, (8,), dict(outputs=1), id="LegoBlock"),
])
def test_factory_arguments_and_skip_init(cls, args, kwargs):
    """torch's factory arguments: parameters made where and as asked, which torch.nn.utils.skip_init (and any
    meta-first loader) needs; GaussianBasisBias and MultiPairContrastive took no device ("Module must support a
    'device' arg")."""
    module = cls(*args, **kwargs, device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in module.parameters())
    skipped = torch.nn.utils.skip_init(cls, *args, **kwargs, dtype=torch.float64)
    assert all(p.device.type == "cpu" and p.dtype == torch.float64 for p in skipped.parameters())
    assert sorted(dict(skipped.named_parameters())) == sorted(dict(cls(*args, **kwargs).named_parameters()))
