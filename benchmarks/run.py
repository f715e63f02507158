"""The benchmark runner behind ``pyblend bench`` and ``make bench``.

Runs every entry the device supports on the default molecule set, prints a table and the targets, merges the
rows into ``benchmarks/results/<device>.json`` and draws ``benchmarks/results/<device>.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from functools import lru_cache
from pathlib import Path

import torch

from . import (
    bench_featurize,
    bench_fourier_cross_attention,
    bench_gated_fusion,
    bench_gaussian_basis,
    bench_gaussian_basis_bias,
    bench_moleblend,
    bench_multi_infonce,
    bench_outer_product,
    bench_path_edge_bias,
    bench_relation_attention,
    bench_shortest_path,
)
from .harness import (
    RESULTS_DIR,
    device_name,
    device_slug,
    format_table,
    format_targets,
    name_selected,
    plot,
    record,
    run_case,
)

ENTRIES = {"featurize": bench_featurize, "shortest_path": bench_shortest_path, "gaussian_basis": bench_gaussian_basis,
           "relation_attention": bench_relation_attention, "multi_infonce": bench_multi_infonce,
           "gated_fusion": bench_gated_fusion, "path_edge_bias": bench_path_edge_bias,
           "outer_product": bench_outer_product, "gaussian_basis_bias": bench_gaussian_basis_bias,
           "fourier_cross_attention": bench_fourier_cross_attention, "moleblend": bench_moleblend}


class Context:
    """What entries share: the device, the time budget, and the default molecule set featurized once."""

    def __init__(self, device: torch.device, quick: bool, molecules: int | None = None, cases: str | None = None):
        self.device = device
        self.cases = cases  # --cases: entries whose cases are costly to build filter them before building
        self.quick = quick
        self.time_budget_s = 1.0 if quick else 5.0
        self.limit = molecules if molecules is not None else (512 if quick else None)
        self.workers = os.cpu_count() or 1

    @lru_cache(maxsize=None)
    def smiles(self) -> list[str]:
        try:
            from pyblend.chem import default_molecules
        except ImportError as error:
            raise RuntimeError(f"the default molecule set needs RDKit ({error}); on an offline machine carry "
                               "its wheel in .whl/ (README: 'Offline GPU machines')") from error
        return default_molecules(self.limit)

    @lru_cache(maxsize=None)
    def invalid_indices(self) -> list[int]:
        from rdkit import Chem, RDLogger

        RDLogger.DisableLog("rdApp.*")
        try:
            return [i for i, text in enumerate(self.smiles()) if Chem.MolFromSmiles(text) is None]
        finally:
            RDLogger.EnableLog("rdApp.*")

    @lru_cache(maxsize=None)
    def molecules(self, hydrogens: bool) -> list:
        from pyblend import featurize_many

        graphs, _ = featurize_many(self.smiles(), errors="skip", workers=self.workers, progress=False,
                                   hydrogens=hydrogens)
        return graphs

    @lru_cache(maxsize=None)
    def conformer_molecules(self, count: int) -> list:
        from pyblend import featurize_many

        valid = [s for i, s in enumerate(self.smiles()) if i not in set(self.invalid_indices())]
        graphs, _ = featurize_many(valid[:count], errors="skip", workers=self.workers, progress=False,
                                   conformer=True)
        return graphs


def selected_entries(text: str, option: str = "--entries") -> list[str]:
    """The entries a comma-separated ``text`` names; a ValueError naming ``option`` for an unknown or no name."""
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ENTRIES))
    if unknown:
        raise ValueError(f"{option}: unknown entries {unknown}; choose from {sorted(ENTRIES)}")
    if not chosen:
        raise ValueError(f"{option}: no entry named; choose from {sorted(ENTRIES)}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyblend bench", description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default=",".join(ENTRIES),
                        help=f"comma-separated entries to run (default: all of {','.join(ENTRIES)})")
    parser.add_argument("--quick", action="store_true", help="512 molecules and 1 s per provider: a smoke run")
    parser.add_argument("--molecules", type=int, default=None,
                        help="use only the first N molecules of the default set (default: all; 512 with --quick)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"],
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cases", default=None,
                        help="keep the cases whose names contain every '&'-joined part of one comma-separated "
                             "item ('!text': do not contain), e.g. 'with hydrogens,4096' (default: every case); "
                             "to split a long entry")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where the JSON and the plot go")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    try:
        chosen = selected_entries(args.entries)
    except ValueError as error:
        parser.error(str(error))
    if args.molecules is not None and args.molecules < 1:
        parser.error(f"--molecules: expected a positive number; got {args.molecules}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    context = Context(device, args.quick, args.molecules, args.cases)
    print(f"pyblend bench on {device_name(device)}{' (quick)' if args.quick else ''}", flush=True)
    partial = args.quick or args.molecules is not None
    results = args.output_dir / f"{device_slug(device)}.json"
    rows, failed = [], []
    for name in chosen:
        started, entry_rows = time.perf_counter(), []
        try:
            for case in ENTRIES[name].cases(context):
                if not name_selected(case.name, args.cases):
                    continue
                print(f"{name}: {case.name}", flush=True)
                entry_rows += run_case(case, device, log=lambda line: print(line, flush=True))
                del case  # its tensors go before the next case is built (two big cases may not fit at once)
        except Exception as error:  # one broken entry must not hide the others' results
            traceback.print_exc()
            failed.append(f"{name}: {type(error).__name__}: {error}")
        print(f"{name}: done in {time.perf_counter() - started:.1f} s", flush=True)
        rows += entry_rows
        if entry_rows and not partial:  # after each entry: a run cut short keeps what it finished
            record(entry_rows, results)

    print()
    print(format_table(rows))
    targets = format_targets(rows)
    if targets:
        print("\nTargets\n" + targets)
    if rows and not partial:
        print(f"\nrows merged into {results}")
        # Every recorded row, so that a run split over several calls draws one plot of all of them.
        if not args.no_plot and plot(json.loads(results.read_text()), results.with_suffix(".png")):
            print(f"plot written to {results.with_suffix('.png')}")
    elif partial:
        print("\n(partial run: --quick or --molecules; results not recorded)")
    for line in failed:
        print(f"ENTRY FAILED: {line}")
    wrong = [r for r in rows if r["status"] == "wrong"]
    return 1 if failed or wrong else 0
