"""RDKit -> :class:`MolGraph`: OGB-style integer atom/bond features, bonds, an optional 3D conformer.

Everything here runs on the CPU and returns numpy arrays; collation into batches lives in :mod:`pyblend.data`.

Conventions shared by every function in this module:

* A graph has ``n`` atoms and ``E`` bonds. ``edge_index`` holds ONE column per bond, in RDKit's bond order
  (column ``e`` is bond ``e``); consumers that want both directions add the reverse themselves.
* Every integer feature is an index into a small vocabulary whose size is given by :data:`ATOM_FEATURE_DIMS` /
  :data:`BOND_FEATURE_DIMS`; a value outside a vocabulary maps to that column's last ("other") index, so every
  value is ``< dim`` and can index an embedding table directly.
* Invalid input raises ``ValueError`` carrying the input text and RDKit's own reason. RDKit's log output is
  silenced only while this module is calling RDKit (:class:`rdkit.rdBase.BlockLogs`, which restores the previous
  state on exit), because every message it would print is already reported through the exception or
  :class:`Failure`.

Importing this module imports RDKit; ``import pyblend`` does not.
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat

import numpy as np
from rdkit import Chem, RDConfig, rdBase
from rdkit.Chem import rdDistGeom, rdForceFieldHelpers
from rdkit.Geometry import Point3D
from tqdm import tqdm

from .features import (ATOM_FEATURE_DIMS, ATOM_FEATURE_NAMES, BOND_FEATURE_DIMS, BOND_FEATURE_NAMES, require_array,
                       require_vocabulary)

__all__ = [
    "ATOM_FEATURE_DIMS", "ATOM_FEATURE_NAMES", "BOND_FEATURE_DIMS", "BOND_FEATURE_NAMES", "DEFAULT_MOLECULES_PATH",
    "Failure", "MolGraph", "MoleculeTable", "default_molecules", "featurize", "featurize_many", "read_csv",
    "read_sdf", "smiles_of_line",
]


DEFAULT_MOLECULES_PATH = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")

CONFORMER_SOURCES = ("etkdg+mmff", "etkdg", "input")


def _enum_vocabulary(enum_type, ordered_names: Sequence[str], other_index: int) -> np.ndarray:
    """Vocabulary index for every ``int(enum value)``, plus one slot past the largest value for values a later
    RDKit may add (raw values are clipped into the table)."""
    table = np.full(max(int(value) for value in enum_type.values) + 2, other_index, dtype=np.int64)
    for index, name in enumerate(ordered_names):
        table[int(getattr(enum_type, name))] = index
    return table


def _range_vocabulary(first: int, last: int) -> tuple[int, np.ndarray]:
    """(shift, table) mapping integers ``first..last`` to ``0..last-first`` and anything else to ``last-first+1``:
    raw values are shifted by ``shift`` and clipped into the table, so both ends fall on the "other" slots."""
    other = last - first + 1
    return 1 - first, np.array([other, *range(other), other], dtype=np.int64)


class _Vocabularies:
    """Raw RDKit values (one row per feature column) -> vocabulary indices in one vectorised lookup.

    Each column j has a ``shift`` and a table; ``index = clip(raw + shift, 0, len(table) - 1)`` and the feature
    is ``table[index]``. The tables are concatenated so a whole (columns, n) block maps in a handful of numpy
    calls instead of a few per column: at ~17 atoms per molecule the cost is per call, not per element.
    """

    def __init__(self, columns: Sequence[tuple[int, np.ndarray]], dims: Sequence[int]):
        shifts, tables = zip(*columns)
        for table, dim in zip(tables, dims):
            if table.max() >= dim:
                raise RuntimeError(f"vocabulary table {table} exceeds its dimension {dim}")  # a bug in this file
        self.shift = np.array(shifts, dtype=np.int64)
        self.top = np.array([len(table) - 1 for table in tables], dtype=np.int64)
        self.offset = np.cumsum([0] + [len(table) for table in tables[:-1]], dtype=np.int64)
        self.table = np.concatenate(tables)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """raw: int64 (columns, n) -> C-contiguous int64 (n, columns) vocabulary indices."""
        index = np.add(raw.T, self.shift, order="C")
        # Two in-place ufuncs: np.clip's Python-level wrapper costs more than the clipping at this size.
        np.maximum(index, 0, out=index)
        np.minimum(index, self.top, out=index)
        index += self.offset
        return self.table[index]


_ATOM_VOCABULARIES = _Vocabularies([
    _range_vocabulary(1, 118),                                   # atomic number Z -> Z - 1
    (0, _enum_vocabulary(Chem.ChiralType,
                         ["CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER"], 4)),
    _range_vocabulary(0, 10),                                    # total degree
    _range_vocabulary(-5, 5),                                    # formal charge
    _range_vocabulary(0, 8),                                     # total hydrogens
    _range_vocabulary(0, 4),                                     # radical electrons
    (0, _enum_vocabulary(Chem.HybridizationType, ["SP", "SP2", "SP3", "SP3D", "SP3D2"], 5)),
    (0, np.array([0, 1], dtype=np.int64)),                       # is aromatic
    (0, np.array([0, 1], dtype=np.int64)),                       # is in ring
], ATOM_FEATURE_DIMS)

_BOND_VOCABULARIES = _Vocabularies([
    (0, _enum_vocabulary(Chem.BondType, ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC"], 4)),
    (0, _enum_vocabulary(Chem.BondStereo,
                         ["STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY"], 5)),
    (0, np.array([0, 1], dtype=np.int64)),                       # is conjugated
], BOND_FEATURE_DIMS)

# Mols cross process boundaries as RDKit binaries; the default pickle drops properties (so the SDF name) and
# rounds coordinates to float32, which would make workers>1 differ from workers=1.
_MOL_BINARY_FLAGS = Chem.PropertyPickleOptions.AllProps | Chem.PropertyPickleOptions.CoordsAsDouble

_LOG_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ?")


# --------------------------------------------------------------------------------------------------- data types

@dataclass(eq=False)
class MolGraph:
    """One molecule as integer-featured graph, optionally with 3D coordinates.

    Attributes:
        atom_features: int64 ``(n, 9)``, columns :data:`ATOM_FEATURE_NAMES`, column ``j`` < ``ATOM_FEATURE_DIMS[j]``.
        edge_index: int64 ``(2, E)``, one column per bond ``(begin atom, end atom)`` in RDKit bond order.
        bond_features: int64 ``(E, 3)``, columns :data:`BOND_FEATURE_NAMES`, row ``e`` describes ``edge_index[:, e]``.
        positions: float32 ``(n, 3)`` in Angstrom, or None.
        conformer_source: where ``positions`` came from: ``"etkdg+mmff"`` (ETKDGv3 then MMFF94 optimisation),
            ``"etkdg"`` (ETKDGv3 only, because MMFF has no parameters for this molecule), ``"input"`` (the 3D
            coordinates of the input Mol), or None when ``positions`` is None.
        smiles: the input text for a SMILES input, RDKit's canonical SMILES (heavy-atom form) for a Mol input.
        name: the Mol's ``_Name`` (e.g. the SDF title line) when non-empty, else None.
        labels: float32 ``(L,)`` with NaN for a missing label, or None.

    Construction checks the dtypes and shapes above and the values a batch relies on: every feature inside its
    vocabulary, every bond joining two atoms of this graph, at most one bond per atom pair (a self-loop is
    allowed); ``ValueError`` / ``TypeError`` name the field.
    """

    atom_features: np.ndarray
    edge_index: np.ndarray
    bond_features: np.ndarray
    positions: np.ndarray | None = None
    conformer_source: str | None = None
    smiles: str = ""
    name: str | None = None
    labels: np.ndarray | None = None

    def __post_init__(self):
        atoms = require_array("MolGraph: atom_features", self.atom_features, np.int64, (None, len(ATOM_FEATURE_DIMS)))
        num_atoms = atoms.shape[0]
        edges = require_array("MolGraph: edge_index", self.edge_index, np.int64, (2, None))
        bonds = require_array("MolGraph: bond_features", self.bond_features, np.int64,
                              (edges.shape[1], len(BOND_FEATURE_DIMS)))
        # Values are checked, not only shapes: collate writes them into shared batch arrays, where a bad atom
        # index lands in padding or in the next molecule (a negative one wraps round), and a feature outside its
        # vocabulary misleads whatever trusts the documented range: an embedding table indexed by offset (the
        # next feature's row, or off the table), MoleBlend's atom-pair types, pair_bond_features' 0 = no bond.
        require_vocabulary(atoms, "atom_features", lambda _: "MolGraph: atom_features")
        require_vocabulary(bonds, "bond_features", lambda _: "MolGraph: bond_features")
        _require_bonds(edges, num_atoms)
        if self.positions is not None:
            require_array("MolGraph: positions", self.positions, np.float32, (num_atoms, 3))
        if (self.positions is None) != (self.conformer_source is None):
            raise ValueError(f"MolGraph: conformer_source must be None exactly when positions is None, got "
                             f"conformer_source={self.conformer_source!r} with positions "
                             f"{'None' if self.positions is None else 'set'}")
        if self.conformer_source is not None and self.conformer_source not in CONFORMER_SOURCES:
            raise ValueError(f"MolGraph: conformer_source must be one of {CONFORMER_SOURCES} or None, "
                             f"got {self.conformer_source!r}")
        if self.labels is not None:
            require_array("MolGraph: labels", self.labels, np.float32, (None,))

    @property
    def num_atoms(self) -> int:
        return self.atom_features.shape[0]

    @property
    def num_bonds(self) -> int:
        return self.edge_index.shape[1]


def _require_bonds(edges: np.ndarray, num_atoms: int) -> None:
    """Check every bond of ``edge_index`` joins atoms of this graph and no atom pair holds two bonds.

    A self-loop is allowed: collate stores it consistently (the pair (i, i) holds its id) and shortest paths
    ignore it. A repeated pair is not: a batch holds one bond id per atom pair, so one of the two bonds would
    vanish from ``bond_ids``/``adjacency`` while ``edge_index`` keeps both, and a reversed repeat (u, v), (v, u)
    would leave ``bond_ids`` asymmetric.
    """
    if edges.shape[1] == 0:
        return
    if edges.view(np.uint64).max() >= num_atoms:
        end, bond = (int(i) for i in np.argwhere((edges < 0) | (edges >= num_atoms))[0])
        raise ValueError(f"MolGraph: edge_index must hold atom indices in [0, num_atoms) = [0, {num_atoms}), got "
                         f"{edges[end, bond]} as the {('begin', 'end')[end]} atom of bond {bond}")
    low, high = np.sort(edges, axis=0)
    pairs = low * num_atoms
    pairs += high  # one number per unordered atom pair
    ordered = np.sort(pairs)
    if np.count_nonzero(ordered[1:] == ordered[:-1]):
        repeated = ordered[1:][ordered[1:] == ordered[:-1]][0]
        first, again = (int(i) for i in np.flatnonzero(pairs == repeated)[:2])
        raise ValueError(f"MolGraph: edge_index must hold at most one bond per atom pair, got bonds {first} "
                         f"and {again} both joining atoms {low[first]} and {high[first]}")


@dataclass(frozen=True)
class Failure:
    """An input of :func:`featurize_many` that gave no graph: its position, its text and RDKit's reason."""

    index: int
    text: str
    reason: str


@dataclass(eq=False)
class MoleculeTable:
    """Rows of a molecule CSV: ``smiles`` (M strings, possibly invalid or empty), ``labels`` float32 ``(M, L)``
    with NaN for an empty cell, and ``label_names`` (L column headers)."""

    smiles: list[str]
    labels: np.ndarray
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.smiles)


class _InvalidMolecule(ValueError):
    """Internal: RDKit rejected an input; ``reason`` is the text that ends up in Failure.reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------- featurization

def featurize(mol_or_smiles, *, conformer: bool = False, hydrogens: bool = False, seed: int = 0) -> MolGraph:
    """Featurize one molecule given as a SMILES string or an ``rdkit.Chem.Mol``.

    Args:
        mol_or_smiles: a SMILES string (CXSMILES extensions after a space are allowed, a trailing name is not) or
            an ``rdkit.Chem.Mol``, which is copied and never modified. All fragments are kept (salts stay whole).
        conformer: generate 3D coordinates with ETKDGv3 (seeded by ``seed``), embedded with explicit hydrogens,
            then optimised with MMFF94 (RDKit's default 200 iterations) when MMFF has parameters for every atom
            (``conformer_source`` tells which). The fragments of a salt or mixture, which ETKDG embeds on top of
            each other, are first set side by side (``FRAGMENT_GAP`` apart) for MMFF to relax together.
            A Mol that already carries a 3D conformer (some z != 0) keeps its coordinates whatever this is.
        hydrogens: False: the atoms RDKit keeps after ``RemoveHs`` (heavy atoms, plus the hydrogens it must keep
            such as isotopic ``[2H]``); other hydrogens only count in the ``total_hydrogens`` feature.
            True: every hydrogen is an atom (``Chem.AddHs``: the molecule's atoms keep their order and the added
            hydrogens follow; for a Mol with a 3D conformer they are placed from its coordinates).
        seed: int in ``[0, 2**31 - 1)``, the ETKDG random seed; the same seed gives the same coordinates, and
            different seeds different ones (RDKit runs ``seed + 1``: it reads a seed of 0 as 1).

    Returns:
        a :class:`MolGraph`.

    Raises:
        TypeError: ``mol_or_smiles`` is neither ``str`` nor ``Chem.Mol``, or an option has the wrong type.
        ValueError: the SMILES does not parse or sanitise (the message quotes the input and RDKit's reason),
            the molecule has no atoms, or 3D embedding failed.
    """
    _check_options("featurize", conformer, hydrogens, seed)
    if not isinstance(mol_or_smiles, (str, Chem.Mol)):
        raise TypeError(f"featurize: mol_or_smiles must be a SMILES str or an rdkit.Chem.Mol, "
                        f"got {type(mol_or_smiles).__name__}")
    with rdBase.BlockLogs():
        try:
            return _featurize_unchecked(mol_or_smiles, conformer, hydrogens, seed)
        except _InvalidMolecule as error:
            raise ValueError(f"featurize: {_describe_input(mol_or_smiles)} failed: {error.reason}") from None


def _check_options(caller: str, conformer, hydrogens, seed) -> None:
    for option, value in (("conformer", conformer), ("hydrogens", hydrogens)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{caller}: {option} must be a bool, got {type(value).__name__} {value!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{caller}: seed must be an int, got {type(seed).__name__} {seed!r}")
    # RDKit reads a negative randomSeed as "seed from the clock", which would break reproducibility.
    if not 0 <= seed < 2**31 - 1:
        raise ValueError(f"{caller}: seed must be in [0, 2**31 - 1), got {seed}")


def _describe_input(mol_or_smiles) -> str:
    if isinstance(mol_or_smiles, str):
        return f"SMILES {mol_or_smiles!r}"
    return f"Mol {_mol_text(mol_or_smiles)!r}"


def _mol_text(mol) -> str:
    """Best human-readable text for a Mol input: its name, else its SMILES, else a placeholder."""
    name = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
    try:
        smiles = Chem.MolToSmiles(mol)
    except Exception:  # an unsanitisable Mol may not even write a SMILES; the name or placeholder still helps
        smiles = ""
    if name and smiles:
        return f"{name} ({smiles})"
    return name or smiles or "<unnamed Mol>"


def _featurize_unchecked(item, conformer: bool, hydrogens: bool, seed: int) -> MolGraph:
    """Featurize a str or Mol whose type and options were already checked; RDKit logs must be blocked."""
    name = None
    positions = None
    source = None
    if isinstance(item, str):
        smiles = str(item)  # a numpy.str_ from a column would otherwise travel inside every graph
        mol = _parse_smiles(item)
        if hydrogens:
            with _rdkit_step("add hydrogens"):
                mol = Chem.AddHs(mol)
    else:
        mol, conformer_id = _prepare_input_mol(item)
        name = (mol.GetProp("_Name") if mol.HasProp("_Name") else "") or None
        with _rdkit_step("remove hydrogens"):
            heavy = Chem.RemoveHs(mol)
        smiles = Chem.MolToSmiles(heavy)
        if hydrogens:
            # AddHs keeps the hydrogens already present (and their input coordinates) and appends the missing
            # ones, placed next to their atom when there are coordinates.
            with _rdkit_step("add hydrogens"):
                mol = Chem.AddHs(mol, addCoords=conformer_id is not None)
        else:
            mol = heavy
        if conformer_id is not None:
            positions = mol.GetConformer(conformer_id).GetPositions().astype(np.float32)
            source = "input"
    if mol.GetNumAtoms() == 0:
        raise _InvalidMolecule("the molecule has no atoms")
    if conformer and positions is None:
        positions, source = _generate_conformer(mol, hydrogens, seed)
    atom_features = _atom_features(mol)
    edge_index, bond_features = _bond_features(mol)
    return MolGraph(atom_features=atom_features, edge_index=edge_index, bond_features=bond_features,
                    positions=positions, conformer_source=source, smiles=smiles, name=name)


@contextmanager
def _rdkit_step(action: str):
    """Turn an exception RDKit raises for one unusual molecule into that molecule's failure, so that a batch of
    thousands is not lost to it; the reason names the step and keeps RDKit's message."""
    try:
        yield
    except _InvalidMolecule:
        raise
    except (RuntimeError, ValueError) as error:  # RDKit's invariant violations and sanitisation exceptions
        raise _InvalidMolecule(f"RDKit failed to {action}: {type(error).__name__}: {error}") from None


def _parse_smiles(text: str):
    """Parse and sanitise a SMILES with RDKit's defaults, or raise _InvalidMolecule with RDKit's reason."""
    if not text.strip():
        raise _InvalidMolecule("empty SMILES")
    pieces = text.split(None, 1)  # the SMILES, and what follows whitespace
    smiles = pieces[0]
    if not smiles.isascii():
        # RDKit drops a trailing run of non-ASCII characters ("CCN’", a zero-width space, "°" pasted along) and
        # parses what is left as a smaller molecule.
        position, character = next((i, c) for i, c in enumerate(smiles) if not c.isascii())
        raise _InvalidMolecule(f"non-ASCII character {character!r} at position {position}: SMILES are ASCII "
                               f"(RDKit drops them at the end of a SMILES and reads a smaller molecule)")
    mol = Chem.MolFromSmiles(text)
    if mol is None:
        # Failures are rare, so only then pay for a second parse that records RDKit's reason.
        raise _InvalidMolecule(_rdkit_reason(text))
    # RDKit reads "CCO ethanol" as CCO named "ethanol", so a pasted "SMILES id" line would be half-read in
    # silence; only a CXSMILES extension block ("... |...|") may follow whitespace.
    if len(pieces) == 2 and not pieces[1].startswith("|"):
        raise _InvalidMolecule(f"whitespace inside the SMILES: RDKit would read only {pieces[0]!r} and take "
                               f"{pieces[1]!r} as a name; pass the SMILES alone")
    return mol


def _rdkit_reason(text: str) -> str:
    """RDKit's own explanation of why ``text`` does not parse or sanitise."""
    with rdBase.CaptureErrorLog() as capture:
        Chem.MolFromSmiles(text)
    lines = []
    for line in capture.messages.splitlines():
        line = _LOG_TIMESTAMP.sub("", line).rstrip()
        # RDKit logs some sanitisation errors twice (kekulisation, for one).
        if line and (not lines or lines[-1] != line):
            lines.append(line)
    if lines:
        return "\n".join(lines)
    # Without a logged message (a future RDKit may log elsewhere), sanitising by hand still raises with the reason.
    unsanitized = Chem.MolFromSmiles(text, sanitize=False)
    if unsanitized is None:
        return "RDKit could not parse the SMILES (it gave no reason)"
    try:
        Chem.SanitizeMol(unsanitized)
    except Exception as error:  # RDKit's MolSanitizeException family
        return str(error)
    return "RDKit rejected the SMILES (it gave no reason)"


def _prepare_input_mol(mol):
    """Copy and sanitise an input Mol; return it with the id of its first conformer that is a 3D geometry
    (:func:`_is_geometry`), or None, with every conformer removed, when none is."""
    mol = Chem.Mol(mol)
    try:
        Chem.SanitizeMol(mol)
    except Exception as error:  # RDKit's MolSanitizeException family carries the reason in its message
        raise _InvalidMolecule(f"RDKit could not sanitise the Mol: {error}") from None
    conformer_id = next((conformer.GetId() for conformer in mol.GetConformers() if _is_geometry(conformer)), None)
    if not mol.HasProp("_StereochemDone"):
        # A Mol read with sanitize=False has had no stereo perception, which RDKit's readers run after
        # sanitising: its chirality tags (from 3D, or none) and E/Z bonds would differ from the same molecule
        # read normally. Perceived here as they would be.
        with _rdkit_step("assign stereochemistry"):
            if conformer_id is not None:
                Chem.AssignStereochemistryFrom3D(mol, confId=conformer_id)
            else:
                Chem.AssignStereochemistry(mol, cleanIt=True, force=True)
    if conformer_id is None:
        mol.RemoveAllConformers()
    return mol, conformer_id


def _is_geometry(conformer) -> bool:
    """Whether an input conformer holds real 3D coordinates worth keeping as ``conformer_source == "input"``."""
    positions = conformer.GetPositions()
    if len(positions) == 0 or not np.isfinite(positions).all():
        return False
    # Several atoms all at one point (e.g. a record whose coordinates were left at 0) is a placeholder, not a
    # geometry: every distance would be 0. A single atom (a lone ion) has no distance to get wrong.
    if len(positions) > 1 and not np.ptp(positions, axis=0).any():
        return False
    if conformer.Is3D():
        # RDKit embeds small molecules (water, CO2, HCN, ions, salts) in the z = 0 plane and a 3D SDF header keeps
        # that flag, so a flat 3D conformer is still a geometry.
        return True
    # Not flagged 3D (a 2D SDF header, Compute2DCoords): a depiction when every z == 0; a hand-built conformer
    # with some z != 0 is still taken as 3D (RDKit's SDF reader flags such a 2D-header record 3D itself).
    return bool(np.any(positions[:, 2] != 0.0))


def _generate_conformer(mol, hydrogens: bool, seed: int):
    """ETKDGv3 (+ MMFF94 when parametrised) coordinates for ``mol``'s atoms: float32 (n, 3) and the source."""
    # Geometry needs the hydrogens even when the graph does not: AddHs appends them after the existing atoms,
    # so the first n rows are ``mol``'s own atoms.
    with _rdkit_step("add hydrogens for embedding"):
        embedded = Chem.Mol(mol) if hydrogens else Chem.AddHs(mol)
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = int(seed) + 1  # RDKit's generator takes a seed of 0 as 1: seeds 0 and 1 gave one conformer
    with _rdkit_step("embed the molecule in 3D"):
        embedded_id = rdDistGeom.EmbedMolecule(embedded, params)
        if embedded_id < 0:
            # Past ~200 atoms (hydrogens counted) the eigenvalue start fails where random starting coordinates,
            # RDKit's advice for large molecules, embed (C70H142: 212 atoms).
            params.useRandomCoords = True
            embedded_id = rdDistGeom.EmbedMolecule(embedded, params)
    if embedded_id < 0:
        raise _InvalidMolecule(f"3D embedding failed (RDKit ETKDGv3, seed {seed}, also from random coordinates; "
                               f"{embedded.GetNumAtoms()} atoms with hydrogens)")
    fragments = Chem.GetMolFrags(embedded)
    if len(fragments) > 1:
        _set_fragments_apart(embedded.GetConformer(embedded_id), fragments)
    source = "etkdg"
    with _rdkit_step("optimise the conformer with MMFF94"):
        if rdForceFieldHelpers.MMFFHasAllMoleculeParams(embedded):
            # RDKit leaves out the forces between fragments by default: a salt's ions stayed where they were set.
            rdForceFieldHelpers.MMFFOptimizeMolecule(embedded, confId=embedded_id, ignoreInterfragInteractions=False)
            source = "etkdg+mmff"
    positions = embedded.GetConformer(embedded_id).GetPositions()[: mol.GetNumAtoms()]
    return positions.astype(np.float32), source


# Angstroms between the spheres around neighbouring fragments of a salt or mixture, before MMFF relaxes them.
FRAGMENT_GAP = 3.0


def _set_fragments_apart(conformer, fragments) -> None:
    """ETKDG embeds each fragment of a multi-fragment molecule about the origin, all on top of each other (two
    ions at distance 0, two benzenes superimposed). Each keeps its own geometry and is moved to lie side by side
    along x, ``FRAGMENT_GAP`` between the spheres that hold them; MMFF, where it has parameters, then relaxes the
    whole, its forces between the fragments included."""
    positions = conformer.GetPositions()
    edge = 0.0
    for atoms in map(list, fragments):
        centre = positions[atoms].mean(0)
        radius = float(np.linalg.norm(positions[atoms] - centre, axis=1).max())
        positions[atoms] += np.array([edge + radius, 0.0, 0.0]) - centre
        edge += 2 * radius + FRAGMENT_GAP
    for index, (x, y, z) in enumerate(positions.tolist()):
        conformer.SetAtomPosition(index, Point3D(x, y, z))


def _atom_features(mol) -> np.ndarray:
    count = mol.GetNumAtoms()
    atoms = list(map(mol.GetAtomWithIdx, range(count)))
    # One getter at a time over all atoms, mapped over the unbound method and read by a single fromiter: about
    # half the cost of a per-atom Python loop, which matters at thousands of molecules per second.
    raw = np.fromiter(chain(
        map(Chem.Atom.GetAtomicNum, atoms),
        map(Chem.Atom.GetChiralTag, atoms),
        map(Chem.Atom.GetTotalDegree, atoms),
        map(Chem.Atom.GetFormalCharge, atoms),
        # includeNeighbors: H atoms count too, so hydrogens=True/False give heavy atoms the same features.
        map(Chem.Atom.GetTotalNumHs, atoms, repeat(True, count)),
        map(Chem.Atom.GetNumRadicalElectrons, atoms),
        map(Chem.Atom.GetHybridization, atoms),
        map(Chem.Atom.GetIsAromatic, atoms),
        map(Chem.Atom.IsInRing, atoms),
    ), dtype=np.int64, count=len(ATOM_FEATURE_DIMS) * count)
    return _ATOM_VOCABULARIES(raw.reshape(len(ATOM_FEATURE_DIMS), count))


def _bond_features(mol) -> tuple[np.ndarray, np.ndarray]:
    count = mol.GetNumBonds()
    bonds = list(map(mol.GetBondWithIdx, range(count)))
    raw = np.fromiter(chain(
        map(Chem.Bond.GetBeginAtomIdx, bonds),
        map(Chem.Bond.GetEndAtomIdx, bonds),
        map(Chem.Bond.GetBondType, bonds),
        map(Chem.Bond.GetStereo, bonds),
        map(Chem.Bond.GetIsConjugated, bonds),
    ), dtype=np.int64, count=5 * count).reshape(5, count)
    return raw[:2].copy(), _BOND_VOCABULARIES(raw[2:])


# ---------------------------------------------------------------------------------------------------- batches

def featurize_many(items: Iterable, *, errors: str = "raise", workers: int | None = None, progress: bool = True,
                   labels=None, **featurize_kwargs) -> tuple[list[MolGraph], list[Failure]]:
    """Featurize many molecules, keeping input order, in this process or in a pool of worker processes.

    Args:
        items: SMILES strings and/or ``rdkit.Chem.Mol`` objects; a None item (e.g. an SDF record RDKit could not
            read, see :func:`read_sdf`) is a failure with reason "no molecule".
        errors: ``"raise"``: raise ValueError at the first failure, naming its index, text and reason;
            ``"skip"``: leave failed inputs out of the graphs and report them in the failure list.
        workers: None or 1: this process. N > 1: a pool of N fresh processes ("forkserver" where available, else
            "spawn"); the results are identical to workers=1.
        progress: show a tqdm progress bar (unit "mol") on stderr.
        labels: optional array-like ``(len(items), L)`` (or ``(len(items),)``, read as L = 1) of floats, NaN for a
            missing label; row i becomes ``labels`` (float32 ``(L,)``) of the graph of item i.
        **featurize_kwargs: ``conformer``, ``hydrogens``, ``seed``, as for :func:`featurize`.

    Returns:
        ``(graphs, failures)``: the graphs of the inputs that worked, in input order, and one :class:`Failure` per
        input that did not, in input order.

    Raises:
        TypeError: an item is neither str, Chem.Mol nor None, or an option has the wrong type.
        ValueError: a bad ``errors``/``workers``/``labels`` argument, or a failure with ``errors="raise"``.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"featurize_many: errors must be 'raise' or 'skip', got {errors!r}")
    if workers is not None and (isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer))):
        raise TypeError(f"featurize_many: workers must be None or a positive int, got {type(workers).__name__}")
    if workers is not None and workers < 1:
        raise ValueError(f"featurize_many: workers must be None or a positive int, got {workers}")
    if not isinstance(progress, (bool, np.bool_)):  # "no" would show the bar
        raise TypeError(f"featurize_many: progress must be a bool, got {progress!r}")
    unknown = set(featurize_kwargs) - {"conformer", "hydrogens", "seed"}
    if unknown:
        raise TypeError(f"featurize_many: unexpected keyword argument(s) {sorted(unknown)}; "
                        "featurize accepts conformer, hydrogens, seed")
    options = {"conformer": False, "hydrogens": False, "seed": 0, **featurize_kwargs}
    _check_options("featurize_many", options["conformer"], options["hydrogens"], options["seed"])

    if isinstance(items, (str, bytes, Chem.Mol)):
        # list("CCO") would featurize C, C and O.
        raise TypeError(f"featurize_many: items must be an iterable of SMILES / Mols, got a single "
                        f"{type(items).__name__}; wrap it in a list, or call featurize")
    items = list(items)
    for index, item in enumerate(items):
        if item is not None and not isinstance(item, (str, Chem.Mol)):
            raise TypeError(f"featurize_many: items[{index}] must be a SMILES str, an rdkit.Chem.Mol or None, "
                            f"got {type(item).__name__} {item!r}")
    label_rows = _check_labels(labels, len(items))

    work = partial(_featurize_payload, conformer=options["conformer"], hydrogens=options["hydrogens"],
                   seed=options["seed"])
    graphs: list[MolGraph] = []
    failures: list[Failure] = []
    # closing(): on an early raise the generator must end now, unblocking RDKit's logs and stopping the pool,
    # not whenever the traceback that references it is collected.
    with tqdm(total=len(items), unit="mol", disable=not progress, file=sys.stderr) as bar, \
            closing(_run(work, items, workers)) as results:
        for index, result in enumerate(results):
            bar.update(1)
            if isinstance(result, MolGraph):
                if label_rows is not None:
                    result.labels = label_rows[index].copy()
                graphs.append(result)
                continue
            text, reason = result
            if errors == "raise":
                raise ValueError(f"featurize_many: items[{index}] ({text!r}) failed: {reason}")
            failures.append(Failure(index=index, text=text, reason=reason))
    return graphs, failures


def _check_labels(labels, count: int) -> np.ndarray | None:
    if labels is None:
        return None
    try:
        with np.errstate(over="ignore"):  # a value past float32's range is reported below, by index
            rows = np.array(labels, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"featurize_many: labels must be numeric array-like of shape (len(items), L): {error}") \
            from None
    if np.isinf(rows).any():
        index = tuple(int(i) for i in np.argwhere(np.isinf(rows))[0])
        raise ValueError(f"featurize_many: labels{list(index)} is infinite in float32 (the value given: "
                         f"{np.asarray(labels, dtype=object)[index]!r}); a label must be finite, NaN where missing")
    if rows.ndim == 1:
        rows = rows[:, None]
    if rows.ndim != 2 or rows.shape[0] != count:
        raise ValueError(f"featurize_many: labels must have shape ({count}, L) for {count} items, "
                         f"got {np.shape(labels)}")
    return rows


def _run(work, items: list, workers: int | None):
    """Yield ``work(payload)`` for every item, in order, in this process or in a pool."""
    if workers is None or workers == 1:
        with rdBase.BlockLogs():
            for item in items:
                yield work(item)
        return
    # Serialised here, where the original objects live, so that workers see exactly what workers=1 would.
    payloads = [item.ToBinary(_MOL_BINARY_FLAGS) if isinstance(item, Chem.Mol) else item for item in items]
    # Not "fork": the caller may hold threads (torch's, torch.compile's), and a forked child can inherit a lock one
    # of them held. Seen in CI: a forked multiprocessing.Pool, terminated on an early raise after earlier tests had
    # started threads, hung with its workers dead. Fresh workers and an executor that is shut down, not killed.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    chunksize = max(1, min(64, math.ceil(len(payloads) / (4 * workers))))
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_silence_worker_logs)
    try:
        yield from executor.map(work, payloads, chunksize=chunksize)
    finally:
        # An early stop (errors="raise") drops the chunks not started and waits for the running ones.
        executor.shutdown(wait=True, cancel_futures=True)


_WORKER_LOG_BLOCK = None


def _silence_worker_logs() -> None:
    """Pool initializer: keep RDKit's logs blocked for the worker's lifetime (failures are reported anyway)."""
    global _WORKER_LOG_BLOCK
    _WORKER_LOG_BLOCK = rdBase.BlockLogs()


def _featurize_payload(payload, *, conformer: bool, hydrogens: bool, seed: int):
    """A MolGraph, or ``(text, reason)`` for a failure. ``payload``: str, Mol, Mol binary (bytes) or None."""
    if payload is None:
        return "None", "no molecule (None item, e.g. an SDF record RDKit could not read)"
    if isinstance(payload, bytes):
        payload = Chem.Mol(payload)
    try:
        return _featurize_unchecked(payload, conformer, hydrogens, seed)
    except _InvalidMolecule as error:
        return (payload if isinstance(payload, str) else _mol_text(payload)), error.reason


# ---------------------------------------------------------------------------------------------------- readers

def default_molecules(limit: int | None = None) -> list[str]:
    """SMILES of RDKit's bundled NCI set (:data:`DEFAULT_MOLECULES_PATH`, 4999 molecules), as raw text.

    Entries RDKit cannot parse are returned unchanged, so :func:`featurize_many` reports them.

    Args:
        limit: return only the first ``limit`` SMILES (None = all).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"default_molecules: limit must be None or a non-negative int, got {limit!r}")
    if not os.path.isfile(DEFAULT_MOLECULES_PATH):
        raise FileNotFoundError(f"default_molecules: RDKit's NCI molecule file is missing at "
                                f"{DEFAULT_MOLECULES_PATH}; this RDKit install lacks its Data directory")
    smiles = []
    with open(DEFAULT_MOLECULES_PATH, encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and len(smiles) >= limit:
                break
            text = smiles_of_line(line)
            if text:
                smiles.append(text)
    return smiles


def smiles_of_line(line: str) -> str:
    """The SMILES of a ``.smi`` line ("SMILES [name ...]"; "" for a blank line), with a CXSMILES extension that
    follows it ("SMILES |...| name") kept: :func:`featurize` reads it (radicals, coordinate bonds, ring stereo),
    and cutting at the first space would change the molecule."""
    fields = line.split(None, 1)
    if not fields:
        return ""
    if len(fields) == 2 and fields[1].startswith("|"):
        end = fields[1].find("|", 1)
        if end > 0:
            return f"{fields[0]} {fields[1][:end + 1]}"
    return fields[0]


_SMILES_HEADERS = ("smiles", "mol")


def _first_undecodable_line(path: str, compressed: bool):
    """``(line number, error)`` of the first line of ``path`` that is not UTF-8: the CSV reader decodes in chunks,
    so its own line count lags behind the bad byte."""
    with (gzip.open if compressed else open)(path, "rb") as raw:
        for number, line in enumerate(raw, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, error
    return "unknown", "a multi-byte character cut at the end of the file"


def read_csv(path, smiles_column: str | None = None, label_columns: Sequence[str] | str | None = None
             ) -> MoleculeTable:
    """Read a molecule CSV (plain or gzip-compressed) into a :class:`MoleculeTable`.

    Args:
        path: a ``.csv`` file, or a gzip-compressed one (recognised by its content, e.g. ``.csv.gz``).
        smiles_column: header of the SMILES column; default: the first column named "smiles" or "mol"
            (any case), else the first column.
        label_columns: headers of the label columns; default: every other column whose non-empty cells are all
            numbers (and that has at least one). Empty cells become NaN.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file has no header, a named column does not exist (the message lists the columns) or is
            not the only one of that name, a row has the wrong number of cells, or a label cell is not a number
            (the message gives its line in the file, blank lines counted; ``1_000`` is not a number here).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_csv: no such file: {path}")
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    raw = gzip.open(path, "rb") if compressed else open(path, "rb")
    rows, lines = [], []  # the non-blank records, and the file line each ends on (errors name it)
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        try:
            for row in reader:
                if row and not (len(row) == 1 and not row[0].strip()):  # a line of spaces is blank too
                    rows.append(row)
                    lines.append(reader.line_num)
        except UnicodeDecodeError:
            line, error = _first_undecodable_line(path, compressed)
            raise ValueError(f"read_csv: {path} is not UTF-8 text (line {line}): {error}") from None
    if not rows:
        raise ValueError(f"read_csv: {path} is empty (expected a header row)")
    header, body, lines = [name.strip() for name in rows[0]], rows[1:], lines[1:]
    for line, row in zip(lines, body):
        if len(row) != len(header):
            raise ValueError(f"read_csv: {path} line {line} has {len(row)} cells, the header has {len(header)}")

    if smiles_column is None:
        smiles_index = next((i for i, name in enumerate(header) if name.lower() in _SMILES_HEADERS), 0)
    else:
        smiles_index = _column_index(path, header, smiles_column, "smiles_column")
    if label_columns is None:
        label_indices = [i for i in range(len(header)) if i != smiles_index and _is_numeric_column(body, i)]
    else:
        names = [label_columns] if isinstance(label_columns, str) else list(label_columns)
        label_indices = [_column_index(path, header, name, "label_columns") for name in names]

    labels = np.empty((len(body), len(label_indices)), dtype=np.float32)
    for column, index in enumerate(label_indices):
        for row_number, row in enumerate(body):
            cell = row[index].strip()
            try:
                with np.errstate(over="ignore"):  # past float32's range: reported below, naming the cell
                    value = np.float32(_number(cell)) if cell else np.nan
            except ValueError:
                raise ValueError(f"read_csv: {path} line {lines[row_number]}, column {header[index]!r}: "
                                 f"{cell!r} is not a number") from None
            if np.isinf(value):
                raise ValueError(f"read_csv: {path} line {lines[row_number]}, column {header[index]!r}: "
                                 f"{cell!r} is infinite in float32; a label must be finite (empty or NaN where "
                                 f"missing)")
            labels[row_number, column] = value
    return MoleculeTable(smiles=[row[smiles_index].strip() for row in body], labels=labels,
                         label_names=[header[i] for i in label_indices])


def _column_index(path: str, header: list[str], name, argument: str) -> int:
    if not isinstance(name, str):
        raise TypeError(f"read_csv: {argument} must name columns by header (str), got {type(name).__name__}")
    if name not in header:
        raise ValueError(f"read_csv: {argument}: no column {name!r} in {path}; available columns: {header}")
    if header.count(name) > 1:
        raise ValueError(f"read_csv: {argument}: {path} has {header.count(name)} columns named {name!r}; "
                         "rename them so the one meant is unambiguous")
    return header.index(name)


def _number(cell: str) -> float:
    # Python's float() also reads "1_000" (a literal's digit grouping), which no CSV writer means as a number.
    if "_" in cell:
        raise ValueError(cell)
    return float(cell)


def _is_numeric_column(body: list[list[str]], index: int) -> bool:
    seen_number = False
    for row in body:
        cell = row[index].strip()
        if not cell:
            continue
        try:
            _number(cell)
        except ValueError:
            return False
        seen_number = True
    return seen_number


def read_sdf(path) -> list:
    """Every record of an SDF file (plain or gzip-compressed), hydrogens, coordinates and properties kept.

    Returns:
        a list with one ``rdkit.Chem.Mol`` per record, or None where RDKit could not read the record (RDKit logs
        why, through its normal logging); pass it to :func:`featurize_many` to get those reported by index.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_sdf: no such file: {path}")
    if os.path.getsize(path) == 0:  # RDKit's SDMolSupplier refuses an empty file; it holds no record
        return []
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    if compressed:
        with gzip.open(path, "rb") as stream:
            return list(Chem.ForwardSDMolSupplier(stream, removeHs=False))
    return list(Chem.SDMolSupplier(path, removeHs=False))
