"""What the examples share: where the MoleculeNet CSVs are, the Murcko-scaffold split, the multi-task ROC-AUC,
and the default molecule set with conformers."""
from __future__ import annotations

import os
import time

import numpy as np

from pyblend.metrics import roc_auc

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "moleculenet")


def scaffold_split(smiles: list[str]) -> dict[str, np.ndarray]:
    """80/10/10 by Murcko scaffold, biggest scaffold groups first (the MoleculeNet / DeepChem convention)."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    groups: dict[str, list[int]] = {}
    for index, text in enumerate(smiles):
        groups.setdefault(MurckoScaffold.MurckoScaffoldSmiles(smiles=text, includeChirality=False), []).append(index)
    ordered = sorted(groups.values(), key=lambda rows: (len(rows), rows[0]), reverse=True)
    train, valid, test = [], [], []
    for rows in ordered:
        if len(train) + len(rows) <= 0.8 * len(smiles):
            train += rows
        elif len(valid) + len(rows) <= 0.1 * len(smiles):
            valid += rows
        else:
            test += rows
    return {"train": np.array(train), "valid": np.array(valid), "test": np.array(test)}


def mean_roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean ROC-AUC over the tasks (columns of ``(M, T)`` arrays, NaN = no label) that have both classes."""
    values = []
    for task in range(labels.shape[1]):
        known = ~np.isnan(labels[:, task])
        y = labels[known, task]
        if 0 < y.sum() < len(y):
            values.append(roc_auc(scores[known, task], y))
    return float(np.mean(values)) if values else float("nan")


def default_set_with_conformers(count: int, seed: int) -> list:
    """The MolGraphs of the first ``count`` SMILES of the default set with ETKDG + MMFF conformers (``seed``),
    featurized by every CPU; says on stdout how many failed and how long it took."""
    from pyblend.chem import default_molecules, featurize_many

    started = time.perf_counter()
    graphs, failures = featurize_many(default_molecules(count), errors="skip", conformer=True,
                                      workers=os.cpu_count(), progress=False, seed=seed)
    graphs = [g for g in graphs if g.positions is not None]
    print(f"{len(graphs)} molecules featurized with conformers ({len(failures)} failed) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return graphs
