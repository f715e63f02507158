"""Modality blending (MoleBlend eq. 8-9): draw statistics, modes, reproducibility, and the blended attention."""
import pytest
import torch

from pyblend import reference
from pyblend.layout import cu_seqlens_from_mask, pack_pairs
from pyblend.ops.blend_relations import (
    EDGE,
    GEOMETRY,
    SPD,
    blend_relations,
    every_channel,
    sample_blend,
)


def _mask(lengths, atoms=None):
    atoms = atoms or max(lengths)
    return torch.arange(atoms) < torch.tensor(lengths)[:, None]


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pair_mode_frequencies_follow_probs():
    mask = _mask([64] * 16)
    choice = sample_blend(mask, probs=(0.2, 0.2, 0.6), generator=_generator())
    assert choice.dtype == torch.uint8 and choice.shape == (16, 64, 64)
    total = choice.numel()
    for bit, expected in ((SPD, 0.2), (EDGE, 0.2), (GEOMETRY, 0.6)):
        frequency = ((choice & bit) != 0).sum().item() / total
        # 65536 Bernoulli draws: the standard error is < 0.002; 0.01 is 5 standard errors.
        assert abs(frequency - expected) < 0.01, (bit, frequency)
    assert torch.isin(choice, torch.tensor([SPD, EDGE, GEOMETRY], dtype=torch.uint8)).all()  # one channel each


def test_probs_are_normalised_and_zero_probability_never_drawn():
    choice = sample_blend(_mask([40] * 8), probs=(1, 0, 3), generator=_generator(1))
    assert not ((choice & EDGE) != 0).any()
    frequency = ((choice & GEOMETRY) != 0).float().mean().item()
    assert abs(frequency - 0.75) < 0.02


def test_same_seed_same_draw_and_different_seed_differs():
    mask = _mask([9, 5, 12])
    first = sample_blend(mask, generator=_generator(7))
    assert torch.equal(first, sample_blend(mask, generator=_generator(7)))
    assert not torch.equal(first, sample_blend(mask, generator=_generator(8)))


def test_padding_pairs_are_zero_and_real_pairs_are_not():
    mask = _mask([3, 6, 1], atoms=8)
    choice = sample_blend(mask, generator=_generator())
    pairs = mask[:, :, None] & mask[:, None, :]
    assert (choice[~pairs] == 0).all() and (choice[pairs] != 0).all()


def test_batch_mode_shares_one_draw_across_molecules():
    mask = _mask([10, 10, 7])
    choice = sample_blend(mask, mode="batch", generator=_generator(2))
    assert torch.equal(choice[0], choice[1])
    assert torch.equal(choice[2, :7, :7], choice[0, :7, :7])
    assert len(torch.unique(choice[0])) == 3  # 100 pairs: every channel appears


def test_molecule_mode_one_subset_per_molecule():
    mask = _mask([6] * 200)
    choice = sample_blend(mask, mode="molecule", probs=(0.25, 0.25, 0.5), generator=_generator(3))
    per_molecule = choice.flatten(1)
    assert (per_molecule == per_molecule[:, :1]).all()
    values = per_molecule[:, 0]
    assert set(values.tolist()) <= {SPD | EDGE, GEOMETRY, SPD | EDGE | GEOMETRY}
    assert abs((values == (SPD | EDGE | GEOMETRY)).float().mean().item() - 0.5) < 0.12


def test_symmetric_draw_is_symmetric_and_default_is_not():
    mask = _mask([30, 30])
    symmetric = sample_blend(mask, symmetric=True, generator=_generator(4))
    assert torch.equal(symmetric, symmetric.transpose(1, 2))
    plain = sample_blend(mask, generator=_generator(4))
    assert not torch.equal(plain, plain.transpose(1, 2))


def test_molecules_without_conformer_never_get_the_3d_channel():
    mask = _mask([20, 20, 20])
    has_geometry = torch.tensor([True, False, True])
    for mode in ("pair", "batch", "molecule"):
        choice = sample_blend(mask, mode=mode, has_geometry=has_geometry, generator=_generator(5))
        assert not ((choice[1] & GEOMETRY) != 0).any(), mode
        assert (choice[1] != 0).all(), mode
    # Renormalised over SPD and edge: 0.2 / 0.4 = half each.
    choice = sample_blend(_mask([50] * 4), has_geometry=torch.zeros(4, dtype=torch.bool), generator=_generator(6))
    assert abs(((choice & SPD) != 0).float().mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("mode", ["pair", "batch", "molecule"])
def test_the_largest_draw_never_picks_an_outcome_of_probability_zero(monkeypatch, mode):
    """torch.rand's largest float32, 1 - 2^-24, at every pair: renormalised, (0.1, 0.2) / 0.3 has a float32 bound
    of 1 - 2^-24 before the third outcome, which that draw once reached (3D for a molecule without conformer)."""
    largest = 1.0 - 2.0 ** -24
    monkeypatch.setattr(torch, "rand", lambda *shape, generator=None, device=None: torch.full(shape, largest))
    mask = _mask([6, 4])
    no_conformer = torch.tensor([False, False])
    two_d = SPD | EDGE
    # (probs, has_geometry, the outcomes allowed): pair and batch draw channels, molecule draws subsets.
    cases = [((0.1, 0.2, 0.7), no_conformer, {SPD, EDGE}), ((0.1, 0.2, 0.0), None, {SPD, EDGE}),
             ((0.3, 0.0, 0.0), None, {SPD})]
    if mode == "molecule":
        cases = [((0.1, 0.2, 0.7), no_conformer, {two_d}), ((0.1, 0.2, 0.0), None, {two_d, GEOMETRY}),
                 ((0.3, 0.0, 0.0), None, {two_d})]
    real = mask[:, :, None] & mask[:, None, :]
    for probs, has_geometry, allowed in cases:
        choice = sample_blend(mask, probs=probs, mode=mode, has_geometry=has_geometry)
        drawn = set(choice[real].unique().tolist())
        assert drawn <= allowed, (probs, has_geometry, drawn)


def test_packed_layout_is_the_padded_draw_packed():
    mask = _mask([4, 7, 2])
    cu_seqlens, max_seqlen = cu_seqlens_from_mask(mask)
    padded = sample_blend(mask, generator=_generator(9))
    packed = sample_blend(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, generator=_generator(9))
    assert packed.shape == (4 * 4 + 7 * 7 + 2 * 2,)
    assert torch.equal(packed, pack_pairs(padded, mask))


@pytest.mark.parametrize("mode, symmetric", [("pair", True), ("batch", False), ("batch", True), ("molecule", False)])
def test_every_mode_packed_is_the_padded_draw_packed(mode, symmetric):
    mask = _mask([4, 1, 7, 2])
    has_geometry = torch.tensor([True, False, True, False])
    cu_seqlens, max_seqlen = cu_seqlens_from_mask(mask)
    options = dict(mode=mode, symmetric=symmetric, has_geometry=has_geometry, probs=(0.3, 0.3, 0.4))
    padded = sample_blend(mask, generator=_generator(14), **options)
    packed = sample_blend(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, generator=_generator(14), **options)
    assert torch.equal(packed, pack_pairs(padded, mask))


def test_numpy_scalars_are_accepted():
    """max_seqlen=np.int64(7) was refused as "expected an int >= 0", and symmetric=np.bool_(True) as no bool."""
    import numpy as np

    mask = _mask([4, 7, 2])
    cu_seqlens, max_seqlen = cu_seqlens_from_mask(mask)
    for symmetric in (False, True):
        want = sample_blend(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, symmetric=symmetric, generator=_generator(3))
        got = sample_blend(cu_seqlens=cu_seqlens, max_seqlen=np.int64(max_seqlen), symmetric=np.bool_(symmetric),
                           generator=_generator(3))
        assert torch.equal(got, want)
    assert torch.equal(every_channel(cu_seqlens=cu_seqlens, max_seqlen=np.int32(max_seqlen)),
                       every_channel(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen))


def test_packed_every_channel_makes_no_padded_pair_tensor():
    from allocations import Allocations

    lengths = [4, 1, 7, 2]
    mask = _mask(lengths)
    cu_seqlens, max_seqlen = cu_seqlens_from_mask(mask)
    has_geometry = torch.tensor([True, False, True, True])
    with Allocations() as record:
        packed = every_channel(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, has_geometry=has_geometry)
    assert torch.equal(packed, pack_pairs(every_channel(mask, has_geometry=has_geometry), mask))
    assert max(record.sizes) <= sum(n * n for n in lengths), record.shapes


@pytest.mark.parametrize("draw", [sample_blend, every_channel])
def test_packed_pair_count_given_is_checked_and_changes_nothing(draw):
    """``pairs`` (P, known from a per-pair input) saves the host read of cu_seqlens that meta tensors cannot do;
    in eager mode it is checked against cu_seqlens, and the padded layout refuses it."""
    mask = _mask([4, 1, 7, 2])
    cu_seqlens, max_seqlen = cu_seqlens_from_mask(mask)
    options = dict(generator=_generator(3)) if draw is sample_blend else {}
    given = draw(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, pairs=70, **options)
    options = dict(generator=_generator(3)) if draw is sample_blend else {}
    assert torch.equal(given, draw(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **options))
    with pytest.raises(ValueError, match=r"pairs: cu_seqlens describes P = sum N_i\^2 = 70 pairs; got 69"):
        draw(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, pairs=69)
    with pytest.raises(ValueError, match="pairs: the packed layout's P"):
        draw(mask, pairs=70)
    meta = draw(cu_seqlens=cu_seqlens.to("meta"), max_seqlen=max_seqlen, pairs=70)
    assert meta.is_meta and meta.shape == (70,) and meta.dtype == torch.uint8


@pytest.mark.parametrize("kwargs, match", [
    (dict(probs=(0.5, 0.5)), "probs"),
    (dict(probs=(-0.1, 0.5, 0.6)), "probs"),
    (dict(probs=(0, 0, 0)), "probs"),
    (dict(mode="per-atom"), "mode"),
    (dict(has_geometry=torch.ones(3, dtype=torch.bool)), "has_geometry"),
])
def test_sample_blend_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_blend(_mask([3, 4]), **kwargs)


def test_sample_blend_needs_exactly_one_layout_and_a_2d_outcome_without_conformer():
    with pytest.raises(ValueError, match="mask, cu_seqlens"):
        sample_blend()
    with pytest.raises(ValueError, match="has_geometry: molecule 1"):
        sample_blend(_mask([3, 4]), probs=(0, 0, 1), has_geometry=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="has_geometry: expected a tensor on cpu .as the mask. or on the CPU"):
        sample_blend(_mask([3, 4]), has_geometry=torch.ones(2, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or None; got 5"):
        sample_blend(_mask([3, 4]), generator=5)


def _biases(batch=2, heads=3, atoms=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    spd = torch.randint(0, 6, (batch, atoms, atoms), generator=generator)
    table = torch.randn(6, heads, generator=generator, dtype=torch.float64)
    edge = torch.randn(batch, heads, atoms, atoms, generator=generator, dtype=torch.float64)
    geometry = torch.randn(batch, heads, atoms, atoms, generator=generator, dtype=torch.float64)
    return spd, table, edge, geometry


def test_blend_zeroes_unchosen_channels_and_sums_the_rest():
    spd, table, edge, geometry = _biases()
    choice = sample_blend(_mask([5, 3], atoms=5), mode="pair", generator=_generator(10))
    dense_spd = table[spd.long()].permute(0, 3, 1, 2)
    blended = blend_relations(choice, spd_bias=dense_spd, edge_bias=edge, geometry_bias=geometry)
    assert blended["rel_index"] is None and blended["rel_table"] is None
    expected = torch.zeros_like(edge)
    for bit, value in ((SPD, dense_spd), (EDGE, edge), (GEOMETRY, geometry)):
        expected += ((choice & bit) != 0)[:, None].double() * value
    torch.testing.assert_close(blended["bias"], expected, rtol=0, atol=0)


def test_unchosen_nan_does_not_leak():
    spd, table, edge, geometry = _biases()
    choice = torch.full(spd.shape, SPD, dtype=torch.uint8)
    edge = torch.full_like(edge, float("nan"))
    blended = blend_relations(choice, edge_bias=edge, geometry_bias=geometry)
    assert torch.equal(blended["bias"], torch.zeros_like(geometry))


def test_table_form_through_attention_equals_the_dense_blend():
    """SPD through the relation index (zero row for unchosen pairs) gives the attention of the dense blend."""
    spd, table, edge, geometry = _biases(seed=1)
    mask = _mask([5, 4], atoms=5)
    choice = sample_blend(mask, generator=_generator(11))
    table = table.requires_grad_()
    blended = blend_relations(choice, spd_index=spd, spd_table=table, edge_bias=edge, geometry_bias=geometry)
    assert blended["rel_table"].shape == (7, 3) and (blended["rel_table"][6] == 0).all()
    q, k, v = (torch.randn(2, 5, 3, 4, dtype=torch.float64) for _ in range(3))
    out = reference.relation_attention(q, k, v, blended["bias"], mask=mask, rel_index=blended["rel_index"],
                                       rel_table=blended["rel_table"])
    dense_spd = table[spd.long()].permute(0, 3, 1, 2)
    dense = blend_relations(choice, spd_bias=dense_spd, edge_bias=edge, geometry_bias=geometry)["bias"]
    expected = reference.relation_attention(q, k, v, dense, mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad(out.sum(), table)
    expected_grad, = torch.autograd.grad(expected.sum(), table)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_empty_spd_table_where_spd_is_never_chosen():
    """An (0, H) table with no pair choosing SPD was refused as "got ids from 0 to 0" (the check's stand-in for
    unread ids); it adds nothing. Where SPD is chosen, the refusal names the empty table."""
    geometry_only = torch.full((1, 2, 2), GEOMETRY, dtype=torch.uint8)
    ids = torch.zeros(1, 2, 2, dtype=torch.long)
    blended = blend_relations(geometry_only, spd_index=ids, spd_table=torch.zeros(0, 2))
    attention_bias = blended["rel_table"][blended["rel_index"].long()]
    assert torch.equal(attention_bias, torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="spd_table: has no rows, but the SPD channel is chosen"):
        blend_relations(geometry_only | SPD, spd_index=ids, spd_table=torch.zeros(0, 2))


def test_packed_blend_broadcasts_over_heads():
    mask = _mask([3, 2])
    cu_seqlens, max_seqlen = cu_seqlens_from_mask(mask)
    choice = sample_blend(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, generator=_generator(12))
    edge = torch.randn(4, choice.shape[0])
    blended = blend_relations(choice, edge_bias=edge)
    torch.testing.assert_close(blended["bias"], torch.where((choice & EDGE) != 0, edge, 0.0))


def test_blend_rejects_bad_arguments():
    spd, table, edge, geometry = _biases()
    choice = torch.ones(spd.shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match="spd_bias"):
        blend_relations(choice, spd_bias=edge, spd_index=spd, spd_table=table)
    with pytest.raises(ValueError, match="spd_table"):
        blend_relations(choice, spd_index=spd)
    with pytest.raises(ValueError, match="edge_bias"):
        blend_relations(choice, edge_bias=edge[:, :, :4])
    with pytest.raises(TypeError, match="choice"):
        blend_relations(choice.float())
    with pytest.raises(TypeError, match="spd_index: expected dtype"):
        blend_relations(choice, spd_index=spd.float(), spd_table=table)
    # Each of these used to pass: bits outside 0..7 (int8 -1 turned every channel on, 8 none), a non-square
    # choice, integer channels (an integer bias), channels with different H (broadcast by the sum), a table
    # elsewhere than the ids.
    for bits in (torch.full(spd.shape, 8, dtype=torch.uint8), torch.full(spd.shape, -1, dtype=torch.int8)):
        with pytest.raises(ValueError, match=r"choice: expected channel bits in \[0, 7\].*got values from"):
            blend_relations(bits, edge_bias=edge)
    with pytest.raises(ValueError, match=r"choice: expected \(B, N, N\) or \(P,\)"):
        blend_relations(choice[:, :, :4], edge_bias=edge[..., :4])
    with pytest.raises(TypeError, match="edge_bias: expected dtype"):
        blend_relations(choice, edge_bias=edge.long())
    with pytest.raises(ValueError, match="geometry_bias: expected H = 3 heads, as edge_bias has; got 1"):
        blend_relations(choice, edge_bias=edge, geometry_bias=geometry[:, :1])
    with pytest.raises(ValueError, match="spd_table: expected H = 3 heads, as edge_bias has; got 2"):
        blend_relations(choice, edge_bias=edge, spd_index=spd, spd_table=table[:, :2])
    with pytest.raises(TypeError, match="spd_table: expected dtype"):
        blend_relations(choice, spd_index=spd, spd_table=table.long())
    with pytest.raises(ValueError, match="spd_table: expected a tensor on cpu like choice; got meta"):
        blend_relations(choice, spd_index=spd, spd_table=table.to("meta"))
    # Checked before narrowing to int16: 65538 would wrap to row 2, and 6 (= R) would be the unchosen row.
    for bad in (65538, 6, -1):
        wrong = spd.clone()
        wrong[1, 2, 3] = bad
        with pytest.raises(ValueError, match=rf"spd_index: expected ids in \[0, 6\).*got ids from"):
            blend_relations(choice, spd_index=wrong, spd_table=table)
        # Where the SPD channel is not chosen, the id is never read.
        unchosen = choice.clone()
        unchosen[1, 2, 3] = EDGE
        blend_relations(unchosen, spd_index=wrong, spd_table=table)


def test_relation_blender_draws_in_training_and_uses_every_channel_in_eval():
    from pyblend.nn import RelationBlender

    mask = _mask([6, 4], atoms=6)
    has_geometry = torch.tensor([True, False])
    blender = RelationBlender(mode="pair")
    drawn = blender(mask, has_geometry=has_geometry, generator=_generator(13))
    assert torch.equal(drawn, sample_blend(mask, has_geometry=has_geometry, generator=_generator(13)))
    blender.eval()
    every = blender(mask, has_geometry=has_geometry)
    assert (every[0] == (SPD | EDGE | GEOMETRY)).all()
    assert (every[1, :4, :4] == (SPD | EDGE)).all() and (every[1, 4:] == 0).all() and (every[1, :, 4:] == 0).all()
    cu_seqlens, max_seqlen = cu_seqlens_from_mask(mask)
    packed = blender(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, has_geometry=has_geometry)
    assert torch.equal(packed, pack_pairs(every, mask))
    with pytest.raises(ValueError, match="probs"):
        RelationBlender(probs=(1, 1))
    # A string was read digit by digit ("123" as 1, 2, 3) and bools as 0/1.
    for probs in ("123", (True, False, False), None):
        with pytest.raises(TypeError, match=r"probs: expected three numbers \(a tuple, list or tensor\)"):
            RelationBlender(probs=probs)
    with pytest.raises(ValueError, match=r"max_seqlen: the padded layout's width is mask.shape\[1\] = 6; got 7"):
        blender(mask, max_seqlen=7)  # was ignored, while pairs= is refused there
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or None; got 1"):
        blender.eval()(mask, generator=1)  # nothing is drawn in eval mode, and the seed was ignored
    with pytest.raises(TypeError, match="symmetric: expected a bool; got 'no'"):
        RelationBlender(symmetric="no")


@pytest.mark.parametrize("mode", ["pair", "batch", "molecule"])
def test_relation_blender_draws_in_one_compiled_graph(mode):
    """Training draws trace whole (fullgraph): probs are checked on Python floats and the no-2D-outcome check is
    skipped while compiling (both read tensors on the host, breaking the graph at every call)."""
    from pyblend.nn import RelationBlender

    torch._dynamo.reset()
    mask, has_geometry = _mask([5, 3]), torch.tensor([True, False])
    drawn = torch.compile(RelationBlender(mode=mode), fullgraph=True)(mask, has_geometry=has_geometry)
    real = mask[:, :, None] & mask[:, None, :]
    assert ((drawn != 0) == real).all()
    assert not (drawn[1] & GEOMETRY).any()
