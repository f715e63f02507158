"""The ``pyblend`` command: ``pyblend bench`` (the benchmark suite) and ``pyblend featurize``."""
from __future__ import annotations

import argparse
import os
import sys


def _featurize(argv) -> int:
    parser = argparse.ArgumentParser(prog="pyblend featurize",
                                     description="Featurize molecules (SMILES file, CSV or SDF) into a .pt file.")
    parser.add_argument("input", help=".smi/.txt (one SMILES per line), .csv[.gz] or .sdf[.gz]")
    parser.add_argument("output", help="where to write the list of MolGraph objects (torch.save; read it back "
                                       "with torch.load(output, weights_only=False))")
    parser.add_argument("--conformer", action="store_true", help="generate 3D coordinates (ETKDG + MMFF)")
    parser.add_argument("--hydrogens", action="store_true", help="keep explicit hydrogen atoms")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers: expected a positive int, got {args.workers}")
    if not os.path.isfile(args.input):
        parser.error(f"input: no such file: {args.input}")
    # Checked before featurizing (hours with --conformer), not when saving.
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        parser.error(f"output: {args.output} is the input file; it would be overwritten")
    if os.path.isdir(args.output):
        parser.error(f"output: {args.output} is a folder; expected a file path such as molecules.pt")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        parser.error(f"output: the folder {folder} does not exist")

    import torch

    from . import chem

    labels = None
    suffix = args.input.lower()
    if suffix.endswith((".csv", ".csv.gz")):
        table = chem.read_csv(args.input)
        items, labels = table.smiles, table.labels
    elif suffix.endswith((".sdf", ".sdf.gz")):
        items = chem.read_sdf(args.input)
    else:
        with open(args.input, encoding="utf-8-sig") as lines:
            items = [smiles for smiles in map(chem.smiles_of_line, lines) if smiles]
    graphs, failures = chem.featurize_many(items, errors="skip", workers=args.workers, labels=labels,
                                           conformer=args.conformer, hydrogens=args.hydrogens)
    torch.save(graphs, args.output)
    for failure in failures:
        print(f"skipped input {failure.index} ({failure.text}): {failure.reason}", file=sys.stderr)
    print(f"{len(graphs)} molecules written to {args.output}; {len(failures)} failed", file=sys.stderr)
    return 1 if failures and not graphs else 0  # every input failed: most likely the wrong file or format


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"bench": "run the benchmark suite", "featurize": "featurize a molecule file"}
    if not argv or argv[0] not in commands:
        usage = "usage: pyblend {bench,featurize} ...\n" + \
            "\n".join(f"  {name:10s} {what}" for name, what in commands.items())
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(usage if asked or not argv else f"{usage}\npyblend: unknown command {argv[0]!r}",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if argv[0] == "bench":
        from .benchmarks.run import main as bench

        return bench(argv[1:])
    return _featurize(argv[1:])
