"""Collation of real molecules into padded and packed batches, round trips, and the layout helpers."""
import numpy as np
import pytest
import torch

pytest.importorskip("rdkit", reason="collation is tested on featurized molecules (RDKit)")

from pyblend import collate, featurize, layout  # noqa: E402
from pyblend.data import MolBatch

MOLECULES = ["CCO", "c1ccccc1", "C", "[Na+].[Cl-]", "CC(=O)[O-].[Na+]", "C1CCC2CCCCC2C1", "N.N.Cl[Pt]Cl",
             "[13CH4]", "OC(=O)C1=CC=CC=C1OC(C)=O", "C#N"]
FIELDS = ["atom_features", "adjacency", "bond_ids", "bond_features", "edge_index", "num_atoms", "num_bonds",
          "mask", "cu_seqlens", "positions", "has_positions", "labels"]


@pytest.fixture(scope="module")
def graphs():
    return [featurize(s) for s in MOLECULES]


def assert_same_batch(a: MolBatch, b: MolBatch):
    assert a.layout == b.layout and a.max_seqlen == b.max_seqlen and a.smiles == b.smiles
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x.nan_to_num(-7) if x.is_floating_point() else x,
                                                      y.nan_to_num(-7) if y.is_floating_point() else y), name


def test_padded_batch_holds_every_molecule(graphs):
    batch = collate(graphs)
    assert batch.atom_features.shape == (len(graphs), batch.max_seqlen, 9)
    assert batch.max_seqlen == max(g.num_atoms for g in graphs)
    for b, graph in enumerate(graphs):
        n, e = graph.num_atoms, graph.num_bonds
        assert batch.mask[b].sum() == n and batch.mask[b, :n].all()
        assert np.array_equal(batch.atom_features[b, :n].numpy(), graph.atom_features)
        assert np.array_equal(batch.bond_features[b, :e].numpy(), graph.bond_features)
        ids = batch.bond_ids[b]
        assert torch.equal(ids, ids.T) and torch.equal(batch.adjacency[b], ids >= 0)
        begin, end = graph.edge_index
        assert (ids[begin, end].numpy() == np.arange(e)).all(), "bond id k must join the atoms of bond k"
        assert int((ids >= 0).sum()) == 2 * e
    assert batch.positions is None and batch.has_positions is None and batch.labels is None


def test_packed_blocks_equal_padded_blocks(graphs):
    padded, packed = collate(graphs), collate(graphs, layout="packed")
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, *np.cumsum([g.num_atoms for g in graphs]).tolist()]
    offsets = layout.pair_offsets(packed.cu_seqlens)
    bond_start = 0
    for b, graph in enumerate(graphs):
        n = graph.num_atoms
        block = packed.adjacency[offsets[b]:offsets[b + 1]].reshape(n, n)
        assert torch.equal(block, padded.adjacency[b, :n, :n])
        ids = packed.bond_ids[offsets[b]:offsets[b + 1]].reshape(n, n)
        local = padded.bond_ids[b, :n, :n]
        assert torch.equal(ids, torch.where(local >= 0, local + bond_start, -1)), "packed bond ids are batch-wide"
        bond_start += graph.num_bonds


def test_round_trips(graphs):
    padded, packed = collate(graphs), collate(graphs, layout="packed")
    assert_same_batch(padded.to_packed(), packed)
    assert_same_batch(packed.to_padded(), padded)
    assert_same_batch(padded.to_packed().to_padded(), padded)


def test_pair_bond_features_agree_across_layouts(graphs):
    padded, packed = collate(graphs), collate(graphs, layout="packed")
    dense = padded.pair_bond_features()
    assert dense.shape == (len(graphs), padded.max_seqlen, padded.max_seqlen, 3)
    assert torch.equal(layout.pack_pairs(dense, padded.mask), packed.pair_bond_features())
    b = MOLECULES.index("c1ccccc1")
    u, v = graphs[b].edge_index[:, 0]
    assert dense[b, u, v].tolist() == (graphs[b].bond_features[0] + 1).tolist()
    assert (dense[b][~padded.adjacency[b]] == 0).all()


def test_positions_and_missing_conformers():
    with_conformer = featurize("CCO", conformer=True)
    without = featurize("CCN")
    batch = collate([with_conformer, without])
    assert batch.has_positions.tolist() == [True, False]
    assert torch.equal(batch.positions[0, :3], torch.from_numpy(with_conformer.positions))
    assert torch.isnan(batch.positions[1, :3]).all(), "a molecule without a conformer must not look like one"
    packed = collate([with_conformer, without], layout="packed")
    assert packed.positions.shape == (6, 3)
    assert_same_batch(packed.to_padded(), batch)


def test_labels(graphs):
    labelled = [featurize("CCO"), featurize("CCN")]
    labelled[0].labels = np.array([1.0, np.nan], dtype=np.float32)
    batch = collate(labelled)
    assert batch.labels.shape == (2, 2) and batch.labels[0, 0] == 1 and torch.isnan(batch.labels[1]).all()
    labelled[1].labels = np.array([1.0], dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        collate(labelled)
    # Reassigned labels are checked again, as the other fields: a (1, 2) array was flattened without a word.
    labelled[1].labels = np.ones((1, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"graphs\[1\].labels must be float32 of shape \(\?\), got float32 of "
                                         r"shape \(1, 2\)"):
        collate(labelled)
    with pytest.raises(TypeError, match=r"graphs: expected a sequence of MolGraph; got one MolGraph"):
        collate(labelled[0])


@pytest.mark.parametrize("batch_layout", ["padded", "packed"])
def test_pair_bond_features_without_any_bond(batch_layout):
    """Ions and single atoms only: no bond anywhere in the batch (the gather once indexed an empty table)."""
    batch = collate([featurize("[Na+].[Cl-]"), featurize("C")], layout=batch_layout)
    dense = batch.pair_bond_features()
    pairs = (2, 2, 2, 3) if batch_layout == "padded" else (5, 3)
    assert dense.shape == pairs and (dense == 0).all()


def test_empty_batch_and_bad_input(graphs):
    empty = collate([])
    assert len(empty) == 0 and empty.atom_features.shape == (0, 0, 9)
    assert len(collate([], layout="packed")) == 0
    with pytest.raises(ValueError, match="layout"):
        collate(graphs, layout="ragged")
    with pytest.raises(TypeError, match=r"graphs\[1\]"):
        collate([graphs[0], "CCO"])


@pytest.mark.parametrize("batch_layout", ["padded", "packed"])
@pytest.mark.parametrize("atom", [2, 3, -1])
def test_bond_outside_its_molecule_is_refused(batch_layout, atom):
    """A MolGraph checks its bonds when built, but its fields can be reassigned since: a bond to atom 2 of a
    2-atom molecule would land in the padding (packed: in the next molecule), atom -1 would wrap round."""
    ethane, methanol = featurize("CC"), featurize("CO")
    ethane.edge_index = np.array([[0], [atom]], dtype=np.int64)
    with pytest.raises(ValueError, match=rf"graphs\[1\]: edge_index must hold atom indices in \[0, 2\) \(its "
                                         rf"number of atoms\), got bond 0 joining atoms 0 and {atom}"):
        collate([featurize("CCO"), ethane, methanol], layout=batch_layout)


def ethanol_with(**fields):
    """graphs[1] of a three-molecule batch: ethanol (3 atoms; bonds 0-1, 1-2) with ``fields`` reassigned."""
    ethanol = featurize("CCO")
    for name, value in fields.items():
        setattr(ethanol, name, value)
    return [featurize("C"), ethanol, featurize("CC")]


def with_value(array, index, value):
    array = array.copy()
    array[index] = value
    return array


@pytest.mark.parametrize("batch_layout", ["padded", "packed"])
def test_reassigned_fields_are_checked_again(batch_layout):
    """collate re-checked only edge_index's atom range: a duplicated bond was counted in num_bonds but vanished from
    bond_ids and adjacency, a feature outside its vocabulary passed, and a field of the wrong shape failed in numpy
    ("could not broadcast") naming neither the graph nor the field."""
    ethanol = featurize("CCO")
    edges, bonds, atoms = ethanol.edge_index, ethanol.bond_features, ethanol.atom_features
    three_bonds = np.concatenate([bonds, bonds[:1]])
    cases = [
        (dict(edge_index=np.concatenate([edges, edges[:, :1]], 1), bond_features=three_bonds), ValueError,
         r"graphs\[1\]\.edge_index must hold at most one bond per atom pair, got bonds 0 and 2 both joining atoms 0 "
         r"and 1"),
        (dict(edge_index=np.concatenate([edges, edges[::-1, 1:]], 1), bond_features=three_bonds), ValueError,
         r"graphs\[1\]\.edge_index must hold at most one bond per atom pair, got bonds 1 and 2 both joining atoms 1 "
         r"and 2"),
        (dict(atom_features=with_value(atoms, (2, 0), 1007)), ValueError,
         r"graphs\[1\]\.atom_features column 0 \(atomic_number\) must hold vocabulary indices in \[0, 119\), got "
         r"1007 in row 2"),
        (dict(atom_features=with_value(atoms, (1, 3), -1)), ValueError,
         r"graphs\[1\]\.atom_features column 3 \(formal_charge\) must hold vocabulary indices in \[0, 12\), got -1 "
         r"in row 1"),
        (dict(bond_features=with_value(bonds, (1, 2), 2)), ValueError,
         r"graphs\[1\]\.bond_features column 2 \(is_conjugated\) must hold vocabulary indices in \[0, 2\), got 2 "
         r"in row 1"),
        (dict(bond_features=bonds[:1]), ValueError,
         r"graphs\[1\]\.bond_features must be int64 of shape \(2, 3\), got int64 of shape \(1, 3\)"),
        (dict(edge_index=edges[:, :1]), ValueError,
         r"graphs\[1\]\.bond_features must be int64 of shape \(1, 3\), got int64 of shape \(2, 3\)"),
        (dict(atom_features=atoms[:, :8]), ValueError,
         r"graphs\[1\]\.atom_features must be int64 of shape \(\?, 9\), got int64 of shape \(3, 8\)"),
        (dict(atom_features=atoms.astype(np.float64)), ValueError,
         r"graphs\[1\]\.atom_features must be int64 of shape \(\?, 9\), got float64"),
        (dict(atom_features=atoms.tolist()), TypeError,
         r"graphs\[1\]\.atom_features must be a numpy.ndarray, got list"),
        (dict(edge_index=edges.astype(np.int32)), ValueError,
         r"graphs\[1\]\.edge_index must be int64 of shape \(2, \?\)"),
        (dict(positions=np.zeros((2, 3), np.float32), conformer_source="etkdg"), ValueError,
         r"graphs\[1\]\.positions must be float32 of shape \(3, 3\), got float32 of shape \(2, 3\)"),
        (dict(positions=np.zeros((3, 3)), conformer_source="etkdg"), ValueError,
         r"graphs\[1\]\.positions must be float32 of shape \(3, 3\), got float64"),
    ]
    for fields, error, message in cases:
        with pytest.raises(error, match=message):
            collate(ethanol_with(**fields), layout=batch_layout)
    # A self-loop is no duplicate (MolGraph accepts it): the pair (2, 2) holds its id.
    looped = collate(ethanol_with(edge_index=np.concatenate([edges, [[2], [2]]], 1), bond_features=three_bonds))
    assert looped.num_bonds.tolist() == [0, 3, 1] and looped.bond_ids[1, 2, 2] == 2


def test_batch_moves_between_devices(graphs):
    moved = collate(graphs).to("meta")
    assert moved.atom_features.device.type == "meta" and moved.mask.device.type == "meta"


def test_batch_pins_its_tensors_and_moves_without_blocking(graphs, monkeypatch):
    """DataLoader(pin_memory=True) pins a custom batch through its pin_memory(); a MolBatch had none and was
    passed on unpinned without a word, and to() refused non_blocking. Pinning needs an accelerator, so here
    Tensor.pin_memory records what it is given."""
    batch = collate(graphs)
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor) or tensor.clone())
    result = batch.pin_memory()
    tensors = [name for name, value in vars(batch).items() if isinstance(value, torch.Tensor)]
    assert len(pinned) == len(tensors) and all(any(t is getattr(batch, name) for t in pinned) for name in tensors)
    assert all(getattr(result, name) is not getattr(batch, name) for name in tensors)
    moved = result.to("cpu", non_blocking=True)
    assert all(torch.equal(getattr(moved, name), getattr(batch, name)) for name in tensors)


@pytest.mark.gpu
def test_data_loader_pins_batches(graphs):
    loader = torch.utils.data.DataLoader(graphs, batch_size=2, collate_fn=collate, pin_memory=True)
    batch = next(iter(loader))
    assert batch.atom_features.is_pinned() and batch.mask.is_pinned()
    assert batch.to("cuda", non_blocking=True).atom_features.is_cuda


def test_layout_helpers_round_trip(generator):
    lengths = [3, 1, 0, 5]
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    atoms = torch.randn(sum(lengths), 4, generator=generator)
    pairs = torch.randn(sum(n * n for n in lengths), generator=generator)
    padded_atoms = layout.pad_atoms(atoms, cu_seqlens, value=float("nan"))
    mask = ~torch.isnan(padded_atoms[..., 0])
    assert mask.sum(1).tolist() == lengths
    assert torch.equal(layout.mask_from_cu_seqlens(cu_seqlens, padded_atoms.shape[1]), mask)
    assert torch.equal(layout.pack_atoms(padded_atoms, mask), atoms)
    padded_pairs = layout.pad_pairs(pairs, cu_seqlens, max_seqlen=7, value=float("nan"))
    assert padded_pairs.shape == (4, 7, 7)
    assert torch.equal(layout.pack_pairs(padded_pairs, torch.arange(7) < torch.tensor(lengths)[:, None]), pairs)
    derived, longest = layout.cu_seqlens_from_mask(mask)
    assert torch.equal(derived, cu_seqlens) and longest == 5
    with pytest.raises(ValueError, match="max_seqlen"):
        layout.pad_atoms(atoms, cu_seqlens, max_seqlen=4)
    # Rows that do not match cu_seqlens, and integer masks (x[mask] would gather rows 0 and 1), are refused.
    with pytest.raises(ValueError, match=r"cu_seqlens describes 9 atoms, but x has 8 rows"):
        layout.pad_atoms(atoms[:-1], cu_seqlens)
    with pytest.raises(ValueError, match=r"cu_seqlens describes 35 pairs, but x has 36 rows"):
        layout.pad_pairs(torch.cat([pairs, pairs[:1]]), cu_seqlens)
    for helper in (layout.pack_atoms, layout.pack_pairs):
        with pytest.raises(TypeError, match="mask: expected a bool tensor"):
            helper(padded_pairs, mask.long())
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        layout.cu_seqlens_from_mask(mask.to(torch.uint8))
    for bad, words in [(torch.tensor([0, 2, 1], dtype=torch.int32), "non-decreasing"),
                       (torch.tensor([[0, 1]], dtype=torch.int32), "(B+1,)"),
                       (torch.tensor([0, 2], dtype=torch.int64), "int32")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            layout.check_cu_seqlens(bad)


def test_pair_index_and_prepend_token_match_the_padded_positions():
    lengths = [3, 1, 0, 5]
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    mask = layout.mask_from_cu_seqlens(cu_seqlens, 5)
    molecule, i, j = layout.pair_index(cu_seqlens)
    assert torch.equal(torch.stack([molecule, i, j], 1), (mask[:, :, None] & mask[:, None, :]).nonzero())
    assert torch.equal(layout.atom_molecules(cu_seqlens), torch.tensor([0, 0, 0, 1, 3, 3, 3, 3, 3]))

    token_cu_seqlens, atom_slots, pair_slots = layout.prepend_token(cu_seqlens)
    assert token_cu_seqlens.dtype == torch.int32 and token_cu_seqlens.tolist() == [0, 4, 6, 7, 13]
    tokens, token_pairs = int(token_cu_seqlens[-1]), int(layout.pair_offsets(token_cu_seqlens)[-1])
    assert token_pairs == sum((1 + n) ** 2 for n in lengths)
    # The padded (B, 1 + N) layout with the extra token at 0: atom i of a molecule sits at 1 + i.
    token_of = layout.pad_atoms(torch.arange(tokens), token_cu_seqlens, 6, value=-1)
    assert torch.equal(atom_slots, token_of[:, 1:][mask])
    pair_of = layout.pad_pairs(torch.arange(token_pairs), token_cu_seqlens, 6, value=-1)
    assert torch.equal(pair_slots, pair_of[:, 1:, 1:][mask[:, :, None] & mask[:, None, :]])
    assert layout.prepend_token(cu_seqlens, atoms=9, pairs=35)[2].equal(pair_slots)
