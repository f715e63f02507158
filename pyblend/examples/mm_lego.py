"""MM-Lego on MoleculeNet, in the shape of the paper's Figures 3 and 4 (seed 004): two LegoBlocks trained
unimodally on two views of the same molecules, then combined without training (LegoMerge) and with two epochs of
fine-tuning (LegoFuse), against each block alone and a naive ensemble (mean of the two blocks' logits).

- Token modality: per-atom tokens. OGB atom features -> summed embeddings -> one pre-LN Transformer layer of
  :class:`pyblend.nn.RelationBiasedAttention` whose bias is a learned per-head table indexed by the shortest-path
  distance (the in-kernel table form) -> tokens ``(B, N, 64)`` with the atom mask.
- Vector modality: the Morgan fingerprint (radius 2, 2048 bits) -> Linear + SELU -> one token ``(B, 128)``.
- LegoBlocks of depth 2, temperature 0.5, the paper's 2-D FFT, one logit (binary cross-entropy), with a latent of
  32 x 32 and 4 heads x 32 by default so that the whole run takes a few CPU minutes (``--latent 64 --heads 8
  --head-dim 64`` gives the public code's sizes); the unimodal blocks and LegoFuse keep the epoch with the best
  validation ROC-AUC.
- One thread: the LegoBlock steps are many tiny FFTs and matmuls that threads only slow down (and the machine
  may be shared).
- Murcko-scaffold split 80/10/10, test ROC-AUC.

    python -m pyblend.examples.mm_lego --data ../shared/data/moleculenet --task bbbp

The absolute numbers are not comparable with the paper (different data, small CPU budget); the comparison
between rows is the point.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch
from torch import nn

from pyblend import collate, featurize_many, ops
from pyblend.chem import ATOM_FEATURE_DIMS, read_csv
from pyblend.examples.moleculenet import DEFAULT_DATA, check_data, positive, scaffold_split
from pyblend.metrics import roc_auc
from pyblend.nn import RelationBiasedAttention
from pyblend.nn.lego import LegoBlock, LegoFuse, classification_loss, lego_merge

DATASETS = {"bbbp": ("bbbp.csv", "p_np"), "bace": ("bace.csv", "Class")}
MAX_DISTANCE = 16  # shortest-path ids 0..15; longer paths and unreachable pairs share id 16


class AtomEncoder(nn.Module):
    """(MolBatch, SPD relation ids) -> per-atom tokens ``(B, N, width)``."""

    def __init__(self, width: int = 64, heads: int = 4):
        super().__init__()
        self.atoms = nn.ModuleList(nn.Embedding(size, width) for size in ATOM_FEATURE_DIMS)
        self.distance = nn.Parameter(torch.zeros(MAX_DISTANCE + 1, heads))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = RelationBiasedAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, inputs):
        batch, relations = inputs
        x = sum(embed(batch.atom_features[..., i]) for i, embed in enumerate(self.atoms))
        x = x + self.attention(self.norm1(x), mask=batch.mask, rel_index=relations, rel_table=self.distance)
        return x + self.mlp(self.norm2(x))


def relation_ids(batch):
    spd = ops.shortest_path(batch.adjacency, batch.mask)
    return torch.where(spd < 0, MAX_DISTANCE, spd.clamp(max=MAX_DISTANCE)).to(torch.int8)


def load(task: str, data_dir: str):
    """Graphs, Morgan fingerprints (M, 2048) float32, labels (M,) float32 and the split, for the molecules both
    RDKit and pyblend's featurizer accept."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdFingerprintGenerator

    filename, column = DATASETS[task]
    table = read_csv(os.path.join(data_dir, filename), label_columns=[column])
    graphs, failures = featurize_many(table.smiles, errors="skip", progress=False, labels=table.labels,
                                      workers=os.cpu_count())
    failed = {f.index for f in failures}
    kept = [i for i in range(len(table.smiles)) if i not in failed]
    morgan = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    with rdBase.BlockLogs():  # sanitiser warnings (e.g. "not removing hydrogen atom without neighbors")
        fingerprints = np.stack([morgan.GetFingerprintAsNumPy(Chem.MolFromSmiles(table.smiles[i]))
                                 .astype(np.float32) for i in kept])
    labels = table.labels[kept, 0].astype(np.float32)
    with rdBase.BlockLogs():
        split = scaffold_split([table.smiles[i] for i in kept])
    return graphs, torch.from_numpy(fingerprints), torch.from_numpy(labels), split, len(failures)


class Batches:
    """Collated mini-batches (both modalities) over given rows; reshuffled per epoch for training."""

    def __init__(self, graphs, fingerprints, labels, rows, size, shuffle, seed=0):
        self.graphs, self.fingerprints, self.labels = graphs, fingerprints, labels
        self.rows, self.size, self.shuffle = np.asarray(rows), size, shuffle
        self.generator = np.random.default_rng(seed)
        self.cache = None if shuffle else list(self._build(self.rows))

    def _build(self, rows):
        for start in range(0, len(rows), self.size):
            chunk = rows[start:start + self.size]
            batch = collate([self.graphs[i] for i in chunk])
            yield (batch, relation_ids(batch)), batch.mask, self.fingerprints[chunk], self.labels[chunk]

    def __iter__(self):
        if self.cache is not None:
            return iter(self.cache)
        return self._build(self.generator.permutation(self.rows))


def predict(model, batches, run) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        scores = [run(model, atoms, mask, fp).reshape(-1) for atoms, mask, fp, _ in batches]
        labels = [y for *_, y in batches]
    model.train()
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def fit(model, train, valid, run, epochs: int, lr: float, label: str):
    """Adam on binary cross-entropy; keeps the epoch with the best validation ROC-AUC."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    best, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        started, losses = time.perf_counter(), []
        for atoms, mask, fp, y in train:
            loss = classification_loss(run(model, atoms, mask, fp), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        score = roc_auc(*predict(model, valid, run))
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
        print(f"{label} epoch {epoch}: loss {np.mean(losses):.3f}, valid ROC-AUC {score:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.load_state_dict(best_state)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyblend.examples.mm_lego", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder with MoleculeNet CSVs (bbbp.csv, bace.csv)")
    parser.add_argument("--task", default="bbbp", choices=sorted(DATASETS))
    parser.add_argument("--epochs", type=positive(int), default=6, help="unimodal training epochs per block")
    parser.add_argument("--fuse-epochs", type=positive(int), default=2,
                        help="LegoFuse fine-tuning epochs (the paper's 2)")
    parser.add_argument("--batch", type=positive(int), default=64)
    parser.add_argument("--latent", type=positive(int), default=32, help="l_c = l_d")
    parser.add_argument("--heads", type=positive(int), default=4)
    parser.add_argument("--head-dim", type=positive(int), default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_data(parser, args.data, [DATASETS[args.task][0]])
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    started = time.perf_counter()
    graphs, fingerprints, labels, split, failed = load(args.task, args.data)
    print(f"{args.task}: {len(graphs)} molecules ({failed} failed to featurize), split "
          f"{len(split['train'])}/{len(split['valid'])}/{len(split['test'])}, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    train = Batches(graphs, fingerprints, labels, split["train"], args.batch, shuffle=True, seed=args.seed)
    valid = Batches(graphs, fingerprints, labels, split["valid"], 256, shuffle=False)
    test = Batches(graphs, fingerprints, labels, split["test"], 256, shuffle=False)

    sizes = {"l_c": args.latent, "l_d": args.latent, "heads": args.heads, "head_dim": args.head_dim}
    atom_block = LegoBlock(64, 1, AtomEncoder(64, 4), **sizes)
    fingerprint_block = LegoBlock(128, 1, nn.Sequential(nn.Linear(fingerprints.shape[1], 128), nn.SELU()), **sizes)
    run_atoms = lambda m, atoms, mask, fp: m(atoms, mask)
    run_fingerprint = lambda m, atoms, mask, fp: m(fp)
    run_pair = lambda m, atoms, mask, fp: m([atoms, fp], [mask, None])
    fit(atom_block, train, valid, run_atoms, args.epochs, 1e-3, "LegoBlock (atoms)")
    fit(fingerprint_block, train, valid, run_fingerprint, args.epochs, 1e-3, "LegoBlock (Morgan)")

    class Ensemble(nn.Module):
        def __init__(self, blocks):
            super().__init__()
            self.blocks = nn.ModuleList(blocks)

        def forward(self, inputs, masks):
            return torch.stack([b(x, m) for b, x, m in zip(self.blocks, inputs, masks)]).mean(0)

    results = {
        "LegoBlock (atom tokens)": (atom_block, run_atoms),
        "LegoBlock (Morgan fingerprint)": (fingerprint_block, run_fingerprint),
        "ensemble (mean of logits)": (Ensemble([atom_block, fingerprint_block]), run_pair),
        "LegoMerge (no training)": (lego_merge([atom_block, fingerprint_block]), run_pair),
    }
    for mode in ("stack", "weave"):
        fuse = LegoFuse([copy.deepcopy(atom_block), copy.deepcopy(fingerprint_block)], mode)
        fit(fuse, train, valid, run_pair, args.fuse_epochs, 2e-4, f"LegoFuse ({mode})")
        results[f"LegoFuse ({mode}, {args.fuse_epochs} epochs)"] = (fuse, run_pair)

    print(f"\n{args.task}: test ROC-AUC (Murcko-scaffold split, {len(split['test'])} molecules), "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"| {'model':<34} | {'valid AUC':>9} | {'test AUC':>9} |")
    print(f"| {'-' * 34} | {'-' * 9} | {'-' * 9} |")
    for name, (model, run) in results.items():
        print(f"| {name:<34} | {roc_auc(*predict(model, valid, run)):9.3f} | "
              f"{roc_auc(*predict(model, test, run)):9.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
