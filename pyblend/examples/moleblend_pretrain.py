"""MoleBlend on the CPU: pretrain a small model on the default molecule set with conformers (relations blended per
atom pair; recover SPD, edge and 3D relations + noisy-node denoising), then fine-tune it on a labelled
MoleculeNet set (2D only, Murcko scaffold split) and compare with the same model trained from scratch (seed 001).

    python -m pyblend.examples.moleblend_pretrain --molecules 1000 --minutes 4 --task bbbp

Prints the pretraining losses per epoch and on held-out molecules before and after pretraining, then test
ROC-AUC of the fine-tuned and from-scratch models (mean over ``--seeds``).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

from pyblend import collate, featurize_many
from pyblend.chem import read_csv
from pyblend.examples.dynamic_fusion import DATASETS
from pyblend.examples.moleculenet import (
    DEFAULT_DATA, check_data, default_set_with_conformers, mean_roc_auc, positive, scaffold_split,
)
from pyblend.models import MoleBlend, MoleBlendConfig, MoleBlendPredictor

PARTS = ("spd", "edge", "geometry", "denoise")


def small_config(finetuning: bool = False) -> MoleBlendConfig:
    """A small model with the public runs' dropout rates: pretraining's defaults, or fine-tuning's (no activation
    dropout or drop-path; attention dropout stays)."""
    config = MoleBlendConfig(layers=4, dim=128, heads=8, ffn_dim=256, num_kernels=32, head_width=16, max_distance=16)
    return replace(config, activation_dropout=0.0, droppath=0.0) if finetuning else config


def batches(items, size, generator=None):
    order = torch.randperm(len(items), generator=generator).tolist() if generator is not None else \
        range(len(items))
    order = list(order)
    return [collate([items[i] for i in order[start:start + size]]) for start in range(0, len(order), size)]


@torch.no_grad()
def held_out_losses(model: MoleBlend, held_out) -> dict[str, float]:
    """Pretraining losses on held-out molecules with a fixed blend and noise: the blender alone in training mode
    (it draws from ``generator``); every dropout (embeddings, attention, feed-forward) and drop-path in eval mode,
    so no draw comes from torch's global generator."""
    model.eval()
    model.blender.train()
    totals = dict.fromkeys(("total", *PARTS), 0.0)
    generator = torch.Generator().manual_seed(1234)
    molecules = sum(len(batch.num_atoms) for batch in held_out)
    for batch in held_out:
        loss, parts = model.pretrain_loss(batch, generator=generator)
        weight = len(batch.num_atoms) / molecules  # each batch by its molecules: the last one is partial
        totals["total"] += loss.item() * weight
        for name in PARTS:
            totals[name] += parts[name].item() * weight
    return totals


def pretrain(model: MoleBlend, training, held_out, minutes: float, batch_size: int, seed: int) -> int:
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    steps, epoch, deadline = 0, 0, time.perf_counter() + 60 * minutes
    while time.perf_counter() < deadline:
        epoch += 1
        model.train()
        sums = dict.fromkeys(("total", *PARTS), 0.0)
        count = 0
        for batch in batches(training, batch_size, generator):
            if time.perf_counter() >= deadline:
                break
            loss, parts = model.pretrain_loss(batch, generator=generator)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            steps, count = steps + 1, count + 1
            sums["total"] += loss.item()
            for name in PARTS:
                sums[name] += parts[name].item()
        if count:
            print(f"epoch {epoch} ({count} steps): " + ", ".join(f"{k} {v / count:.3f}" for k, v in sums.items()),
                  flush=True)
    return steps


def finetune(model: MoleBlendPredictor, train, valid, test, epochs: int, seed: int) -> float:
    """AdamW on ``train`` (graphs, reshuffled each epoch); the test ROC-AUC (``test``: batches) of the epoch with
    the best validation ROC-AUC."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    best_valid, best_test = -1.0, float("nan")

    @torch.no_grad()
    def score(split):
        model.eval()
        outputs, labels = [], []
        for batch in split:
            outputs.append(model(batch).double().numpy())  # logits: a float32 sigmoid ties everything past ~17
            labels.append(batch.labels.numpy())
        return mean_roc_auc(np.concatenate(outputs), np.concatenate(labels))

    for _ in range(epochs):
        model.train()
        for batch in batches(train, 64, generator):
            loss = model.loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        valid_auc = score(valid)
        if valid_auc > best_valid:
            best_valid, best_test = valid_auc, score(test)
    return best_test


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyblend.examples.moleblend_pretrain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--molecules", type=positive(int), default=1000, help="first N SMILES of the default set")
    parser.add_argument("--held-out", type=positive(int), default=100)
    parser.add_argument("--minutes", type=positive(float), default=4.0, help="pretraining time budget")
    parser.add_argument("--batch", type=positive(int), default=32)
    parser.add_argument("--task", default="bbbp", choices=sorted(DATASETS))
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=positive(int), default=10, help="fine-tuning epochs")
    parser.add_argument("--seeds", type=positive(int), default=2, help="fine-tuning runs per model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.held_out >= args.molecules:
        parser.error(f"--held-out: expected fewer than --molecules ({args.molecules}), got {args.held_out}")
    check_data(parser, args.data, [DATASETS[args.task]])
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)

    graphs = default_set_with_conformers(args.molecules, args.seed)
    if args.held_out >= len(graphs):
        parser.error(f"--held-out: {args.held_out} leaves no training molecule of the {len(graphs)} with conformers")
    held_out = batches(graphs[:args.held_out], 64)
    training = graphs[args.held_out:]

    model = MoleBlend(small_config())
    before = held_out_losses(model, held_out)
    steps = pretrain(model, training, held_out, args.minutes, args.batch, args.seed)
    after = held_out_losses(model, held_out)
    print(f"\nHeld-out pretraining losses ({len(graphs[:args.held_out])} molecules), before and after {steps} steps:")
    print("| | " + " | ".join(("total", *PARTS)) + " |")
    print("| --- |" + " --- |" * (1 + len(PARTS)))
    for label, values in (("untrained", before), ("pretrained", after)):
        print(f"| {label} | " + " | ".join(f"{values[k]:.3f}" for k in ("total", *PARTS)) + " |")

    table = read_csv(os.path.join(args.data, DATASETS[args.task]))
    labelled, _ = featurize_many(table.smiles, labels=table.labels, errors="skip", workers=os.cpu_count(),
                                 progress=False)
    if labelled[0].labels is not None and len(labelled[0].labels) != 1:
        raise SystemExit(f"--task {args.task}: one label column expected, got {len(labelled[0].labels)}")
    split = scaffold_split([g.smiles for g in labelled])
    train = [labelled[i] for i in split["train"]]
    valid, test = (batches([labelled[i] for i in split[name]], 128) for name in ("valid", "test"))
    print(f"\n{args.task}: {len(labelled)} molecules, scaffold split "
          + "/".join(str(len(rows)) for rows in split.values()), flush=True)
    results = {"from scratch": [], "MoleBlend-pretrained": []}
    state = model.state_dict()
    for seed in range(args.seeds):
        for label in results:
            torch.manual_seed(seed)
            encoder = MoleBlend(small_config(finetuning=True))
            if label != "from scratch":
                encoder.load_state_dict(state)
            predictor = MoleBlendPredictor(encoder, outputs=1)
            results[label].append(finetune(predictor, train, valid, test, args.epochs, seed))
            print(f"  {label}, seed {seed}: test ROC-AUC {100 * results[label][-1]:.1f}", flush=True)
    print(f"\n{args.task} test ROC-AUC x 100 (mean +- std over {args.seeds} seeds, {args.epochs} epochs, 2D only):")
    for label, values in results.items():
        values = np.array(values) * 100
        print(f"| {label} | {values.mean():.1f} +- {values.std():.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
