"""What the examples share: where the MoleculeNet CSVs are, the Murcko-scaffold split, the multi-task ROC-AUC,
and the default molecule set with conformers."""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from pyblend.metrics import roc_auc

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "moleculenet")


def positive(kind):
    """An argparse ``type``: a number of ``kind`` (int or float) above 0, else the flag's error."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"  # argparse's "invalid ... value" for text kind() refuses
    return parse


def fraction_below_one(text: str) -> float:
    """An argparse ``type``: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a float in [0, 1), got {text}")
    return value


def check_data(parser: argparse.ArgumentParser, folder: str, files: list[str]) -> None:
    """Before any work: ``--data`` must hold every CSV the run will read (``parser.error`` otherwise)."""
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        parser.error(f"--data: {', '.join(missing)} not found in {os.path.abspath(folder)}")


def scaffold_split(smiles: list[str]) -> dict[str, np.ndarray]:
    """80/10/10 by Murcko scaffold (without chirality), biggest scaffold groups first, as DeepChem's
    ScaffoldSplitter (MoleculeNet): a group goes to train while train stays within 80%, else to valid while train
    and valid stay within 90%, else to test. Returns int64 row indices; an unparsable SMILES is a ValueError."""
    from rdkit import Chem, rdBase
    from rdkit.Chem.Scaffolds import MurckoScaffold

    groups: dict[str, list[int]] = {}
    for index, text in enumerate(smiles):
        with rdBase.BlockLogs():  # sanitiser warnings; a parse failure raises below
            mol = Chem.MolFromSmiles(text)
        if mol is None:
            raise ValueError(f"scaffold_split: smiles[{index}] = {text!r} does not parse")
        groups.setdefault(MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False), []).append(index)
    ordered = sorted(groups.values(), key=lambda rows: (len(rows), rows[0]), reverse=True)
    train, valid, test = [], [], []
    for rows in ordered:
        if len(train) + len(rows) <= 0.8 * len(smiles):
            train += rows
        elif len(train) + len(valid) + len(rows) <= 0.9 * len(smiles):
            valid += rows
        else:
            test += rows
    return {name: np.array(rows, dtype=np.int64) for name, rows in (("train", train), ("valid", valid),
                                                                    ("test", test))}


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
    featurized by every CPU, each molecule once (the set repeats some, by canonical SMILES: a repeat would sit on
    both sides of a held-out split); says on stdout how many failed or repeated and how long it took."""
    from rdkit import Chem

    from pyblend.chem import default_molecules, featurize_many

    started = time.perf_counter()
    graphs, failures = featurize_many(default_molecules(count), errors="skip", conformer=True,
                                      workers=os.cpu_count(), progress=False, seed=seed)
    seen, unique = set(), []
    for graph in graphs:
        canonical = Chem.MolToSmiles(Chem.MolFromSmiles(graph.smiles))
        if graph.positions is not None and canonical not in seen:
            seen.add(canonical)
            unique.append(graph)
    repeats = sum(g.positions is not None for g in graphs) - len(unique)
    print(f"{len(unique)} molecules featurized with conformers ({len(failures)} failed, {repeats} repeats left out) "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return unique
