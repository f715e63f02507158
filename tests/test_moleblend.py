"""The MoleBlend encoder, its pretraining objective and fine-tuning head on real molecules (CPU reference path)."""
import dataclasses
import math

import pytest
import torch

pytest.importorskip("rdkit", reason="MoleBlend is tested on featurized molecules (RDKit)")

from pyblend import collate, featurize_many  # noqa: E402
from pyblend.models import MoleBlend, MoleBlendConfig, MoleBlendPredictor  # noqa: E402

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C1CC1C(=O)O", "[Na+].[Cl-]", "C"]


def _config(**overrides):
    settings = dict(layers=2, dim=32, heads=4, ffn_dim=48, num_kernels=8, head_width=4, max_distance=8,
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, droppath=0.0)
    settings.update(overrides)
    return MoleBlendConfig(**settings)


@pytest.fixture(scope="module")
def graphs():
    graphs, _ = featurize_many(SMILES, conformer=True, progress=False)
    return graphs


@pytest.fixture(scope="module")
def graphs_2d():
    graphs, _ = featurize_many(SMILES, progress=False)
    return graphs


def _model(**overrides):
    torch.manual_seed(0)
    return MoleBlend(_config(**overrides))


def test_defaults_are_the_papers_base_model():
    config = MoleBlendConfig()
    assert (config.layers, config.dim, config.heads, config.blend_probs) == (12, 768, 32, (0.2, 0.2, 0.6))
    assert config.loss_weights == {"geometry": 0.5, "spd": 0.1, "edge": 0.1, "denoise": 6.0}
    # The public pretraining run's rates (pretrain-moleblend.sh: --dropout 0.0, the architecture's 0.1 overridden).
    assert (config.dropout, config.attention_dropout, config.activation_dropout, config.droppath) == \
        (0.0, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="divisible"):
        MoleBlendConfig(dim=30, heads=4)
    # Sizes are checked when the config is made (heads = 0 was a ZeroDivisionError, max_distance = -1 an
    # embedding error at the first forward).
    for name, value, expected in [("heads", 0, "a positive int"), ("layers", 2.0, "a positive int"),
                                  ("max_distance", -1, "an int >= 0"), ("max_degree", -1, "an int >= 0")]:
        with pytest.raises(ValueError, match=f"{name}: expected {expected}; got {value!r}"):
            MoleBlendConfig(**{name: value})
    # Naming some loss weights keeps the others' defaults (the unnamed parts were weighted 0).
    assert MoleBlendConfig(loss_weights={"spd": 1.0}).loss_weights == {"geometry": 0.5, "spd": 1.0, "edge": 0.1,
                                                                       "denoise": 6.0}
    for weights, expected in [({"spd": float("nan")}, r"loss_weights\['spd'\]: expected a finite number"),
                              ({"edge": "0.1"}, r"loss_weights\['edge'\]: expected a finite number"),
                              ({"angle": 1.0}, r"unknown parts \['angle'\]")]:
        with pytest.raises(ValueError, match=expected):
            MoleBlendConfig(loss_weights=weights)


def test_spd_targets_merge_the_distances_from_the_last_class_on():
    """Class s - 1 for SPD s, SPD >= 11 in the last of 11 classes (the public code's); diagonal, unreachable and
    padding ignored. A path of 14 atoms has every distance from 0 to 13."""
    from pyblend.models.moleblend import spd_targets

    spd = torch.tensor([0, 1, 2, 10, 11, 12, 13, -1])
    assert spd_targets(spd, 11).tolist() == [-100, 0, 1, 9, 10, 10, 10, -100]
    graph, _ = featurize_many(["C" * 14], progress=False)
    relations = _model().build_relations(collate(graph))
    targets = spd_targets(relations.spd, 11)[0]
    assert targets.diagonal().eq(-100).all()
    assert targets[0].tolist() == [-100, *range(10), 10, 10, 10]


def test_edge_targets_are_the_joint_bond_class_of_every_hop():
    """(type * 3 + stereo) * 2 + conjugated over 4 x 3 x 2 = 24 classes; hops past the path's end and bonds with
    a feature outside those classes (the "other" bond type, STEREOCIS...) are ignored."""
    from pyblend.models.moleblend import edge_targets

    bonds = torch.tensor([[0, 0, 0], [1, 2, 1], [3, 0, 1], [4, 0, 0], [1, 3, 0]])
    routes = torch.tensor([[0, 1, 2, 3, 4], [1, -1, -1, -1, -1], [-1, -1, -1, -1, -1]])
    assert edge_targets(routes, bonds, (4, 3, 2)).tolist() == [[0, 11, 19, -100, -100], [11, -100, -100, -100, -100],
                                                               [-100] * 5]
    assert edge_targets(routes, bonds, (5, 6, 2)).tolist()[0] == [0, 17, 37, 48, 18]
    assert edge_targets(torch.full((2, 5), -1), bonds[:0], (4, 3, 2)).eq(-100).all(), "no bond in the batch"
    assert MoleBlend(_config()).edge_head.out.out_features == 5 * 24
    for classes in [(4, 3), (6, 3, 2), (4, 0, 2), (4.0, 3, 2)]:
        with pytest.raises(ValueError, match="edge_classes: expected 3 ints"):
            _config(edge_classes=classes)
    # The ethanol C-O bond: single, no stereo, not conjugated: class 0 at hop 0 of pair (C1, O).
    graph, _ = featurize_many(["CCO"], progress=False)
    relations = _model().build_relations(collate(graph))
    targets = edge_targets(relations.routes, relations.bond_features, (4, 3, 2))
    assert targets[0, 0, 2].tolist() == [0, 0, -100, -100, -100]


def test_droppath_drops_whole_molecules_at_rates_rising_over_the_layers(graphs):
    """Stochastic depth: layer rates 0 ... droppath (Graphormer's linear spacing); in training a branch is kept
    or dropped for a whole molecule (padded: its row; packed: every token of its span), kept ones scaled by
    1 / (1 - p); eval mode and p = 0 leave it alone."""
    from pyblend.layout import atom_molecules
    from pyblend.models.moleblend import EncoderLayer

    assert MoleBlendConfig().droppath == 0.1
    assert [layer.droppath for layer in MoleBlend(_config(layers=3, droppath=0.2)).layers] == [0.0, 0.1, 0.2]
    assert MoleBlend(_config(layers=1, droppath=0.2)).layers[0].droppath == 0.0
    for value in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="droppath: expected a probability in \\[0, 1\\)"):
            _config(droppath=value)
    layer = EncoderLayer(_config(), droppath=0.25).train()
    torch.manual_seed(0)
    padded = layer._residual_dropout(torch.ones(4000, 3, 2), 4000, None)
    per_molecule = padded.flatten(1)
    assert (per_molecule == per_molecule[:, :1]).all(), "one draw per molecule"
    assert per_molecule[:, 0].unique().tolist() == [0.0, pytest.approx(4 / 3)]
    assert (per_molecule[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    cu_seqlens = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    for seed in range(20):
        torch.manual_seed(seed)
        packed = layer._residual_dropout(torch.ones(9, 2), 3, atom_molecules(cu_seqlens, 9))[:, 0]
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            assert (packed[start:end] == packed[start]).all()
    # Packed, the layer makes the row -> molecule map itself when it is not given: the same draws.
    tokens = torch.randn(9, 32)
    outputs = []
    for given in (atom_molecules(cu_seqlens, 9), None):
        torch.manual_seed(5)
        outputs.append(layer(tokens, cu_seqlens=cu_seqlens, max_seqlen=5, row_molecules=given))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert layer.eval()._residual_dropout(torch.ones(3, 2, 2), 3, None).eq(1).all()
    # Drop-path replaces the residual dropout (Graphormer's layer); a layer without drop-path applies dropout.
    x = torch.randn(3, 5, 32)
    for droppath, dropped in ((1e-12, False), (0.0, True)):
        layer = EncoderLayer(_config(dropout=0.9), droppath=droppath)
        evaluated = layer.eval()(x)
        torch.manual_seed(0)
        trained = layer.train()(x)
        assert torch.equal(trained, evaluated) != dropped, droppath
    # In a training step it draws from torch's generator: with the blend fixed, two steps differ (both layouts).
    model = _model(droppath=0.9).train()
    for layout in ("padded", "packed"):
        batch = collate(graphs, layout=layout)
        torch.manual_seed(1)
        first, _ = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(3))
        second, _ = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(3))
        assert first.item() != second.item()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_molecule_mode_keeps_each_modality_out_of_the_other(graphs, layout):
    """blend_mode="molecule" (Transformer-M's modes) in training: a molecule drawn 2D-only sees nothing of its
    positions (no 3D bias, no 3D atom feature: the feature once leaked them), one drawn 3D-only nothing of its
    bonds (no SPD, edge or degree embedding)."""
    import copy

    def encoded(model, relations):
        return model._encode(relations, torch.Generator().manual_seed(0))[0]

    model = _model(blend_mode="molecule", blend_probs=(1.0, 0.0, 0.0)).train()
    relations = model.build_relations(collate(graphs, layout=layout))
    moved = copy.copy(relations)
    moved.positions = relations.positions * 1.7
    torch.testing.assert_close(encoded(model, moved), encoded(model, relations), rtol=0, atol=0)

    model = _model(blend_mode="molecule", blend_probs=(0.0, 1.0, 0.0)).train()
    relations = model.build_relations(collate(graphs, layout=layout))
    before = encoded(model, relations)
    with torch.no_grad():
        for table in (model.degree_encoder, model.edge_encoder, model.edge_dis_encoder):
            table.weight.normal_()
    torch.testing.assert_close(encoded(model, relations), before, rtol=0, atol=0)
    # In eval every molecule keeps every atom feature it has.
    before = encoded(model.eval(), relations)
    with torch.no_grad():
        model.degree_encoder.weight.normal_()
    assert not torch.equal(encoded(model, relations), before)


def test_geometry_loss_averages_molecules_as_the_public_code(graphs):
    """The 3D head's loss is the mean over molecules of each one's mean over its pairs by default (the public
    compute_3d_blending_loss), the mean over all pairs with geometry_reduction="pairs"; the rest is unchanged."""
    assert MoleBlendConfig().geometry_reduction == "molecules"
    with pytest.raises(ValueError, match="geometry_reduction: expected 'molecules' or 'pairs'; got 'mean'"):
        _config(geometry_reduction="mean")
    batch = collate(graphs)
    noise = torch.zeros_like(batch.positions)
    parts = {}
    for reduction in ("molecules", "pairs"):
        model = _model(geometry_reduction=reduction).eval()
        parts[reduction] = model.pretrain_loss(batch, noise=noise)[1]
    assert parts["molecules"]["geometry"].item() != pytest.approx(parts["pairs"]["geometry"].item(), rel=1e-3)
    for name in ("spd", "edge", "denoise"):
        assert parts["molecules"][name].item() == parts["pairs"][name].item()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_atom_feature_blend_draws_the_degree_or_the_3d_feature_per_atom(graphs, graphs_2d, layout):
    """atom_feature_blend (the public code's blend_atom_feature): in training each atom takes the degree embedding
    or the 3D atom feature, never both: (1, 0) gives the embeddings without the 3D feature, (0, 1) without the
    degree, (0.4, 0.6) about 60% of the atoms with the 3D feature; an atom without a conformer keeps its degree.
    Eval is unaffected."""
    import copy

    def embeddings(model, relations, seed=0):
        return model.layer_inputs(relations, torch.Generator().manual_seed(seed))[0]

    for blend, silenced in (((1.0, 0.0), "atom_3d_proj"), ((0.0, 1.0), "degree_encoder")):
        model = _model(atom_feature_blend=blend).train()
        relations = model.build_relations(collate(graphs, layout=layout))
        plain = copy.deepcopy(model)
        plain.config = dataclasses.replace(plain.config, atom_feature_blend=None)
        with torch.no_grad():
            for parameter in getattr(plain, silenced).parameters():
                parameter.zero_()
        torch.testing.assert_close(embeddings(model, relations), embeddings(plain, relations), rtol=0, atol=0)
        unblended = copy.deepcopy(model)
        unblended.config = dataclasses.replace(unblended.config, atom_feature_blend=None)
        torch.testing.assert_close(embeddings(model.eval(), relations), embeddings(unblended.eval(), relations),
                                   rtol=0, atol=0)

    model = _model(atom_feature_blend=(0.4, 0.6)).train()
    many = collate(graphs * 40, layout=layout)
    relations = model.build_relations(many)
    atoms = torch.Size([many.atom_features.shape[0]]) if layout == "packed" else many.mask.shape
    choice = model.blender(**({"cu_seqlens": many.cu_seqlens, "max_seqlen": many.max_seqlen,
                               "pairs": relations.spd.shape[0]} if layout == "packed" else {"mask": many.mask}),
                           has_geometry=relations.has_geometry)
    with_degree, with_3d = model._atom_features(choice, relations, torch.Generator().manual_seed(0))
    real = torch.ones(atoms, dtype=torch.bool) if layout == "packed" else many.mask
    assert (with_degree ^ with_3d)[real].all(), "one feature per atom"
    assert with_3d[real].float().mean().item() == pytest.approx(0.6, abs=0.05)
    no_conformer = _model(atom_feature_blend=(0.0, 1.0)).train()
    relations_2d = no_conformer.build_relations(collate(graphs_2d, layout=layout))
    choice = torch.zeros(relations_2d.spd.shape, dtype=torch.uint8)
    with_degree, with_3d = no_conformer._atom_features(choice, relations_2d, None)
    assert with_degree.all() and not with_3d.any()
    for blend in ((0.5,), (-0.1, 1.0), (0.0, 0.0), (True, 1.0)):
        with pytest.raises(ValueError, match="atom_feature_blend: expected None or two non-negative numbers"):
            _config(atom_feature_blend=blend)
    with pytest.raises(ValueError, match="blend_mode='molecule' already chooses"):
        _config(atom_feature_blend=(0.4, 0.6), blend_mode="molecule")
    # Atoms drawing the 3D feature lost their degree embedding and got nothing in its place.
    with pytest.raises(ValueError, match="atom_3d_feature=False turns the latter off"):
        _config(atom_feature_blend=(0.4, 0.6), atom_3d_feature=False)


def test_atom_feature_blend_draws_the_same_atoms_padded_and_packed(graphs, graphs_2d):
    """The per-atom draw was (B, N) uniforms padded but (T,) packed, so one generator seed chose other atoms in
    every molecule after the first. Drawn as padded (B, N) uniforms in both layouts (as the relation blend draws its
    (B, N, N) ones), a padded batch and its packed twin get the same training forward and loss from one seed."""
    model = _model(atom_feature_blend=(0.4, 0.6)).train()
    chosen = _mixed(graphs, graphs_2d)
    padded, packed = collate(chosen), collate(chosen, layout="packed")
    real = torch.nn.functional.pad(padded.mask, (1, 0), value=True)
    noise, packed_noise = _packed_noise(padded)
    for seed in range(3):
        out = model(padded, generator=torch.Generator().manual_seed(seed))
        packed_out = model(packed, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(packed_out[real], out[real], rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
        _, parts = model.pretrain_loss(padded, generator=torch.Generator().manual_seed(seed), noise=noise)
        _, packed_parts = model.pretrain_loss(packed, generator=torch.Generator().manual_seed(seed),
                                              noise=packed_noise)
        for name in parts:
            torch.testing.assert_close(packed_parts[name], parts[name], rtol=1e-5, atol=1e-6,
                                       msg=f"seed {seed}: {name}")


def test_encoder_shapes_and_packed_equals_padded_in_eval(graphs):
    model = _model().eval()
    padded = collate(graphs)
    out = model(padded)
    assert out.shape == (len(graphs), 1 + padded.max_seqlen, 32)
    assert torch.isfinite(out[:, 0]).all()
    packed_out = model(collate(graphs, layout="packed"))
    real = torch.nn.functional.pad(padded.mask, (1, 0), value=True)
    torch.testing.assert_close(packed_out[real], out[real], rtol=1e-5, atol=1e-5)
    # Rows past a molecule's end are 0 in both layouts (the padded ones were LayerNorm output of nothing).
    assert not real.all() and (out[~real] == 0).all() and (packed_out[~real] == 0).all()


def test_pretrain_loss_parts_are_finite_and_every_parameter_gets_a_gradient(graphs):
    model = _model().train()
    loss, parts = model.pretrain_loss(collate(graphs), generator=torch.Generator().manual_seed(1))
    assert set(parts) == {"spd", "edge", "geometry", "denoise"}
    assert all(torch.isfinite(value) and value > 0 for value in parts.values()), parts
    expected = 0.5 * parts["geometry"] + 0.1 * parts["spd"] + 0.1 * parts["edge"] + 6.0 * parts["denoise"]
    torch.testing.assert_close(loss, expected)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_blend_and_noise_are_reproducible_with_a_generator(graphs):
    model = _model().train()
    batch = collate(graphs)
    first, _ = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(3))
    again, _ = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(3))
    other, _ = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(4))
    assert first.item() == again.item() and first.item() != other.item()


def test_2d_only_batches_and_molecules_without_conformer(graphs, graphs_2d):
    model = _model().train()
    loss, parts = model.pretrain_loss(collate(graphs_2d), generator=torch.Generator().manual_seed(5))
    assert parts["geometry"] == 0 and parts["denoise"] == 0 and torch.isfinite(loss)
    mixed = collate([graphs[0], graphs_2d[1], graphs[2]])
    assert mixed.has_positions.tolist() == [True, False, True]
    loss, parts = model.pretrain_loss(mixed, generator=torch.Generator().manual_seed(6))
    assert torch.isfinite(loss) and parts["geometry"] > 0
    model.eval()
    out = model(mixed)
    assert torch.isfinite(out).all()


def test_the_3d_channel_reaches_the_output_only_with_positions(graphs):
    model = _model().eval()
    batch = collate(graphs[:3])
    shifted = batch.positions.clone()
    shifted[0, 1] += 0.5  # move one atom of the first molecule
    base, moved = model(batch), model(batch, positions=shifted)
    assert not torch.allclose(base[0], moved[0])
    torch.testing.assert_close(base[1:], moved[1:])  # other molecules are unaffected


def test_pre_layernorm_variant_runs(graphs):
    model = _model(pre_layernorm=True).train()
    loss, _ = model.pretrain_loss(collate(graphs[:3]), generator=torch.Generator().manual_seed(7))
    loss.backward()
    assert torch.isfinite(loss)


def test_pretraining_steps_reduce_the_loss(graphs):
    """The same blend and noise every step: the objective's gradient must drive it down (overfitting one batch).
    20 steps: with the salt's ions 3 A apart (they once coincided) the first 10 steps take the loss from 5.9 to
    4.5, 17% on the means of three."""
    model = _model().train()
    batch = collate(graphs)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_predictor_reads_the_virtual_token_and_ignores_missing_labels(graphs_2d):
    labels = [[1.0, float("nan")], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [float("nan"), 0.0]]
    graphs, _ = featurize_many(SMILES, labels=labels, progress=False)
    model = MoleBlendPredictor(_model(), outputs=2)
    batch = collate(graphs)
    assert model(batch).shape == (len(graphs), 2)
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad is not None
    with pytest.raises(ValueError, match="labels"):
        model.loss(collate(graphs_2d))
    with pytest.raises(ValueError, match="task"):
        MoleBlendPredictor(_model(), outputs=1, task="ranking")


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_predictor_loss_is_the_mean_over_known_labels_and_zero_without_any(task):
    labels = [[1.0, float("nan")], [float("nan"), 0.0], [0.0, 1.0]]
    model = MoleBlendPredictor(_model(layers=1), outputs=2, task=task)
    batch = collate(featurize_many(SMILES[:3], labels=labels, progress=False)[0])
    out, known = model(batch), ~torch.isnan(batch.labels)
    reference = torch.nn.functional.binary_cross_entropy_with_logits if task == "classification" else \
        torch.nn.functional.mse_loss
    torch.testing.assert_close(model.loss(batch), reference(out[known], batch.labels[known]))
    none = collate(featurize_many(SMILES[:2], labels=[[float("nan")] * 2] * 2, progress=False)[0])
    with pytest.raises(ValueError, match=r"labels of shape \(3, 2\) do not match this head's outputs \(3, 1\)"):
        MoleBlendPredictor(_model(layers=1), outputs=1, task=task).loss(batch)
    loss = model.loss(none)  # the empty mean was NaN
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_batches_without_any_bond_pretrain(layout):
    """Ions and single atoms only (E = 0): the edge head has no target (its lookup once indexed an empty table)."""
    model = _model(layers=1)
    batch = collate(featurize_many(["[Na+].[Cl-]", "C"], conformer=True, progress=False)[0], layout=layout)
    loss, parts = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and parts["edge"].item() == 0.0


def test_padded_position_override_is_checked_and_noise_may_be_any_float_dtype(graphs):
    model = _model(layers=1).eval()
    padded = collate(graphs[:3])
    for wrong in (padded.positions[0], padded.positions[:1], padded.positions[:, :-1]):
        with pytest.raises(ValueError, match=r"positions: expected padded \(B, N, 3\)"):
            model(padded, positions=wrong)  # (N, 3) and (1, N, 3) once broadcast molecule 0's to every molecule
    noise = torch.randn(padded.positions.shape, generator=torch.Generator().manual_seed(1))
    single, double = (model.pretrain_loss(padded, noise=noise.to(dtype))[0] for dtype in (torch.float32,
                                                                                          torch.float64))
    torch.testing.assert_close(single, double.float())


def test_features_outside_the_vocabulary_read_its_other_row(graphs_2d):
    """A hand-built batch with atomic number index 119 or bond type 5: the vocabulary's last ("other") row, as
    featurization maps such values, not the first row of the next feature."""
    from pyblend.features import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS

    model = _model(layers=1).eval()
    batch = collate(graphs_2d[:2])
    outside, other = collate(graphs_2d[:2]), collate(graphs_2d[:2])
    outside.atom_features[0, 0, 0], other.atom_features[0, 0, 0] = ATOM_FEATURE_DIMS[0] + 1, ATOM_FEATURE_DIMS[0] - 1
    outside.bond_features[0, 0, 0], other.bond_features[0, 0, 0] = BOND_FEATURE_DIMS[0], BOND_FEATURE_DIMS[0] - 1
    torch.testing.assert_close(model(outside), model(other))
    assert not torch.allclose(model(batch), model(other))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_atomic_numbers_outside_the_vocabulary_read_its_other_row_in_3d_too(graphs, layout):
    """The 3D channel's pair types follow the embeddings' rule: an atomic-number id outside the vocabulary is its
    "other" id (it raised "pair_types: expected ids in [0, 238)", an argument the caller never gave)."""
    from pyblend.features import ATOM_FEATURE_DIMS

    model = _model(layers=1).eval()
    outside, other = collate(graphs[:2], layout=layout), collate(graphs[:2], layout=layout)
    for value, batch in ((10_000, outside), (ATOM_FEATURE_DIMS[0] - 1, other)):
        batch.atom_features[(0, 0) if layout == "packed" else (0, 0, 0)] = value  # atom 0's atomic number
    assert outside.positions is not None
    torch.testing.assert_close(model(outside), model(other))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_nan_coordinates_of_a_conformer_are_named(graphs, layout):
    """A NaN or inf coordinate of a molecule with a conformer made every part of the loss NaN (the 2D ones too);
    it is named, unless value checks are off, and so is a NaN in a given ``noise``. NaN positions of a molecule
    without a conformer are its normal state."""
    import dataclasses

    import pyblend

    model = _model(layers=1)
    batch = collate(graphs[:3], layout=layout)
    for value in (float("nan"), float("inf")):
        positions = batch.positions.clone()
        positions[(1, 0) if layout == "padded" else (batch.cu_seqlens[1].item(), 0)] = value
        poisoned = dataclasses.replace(batch, positions=positions)
        with pytest.raises(ValueError, match="positions: molecule 1 has a conformer .* but NaN or inf coordinates"):
            model.pretrain_loss(poisoned)
        with pyblend.set_value_checks(False):
            assert torch.isnan(model.pretrain_loss(poisoned)[0])
        no_conformer = dataclasses.replace(poisoned, has_positions=torch.tensor([True, False, True]))
        assert torch.isfinite(model.pretrain_loss(no_conformer)[0])
    noise = torch.zeros(batch.positions.shape)
    noise[(1, 0) if layout == "padded" else (batch.cu_seqlens[1].item(), 0)] = float("nan")
    with pytest.raises(ValueError, match="noise: expected finite values at the atoms of molecules with a conformer"):
        model.pretrain_loss(batch, noise=noise)
    with pytest.raises(ValueError, match="batch: expected layout 'padded' or 'packed'; got 'bogus'"):
        model.pretrain_loss(dataclasses.replace(batch, layout="bogus"))
    with pytest.raises(TypeError, match="batch: expected a pyblend MolBatch .* got dict"):
        model.pretrain_loss({"layout": layout})


def test_config_refuses_values_it_used_to_take():
    """Truthy stand-ins built the other model ("no" made a pre-LN one); out-of-range dropouts failed in torch
    naming another argument or none; a NaN or negative noise_scale, a None or list loss_weights and negative
    weights were taken."""
    for name in ("pre_layernorm", "embedding_layernorm", "atom_3d_feature"):
        with pytest.raises(TypeError, match=f"{name}: expected a bool; got 'no'"):
            _config(**{name: "no"})
    for name in ("dropout", "attention_dropout", "activation_dropout"):
        for value in (-0.1, 1.0, float("nan"), "0.1"):
            with pytest.raises(ValueError, match=rf"{name}: expected a probability in \[0, 1\)"):
                _config(**{name: value})
    for value in (float("nan"), -1.0, "x"):
        with pytest.raises(ValueError, match="noise_scale: expected a finite float >= 0"):
            _config(noise_scale=value)
    for value in (None, [("spd", 1.0)]):
        with pytest.raises(TypeError, match="loss_weights: expected a dict of part -> weight"):
            _config(loss_weights=value)
    with pytest.raises(ValueError, match=r"loss_weights\['spd'\]: expected a finite number >= 0; got -1"):
        _config(loss_weights={"spd": -1})
    # Taken by the config, then refused by MoleBlend(config) naming the blender's probs / mode.
    with pytest.raises(ValueError, match=r"blend_probs: expected three finite non-negative numbers"):
        _config(blend_probs=(1, 1))
    with pytest.raises(ValueError, match=r"blend_mode: expected one of \('pair', 'batch', 'molecule'\); got 'atom'"):
        _config(blend_mode="atom")
    with pytest.raises(TypeError, match=r"config: expected a MoleBlendConfig or None .*; got dict"):
        MoleBlend({"layers": 1})


def test_predictor_fine_tunes_without_the_blend_unless_asked(graphs_2d):
    """In train() mode the encoder's blender kept drawing channels per pair (SPD or edge, never both on 2D data):
    the public fine-tuning runs without blending. Dropout is off here, so train and eval agree exactly. (Two
    layers: the virtual token's row after one reads only the atoms' embeddings, which no blend changes.)"""
    batch = collate(graphs_2d)
    predictor = MoleBlendPredictor(_model(), outputs=1).train()
    assert predictor.training and not predictor.encoder.blender.training
    first, second = predictor(batch), predictor(batch)
    assert torch.equal(first, second) and torch.equal(first, predictor.eval()(batch))
    blending = MoleBlendPredictor(_model(), outputs=1, blend=True).train()
    assert blending.encoder.blender.training
    assert not torch.equal(blending(batch), blending(batch))
    with pytest.raises(TypeError, match="blend: expected a bool"):
        MoleBlendPredictor(_model(layers=1), outputs=1, blend="no")


def test_predictor_refuses_bad_heads_and_labels(graphs_2d):
    """outputs=0 made a head whose loss was always 0; labels of 2 or -1 went into binary cross-entropy and an inf
    label made the loss inf, all without a word."""
    with pytest.raises(ValueError, match="outputs: expected a positive int"):
        MoleBlendPredictor(_model(layers=1), outputs=0)
    with pytest.raises(TypeError, match="encoder: expected a pyblend MoleBlend; got NoneType"):
        MoleBlendPredictor(None, outputs=1)
    for task, labels, message in (("classification", [[2.0], [0.0]], r"labels in \[0, 1\].*from 0 to 2"),
                                  ("classification", [[-1.0], [float("nan")]], r"labels in \[0, 1\].*from -1 to -1"),
                                  ("regression", [[float("inf")], [0.5]], "finite labels")):
        # featurize_many refuses an infinite label itself: set on the batch, the predictor must refuse it too.
        finite = [[0.0 if math.isinf(row[0]) else row[0]] for row in labels]
        batch = collate(featurize_many(SMILES[:2], labels=finite, progress=False)[0])
        batch.labels = torch.tensor(labels, dtype=torch.float32)
        with pytest.raises(ValueError, match=message):
            MoleBlendPredictor(_model(layers=1), outputs=1, task=task).loss(batch)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_batch_fields_of_the_wrong_dtype_are_named(graphs, layout):
    """Float atom features failed in torch's embedding ("Expected tensor for argument #1 'indices'"), naming
    neither the batch nor the field; integer positions were taken."""
    import dataclasses

    model = _model(layers=1)
    batch = collate(graphs, layout=layout)
    with pytest.raises(TypeError, match="batch.atom_features: expected dtype int8.*got torch.float32"):
        model(dataclasses.replace(batch, atom_features=batch.atom_features.float()))
    with pytest.raises(TypeError, match="positions: expected dtype float16.*got torch.int64"):
        model(batch, positions=batch.positions.nan_to_num().long())


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_one_atom_molecules_are_not_scored_by_the_denoising_loss(graphs, layout):
    """A one-atom molecule with a conformer has no neighbour direction: its predicted noise is exactly 0, where
    the cosine's gradient is ~1/eps (a gradient norm of 1e8 at the first step, which clipping turned into a step
    that trained nothing). It is left out, as in the public criterion: the loss and its gradients are those of the
    batch without it."""
    model = _model(layers=1).double().eval()  # float64: the two batches' sums differ only in rounding
    ethanol, methane = graphs[0], graphs[5]
    assert methane.num_atoms == 1

    def denoise(molecules):
        batch = collate(molecules, layout=layout)
        relations = model.build_relations(batch)
        noise = torch.zeros(relations.positions.shape, dtype=relations.positions.dtype)
        rows = (slice(0, ethanol.num_atoms),) if layout == "packed" else (0, slice(0, ethanol.num_atoms))
        noise[rows] = torch.randn(ethanol.num_atoms, 3, generator=torch.Generator().manual_seed(3),
                                  dtype=noise.dtype) * 0.2
        part = model.relation_loss(relations, noise=noise)[1]["denoise"]
        return part, torch.autograd.grad(part, list(model.atom_proc.parameters()))

    alone, alone_grads = denoise([ethanol])
    both, both_grads = denoise([ethanol, methane])
    torch.testing.assert_close(both, alone)
    for got, want in zip(both_grads, alone_grads):
        torch.testing.assert_close(got, want)


def test_denoising_scores_only_atoms_that_drew_the_3d_feature(graphs):
    """With atom_feature_blend the public criterion scores the noise only at atoms that took the 3D atom feature;
    every atom of a molecule with a conformer was scored. Drawing the degree embedding everywhere leaves none."""
    model = _model(layers=1, atom_feature_blend=(1.0, 0.0)).train()
    loss, parts = model.pretrain_loss(collate(graphs[:4]), generator=torch.Generator().manual_seed(0))
    assert parts["denoise"].item() == 0.0
    assert _model(layers=1, atom_feature_blend=(0.0, 1.0)).train().pretrain_loss(
        collate(graphs[:4]), generator=torch.Generator().manual_seed(0))[1]["denoise"].item() > 0


def test_transformer_m_converter_refuses_another_head_count_and_leaves_extra_layers_out():
    """A checkpoint of other heads passed the dim x dim layer shapes and misread the H x H edge matrices (or
    failed in a concatenation naming nothing); its layers past config.layers went into the result, unwarned."""
    from pyblend.models import convert_transformer_m_state_dict

    state = _transformer_m_state(_config(layers=1), torch.Generator().manual_seed(0))
    for heads in (2, 8):
        with pytest.raises(ValueError, match=rf"config: heads = {heads}; the checkpoint's .*spatial_pos_encoder has "
                                             rf"shape \(512, 4\) \(one column per head\)"):
            convert_transformer_m_state_dict(state, _config(layers=1, heads=heads))
    short = dict(state)
    short["encoder.molecule_encoder.molecule_attn_bias.edge_dis_encoder.weight"] = torch.zeros(79, 1)
    with pytest.raises(ValueError, match="config: max_hops x heads x heads = 5 x 4 x 4 rows .* which has 79"):
        convert_transformer_m_state_dict(short, _config(layers=1))
    state = _transformer_m_state(_config(layers=1), torch.Generator().manual_seed(0))
    extra = "encoder.molecule_encoder.layers.1.self_attn.q_proj.weight"
    state[extra] = torch.zeros(32, 32)
    with pytest.warns(UserWarning, match="layers.1.self_attn.q_proj.weight"):
        converted = convert_transformer_m_state_dict(state, _config(layers=1))
    assert "layers.1.self_attn.q_proj.weight" not in converted and "layers.0.self_attn.q_proj.weight" in converted
    for bad, message in (([], "state: expected a state_dict"), ({}, "config: expected a MoleBlendConfig")):
        with pytest.raises(TypeError, match=message):
            convert_transformer_m_state_dict(bad, {} if bad == {} else _config(layers=1))


def _transformer_m_state(config, generator):
    """A checkpoint laid out like Transformer-M's encoder (names and shapes of the public code), random values."""
    heads, dim, kernels = config.heads, config.dim, config.num_kernels
    shapes = {
        "atom_feature.atom_encoder.weight": (512 * 9 + 1, dim),
        "atom_feature.in_degree_encoder.weight": (512, dim),
        "atom_feature.out_degree_encoder.weight": (512, dim),
        "atom_feature.graph_token.weight": (1, dim),
        "molecule_attn_bias.edge_encoder.weight": (512 * 3 + 1, heads),
        "molecule_attn_bias.edge_dis_encoder.weight": (128 * heads * heads, 1),
        "molecule_attn_bias.spatial_pos_encoder.weight": (512, heads),
        "molecule_attn_bias.graph_token_virtual_distance.weight": (1, heads),
        "molecule_3d_bias.gbf.means.weight": (1, kernels),
        "molecule_3d_bias.gbf.stds.weight": (1, kernels),
        "molecule_3d_bias.gbf.mul.weight": (512 * 3, 1),
        "molecule_3d_bias.gbf.bias.weight": (512 * 3, 1),
        "molecule_3d_bias.gbf_proj.layer1.weight": (kernels, kernels),
        "molecule_3d_bias.gbf_proj.layer1.bias": (kernels,),
        "molecule_3d_bias.gbf_proj.layer2.weight": (heads, kernels),
        "molecule_3d_bias.gbf_proj.layer2.bias": (heads,),
        "molecule_3d_bias.edge_proj.weight": (dim, kernels),
        "molecule_3d_bias.edge_proj.bias": (dim,),
        "emb_layer_norm.weight": (dim,),
        "emb_layer_norm.bias": (dim,),
    }
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes[f"layers.0.self_attn.{name}.weight"] = (dim, dim)
        shapes[f"layers.0.self_attn.{name}.bias"] = (dim,)
    prefix = "encoder.molecule_encoder."
    return {prefix + name: torch.randn(shape, generator=generator, dtype=torch.float64).float()
            for name, shape in shapes.items()}


def test_transformer_m_converter_names_limits_the_checkpoint_cannot_meet():
    from pyblend.models import convert_transformer_m_state_dict

    state = _transformer_m_state(_config(layers=1), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="max_degree = 511 needs degree rows up to 512"):
        convert_transformer_m_state_dict(state, _config(layers=1, max_degree=511))  # was a bare IndexError
    with pytest.raises(ValueError, match="max_distance = 510: a Transformer-M SPD table holds distances up to 509"):
        convert_transformer_m_state_dict(state, _config(layers=1, max_distance=510))


def _their_ids(x, shifts):
    """Their data pipeline's embedding rows: ``convert_to_single_emb`` (``x + 1 + 512 f`` for feature f), then
    ``shifts`` more ``+ 1``s (``attn_edge_type``, the collator's ``pad_*_unsqueeze``), as in their
    wrapper.py / collator.py."""
    return x + 1 + 512 * torch.arange(x.shape[-1]) + shifts


def test_transformer_m_checkpoint_maps_onto_the_encoder(graphs_2d):
    """Loaded through the converter, the first layer sees Transformer-M's atom embeddings and attention bias
    (SPD + virtual distance + multi-hop edge encoding), computed here from their tables the way their code does:
    their ids are built by replaying their data pipeline's shifts, not from the converter's row formulas."""
    from pyblend.models import convert_transformer_m_state_dict
    from pyblend.reference import bias_from_relations

    config = _config(layers=1)
    model = MoleBlend(config).eval()
    state = _transformer_m_state(config, torch.Generator().manual_seed(0))
    converted = convert_transformer_m_state_dict(state, config)
    report = model.load_state_dict(converted, strict=False)
    assert not report.unexpected_keys
    loaded_prefixes = ("atom_encoder", "degree_encoder", "graph_token", "spatial_pos_encoder", "edge_encoder",
                       "edge_dis_encoder", "gaussian.", "atom_3d_proj", "layers.0.self_attn.")
    assert not [key for key in report.missing_keys if key.startswith(loaded_prefixes)], report.missing_keys

    theirs = {key.split("molecule_encoder.")[1]: value for key, value in state.items()}
    batch = collate(graphs_2d)
    relations = model.build_relations(batch)
    with torch.no_grad():
        x, attention, _ = model.layer_inputs(relations)
    mask, spd = relations.mask, relations.spd.long()

    # Atoms: x single-embedded, then pad_2d_unsqueeze; in- and out-degree rows through pad_1d_unsqueeze; the
    # embedding LayerNorm of the base model (encoder_normalize_before) over the graph token and the atoms.
    rows = _their_ids(relations.atom_features, shifts=1)
    degree = (spd == 1).sum(-1) + 1
    expected_x = (theirs["atom_feature.atom_encoder.weight"][rows].sum(-2)
                  + theirs["atom_feature.in_degree_encoder.weight"][degree]
                  + theirs["atom_feature.out_degree_encoder.weight"][degree])
    expected_x = torch.cat([theirs["atom_feature.graph_token.weight"].expand(len(batch), 1, -1), expected_x], 1)
    expected_x = torch.nn.functional.layer_norm(expected_x, (config.dim,), theirs["emb_layer_norm.weight"],
                                                theirs["emb_layer_norm.bias"])
    torch.testing.assert_close(x[:, 1:][mask], expected_x[:, 1:][mask])
    torch.testing.assert_close(x[:, 0], expected_x[:, 0])

    # Bias: spatial_pos rows spd + 1 (unreachable: 511), virtual distance on row 0 and column 0, and the
    # multi-hop edge term: mean over bond features of edge_encoder rows, hop k times its H x H matrix, summed over
    # the hops, divided by clamp(spd, 1, max_hops).
    heads, hops = config.heads, config.max_hops
    spatial = torch.where(spd < 0, 511, spd + 1)
    expected = theirs["molecule_attn_bias.spatial_pos_encoder.weight"][spatial].permute(0, 3, 1, 2)
    routes = relations.routes.long()
    # attn_edge_type = single-emb + 1; gen_edge_input copies it along the path (-1 past its end); pad_3d_unsqueeze
    # adds 1, so past the end is their padding id 0.
    hop_features = _their_ids(relations.bond_features[routes.clamp(min=0)], shifts=2)
    hop_features = torch.where(routes[..., None] >= 0, hop_features, 0)
    edge_table = theirs["molecule_attn_bias.edge_encoder.weight"].clone()
    edge_table[0] = 0  # padding_idx
    per_hop = edge_table[hop_features].mean(-2)                                       # (B, N, N, K, H)
    weights = theirs["molecule_attn_bias.edge_dis_encoder.weight"].view(-1, heads, heads)[:hops]
    edge = torch.einsum("bijkh,khg->bijg", per_hop, weights) / spd.clamp(1, hops)[..., None]
    expected = expected + edge.permute(0, 3, 1, 2)
    expected = torch.nn.functional.pad(expected, (1, 0, 1, 0))
    virtual = theirs["molecule_attn_bias.graph_token_virtual_distance.weight"].view(1, heads, 1)
    expected[:, :, 1:, 0] += virtual
    expected[:, :, 0, :] += virtual
    ours = bias_from_relations(attention["rel_index"], attention["rel_table"]) + attention["attn_bias"]
    real = torch.nn.functional.pad(mask, (1, 0), value=True)
    pairs = real[:, :, None] & real[:, None, :]
    torch.testing.assert_close(ours.permute(0, 2, 3, 1)[pairs], expected.permute(0, 2, 3, 1)[pairs])


def _moleblend_heads(config, generator):
    """The relation heads of MoleBlend's public checkpoint (blend_*_pred_head), names and shapes, random values."""
    dim, width, hidden = config.dim, config.head_width, 7
    heads = {"blend_spd_pred_head.": ("linear", config.spd_classes),
             "blend_edge_pred_head.": ("linear_map_feature", config.max_hops * 24),
             "blend_3d_pred_head.": ("linear", hidden)}
    shapes = {}
    for head, (linear, outputs) in heads.items():
        for side in ("row", "column"):
            shapes.update({f"{head}transform_n2_head.{side}_head.weight": (width, dim),
                           f"{head}transform_n2_head.{side}_head.bias": (width,),
                           f"{head}transform_n2_head.{side}_LayerNorm.weight": (width,),
                           f"{head}transform_n2_head.{side}_LayerNorm.bias": (width,)})
        shapes.update({f"{head}{linear}.weight": (outputs, width * width), f"{head}{linear}.bias": (outputs,)})
    for k in (1, 2, 3):
        shapes.update({f"blend_3d_pred_head.force_proj{k}.weight": (1, hidden),
                       f"blend_3d_pred_head.force_proj{k}.bias": (1,)})
    return {"encoder.molecule_encoder." + name: torch.randn(shape, generator=generator) for name, shape in
            shapes.items()}


def test_moleblend_checkpoint_heads_map_onto_the_relation_heads():
    """MoleBlend's TransformN2Head (row / column Linear -> GELU -> LayerNorm(eps 1e-12), outer product flattened
    row-major) and output Linear give, after conversion, what the model's heads give; the 3D head's Linear and its
    three force projections compose into one Linear. Entries with no place in the model are named in a warning;
    a head of another size is refused."""
    import warnings

    from pyblend import ops
    from pyblend.models import convert_transformer_m_state_dict

    config = _config(layers=1)
    generator = torch.Generator().manual_seed(2)
    state = {**_transformer_m_state(config, generator), **_moleblend_heads(config, generator)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_transformer_m_state_dict(state, config)
    model = MoleBlend(config).eval()
    report = model.load_state_dict(converted, strict=False)
    assert not report.unexpected_keys
    assert not [key for key in report.missing_keys if key.startswith(("spd_head", "edge_head", "geometry_head"))]

    theirs = {key.split("molecule_encoder.")[1]: value for key, value in state.items()}
    atoms = torch.randn(2, 6, config.dim, generator=generator)

    def their_pairs(head):
        def side(name):
            hidden = torch.nn.functional.gelu(atoms @ theirs[f"{head}transform_n2_head.{name}_head.weight"].T
                                              + theirs[f"{head}transform_n2_head.{name}_head.bias"])
            return torch.nn.functional.layer_norm(hidden, (hidden.shape[-1],),
                                                  theirs[f"{head}transform_n2_head.{name}_LayerNorm.weight"],
                                                  theirs[f"{head}transform_n2_head.{name}_LayerNorm.bias"], eps=1e-12)
        row, column = side("row"), side("column")
        return torch.einsum("bic,bjd->bijcd", row, column).flatten(-2)                    # (B, N, N, d * d)

    def linear(x, name):
        return x @ theirs[name + ".weight"].T + theirs[name + ".bias"]

    def ours(head):
        with torch.no_grad():
            return ops.outer_product_logits(*head.projected(atoms), backend="reference")

    spd = linear(their_pairs("blend_spd_pred_head."), "blend_spd_pred_head.linear")
    edge = linear(their_pairs("blend_edge_pred_head."), "blend_edge_pred_head.linear_map_feature")
    hidden = linear(their_pairs("blend_3d_pred_head."), "blend_3d_pred_head.linear")
    forces = torch.cat([linear(hidden, f"blend_3d_pred_head.force_proj{k}") for k in (1, 2, 3)], -1)
    torch.testing.assert_close(ours(model.spd_head), spd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(model.edge_head), edge, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(model.geometry_head), forces, rtol=1e-5, atol=1e-5)

    with pytest.warns(UserWarning, match="1 checkpoint entries .* left out: stray.weight"):
        convert_transformer_m_state_dict({**state, "encoder.molecule_encoder.stray.weight": torch.ones(1)}, config)
    with pytest.raises(ValueError, match="spd_head has 12 outputs .* has 11"):
        convert_transformer_m_state_dict(state, _config(layers=1, spd_classes=12))
    with pytest.raises(ValueError, match="head_width = 8; .* projects to 4"):
        convert_transformer_m_state_dict(state, _config(layers=1, head_width=8))


def test_transformer_m_gaussian_layer_maps_onto_the_encoder(graphs):
    """The 3D bias after conversion is their GaussianLayer + NonLinear on their pair types: collator_3d takes the
    single-embedded atomic-number id, adds 1 (pad_spatial_pos_unsqueeze) and single-embeds the (i, j) pair again,
    so atom i reads rows 3 + z_i and atom j rows 515 + z_j of mul and bias (they were read as one shared table)."""
    from pyblend.models import convert_transformer_m_state_dict

    config = _config(layers=1)
    model = MoleBlend(config).eval()
    state = _transformer_m_state(config, torch.Generator().manual_seed(1))
    model.load_state_dict(convert_transformer_m_state_dict(state, config), strict=False)
    theirs = {key.split("molecule_encoder.")[1]: value for key, value in state.items()}
    relations = model.build_relations(collate(graphs[:4]))
    with torch.no_grad():
        _, _, ours = model.layer_inputs(relations)

    atom_ids = _their_ids(relations.atom_features[..., :1], shifts=0) + 1         # x[:, 0], pad_spatial_pos
    pair = torch.cat(torch.broadcast_tensors(atom_ids[:, :, None], atom_ids[:, None, :]), -1)
    pair = _their_ids(pair, shifts=0)                                               # (B, N, N, 2)
    positions = relations.positions.double()
    distance = (positions[:, None] - positions[:, :, None]).norm(dim=-1)
    gbf = {name: theirs[f"molecule_3d_bias.gbf.{name}.weight"].double() for name in ("mul", "bias", "means", "stds")}
    affine = gbf["mul"][pair].sum(-2) * distance[..., None] + gbf["bias"][pair].sum(-2)
    std = gbf["stds"].view(-1).abs() + config.std_eps
    features = torch.exp(-0.5 * ((affine - gbf["means"].view(-1)) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
    layer = {name: theirs[f"molecule_3d_bias.gbf_proj.{name}"].double()
             for name in ("layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias")}
    hidden = torch.nn.functional.gelu(features @ layer["layer1.weight"].T + layer["layer1.bias"])
    expected = (hidden @ layer["layer2.weight"].T + layer["layer2.bias"]).permute(0, 3, 1, 2)
    pairs = (relations.mask[:, :, None] & relations.mask[:, None, :])[:, None].expand_as(expected)
    torch.testing.assert_close(ours[pairs].double(), expected[pairs], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ packed layout
def _mixed(graphs, graphs_2d):
    """Ragged sizes: a conformer, no conformer, a single atom (methane) and a salt (two fragments)."""
    return [graphs[2], graphs_2d[1], graphs[5], graphs[4]]


def _loss_and_gradients(model, batch, noise):
    model.zero_grad(set_to_none=True)
    loss, parts = model.pretrain_loss(batch, noise=noise)
    loss.backward()
    return loss.detach(), {name: value.detach() for name, value in parts.items()}, \
        {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def _assert_same_gradients(packed, padded, rtol=1e-4, atol=1e-6):
    assert packed.keys() == padded.keys()
    for name, expected in padded.items():
        got = packed[name]
        assert (got is None) == (expected is None), name
        if expected is not None:
            # Relative to the whole gradient: some are 0 up to rounding (softmax is blind to the key bias).
            error, scale = (got - expected).norm().item(), expected.norm().item()
            assert error <= rtol * scale + atol, f"{name}: |packed - padded| = {error:.3g}, |padded| = {scale:.3g}"


def _packed_noise(padded_batch):
    if padded_batch.positions is None:
        return None, None
    noise = torch.randn(padded_batch.positions.shape, generator=torch.Generator().manual_seed(8)) * 0.2
    return noise, noise[padded_batch.mask]


@pytest.mark.parametrize("molecules", ["conformers", "2d", "mixed"])
def test_packed_pretrain_loss_equals_padded_in_eval(graphs, graphs_2d, molecules):
    """Eval mode (every channel on, no dropout) and the same noise: the packed path computes the padded one's
    loss and gradients."""
    chosen = {"conformers": graphs[:4], "2d": graphs_2d[2:], "mixed": _mixed(graphs, graphs_2d)}[molecules]
    model = _model(layers=1).eval()
    padded = collate(chosen)
    noise, packed_noise = _packed_noise(padded)
    loss, parts, gradients = _loss_and_gradients(model, padded, noise)
    packed_loss, packed_parts, packed_gradients = _loss_and_gradients(model, collate(chosen, layout="packed"),
                                                                      packed_noise)
    if molecules != "2d":
        assert parts["geometry"] > 0 and parts["denoise"] > 0
    for name in parts:
        torch.testing.assert_close(packed_parts[name], parts[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    _assert_same_gradients(packed_gradients, gradients)


def test_packed_forward_and_predictor_equal_padded_with_ragged_molecules(graphs, graphs_2d):
    model = _model().eval()
    chosen = _mixed(graphs, graphs_2d)
    padded, packed = collate(chosen), collate(chosen, layout="packed")
    out, packed_out = model(padded), model(packed)
    assert packed_out.shape == out.shape == (4, 1 + padded.max_seqlen, 32)
    real = torch.nn.functional.pad(padded.mask, (1, 0), value=True)
    torch.testing.assert_close(packed_out[real], out[real], rtol=1e-5, atol=1e-5)
    # Rows past a molecule's end are 0 in both layouts (the padded ones were LayerNorm output of nothing).
    assert not real.all() and (out[~real] == 0).all() and (packed_out[~real] == 0).all()
    assert (packed_out[~real] == 0).all()
    torch.testing.assert_close(model.readout(packed), out[:, 0], rtol=1e-5, atol=1e-5)
    predictor = MoleBlendPredictor(model, outputs=2).eval()
    torch.testing.assert_close(predictor(packed), predictor(padded), rtol=1e-5, atol=1e-5)


def test_packed_position_override_takes_either_layout(graphs):
    model = _model(layers=1).eval()
    padded, packed = collate(graphs[:3]), collate(graphs[:3], layout="packed")
    shifted = padded.positions.clone()
    shifted[0, 1] += 0.5
    expected = model(padded, positions=shifted)
    real = torch.nn.functional.pad(padded.mask, (1, 0), value=True)
    for positions in (shifted, shifted[padded.mask]):
        torch.testing.assert_close(model(packed, positions=positions)[real], expected[real], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        model(packed, positions=shifted[:, :-1])
    with pytest.raises(ValueError, match="noise"):
        model.pretrain_loss(packed, noise=torch.zeros(3, 3))


def test_packed_training_is_reproducible_and_reaches_every_parameter(graphs, graphs_2d):
    model = _model(layers=1, dropout=0.1, attention_dropout=0.1).train()
    batch = collate(_mixed(graphs, graphs_2d), layout="packed")
    losses = []
    for blend_seed in (2, 2, 3):
        torch.manual_seed(0)  # dropout draws from torch's global generator
        loss, parts = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(blend_seed))
        losses.append(loss.item())
    assert losses[0] == losses[1] != losses[2] and all(torch.isfinite(value) for value in parts.values()), parts
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_packed_batch_runs_packed_on_the_kernels(graphs, graphs_2d, monkeypatch):
    """Every op on its Triton kernel (the interpreter here): no tensor with a (N, N) or (1 + N, 1 + N) pair of
    dimensions is ever made (eval mode: the training blend's (B, N, N) uniforms are the documented exception),
    the model pads nothing but the forward's final activations, and the loss and gradients are the padded
    batch's on the reference ops."""
    from allocations import Allocations

    import pyblend.models.moleblend as moleblend

    chosen = _mixed(graphs, graphs_2d)
    model = _model(layers=1, dim=16, heads=2, ffn_dim=16, num_kernels=6, max_hops=3).eval()
    padded, packed = collate(chosen), collate(chosen, layout="packed")
    noise, packed_noise = _packed_noise(padded)
    loss, _, gradients = _loss_and_gradients(model, padded, noise)
    expected = model(padded)

    padded_calls = []
    original_pad_atoms = moleblend.pad_atoms
    monkeypatch.setattr(moleblend, "pad_atoms", lambda *args, **kw: padded_calls.append(args[0].shape) or
                        original_pad_atoms(*args, **kw))
    monkeypatch.setenv("PYBLEND_BACKEND", "triton")
    with Allocations() as record:
        packed_loss, _, packed_gradients = _loss_and_gradients(model, packed, packed_noise)
    assert not padded_calls, "pretrain_loss padded a tensor"
    width = padded.max_seqlen
    square = [shape for shape in record.shapes
              if any(a == b and a in (width, width + 1) for a, b in zip(shape, shape[1:]))]
    assert not square, f"tensors shaped like padded pairs (N = {width}): {sorted(set(square))}"
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    _assert_same_gradients(packed_gradients, gradients)

    with torch.no_grad():
        out = model(packed)
    tokens = int(packed.num_atoms.sum()) + len(packed)
    assert padded_calls == [(tokens, 16)], "the forward pads its final activations, once"
    real = torch.nn.functional.pad(padded.mask, (1, 0), value=True)
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_pretraining_under_bfloat16_autocast(graphs, layout):
    """AMP: the heads' projections come out of autocast in bfloat16 while their output Linear stays float32; the
    fused pair losses take one dtype, so the model hands them the weights in the rows' dtype."""
    model = _model()
    batch = collate(graphs, layout=layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = model.pretrain_loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(value) for value in parts.values())
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or p.grad.dtype != torch.float32 or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_float64_model_keeps_every_loss_part_in_float64(graphs):
    model = _model().double()
    loss, parts = model.pretrain_loss(collate(graphs), generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float64 and {value.dtype for value in parts.values()} == {torch.float64}



@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_without_the_3d_atom_feature_no_parameter_goes_unused(graphs, layout):
    """atom_3d_feature=False still made atom_3d_proj, which then never got a gradient (DistributedDataParallel
    needed find_unused_parameters=True); reset_parameters and the Transformer-M converter must do without it (the
    checkpoint's edge_proj has no place in the model: named in the warning, not loaded)."""
    from pyblend.models import convert_transformer_m_state_dict

    model = _model(atom_3d_feature=False).train()
    assert model.atom_3d_proj is None and not [name for name in model.state_dict() if "atom_3d_proj" in name]
    loss, _ = model.pretrain_loss(collate(graphs, layout=layout), generator=torch.Generator().manual_seed(1))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    model.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())

    config = _config(layers=1, atom_3d_feature=False)
    state = _transformer_m_state(config, torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"2 checkpoint entries .* molecule_3d_bias\.edge_proj\.bias, "
                                         r"molecule_3d_bias\.edge_proj\.weight$"):
        converted = convert_transformer_m_state_dict(state, config)
    report = MoleBlend(config).load_state_dict(converted, strict=False)
    assert not report.unexpected_keys, report.unexpected_keys


def test_reset_parameters_restores_every_parameter_after_to_empty():
    """Meta construction, ``to_empty()``, then ``reset_parameters()`` (deferred initialisation): no parameter may
    keep the uninitialised memory (LayerNorms and the Gaussian layer were skipped)."""
    model = _model()
    for parameter in model.parameters():
        parameter.data.fill_(float("nan"))  # what to_empty() may leave
    model.reset_parameters()
    left = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not left, left
    gbf = model.gaussian.gbf
    assert ((gbf.means.weight >= 0) & (gbf.means.weight <= 3)).all() and (gbf.mul.weight == 1).all()
    assert all((module.weight == 1).all() for module in model.modules() if isinstance(module, torch.nn.LayerNorm))


def test_meta_construction_then_to_empty_reset_and_load(graphs):
    """Deferred initialisation end to end: built on the meta device (the feature-row offsets were computed with
    .tolist(), which meta tensors refuse), materialised, reset (the non-persistent index buffers must be refilled:
    they are not in the state_dict), then loaded: the same output as the original model."""
    model = _model().eval()
    with torch.device("meta"):
        deferred = MoleBlend(_config())
    deferred = deferred.to_empty(device="cpu")
    deferred.reset_parameters()
    deferred.load_state_dict(model.state_dict())
    batch = collate(graphs)
    torch.testing.assert_close(deferred.eval()(batch), model(batch), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_checkpoint_loads_into_a_meta_model_without_reset(graphs, how):
    """PyTorch's big-model loading: a meta-device model given a checkpoint with ``load_state_dict(assign=True)``,
    or materialised by ``to_empty()`` and loaded without ``reset_parameters()``. The feature-row index buffers are
    not in the state_dict: they stayed on the meta device (the forward raised "Tensor on device meta") or held
    uninitialised memory (an IndexError, or on a GPU possibly wrong rows read without an error)."""
    model = _model().eval()
    with torch.device("meta"):
        deferred = MoleBlend(_config())
    if how == "to_empty":
        deferred = deferred.to_empty(device="cpu")
        for name, buffer in deferred.named_buffers():
            buffer.fill_(10**6)  # what uninitialised memory may hold
    deferred.load_state_dict(model.state_dict(), assign=how == "assign")
    assert all(buffer.device.type == "cpu" for buffer in deferred.buffers())
    batch = collate(graphs)
    torch.testing.assert_close(deferred.eval()(batch), model(batch), rtol=0, atol=0)


def test_pretrain_loss_names_a_bad_generator(graphs):
    """A seed for a generator failed in torch.randn with "received an invalid combination of arguments"."""
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or None; got 'seed'"):
        _model().pretrain_loss(collate(graphs), generator="seed")
