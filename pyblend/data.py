"""Collation of featurized molecules into padded or packed batches (layouts: :mod:`pyblend.layout`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .features import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS, require_array, require_vocabulary
from .layout import (cu_seqlens_from_mask, mask_from_cu_seqlens, pack_atoms, pack_pairs, pad_atoms, pad_pairs,
                     seqlens)

if TYPE_CHECKING:  # pragma: no cover
    from .chem import MolGraph

__all__ = ["MolBatch", "collate"]

LAYOUTS = ("padded", "packed")
_ATOM_WIDTH, _BOND_WIDTH = len(ATOM_FEATURE_DIMS), len(BOND_FEATURE_DIMS)
_INT64, _FLOAT32 = np.dtype(np.int64), np.dtype(np.float32)


@dataclass
class MolBatch:
    """A batch of molecules. Shapes per layout (``F_a = 9`` atom and ``F_b = 3`` bond features, int64):

    ============== =============================== ====================================================
    field          padded                          packed
    ============== =============================== ====================================================
    atom_features  ``(B, N, F_a)``                 ``(T, F_a)``
    mask           ``(B, N)`` bool, True = real    None
    cu_seqlens     None                            ``(B+1,)`` int32
    max_seqlen     ``N``                           longest molecule
    adjacency      ``(B, N, N)`` bool              ``(P,)`` bool, pair blocks as in pyblend.layout
    bond_ids       ``(B, N, N)`` int32             ``(P,)`` int32
    bond_features  ``(B, E, F_b)``                 ``(E_total, F_b)``
    edge_index     ``(B, 2, E)``, -1 = padding     ``(2, E_total)``, atom indices into the packed atoms
    positions      ``(B, N, 3)`` float32 or None   ``(T, 3)`` float32 or None
    ============== =============================== ====================================================

    ``bond_ids`` holds, for every bonded atom pair (both directions), the index of that bond in
    ``bond_features`` — per molecule in the padded layout (``bond_features[b, id]``), over the whole batch in
    the packed one (``bond_features[id]``) — and -1 where there is no bond; ``adjacency == (bond_ids >= 0)``.
    ``num_atoms``/``num_bonds`` are ``(B,)`` int64. ``positions`` is present when any molecule has
    coordinates; ``has_positions (B,)`` says which do, and a molecule without a conformer has NaN positions
    (never a silent zero geometry). ``labels (B, L)`` float32, NaN = missing, when the graphs carry labels.
    """

    layout: str
    atom_features: Tensor
    adjacency: Tensor
    bond_ids: Tensor
    bond_features: Tensor
    edge_index: Tensor
    num_atoms: Tensor
    num_bonds: Tensor
    max_seqlen: int
    mask: Tensor | None = None
    cu_seqlens: Tensor | None = None
    positions: Tensor | None = None
    has_positions: Tensor | None = None
    labels: Tensor | None = None
    smiles: list[str] | None = None

    def __len__(self) -> int:
        return self.num_atoms.shape[0]

    def to(self, device, non_blocking: bool = False) -> MolBatch:
        """Every tensor moved to ``device``; ``non_blocking`` as for ``Tensor.to`` (an asynchronous copy from
        pinned memory, see :meth:`pin_memory`)."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MolBatch:
        """Every tensor in page-locked host memory: ``DataLoader(..., collate_fn=pyblend.collate,
        pin_memory=True)`` calls this on each batch."""
        return self._map(Tensor.pin_memory)

    def _map(self, move) -> MolBatch:
        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def to_packed(self) -> MolBatch:
        """The same batch in the packed layout (a no-op when already packed)."""
        if self.layout == "packed":
            return self
        mask = self.mask
        cu_seqlens, max_seqlen = cu_seqlens_from_mask(mask)
        bond_mask = torch.arange(self.bond_features.shape[1], device=mask.device)[None, :] < self.num_bonds[:, None]
        bond_start = _starts(self.num_bonds)
        ids = self.bond_ids + torch.where(self.bond_ids >= 0, bond_start[:, None, None], 0).to(torch.int32)
        atom_start = _starts(self.num_atoms)
        edge_index = (self.edge_index + atom_start[:, None, None]).transpose(0, 1)[:, bond_mask]
        return replace(
            self, layout="packed", mask=None, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            atom_features=pack_atoms(self.atom_features, mask), adjacency=pack_pairs(self.adjacency, mask),
            bond_ids=pack_pairs(ids, mask), bond_features=self.bond_features[bond_mask], edge_index=edge_index,
            positions=None if self.positions is None else pack_atoms(self.positions, mask))

    def to_padded(self) -> MolBatch:
        """The same batch in the padded layout (a no-op when already padded)."""
        if self.layout == "padded":
            return self
        cu, width = self.cu_seqlens, self.max_seqlen
        batch, device = len(self), cu.device
        molecule_of_pair = torch.repeat_interleave(torch.arange(batch, device=device), seqlens(cu) ** 2)
        bond_start = _starts(self.num_bonds)
        local_ids = self.bond_ids - torch.where(self.bond_ids >= 0, bond_start[molecule_of_pair], 0).to(torch.int32)
        cu_bonds = torch.cat([bond_start, self.num_bonds.sum().reshape(1)]).to(torch.int32)
        max_bonds = int(self.num_bonds.max()) if batch else 0
        molecule_of_bond = torch.repeat_interleave(torch.arange(batch, device=device), self.num_bonds)
        local_edges = self.edge_index - cu.long()[:-1][molecule_of_bond]
        edge_index = pad_atoms(local_edges.T, cu_bonds, max_bonds, value=-1).transpose(1, 2)
        return replace(
            self, layout="padded", cu_seqlens=None,
            mask=mask_from_cu_seqlens(cu, width),
            atom_features=pad_atoms(self.atom_features, cu, width),
            adjacency=pad_pairs(self.adjacency, cu, width, value=False),
            bond_ids=pad_pairs(local_ids, cu, width, value=-1),
            bond_features=pad_atoms(self.bond_features, cu_bonds, max_bonds), edge_index=edge_index,
            positions=None if self.positions is None else pad_atoms(self.positions, cu, width))

    def pair_bond_features(self) -> Tensor:
        """Dense bond features of every atom pair: ``(B, N, N, F_b)`` / ``(P, F_b)`` int64, each feature + 1,
        0 where the pair has no bond (Graphormer's edge-type convention)."""
        ids = self.bond_ids.long()
        # Pairs without a bond read an appended zero row (which also exists when no molecule has a bond).
        table = torch.nn.functional.pad(self.bond_features, (0, 0, 0, 1), value=-1)
        ids = torch.where(ids >= 0, ids, table.shape[-2] - 1)
        if self.layout == "padded":
            molecule = torch.arange(len(self), device=ids.device)[:, None, None].expand_as(ids)
            return table[molecule, ids] + 1
        return table[ids] + 1


def _starts(counts: Tensor) -> Tensor:
    return torch.cumsum(counts, 0) - counts


def collate(graphs: Sequence[MolGraph], layout: str = "padded") -> MolBatch:
    """Batch :class:`pyblend.chem.MolGraph` objects.

    Args:
        graphs: the molecules, in batch order (may be empty).
        layout: "padded" (``(B, N, ...)`` + ``mask``) or "packed" (``(T, ...)`` + ``cu_seqlens``).

    Returns:
        A :class:`MolBatch` of CPU tensors (move it with ``.to(device)``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if hasattr(graphs, "atom_features"):
        raise TypeError("graphs: expected a sequence of MolGraph; got one MolGraph (pass [graph])")
    graphs = list(graphs)
    batch = len(graphs)
    # MolGraph checks its fields when built, but they can be reassigned since: each graph's are checked again,
    # shapes here (one cheap test per graph, the detailed one only to word an error), values batch-wide below.
    atom_counts, bond_counts = [], []
    for index, graph in enumerate(graphs):
        if not hasattr(graph, "atom_features") or not hasattr(graph, "edge_index"):
            raise TypeError(f"graphs[{index}]: expected a pyblend MolGraph, got {type(graph).__name__}")
        atoms, edges, bonds, positions = graph.atom_features, graph.edge_index, graph.bond_features, graph.positions
        if not (type(atoms) is np.ndarray and type(edges) is np.ndarray and type(bonds) is np.ndarray
                and atoms.dtype == _INT64 and edges.dtype == _INT64 and bonds.dtype == _INT64
                and atoms.ndim == 2 and atoms.shape[1] == _ATOM_WIDTH and edges.ndim == 2 and edges.shape[0] == 2
                and bonds.shape == (edges.shape[1], _BOND_WIDTH)
                and (positions is None or (type(positions) is np.ndarray and positions.dtype == _FLOAT32
                                           and positions.shape == (atoms.shape[0], 3)))):
            _check_graph_shapes(graph, f"graphs[{index}].")
        atom_counts.append(atoms.shape[0])
        bond_counts.append(edges.shape[1])
    num_atoms = np.array(atom_counts, dtype=np.int64)
    num_bonds = np.array(bond_counts, dtype=np.int64)
    width = int(num_atoms.max()) if batch else 0
    max_bonds = int(num_bonds.max()) if batch else 0

    atom_features = np.zeros((batch, width, _ATOM_WIDTH), dtype=np.int64)
    mask = np.zeros((batch, width), dtype=bool)
    bond_ids = np.full((batch, width, width), -1, dtype=np.int32)
    bond_features = np.zeros((batch, max_bonds, _BOND_WIDTH), dtype=np.int64)
    edge_index = np.full((batch, 2, max_bonds), -1, dtype=np.int64)
    for b, graph in enumerate(graphs):
        n, e = num_atoms[b], num_bonds[b]
        atom_features[b, :n] = graph.atom_features
        mask[b, :n] = True
        bond_features[b, :e] = graph.bond_features
        edge_index[b, :, :e] = graph.edge_index
    # Feature values batch-wide (the padding's zeros are valid): one outside its vocabulary would index past its
    # embedding table's rows, into the next feature's or off the table.
    for field, values in (("atom_features", atom_features), ("bond_features", bond_features)):
        require_vocabulary(values, field, lambda leading, field=field: f"graphs[{leading[0]}].{field}")
    # Every bond at once, after checking its atoms: an index past the molecule would mark a bond in the padding
    # (or, packed, in the next molecule) while a negative one would wrap round.
    molecule, bond = np.nonzero(np.arange(max_bonds) < num_bonds[:, None])
    begin, end = edge_index[molecule, 0, bond], edge_index[molecule, 1, bond]
    outside = (np.minimum(begin, end) < 0) | (np.maximum(begin, end) >= num_atoms[molecule])
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        b = int(molecule[first])
        raise ValueError(f"graphs[{b}]: edge_index must hold atom indices in [0, {num_atoms[b]}) (its number of "
                         f"atoms), got bond {bond[first]} joining atoms {begin[first]} and {end[first]}")
    bond = bond.astype(np.int32)
    bond_ids[molecule, begin, end] = bond_ids[molecule, end, begin] = bond
    # A pair holds one bond id: a second bond between the same atoms (either direction) overwrote the first, which
    # reads back another id, and would vanish from bond_ids and adjacency while num_bonds counts it.
    lost = (bond_ids[molecule, begin, end] != bond) | (bond_ids[molecule, end, begin] != bond)
    if lost.any():
        first = int(np.flatnonzero(lost)[0])
        b, low, high = int(molecule[first]), *sorted((int(begin[first]), int(end[first])))
        other = int(bond_ids[b, begin[first], end[first]])
        other = other if other != bond[first] else int(bond_ids[b, end[first], begin[first]])
        raise ValueError(f"graphs[{b}].edge_index must hold at most one bond per atom pair, got bonds "
                         f"{min(bond[first], other)} and {max(bond[first], other)} both joining atoms {low} and "
                         f"{high}")

    padded = MolBatch(
        layout="padded", atom_features=torch.from_numpy(atom_features), mask=torch.from_numpy(mask),
        adjacency=torch.from_numpy(bond_ids >= 0), bond_ids=torch.from_numpy(bond_ids),
        bond_features=torch.from_numpy(bond_features), edge_index=torch.from_numpy(edge_index),
        num_atoms=torch.from_numpy(num_atoms), num_bonds=torch.from_numpy(num_bonds), max_seqlen=width,
        smiles=[g.smiles for g in graphs], labels=_labels(graphs), **_positions(graphs, width))
    return padded if layout == "padded" else padded.to_packed()


def _check_graph_shapes(graph, prefix: str) -> None:
    """The dtype and shape checks of MolGraph's construction, for a graph collate found wrong, naming the field."""
    atoms = require_array(f"{prefix}atom_features", graph.atom_features, np.int64, (None, _ATOM_WIDTH))
    edges = require_array(f"{prefix}edge_index", graph.edge_index, np.int64, (2, None))
    require_array(f"{prefix}bond_features", graph.bond_features, np.int64, (edges.shape[1], _BOND_WIDTH))
    if graph.positions is not None:
        require_array(f"{prefix}positions", graph.positions, np.float32, (atoms.shape[0], 3))


def _positions(graphs: Sequence[MolGraph], width: int) -> dict:
    present = np.array([g.positions is not None for g in graphs], dtype=bool)
    if not present.any():
        return {}
    positions = np.zeros((len(graphs), width, 3), dtype=np.float32)
    for b, graph in enumerate(graphs):
        n = graph.atom_features.shape[0]
        positions[b, :n] = graph.positions if present[b] else np.nan
    return {"positions": torch.from_numpy(positions), "has_positions": torch.from_numpy(present)}


def _labels(graphs: Sequence[MolGraph]) -> Tensor | None:
    for index, graph in enumerate(graphs):  # checked again, as the other fields: they may be reassigned
        labels = getattr(graph, "labels", None)
        if labels is not None and not (type(labels) is np.ndarray and labels.dtype == _FLOAT32 and labels.ndim == 1):
            require_array(f"graphs[{index}].labels", labels, np.float32, (None,))
    widths = {g.labels.shape[0] for g in graphs if getattr(g, "labels", None) is not None}
    if not widths:
        return None
    if len(widths) > 1:
        raise ValueError(f"graphs: labels must have one width across the batch, got widths {sorted(widths)}")
    labels = np.full((len(graphs), widths.pop()), np.nan, dtype=np.float32)
    for b, graph in enumerate(graphs):
        if getattr(graph, "labels", None) is not None:
            labels[b] = graph.labels
    return torch.from_numpy(labels)
