"""pyblend.chem: RDKit -> MolGraph featurization, batch featurization with failures, CSV/SDF readers.

Real molecules throughout; expected feature values are checked by hand for a few small molecules and against a
deliberately naive per-atom reference (written below) for hundreds of RDKit's bundled NCI molecules.
"""
import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

Chem = pytest.importorskip("rdkit.Chem", reason="pyblend.chem needs RDKit")
from rdkit import RDConfig, rdBase  # noqa: E402
from rdkit.Chem import AllChem, rdDistGeom  # noqa: E402

from pyblend import chem  # noqa: E402
from pyblend.chem import (  # noqa: E402
    ATOM_FEATURE_DIMS, ATOM_FEATURE_NAMES, BOND_FEATURE_DIMS, BOND_FEATURE_NAMES, Failure, MolGraph,
    MoleculeTable, default_molecules, featurize, featurize_many, read_csv, read_sdf,
)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")  # ../shared/data
MOLECULENET = os.path.join(SHARED_DATA, "moleculenet")
NCI_SDF = os.path.join(RDConfig.RDDataDir, "NCI", "first_200.props.sdf")
PARACETAMOL = "CC(=O)Nc1ccc(O)cc1"
# Bicyclo[1.1.0]butane with bridgehead stereo tags ETKDG cannot satisfy: embedding fails for every seed tried
# (0..5) with this RDKit, while the same skeleton without tags embeds.
UNEMBEDDABLE = "C1[C@H]2C[C@H]12"


def rdkit_parse(smiles):
    with rdBase.BlockLogs():
        return Chem.MolFromSmiles(smiles)


# --------------------------------------------------------------------------- a naive reference for the features

def _index_or_other(value, vocabulary):
    return vocabulary.index(value) if value in vocabulary else len(vocabulary)


_CHIRAL_TAGS = [Chem.ChiralType.CHI_UNSPECIFIED, Chem.ChiralType.CHI_TETRAHEDRAL_CW,
                Chem.ChiralType.CHI_TETRAHEDRAL_CCW, Chem.ChiralType.CHI_OTHER]
_HYBRIDIZATIONS = [Chem.HybridizationType.SP, Chem.HybridizationType.SP2, Chem.HybridizationType.SP3,
                   Chem.HybridizationType.SP3D, Chem.HybridizationType.SP3D2]
_BOND_TYPES = [Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC]
_BOND_STEREOS = [Chem.BondStereo.STEREONONE, Chem.BondStereo.STEREOZ, Chem.BondStereo.STEREOE,
                 Chem.BondStereo.STEREOCIS, Chem.BondStereo.STEREOTRANS, Chem.BondStereo.STEREOANY]


def reference_atom_features(mol):
    return np.array([[
        _index_or_other(atom.GetAtomicNum(), list(range(1, 119))),
        _index_or_other(atom.GetChiralTag(), _CHIRAL_TAGS),
        _index_or_other(atom.GetTotalDegree(), list(range(11))),
        _index_or_other(atom.GetFormalCharge(), list(range(-5, 6))),
        _index_or_other(atom.GetTotalNumHs(includeNeighbors=True), list(range(9))),
        _index_or_other(atom.GetNumRadicalElectrons(), list(range(5))),
        _index_or_other(atom.GetHybridization(), _HYBRIDIZATIONS),
        int(atom.GetIsAromatic()),
        int(atom.IsInRing()),
    ] for atom in mol.GetAtoms()], dtype=np.int64).reshape(-1, 9)


def reference_bonds(mol):
    edges = np.array([[b.GetBeginAtomIdx(), b.GetEndAtomIdx()] for b in mol.GetBonds()], dtype=np.int64)
    features = np.array([[
        _index_or_other(b.GetBondType(), _BOND_TYPES),
        min(_index_or_other(b.GetStereo(), _BOND_STEREOS), 5),  # unknown stereo shares STEREOANY's slot
        int(b.GetIsConjugated()),
    ] for b in mol.GetBonds()], dtype=np.int64)
    return edges.reshape(-1, 2).T, features.reshape(-1, 3)


def assert_within_vocabulary(graph, where=""):
    for column, (name, dim) in enumerate(zip(ATOM_FEATURE_NAMES, ATOM_FEATURE_DIMS)):
        values = graph.atom_features[:, column]
        assert values.min(initial=0) >= 0 and values.max(initial=0) < dim, \
            f"{where}: atom feature {name} has values {sorted(set(values.tolist()))}, dim {dim}"
    for column, (name, dim) in enumerate(zip(BOND_FEATURE_NAMES, BOND_FEATURE_DIMS)):
        values = graph.bond_features[:, column]
        assert values.min(initial=0) >= 0 and values.max(initial=0) < dim, \
            f"{where}: bond feature {name} has values {sorted(set(values.tolist()))}, dim {dim}"


def assert_same_graph(a, b, where=""):
    for field in ("atom_features", "edge_index", "bond_features", "positions", "labels"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), f"{where}: {field} is None on one side only"
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, \
                f"{where}: {field} {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
            assert np.array_equal(x, y, equal_nan=True), f"{where}: {field} differs"
    for field in ("conformer_source", "smiles", "name"):
        assert getattr(a, field) == getattr(b, field), \
            f"{where}: {field} {getattr(a, field)!r} vs {getattr(b, field)!r}"


def bond_lengths(graph):
    begin, end = graph.edge_index
    return np.linalg.norm(graph.positions[begin] - graph.positions[end], axis=1)


@pytest.fixture(scope="module")
def nci_smiles():
    return default_molecules()


# ------------------------------------------------------------------------------------------ import / constants

def test_import_pyblend_does_not_import_rdkit():
    code = "import sys, pyblend; print('rdkit' in sys.modules); pyblend.featurize; print('rdkit' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"], result.stdout


def test_feature_constants():
    assert ATOM_FEATURE_DIMS == (119, 5, 12, 12, 10, 6, 6, 2, 2)
    assert BOND_FEATURE_DIMS == (5, 6, 2)
    assert len(ATOM_FEATURE_NAMES) == len(ATOM_FEATURE_DIMS)
    assert len(BOND_FEATURE_NAMES) == len(BOND_FEATURE_DIMS)


# ------------------------------------------------------------------------------------------- hand-checked values

def test_ethanol_by_hand():
    graph = featurize("CCO")
    # columns: Z-1, chirality, total degree, charge+5, total H, radicals, hybridisation, aromatic, ring
    assert graph.atom_features.tolist() == [
        [5, 0, 4, 5, 3, 0, 2, 0, 0],   # CH3: degree 1 + 3 H, sp3
        [5, 0, 4, 5, 2, 0, 2, 0, 0],   # CH2
        [7, 0, 2, 5, 1, 0, 2, 0, 0],   # OH
    ]
    assert graph.edge_index.tolist() == [[0, 1], [1, 2]]
    assert graph.bond_features.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert graph.atom_features.dtype == np.int64 and graph.edge_index.dtype == np.int64
    assert graph.bond_features.dtype == np.int64
    assert all(a.flags["C_CONTIGUOUS"] for a in (graph.atom_features, graph.edge_index, graph.bond_features))
    assert graph.num_atoms == 3 and graph.num_bonds == 2
    assert graph.positions is None and graph.conformer_source is None
    assert graph.smiles == "CCO" and graph.name is None and graph.labels is None


@pytest.mark.parametrize("smiles", ["c1ccccc1", "C1=CC=CC=C1"])
def test_benzene_by_hand(smiles):
    graph = featurize(smiles)
    # carbon (Z index 5), total degree 3, one H, SP2 (index 1), aromatic, in a ring
    assert graph.atom_features.tolist() == [[5, 0, 3, 5, 1, 0, 1, 1, 1]] * 6
    assert graph.bond_features.tolist() == [[3, 0, 1]] * 6      # AROMATIC, no stereo, conjugated
    assert graph.edge_index.tolist() == [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]]
    assert graph.smiles == smiles


def test_acetic_acid_by_hand():
    graph = featurize("CC(=O)O")
    assert graph.atom_features.tolist() == [
        [5, 0, 4, 5, 3, 0, 2, 0, 0],   # CH3, sp3
        [5, 0, 3, 5, 0, 0, 1, 0, 0],   # carboxyl C, sp2, no H
        [7, 0, 1, 5, 0, 0, 1, 0, 0],   # =O, sp2
        [7, 0, 2, 5, 1, 0, 1, 0, 0],   # -OH: RDKit makes the conjugated O sp2
    ]
    assert graph.bond_features.tolist() == [[0, 0, 0], [1, 0, 1], [0, 0, 1]]  # C-C, C=O, C-O (conjugated)


def test_stereo_features():
    assert featurize("C[C@H](F)Cl").atom_features[1, 1] == 2      # CHI_TETRAHEDRAL_CCW
    assert featurize("C[C@@H](F)Cl").atom_features[1, 1] == 1     # CHI_TETRAHEDRAL_CW
    assert featurize("F/C=C/F").bond_features[1].tolist() == [1, 2, 0]    # DOUBLE, STEREOE
    assert featurize("F/C=C\\F").bond_features[1].tolist() == [1, 1, 0]   # DOUBLE, STEREOZ
    assert featurize("CC=CC").bond_features[1].tolist() == [1, 0, 0]      # no stereo given


@pytest.mark.parametrize("smiles, atom, column, expected", [
    ("*C", 0, 0, 118),                               # dummy atom: atomic number "other"
    ("[U+7]", 0, 3, 11),                             # charge outside -5..5
    ("[U](C)(C)(C)(C)(C)(C)(C)(C)(C)(C)(C)", 0, 2, 11),  # degree 11
    ("[UH12]", 0, 4, 9),                             # 12 hydrogens
    ("[C]", 0, 5, 4),                                # atomic carbon: 4 radical electrons
    ("[Pt@SP1](F)(Cl)(Br)I", 0, 1, 4),               # square-planar chirality: "other"
    ("[Pt@SP1](F)(Cl)(Br)I", 0, 6, 5),               # hybridisation "other"
])
def test_out_of_vocabulary_values_go_to_other(smiles, atom, column, expected):
    graph = featurize(smiles)
    assert graph.atom_features[atom, column] == expected
    assert_within_vocabulary(graph, smiles)


def test_dative_bond_is_other_bond_type():
    graph = featurize("[NH3]->[Pt]")
    assert graph.bond_features.tolist() == [[4, 0, 0]]


def test_matches_reference_and_rdkit_bonds_on_nci(nci_smiles):
    checked = 0
    for smiles in nci_smiles[:500]:
        mol = rdkit_parse(smiles)
        if mol is None:
            continue
        graph = featurize(smiles)
        assert graph.num_atoms == mol.GetNumAtoms(), smiles
        edges, bond_features = reference_bonds(mol)
        assert np.array_equal(graph.edge_index, edges), smiles
        assert np.array_equal(graph.bond_features, bond_features), smiles
        assert np.array_equal(graph.atom_features, reference_atom_features(mol)), smiles
        assert_within_vocabulary(graph, smiles)
        checked += 1
    assert checked >= 490


# -------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("smiles, rdkit_reason", [
    ("C1CC", "SMILES Parse Error: unclosed ring"),
    ("C(C)(C)(C)(C)C", "Explicit valence for atom # 0 C, 5, is greater than permitted"),
    ("not a smiles", "SMILES Parse Error: syntax error while parsing: not"),
    ("c1cccc1", "Can't kekulize mol"),
    ("", "empty SMILES"),
    ("   ", "empty SMILES"),
    ("CCO ethanol", "whitespace inside the SMILES"),
    # RDKit drops a trailing run of non-ASCII characters: these parsed as benzene, CCN and CCO.
    ("c1ccccc1\u00d6", "non-ASCII character '\u00d6' at position 8"),
    ("CCN\u2019", "non-ASCII character"),
    ("CCO\u200b", "non-ASCII character '\\u200b'"),
])
def test_invalid_smiles_raise_with_input_and_reason(smiles, rdkit_reason):
    with pytest.raises(ValueError) as error:
        featurize(smiles)
    message = str(error.value)
    assert repr(smiles) in message
    assert rdkit_reason in message


def test_invalid_smiles_is_not_printed_and_log_state_is_restored(capfd):
    status = rdBase.LogStatus()
    with pytest.raises(ValueError, match="unclosed ring"):
        featurize("C1CC")
    assert rdBase.LogStatus() == status
    assert "unclosed ring" not in capfd.readouterr().err
    # RDKit still logs normally outside pyblend
    with rdBase.CaptureErrorLog() as capture:
        Chem.MolFromSmiles("C1CC")
    assert "unclosed ring" in capture.messages


def test_reason_without_rdkit_log_comes_from_sanitisation(monkeypatch):
    class CapturesNothing:
        messages = ""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(chem.rdBase, "CaptureErrorLog", CapturesNothing)
    with pytest.raises(ValueError, match="Explicit valence for atom # 0 C, 5, is greater than permitted"):
        featurize("C(C)(C)(C)(C)C")
    with pytest.raises(ValueError, match="could not parse"):
        featurize("C1CC")


def test_cxsmiles_extension_is_accepted():
    graph = featurize("C[C@H](F)Cl |&1:1|")
    assert graph.num_atoms == 4


def test_smiles_of_a_smi_line_keeps_its_cxsmiles_extension():
    """Cutting a .smi line at its first space dropped the extension: a radical, ring stereo, lost."""
    assert chem.smiles_of_line("CC |^1:1| ethyl\n") == "CC |^1:1|"
    assert chem.smiles_of_line("CCO ethanol 42\n") == "CCO"
    assert chem.smiles_of_line("  \n") == ""
    radical = featurize(chem.smiles_of_line("CC |^1:1| ethyl"))
    assert radical.atom_features[:, ATOM_FEATURE_NAMES.index("radical_electrons")].tolist() == [0, 1]


@pytest.mark.parametrize("smiles", ["F/C=C/F", "C[C@H](N)O", "C/C=C\\C[C@@H](Cl)F"])
def test_an_unsanitised_mol_gets_the_features_of_the_sanitised_one(smiles):
    """A Mol read with sanitize=False has had no stereo perception: its E/Z bonds and chirality tags were lost (or,
    read from a 3D SDF, every CH3 got a tag)."""
    expected = featurize(smiles)
    got = featurize(Chem.MolFromSmiles(smiles, sanitize=False))
    assert np.array_equal(got.atom_features, expected.atom_features)
    assert np.array_equal(got.bond_features, expected.bond_features)


def test_an_unsanitised_3d_sdf_record_gets_the_features_of_the_sanitised_one(tmp_path):
    mol = Chem.AddHs(Chem.MolFromSmiles("C/C=C/[C@@H](N)C(=O)O"))
    AllChem.EmbedMolecule(mol, randomSeed=3)
    path = tmp_path / "one.sdf"
    path.write_text(Chem.MolToMolBlock(mol) + "$$$$\n")
    sanitised = featurize(next(iter(Chem.SDMolSupplier(str(path), removeHs=False))))
    unsanitised = featurize(next(iter(Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False))))
    assert np.array_equal(unsanitised.atom_features, sanitised.atom_features)
    assert np.array_equal(unsanitised.bond_features, sanitised.bond_features)
    assert np.array_equal(unsanitised.positions, sanitised.positions)


@pytest.mark.parametrize("value", [42, b"CCO", None, ["CCO"]])
def test_featurize_rejects_other_types(value):
    with pytest.raises(TypeError, match="mol_or_smiles"):
        featurize(value)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"conformer": "yes"}, TypeError, "conformer"),
    ({"hydrogens": 1}, TypeError, "hydrogens"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": -1}, ValueError, "seed"),
])
def test_featurize_rejects_bad_options(kwargs, error, name):
    with pytest.raises(error, match=name):
        featurize("CCO", **kwargs)


def test_mol_with_no_atoms_raises():
    with pytest.raises(ValueError, match="no atoms"):
        featurize(Chem.Mol())


# ------------------------------------------------------------------------------------- unusual real molecules

@pytest.mark.parametrize("smiles, num_atoms, num_bonds", [
    ("[Na+].[Cl-]", 2, 0),
    ("CC(=O)[O-].[Na+]", 5, 3),
    ("C[N+](C)(C)C", 5, 4),
    ("[13CH4]", 1, 0),
    ("[2H]C([2H])([2H])[2H]", 5, 4),          # RDKit keeps isotopic hydrogens as atoms
    ("[Fe]", 1, 0),
    ("[CH-]1C=CC=C1.[CH-]1C=CC=C1.[Fe+2]", 11, 10),   # ferrocene, ionic form
    ("N.N.Cl[Pt]Cl", 5, 2),                   # cisplatin
    ("[O-][n+]1ccccc1", 7, 7),
])
def test_charged_isotopes_metals_salts(smiles, num_atoms, num_bonds):
    graph = featurize(smiles)
    assert (graph.num_atoms, graph.num_bonds) == (num_atoms, num_bonds)
    assert_within_vocabulary(graph, smiles)
    mol = rdkit_parse(smiles)
    assert np.array_equal(graph.atom_features, reference_atom_features(mol))


def test_salt_keeps_all_fragments_and_charges():
    graph = featurize("[Na+].[Cl-]")
    assert graph.atom_features[:, 0].tolist() == [10, 16]    # Na, Cl
    assert graph.atom_features[:, 3].tolist() == [6, 4]      # +1, -1


def test_isotope_does_not_change_features():
    assert np.array_equal(featurize("[13CH4]").atom_features, featurize("C").atom_features)


@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1", PARACETAMOL, "[Na+].[Cl-]", "N.N.Cl[Pt]Cl", "C"])
def test_hydrogens_true_adds_all_hydrogens(smiles):
    heavy = featurize(smiles)
    full = featurize(smiles, hydrogens=True)
    assert full.num_atoms == Chem.AddHs(rdkit_parse(smiles)).GetNumAtoms()
    # AddHs appends hydrogens, and total H / degree count them either way: heavy atoms look the same.
    assert np.array_equal(full.atom_features[:heavy.num_atoms], heavy.atom_features)
    assert (full.atom_features[heavy.num_atoms:, 0] == 0).all()
    assert full.num_atoms - heavy.num_atoms == heavy.atom_features[:, 4].sum()


# ---------------------------------------------------------------------------------------------------- conformers

@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1", PARACETAMOL])
@pytest.mark.parametrize("hydrogens", [False, True])
def test_conformer_positions(smiles, hydrogens):
    graph = featurize(smiles, conformer=True, hydrogens=hydrogens)
    assert graph.positions.dtype == np.float32 and graph.positions.shape == (graph.num_atoms, 3)
    assert np.isfinite(graph.positions).all()
    lengths = bond_lengths(graph)
    assert ((lengths > 0.9) & (lengths < 2.0)).all(), lengths
    assert graph.conformer_source == "etkdg+mmff"


def test_conformer_is_deterministic_per_seed_and_keeps_heavy_coordinates():
    first = featurize(PARACETAMOL, conformer=True, seed=7)
    again = featurize(PARACETAMOL, conformer=True, seed=7)
    other = featurize(PARACETAMOL, conformer=True, seed=8)
    assert np.array_equal(first.positions, again.positions)
    assert not np.allclose(first.positions, other.positions, atol=1e-2)
    # RDKit reads a seed of 0 as 1: seeds 0 and 1 gave one conformer.
    zero, one = (featurize(PARACETAMOL, conformer=True, seed=seed).positions for seed in (0, 1))
    assert not np.allclose(zero, one, atol=1e-2)
    # The same hydrogen-complete molecule is embedded either way; hydrogens=False keeps its heavy-atom rows.
    with_h = featurize(PARACETAMOL, conformer=True, hydrogens=True, seed=7)
    assert np.array_equal(with_h.positions[:first.num_atoms], first.positions)


@pytest.mark.parametrize("smiles", ["[Na+].[Cl-]", "CC(=O)[O-].[Na+]", "c1ccccc1.c1ccccc1", "C.C"])
def test_fragments_of_a_salt_or_mixture_do_not_overlap(smiles):
    """ETKDG embeds every fragment about the origin: the ions sat at distance 0 and the benzenes were
    superimposed. Each fragment keeps its geometry; atoms of different fragments stand at least 1.5 A apart."""
    graph = featurize(smiles, conformer=True, hydrogens=True)
    mol = chem.Chem.MolFromSmiles(smiles)
    fragment = np.zeros(graph.num_atoms, dtype=int)
    for index, atoms in enumerate(chem.Chem.GetMolFrags(chem.Chem.AddHs(mol))):
        fragment[list(atoms)] = index
    distances = np.linalg.norm(graph.positions[:, None] - graph.positions[None], axis=-1)
    between = distances[fragment[:, None] != fragment[None, :]]
    assert between.min() > 1.5, between.min()
    lengths = bond_lengths(graph)
    assert ((lengths > 0.9) & (lengths < 2.0)).all(), lengths


def test_mmff_relaxes_the_fragments_together():
    """RDKit's MMFF leaves out the forces between fragments unless asked: the ions of a salt stayed exactly
    FRAGMENT_GAP apart, where they were set."""
    positions = featurize("[Na+].[Cl-]", conformer=True).positions
    distance = float(np.linalg.norm(positions[0] - positions[1]))
    assert 2.0 < distance < chem.FRAGMENT_GAP - 0.3, distance


def test_a_large_molecule_embeds_from_random_coordinates():
    """C70H142 (212 atoms with hydrogens): ETKDG's default start fails past ~200 atoms; RDKit's advice for large
    molecules, random starting coordinates, embeds it."""
    graph = featurize("C" * 70, conformer=True)
    assert graph.conformer_source == "etkdg+mmff"
    lengths = bond_lengths(graph)
    assert ((lengths > 1.4) & (lengths < 1.7)).all(), lengths


def test_embedding_failure_is_reported():
    assert featurize("C1C2CC12", conformer=True).positions is not None   # the skeleton itself embeds
    with pytest.raises(ValueError) as error:
        featurize(UNEMBEDDABLE, conformer=True)
    assert "embedding failed" in str(error.value) and repr(UNEMBEDDABLE) in str(error.value)
    graphs, failures = featurize_many(["CCO", UNEMBEDDABLE], conformer=True, errors="skip", progress=False)
    assert len(graphs) == 1
    assert [(f.index, f.text) for f in failures] == [(1, UNEMBEDDABLE)]
    assert "embedding failed" in failures[0].reason


def test_embedding_failure_never_fakes_coordinates(monkeypatch):
    monkeypatch.setattr(chem.rdDistGeom, "EmbedMolecule", lambda *args, **kwargs: -1)
    with pytest.raises(ValueError, match="embedding failed"):
        featurize("CCO", conformer=True)


@pytest.mark.parametrize("smiles", ["OB(O)c1ccccc1", "C[Se]C"])
def test_etkdg_only_when_mmff_lacks_parameters(smiles):
    graph = featurize(smiles, conformer=True)
    assert graph.conformer_source == "etkdg"
    assert np.isfinite(graph.positions).all()
    lengths = bond_lengths(graph)
    assert ((lengths > 0.9) & (lengths < 2.2)).all(), lengths   # C-Se is ~1.95 A


# ------------------------------------------------------------------------------------------------ Mol / SDF input

def _embedded_paracetamol(name="paracetamol", seed=3):
    mol = Chem.AddHs(Chem.MolFromSmiles(PARACETAMOL))
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = seed
    assert rdDistGeom.EmbedMolecule(mol, params) == 0
    mol.SetProp("_Name", name)
    return mol


def _write_sdf(path, mols):
    writer = Chem.SDWriter(str(path))
    for mol in mols:
        writer.write(mol)
    writer.close()


def test_sdf_input_keeps_its_coordinates(tmp_path):
    path = tmp_path / "ligand.sdf"
    _write_sdf(path, [_embedded_paracetamol()])
    (mol,) = read_sdf(path)
    written = mol.GetConformer().GetPositions()
    assert mol.GetNumAtoms() == 20    # hydrogens kept by read_sdf
    with_h = featurize(mol, hydrogens=True)
    assert with_h.conformer_source == "input" and with_h.name == "paracetamol"
    assert np.array_equal(with_h.positions, written.astype(np.float32))
    for conformer in (False, True):
        heavy = featurize(mol, conformer=conformer)
        assert heavy.conformer_source == "input" and heavy.num_atoms == 11
        assert np.array_equal(heavy.positions, written[:11].astype(np.float32))
    assert heavy.smiles == Chem.MolToSmiles(Chem.MolFromSmiles(PARACETAMOL))
    assert np.array_equal(heavy.atom_features, featurize(PARACETAMOL).atom_features)
    assert mol.GetNumAtoms() == 20    # the input Mol is not modified


def test_3d_input_without_hydrogens_gets_placed_hydrogens(tmp_path):
    heavy_only = Chem.RemoveHs(_embedded_paracetamol())
    graph = featurize(heavy_only, hydrogens=True)
    assert graph.num_atoms == 20 and graph.conformer_source == "input"
    assert np.array_equal(graph.positions[:11], heavy_only.GetConformer().GetPositions().astype(np.float32))
    lengths = bond_lengths(graph)
    assert np.isfinite(graph.positions).all() and ((lengths > 0.9) & (lengths < 2.0)).all()


def test_non_finite_coordinates_are_not_a_geometry():
    mol = chem.Chem.AddHs(chem.Chem.MolFromSmiles("CCO"))
    rdDistGeom.EmbedMolecule(mol, randomSeed=0)
    mol.GetConformer().SetAtomPosition(0, chem.Point3D(float("nan"), 0.0, 1.0))
    assert featurize(mol).positions is None  # its only conformer is dropped, as a 2D one is
    generated = featurize(mol, conformer=True)
    assert generated.conformer_source == "etkdg+mmff" and np.isfinite(generated.positions).all()


def _embedded(smiles, seed=0):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert rdDistGeom.EmbedMolecule(mol, randomSeed=seed) == 0
    mol.SetProp("_Name", smiles)
    return mol


def _ion_pair():
    """Na+ Cl- 2.8 A apart on the x axis (RDKit's embedding stacks both ions at the origin)."""
    mol = Chem.MolFromSmiles("[Na+].[Cl-]")
    conformer = Chem.Conformer(2)
    conformer.SetAtomPosition(1, chem.Point3D(2.8, 0.0, 0.0))
    mol.AddConformer(conformer, assignId=True)
    mol.SetProp("_Name", "[Na+].[Cl-]")
    return mol


@pytest.mark.parametrize("smiles", ["O", "O=C=O", "C#N", "[Na+]", "[Na+].[Cl-]"])
def test_flat_3d_sdf_keeps_its_coordinates(tmp_path, smiles):
    """RDKit embeds these in the z = 0 plane; their SDF says 3D, so their coordinates are the input geometry."""
    path = tmp_path / "flat.sdf"
    _write_sdf(path, [_ion_pair() if smiles == "[Na+].[Cl-]" else _embedded(smiles)])
    assert path.read_text().splitlines()[1].rstrip().endswith("3D")
    (mol,) = read_sdf(path)
    written = mol.GetConformer().GetPositions()
    assert mol.GetConformer().Is3D() and (written[:, 2] == 0).all()
    for conformer in (False, True):
        graph = featurize(mol, hydrogens=True, conformer=conformer)
        assert graph.conformer_source == "input" and graph.name == smiles
        assert np.array_equal(graph.positions, written.astype(np.float32))
        heavy = featurize(mol, conformer=conformer)
        assert heavy.conformer_source == "input"
        assert np.array_equal(heavy.positions, written[:heavy.num_atoms].astype(np.float32))


def test_3d_conformer_with_every_atom_at_one_point_is_not_a_geometry():
    """A 3D-flagged conformer left at the origin (RDKit's Conformer(n) default) would make every distance 0."""
    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    mol.AddConformer(Chem.Conformer(mol.GetNumAtoms()), assignId=True)
    assert mol.GetConformer().Is3D()
    assert featurize(mol).positions is None
    assert featurize(mol, conformer=True).conformer_source == "etkdg+mmff"
    salt = _embedded("[Na+].[Cl-]")
    assert salt.GetConformer().Is3D() and not salt.GetConformer().GetPositions().any(), "RDKit stacks the ions"
    assert featurize(salt).positions is None
    generated = featurize(salt, conformer=True)
    assert generated.conformer_source == "etkdg+mmff" and np.linalg.norm(np.subtract(*generated.positions)) > 1
    ion = Chem.MolFromSmiles("[Na+]")
    ion.AddConformer(Chem.Conformer(1), assignId=True)
    graph = featurize(ion)    # one atom at the origin is a geometry: it has no distance to get wrong
    assert graph.conformer_source == "input" and graph.positions.tolist() == [[0.0, 0.0, 0.0]]


def test_2d_sdf_is_not_treated_as_3d():
    if not os.path.isfile(NCI_SDF):
        pytest.skip(f"RDKit's NCI SDF is not installed at {NCI_SDF}")
    mols = read_sdf(NCI_SDF)
    assert len(mols) == 200 and all(m is not None for m in mols)
    graph = featurize(mols[0])
    assert graph.positions is None and graph.conformer_source is None
    generated = featurize(mols[0], conformer=True)
    assert generated.conformer_source == "etkdg+mmff"
    assert not np.allclose(generated.positions[:, 2], 0.0)


def test_read_sdf_broken_record_is_none_and_reported(tmp_path):
    good = Chem.MolToMolBlock(Chem.MolFromSmiles("CCO"))
    broken = good.replace("  3  2  0", "  3  9  0", 1)    # claims 9 bonds, has 2
    assert broken != good
    text = "".join(block + "$$$$\n" for block in (good, broken, good))
    path = tmp_path / "three.sdf"
    path.write_text(text)
    gz_path = tmp_path / "three.sdf.gz"
    with gzip.open(gz_path, "wt") as stream:
        stream.write(text)
    for file in (path, gz_path):
        mols = read_sdf(file)
        assert [m is None for m in mols] == [False, True, False], file
        graphs, failures = featurize_many(mols, errors="skip", progress=False)
        assert len(graphs) == 2
        assert [(f.index, f.reason.startswith("no molecule")) for f in failures] == [(1, True)]


def test_read_sdf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.sdf"):
        read_sdf(tmp_path / "nothing.sdf")


def test_read_sdf_empty_file_has_no_records(tmp_path):
    (tmp_path / "empty.sdf").write_bytes(b"")
    with gzip.open(tmp_path / "empty.sdf.gz", "wb"):
        pass
    assert read_sdf(tmp_path / "empty.sdf") == [] and read_sdf(tmp_path / "empty.sdf.gz") == []


def test_protein_ligand_benchmark_ligands():
    root = os.path.join(SHARED_DATA, "protein-ligand-benchmark")
    if not os.path.isdir(root):
        pytest.skip(f"{root} is not available on this machine")
    path = os.path.join(root, sorted(os.listdir(root))[0], "02_ligands", "ligands.sdf")
    mols = read_sdf(path)
    graphs, failures = featurize_many(mols, hydrogens=True, errors="skip", progress=False)
    assert not failures and len(graphs) == len(mols) > 0
    for mol, graph in zip(mols, graphs):
        assert graph.conformer_source == "input" and graph.name
        assert np.array_equal(graph.positions, mol.GetConformer().GetPositions().astype(np.float32))


# -------------------------------------------------------------------------------------------------- featurize_many

MIXED = ["CCO", "C1CC", "c1ccccc1", "", "C(C)(C)(C)(C)C", None, "CC(=O)O"]


def test_featurize_many_skip_keeps_order_and_reports_failures():
    graphs, failures = featurize_many(MIXED, errors="skip", progress=False)
    assert [g.smiles for g in graphs] == ["CCO", "c1ccccc1", "CC(=O)O"]
    assert [(f.index, f.text) for f in failures] == [(1, "C1CC"), (3, ""), (4, "C(C)(C)(C)(C)C"), (5, "None")]
    assert "unclosed ring" in failures[0].reason
    assert "empty" in failures[1].reason
    assert "Explicit valence for atom # 0 C, 5" in failures[2].reason
    assert "no molecule" in failures[3].reason
    assert all(isinstance(f, Failure) for f in failures)
    for graph in graphs:
        assert_same_graph(graph, featurize(graph.smiles), graph.smiles)


@pytest.mark.parametrize("workers", [None, 2])
def test_featurize_many_raise_names_index_text_reason(workers):
    status = rdBase.LogStatus()
    with pytest.raises(ValueError) as error:
        featurize_many(MIXED, progress=False, workers=workers)
    message = str(error.value)
    assert "items[1]" in message and "'C1CC'" in message and "unclosed ring" in message
    assert rdBase.LogStatus() == status


@pytest.mark.parametrize("kwargs, error, name", [
    ({"errors": "ignore"}, ValueError, "errors"),
    ({"workers": 0}, ValueError, "workers"),
    ({"workers": -2}, ValueError, "workers"),
    ({"workers": 2.0}, TypeError, "workers"),
    ({"labels": [[1.0], [2.0]]}, ValueError, "labels"),
    ({"conformers": True}, TypeError, "conformers"),
])
def test_featurize_many_rejects_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        featurize_many(["CCO", "CC", "C"], progress=False, **kwargs)


def test_featurize_many_rejects_non_molecule_items():
    with pytest.raises(TypeError, match=r"items\[1\]"):
        featurize_many(["CCO", 3.5], progress=False)
    # A bare string is not a list of molecules (list("CCO") would be C, C and O).
    for single in ("CCO", chem.Chem.MolFromSmiles("CCO")):
        with pytest.raises(TypeError, match="got a single"):
            featurize_many(single, progress=False)


def test_featurize_many_attaches_labels():
    labels = np.array([[1.0, np.nan], [2.0, 0.5], [3.0, 1.5]])
    graphs, failures = featurize_many(["CCO", "C1CC", "CC"], labels=labels, errors="skip", progress=False)
    assert [f.index for f in failures] == [1]
    assert graphs[0].labels.dtype == np.float32 and graphs[0].labels.shape == (2,)
    assert np.array_equal(graphs[0].labels, np.array([1.0, np.nan], np.float32), equal_nan=True)
    assert np.array_equal(graphs[1].labels, np.array([3.0, 1.5], np.float32))
    one_column, _ = featurize_many(["CCO", "CC"], labels=[0.0, 1.0], progress=False)
    assert [g.labels.tolist() for g in one_column] == [[0.0], [1.0]]
    with pytest.raises(TypeError, match="featurize_many: progress must be a bool, got 'no'"):
        featurize_many(["CCO"], progress="no")
    # Past float32's range a label became inf, with only numpy's overflow warning.
    for bad, where in (([1e40, 2.0], r"labels\[0\] is infinite in float32 \(the value given: 1e\+40\)"),
                       ([[1.0, 2.0], [3.0, float("inf")]], r"labels\[1, 1\] is infinite in float32")):
        with pytest.raises(ValueError, match=where):
            featurize_many(["CCO", "CC"], labels=bad, progress=False)


def test_featurize_many_workers_match_in_process(nci_smiles):
    mols = read_sdf(NCI_SDF)[:10] if os.path.isfile(NCI_SDF) else []
    items = nci_smiles[2080:2180] + ["C1CC", None] + mols + [_embedded_paracetamol()]
    labels = np.arange(2 * len(items), dtype=np.float64).reshape(-1, 2)
    serial = featurize_many(items, errors="skip", progress=False, labels=labels)
    parallel = featurize_many(items, errors="skip", progress=False, labels=labels, workers=2)
    assert serial[1] == parallel[1] and len(serial[1]) == 3     # 'C1CC', None, and NCI #2097
    assert len(serial[0]) == len(parallel[0]) == len(items) - 3
    for index, (a, b) in enumerate(zip(*(serial[0], parallel[0]))):
        assert_same_graph(a, b, f"graph {index}")
    conformers = [featurize_many(items[:6], conformer=True, progress=False, workers=w)[0] for w in (1, 2)]
    for a, b in zip(*conformers):
        assert_same_graph(a, b, a.smiles)


def test_featurize_many_progress_bar(capfd):
    featurize_many(["CCO", "CC"], progress=True)
    assert "mol" in capfd.readouterr().err
    featurize_many(["CCO", "CC"], progress=False)
    assert capfd.readouterr().err == ""


def test_full_default_set_fails_exactly_where_rdkit_does(nci_smiles):
    assert len(nci_smiles) == 4999
    rejected = [i for i, smiles in enumerate(nci_smiles) if rdkit_parse(smiles) is None]
    graphs, failures = featurize_many(nci_smiles, errors="skip", progress=False)
    assert [f.index for f in failures] == rejected
    assert [f.text for f in failures] == [nci_smiles[i] for i in rejected]
    assert all("greater than permitted" in f.reason or "Parse Error" in f.reason for f in failures), failures
    assert len(graphs) == len(nci_smiles) - len(rejected)
    maxima = np.max([g.atom_features.max(axis=0) for g in graphs], axis=0)
    assert (maxima < np.array(ATOM_FEATURE_DIMS)).all(), maxima


# ------------------------------------------------------------------------------------------------ MolGraph itself

def test_molgraph_pickles():
    graph = featurize_many([PARACETAMOL], conformer=True, labels=[[1.0, np.nan]], progress=False)[0][0]
    clone = pickle.loads(pickle.dumps(graph))
    assert_same_graph(graph, clone)
    assert clone.num_atoms == 11 and clone.num_bonds == 11


def test_molgraph_validates_fields():
    graph = featurize("CCO")
    with pytest.raises(ValueError, match="atom_features"):
        MolGraph(graph.atom_features.astype(np.int32), graph.edge_index, graph.bond_features)
    with pytest.raises(ValueError, match="bond_features"):
        MolGraph(graph.atom_features, graph.edge_index, graph.bond_features[:1])
    with pytest.raises(ValueError, match="positions"):
        MolGraph(graph.atom_features, graph.edge_index, graph.bond_features,
                 positions=np.zeros((2, 3), np.float32), conformer_source="input")
    with pytest.raises(ValueError, match="conformer_source"):
        MolGraph(graph.atom_features, graph.edge_index, graph.bond_features,
                 positions=np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="edge_index"):
        MolGraph(graph.atom_features, graph.edge_index.tolist(), graph.bond_features)


def _two_atoms(edge_index=((0,), (1,)), atom_features=None, bond_features=None):
    """C-C built by hand, with any field replaced."""
    graph = featurize("CC")
    return MolGraph(graph.atom_features if atom_features is None else np.array(atom_features, dtype=np.int64),
                    np.array(edge_index, dtype=np.int64).reshape(2, -1),
                    graph.bond_features if bond_features is None else np.array(bond_features, dtype=np.int64))


@pytest.mark.parametrize("edge_index, message", [
    ([[0], [3]], r"edge_index must hold atom indices in \[0, num_atoms\) = \[0, 2\), got 3 as the end atom of bond 0"),
    ([[0], [2]], r"edge_index .* got 2 as the end atom of bond 0"),
    ([[-1], [1]], r"edge_index .* got -1 as the begin atom of bond 0"),
])
def test_molgraph_rejects_bonds_outside_the_molecule(edge_index, message):
    with pytest.raises(ValueError, match=message):
        _two_atoms(edge_index)


def test_molgraph_rejects_a_second_bond_between_the_same_atoms():
    bond = featurize("CC").bond_features
    for edge_index in ([[0, 0], [1, 1]], [[0, 1], [1, 0]]):
        with pytest.raises(ValueError, match=r"edge_index must hold at most one bond per atom pair, got bonds 0 "
                                             r"and 1 both joining atoms 0 and 1"):
            _two_atoms(edge_index, bond_features=np.concatenate([bond, bond]))


def test_molgraph_accepts_a_self_loop():
    """Collate stores it consistently (the pair (0, 0) holds bond 0) and shortest paths ignore it."""
    graph = _two_atoms([[0], [0]])
    assert graph.num_bonds == 1


@pytest.mark.parametrize("field, column, value, message", [
    ("atom_features", 0, -1, r"atom_features column 0 \(atomic_number\) must hold vocabulary indices in "
                             r"\[0, 119\), got -1 in row 1; featurize maps a value outside the vocabulary to its "
                             r"last \(\"other\"\) index 118"),
    ("atom_features", 0, ATOM_FEATURE_DIMS[0], r"atom_features column 0 \(atomic_number\) .* got 119 in row 1"),
    ("atom_features", 8, 2, r"atom_features column 8 \(is_in_ring\) .* \[0, 2\), got 2 in row 1"),
    ("bond_features", 0, BOND_FEATURE_DIMS[0], r"bond_features column 0 \(bond_type\) must hold vocabulary "
                                               r"indices in \[0, 5\), got 5 in row 0"),
    ("bond_features", 1, -3, r"bond_features column 1 \(stereo\) .* got -3 in row 0"),
])
def test_molgraph_rejects_features_outside_their_vocabulary(field, column, value, message):
    features = getattr(featurize("CC"), field).copy()
    features[-1, column] = value
    with pytest.raises(ValueError, match=message):
        _two_atoms(**{field: features})
    features[-1, column] = (ATOM_FEATURE_DIMS if field == "atom_features" else BOND_FEATURE_DIMS)[column] - 1
    _two_atoms(**{field: features})    # the last ("other") index is inside the vocabulary


# ---------------------------------------------------------------------------------------------- default molecules

def test_default_molecules(nci_smiles):
    assert default_molecules(limit=3) == nci_smiles[:3]
    assert nci_smiles[0] == "CC1=CC(=O)C=CC1=O"
    assert all(smiles and not any(c.isspace() for c in smiles) for smiles in nci_smiles)
    with pytest.raises(ValueError, match="limit"):
        default_molecules(limit=-1)


def test_default_molecules_missing_file(monkeypatch, tmp_path):
    monkeypatch.setattr(chem, "DEFAULT_MOLECULES_PATH", str(tmp_path / "first_5K.smi"))
    with pytest.raises(FileNotFoundError, match="first_5K.smi"):
        default_molecules()


# ------------------------------------------------------------------------------------------------------- read_csv

CSV_TEXT = ("name,SMILES,y1,y2,note\n"
            "ethanol,CCO,1,0.5,liquid\n"
            "broken,C1CC,0,,n/a\n"
            "benzene,c1ccccc1,,2,\n")


def test_read_csv_defaults(tmp_path):
    path = tmp_path / "molecules.csv"
    path.write_text(CSV_TEXT)
    table = read_csv(path)
    assert isinstance(table, MoleculeTable) and len(table) == 3
    assert table.smiles == ["CCO", "C1CC", "c1ccccc1"]
    assert table.label_names == ["y1", "y2"]
    assert table.labels.dtype == np.float32 and table.labels.shape == (3, 2)
    expected = np.array([[1, 0.5], [0, np.nan], [np.nan, 2]], np.float32)
    assert np.array_equal(table.labels, expected, equal_nan=True)
    graphs, failures = featurize_many(table.smiles, labels=table.labels, errors="skip", progress=False)
    assert [f.index for f in failures] == [1]
    assert np.array_equal(graphs[1].labels, expected[2], equal_nan=True)


def test_read_csv_gzip_and_explicit_columns(tmp_path):
    path = tmp_path / "molecules.csv.gz"
    with gzip.open(path, "wt") as stream:
        stream.write(CSV_TEXT)
    table = read_csv(path, smiles_column="SMILES", label_columns=["y2"])
    assert table.smiles == ["CCO", "C1CC", "c1ccccc1"] and table.label_names == ["y2"]
    assert np.array_equal(table.labels[:, 0], np.array([0.5, np.nan, 2], np.float32), equal_nan=True)


def test_read_csv_first_column_when_no_smiles_header(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("structure,activity\nCCO,1\nCC,0\n")
    table = read_csv(path)
    assert table.smiles == ["CCO", "CC"] and table.label_names == ["activity"]


def test_read_csv_errors(tmp_path):
    path = tmp_path / "molecules.csv"
    path.write_text(CSV_TEXT)
    with pytest.raises(ValueError, match=r"'smile'.*\['name', 'SMILES', 'y1', 'y2', 'note'\]"):
        read_csv(path, smiles_column="smile")
    with pytest.raises(ValueError, match="label_columns.*'y3'"):
        read_csv(path, label_columns=["y1", "y3"])
    with pytest.raises(ValueError, match="line 2, column 'note': 'liquid' is not a number"):
        read_csv(path, label_columns=["note"])
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("smiles,y\nCCO,1\nCC,0,7\n")
    with pytest.raises(ValueError, match="line 3 has 3 cells"):
        read_csv(ragged)
    # The line in the file, blank lines and a quoted line break counted (it was the index among non-blank rows).
    gaps = tmp_path / "gaps.csv"
    gaps.write_text('smiles,y\n\nCCO,1\n"C\nC",2\nCC,x\n')
    with pytest.raises(ValueError, match="line 6, column 'y': 'x' is not a number"):
        read_csv(gaps, label_columns=["y"])
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "missing.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("smiles,name\nCCO,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv is not UTF-8 text \(line 2\)"):
        read_csv(latin)
    # The line of the bad byte, not of where the reader's decoded chunk ended ("after line 0").
    late = tmp_path / "late.csv"
    late.write_bytes(b"smiles,y\n" + b"CCO,1\n" * 5000 + b"CC\xff,1\n")
    with pytest.raises(ValueError, match=r"late.csv is not UTF-8 text \(line 5002\)"):
        read_csv(late)
    # A line of spaces is blank, not a row of one cell; a row of empty cells is a record (an empty SMILES, which
    # featurize_many reports), not dropped.
    spaces = tmp_path / "spaces.csv"
    spaces.write_text("smiles,y\nCCO,1\n   \n,\n")
    assert read_csv(spaces).smiles == ["CCO", ""]


def test_read_csv_refuses_ambiguous_columns_and_grouped_digits(tmp_path):
    twice = tmp_path / "twice.csv"
    twice.write_text("smiles,y,y\nCCO,1,2\n")
    with pytest.raises(ValueError, match="label_columns: .* has 2 columns named 'y'"):
        read_csv(twice, label_columns="y")
    # float() reads "1_000" as 1000; a CSV cell like that is text, so the column is not a label by default and
    # naming it is an error.
    grouped = tmp_path / "grouped.csv"
    grouped.write_text("smiles,count,y\nCCO,1_000,1\nCC,2,0\n")
    assert read_csv(grouped).label_names == ["y"]
    with pytest.raises(ValueError, match="line 2, column 'count': '1_000' is not a number"):
        read_csv(grouped, label_columns=["count"])
    # A value past float32's range, or "inf", became an infinite label (numpy's overflow warning at most).
    for cell in ("1e40", "-inf"):
        huge = tmp_path / "huge.csv"
        huge.write_text(f"smiles,y\nCC,0\nCCO,{cell}\n")
        with pytest.raises(ValueError, match=f"line 3, column 'y': '{cell}' is infinite in float32"):
            read_csv(huge)


@pytest.mark.parametrize("file, smiles_column, label_names", [
    ("bbbp.csv", "smiles", ["p_np"]),
    ("bace.csv", "mol", ["Class"]),
    ("hiv.csv.gz", "smiles", ["HIV_active"]),
])
def test_read_csv_moleculenet(file, smiles_column, label_names):
    path = os.path.join(MOLECULENET, file)
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not available on this machine")
    table = read_csv(path)
    assert table.label_names == label_names
    assert table.labels.shape == (len(table.smiles), len(label_names)) and len(table.smiles) > 1000
    assert not np.isnan(table.labels).any()
    assert read_csv(path, smiles_column=smiles_column).smiles == table.smiles


def test_read_csv_tox21_missing_labels():
    path = os.path.join(MOLECULENET, "tox21.csv")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not available on this machine")
    table = read_csv(path)
    assert len(table.label_names) == 12 and table.label_names[0] == "NR-AR"
    assert np.isnan(table.labels).any() and not np.isnan(table.labels).all()
    assert set(np.unique(table.labels[~np.isnan(table.labels)]).tolist()) == {0.0, 1.0}


@pytest.mark.full
def test_moleculenet_featurizes_with_exactly_rdkits_failures():
    path = os.path.join(MOLECULENET, "hiv.csv.gz")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not available on this machine")
    table = read_csv(path)
    rejected = [i for i, smiles in enumerate(table.smiles) if rdkit_parse(smiles) is None]
    graphs, failures = featurize_many(table.smiles, labels=table.labels, errors="skip", workers=2, progress=False)
    assert [f.index for f in failures] == rejected
    for graph in graphs:
        assert_within_vocabulary(graph)
