"""Dynamic Fusion on MoleculeNet, in the shape of the paper's Table 1 (IBM, seed 000): unimodal models, naive
concatenation and :class:`pyblend.nn.DynamicFusion`, test ROC-AUC on a Murcko-scaffold split, with every
modality present and with modalities missing at random (train and test).

Modalities available without pretrained foundation models: Morgan fingerprints (radius 2, 2048 bits), MACCS keys
(167 bits) and RDKit's 2D descriptors (standardised on the training part). The paper's SELFIES/SMILES/graph
encoders are not available offline, so the absolute numbers are not comparable with its Table 1; the comparison
between rows is the point.

    python -m pyblend.examples.dynamic_fusion --data ../shared/data/moleculenet --tasks bbbp,bace,clintox

Missing modalities: each (sample, modality) is absent with probability ``--missing`` (never every modality of a
sample). Unimodal and concatenation models see zeros where a modality is absent (they have no other option);
Dynamic Fusion gets the presence mask, so an absent modality's values never reach its output.
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pyblend.examples.moleculenet import (
    DEFAULT_DATA, check_data, fraction_below_one, mean_roc_auc, positive, scaffold_split,
)

DATASETS = {"bbbp": "bbbp.csv", "bace": "bace.csv", "clintox": "clintox.csv", "tox21": "tox21.csv",
            "sider": "sider.csv"}


@dataclass
class Dataset:
    name: str
    features: dict[str, np.ndarray]  # modality -> (M, d_m) float32
    labels: np.ndarray               # (M, T) float32, NaN = missing label
    split: dict[str, np.ndarray]     # train / valid / test row indices
    unparsable: list[int]            # data rows (0 = first after the header) RDKit cannot parse, left out


def featurize(smiles: list[str]) -> tuple[list[int], dict[str, np.ndarray]]:
    """RDKit features of the SMILES RDKit parses: (kept row indices, modality -> (M, d) float32)."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import Descriptors, MACCSkeys, rdFingerprintGenerator

    morgan = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    kept, columns = [], {"morgan": [], "maccs": [], "descriptors": []}
    names = [name for name, _ in Descriptors.descList]
    with rdBase.BlockLogs():  # parse errors are counted by the caller; sanitiser warnings would flood the output
        for index, text in enumerate(smiles):
            mol = Chem.MolFromSmiles(text)
            if mol is None or mol.GetNumAtoms() == 0:
                continue
            kept.append(index)
            columns["morgan"].append(morgan.GetFingerprintAsNumPy(mol).astype(np.float32))
            columns["maccs"].append(np.array(list(MACCSkeys.GenMACCSKeys(mol)), dtype=np.float32))
            values = Descriptors.CalcMolDescriptors(mol, missingVal=np.nan)
            columns["descriptors"].append(np.array([values[name] for name in names], dtype=np.float64))
    features = {name: np.stack(rows) for name, rows in columns.items()}
    return kept, features


def load(name: str, data_dir: str) -> Dataset:
    from pyblend.chem import read_csv

    table = read_csv(os.path.join(data_dir, DATASETS[name]))
    kept, features = featurize(table.smiles)
    smiles = [table.smiles[i] for i in kept]
    labels = table.labels[kept].astype(np.float32)
    split = scaffold_split(smiles)
    descriptors = features["descriptors"]
    train = descriptors[split["train"]]
    # Standardise with training statistics; clip the heavy tails some descriptors have.
    mean, std = np.nanmean(train, 0), np.nanstd(train, 0)
    scaled = np.clip((descriptors - mean) / np.where(std > 0, std, 1.0), -6, 6)
    features["descriptors"] = np.nan_to_num(scaled, nan=0.0).astype(np.float32)
    unparsable = sorted(set(range(len(table.smiles))) - set(kept))
    return Dataset(name, features, labels, split, unparsable)


def presence(count: int, modalities: list[str], missing: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each (sample, modality) absent with probability ``missing``; a sample keeps at least one modality."""
    present = torch.rand(count, len(modalities), generator=generator) >= missing
    empty = ~present.any(1)
    keep = torch.randint(0, len(modalities), (count,), generator=generator)
    present[empty, keep[empty]] = True
    return {name: present[:, i] for i, name in enumerate(modalities)}


class MLPHead(nn.Module):
    def __init__(self, width: int, tasks: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, tasks))

    def forward(self, x):
        return self.net(x)


class Concatenation(nn.Module):
    """Naive concatenation (zeros for an absent modality), or one modality alone."""

    def __init__(self, dims: dict[str, int], tasks: int):
        super().__init__()
        self.names = list(dims)
        self.head = MLPHead(sum(dims.values()), tasks)

    def forward(self, features, present):
        parts = [torch.where(present[name][:, None], features[name], 0.0) for name in self.names]
        return self.head(torch.cat(parts, 1)), torch.zeros((), device=parts[0].device)


class Fused(nn.Module):
    """DynamicFusion -> MLP head; the fusion's own objective (reconstruction + entropy term) is added."""

    def __init__(self, dims: dict[str, int], tasks: int, width: int = 256, rescale_gate: bool = False):
        super().__init__()
        from pyblend.nn import DynamicFusion

        self.fusion = DynamicFusion(dims, width, rescale_gate=rescale_gate)
        self.head = MLPHead(width, tasks)

    def forward(self, features, present):
        fused, _ = self.fusion(features, present)
        return self.head(fused), self.fusion.objective(fused, features, present)


def train(model: nn.Module, data: Dataset, modalities: list[str], missing: float, seed: int, epochs: int,
          batch_size: int = 128) -> float:
    """Adam with early stopping on the validation ROC-AUC; returns the test ROC-AUC of the best epoch."""
    generator = torch.Generator().manual_seed(seed)
    features = {name: torch.from_numpy(data.features[name]) for name in modalities}
    labels = torch.from_numpy(data.labels)
    masks = presence(len(labels), modalities, missing, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)

    def predict(rows):
        model.eval()
        with torch.no_grad():
            logits, _ = model({n: features[n][rows] for n in modalities}, {n: masks[n][rows] for n in modalities})
        return logits.double().numpy()  # ROC-AUC ranks: logits, as a float32 sigmoid ties everything past ~17

    best_valid, best_test = -1.0, float("nan")
    train_rows = torch.from_numpy(data.split["train"])
    for _ in range(epochs):
        model.train()
        for batch in train_rows[torch.randperm(len(train_rows), generator=generator)].split(batch_size):
            logits, auxiliary = model({n: features[n][batch] for n in modalities},
                                      {n: masks[n][batch] for n in modalities})
            target = labels[batch]
            known = ~torch.isnan(target)
            loss = nn.functional.binary_cross_entropy_with_logits(logits[known], target[known]) + 0.1 * auxiliary
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        valid = mean_roc_auc(predict(data.split["valid"]), data.labels[data.split["valid"]])
        if valid > best_valid:
            best_valid = valid
            best_test = mean_roc_auc(predict(data.split["test"]), data.labels[data.split["test"]])
    return best_test


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyblend.examples.dynamic_fusion",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder with MoleculeNet CSVs (bbbp.csv, ...)")
    parser.add_argument("--tasks", default="bbbp,bace,clintox,tox21,sider")
    parser.add_argument("--missing", type=fraction_below_one, default=0.3,
                        help="absence probability in the missing setting")
    parser.add_argument("--epochs", type=positive(int), default=40)
    parser.add_argument("--seeds", type=positive(int), default=3, help="runs per model (mean and spread reported)")
    parser.add_argument("--rescale-gate", action="store_true",
                        help="DynamicFusion(rescale_gate=True): gated features times the width, so an all-equal "
                             "gate is the identity (eq. 2 as printed makes each feature ~1/width)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in DATASETS]
    if not names or unknown or len(set(names)) != len(names):
        parser.error(f"--tasks: expected distinct names among {', '.join(DATASETS)}; got {args.tasks!r}")
    check_data(parser, args.data, [DATASETS[name] for name in names])
    torch.set_num_threads(os.cpu_count() or 1)
    modalities = ["morgan", "maccs", "descriptors"]
    rows = [(f"unimodal: {m}", [m], Concatenation) for m in modalities]
    rows += [("naive concatenation: " + " + ".join(modalities), modalities, Concatenation),
             ("Dynamic Fusion (pyblend)", modalities, functools.partial(Fused, rescale_gate=args.rescale_gate))]
    results: dict[tuple[str, str, float], list[float]] = {}
    for name in names:
        started = time.perf_counter()
        data = load(name, args.data)
        left_out = (f" ({len(data.unparsable)} SMILES RDKit cannot parse left out, data rows "
                    f"{data.unparsable[:5]}{' ...' if len(data.unparsable) > 5 else ''})" if data.unparsable else "")
        print(f"{name}: {len(data.labels)} molecules{left_out}, {data.labels.shape[1]} tasks, split "
              f"{len(data.split['train'])}/{len(data.split['valid'])}/{len(data.split['test'])}, features in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        for missing in (0.0, args.missing):
            for label, chosen, kind in rows:
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    model = kind({m: data.features[m].shape[1] for m in chosen}, data.labels.shape[1])
                    auc = train(model, data, chosen, missing, seed, args.epochs)
                    results.setdefault((label, name, missing), []).append(auc)
        print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    for missing in (0.0, args.missing):
        print(f"\nTest ROC-AUC x 100 (mean +- std over {args.seeds} seeds), "
              f"{'every modality present' if missing == 0 else f'{missing:.0%} of modalities missing at random'}")
        width = max(len(label) for label, _, _ in rows)
        print(f"| {'model':<{width}} | " + " | ".join(f"{n:>11}" for n in names) + " |")
        print(f"| {'-' * width} | " + " | ".join("-" * 11 for _ in names) + " |")
        for label, _, _ in rows:
            cells = []
            for n in names:
                values = np.array(results[(label, n, missing)]) * 100
                cells.append(f"{values.mean():5.1f} +- {values.std():3.1f}")
            print(f"| {label:<{width}} | " + " | ".join(f"{c:>11}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
