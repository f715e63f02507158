"""The benchmark runner behind ``pyblend bench`` and ``make bench``.

Runs every entry the device supports on the default molecule set, prints a table and the targets, merges the
rows into ``benchmarks/results/<device>.json`` and draws ``benchmarks/results/<device>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
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
    recorded_cases,
    run_case,
)

ENTRIES = {"featurize": bench_featurize, "shortest_path": bench_shortest_path, "gaussian_basis": bench_gaussian_basis,
           "relation_attention": bench_relation_attention, "multi_infonce": bench_multi_infonce,
           "gated_fusion": bench_gated_fusion, "path_edge_bias": bench_path_edge_bias,
           "outer_product": bench_outer_product, "gaussian_basis_bias": bench_gaussian_basis_bias,
           "fourier_cross_attention": bench_fourier_cross_attention, "moleblend": bench_moleblend}


class Context:
    """What entries share: the device, the time budget, which cases to run, and the default molecule set
    featurized once."""

    def __init__(self, device: torch.device, quick: bool, molecules: int | None = None, cases: str | None = None,
                 deadline: float | None = None, recorded: frozenset = frozenset()):
        self.device = device
        self.cases = cases  # --cases
        self.deadline = deadline  # a time.perf_counter() value after which no case is started (None: no limit)
        self.recorded = recorded  # (entry, case) pairs to leave out (--skip-recorded)
        self.not_started: dict[tuple[str, str], str] = {}  # (entry, case) -> why it was left out
        # (entry, case) pairs --cases keeps, run or not: none means the pattern matches nothing, which is an error,
        # while cases left out as recorded or late did match.
        self.matched: set[tuple[str, str]] = set()
        self.quick = quick
        self.time_budget_s = 1.0 if quick else 5.0
        self.limit = molecules if molecules is not None else (512 if quick else None)
        self.workers = os.cpu_count() or 1

    def wants(self, entry: str, name: str) -> bool:
        """Whether to build and run the case ``name`` of ``entry``: ``--cases`` keeps it, it is not recorded yet
        (with ``--skip-recorded``) and the deadline has not passed. Entries ask before they build a case (building
        may compile peers for a minute); a case left out for the last two reasons is listed in the summary."""
        if not name_selected(name, self.cases):
            return False
        self.matched.add((entry, name))
        if (entry, name) in self.recorded:
            self.not_started[(entry, name)] = "recorded in an earlier run"
            return False
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.not_started[(entry, name)] = "deadline"
            return False
        return True

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
    """The entries a comma-separated ``text`` names, each once, in order; a ValueError naming ``option`` for an
    unknown or no name."""
    chosen = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = sorted(set(chosen) - set(ENTRIES))
    if unknown:
        raise ValueError(f"{option}: unknown entries {unknown}; choose from {sorted(ENTRIES)}")
    if not chosen:
        raise ValueError(f"{option}: no entry named; choose from {sorted(ENTRIES)}")
    return chosen


def run_entries(names: list[str], context: Context, results: Path | None = None, log=print
                ) -> tuple[list[dict], list[str]]:
    """Run the cases of the entries ``names`` that ``context`` wants, in order; with ``results``, merge each
    case's rows into that JSON as soon as the case ends (a run cut short keeps every finished case). Returns
    ``(rows, failures)``: an entry that raises is one failure line and the next entry still runs."""
    rows, failed = [], []
    for name in names:
        started = time.perf_counter()
        try:
            for case in ENTRIES[name].cases(context):
                if not name_selected(case.name, context.cases):
                    continue
                context.matched.add((name, case.name))  # an entry may not ask context.wants
                log(f"{name}: {case.name}")
                case_rows = run_case(case, context.device, log=log)
                del case  # its tensors go before the next case is built (two big cases may not fit at once)
                rows += case_rows
                if results is not None and case_rows:
                    record(case_rows, results)
        except Exception as error:  # one broken entry must not hide the others' results
            traceback.print_exc()
            failed.append(f"{name}: {type(error).__name__}: {error}")
        log(f"{name}: done in {time.perf_counter() - started:.1f} s")
    return rows, failed


def report(rows: list[dict], failed: list[str], not_started: dict[tuple[str, str], str], log=print) -> None:
    """The table, the targets, the cases left out (``not_started``: (entry, case) -> why) and the failures."""
    log("")
    log(format_table(rows))
    targets = format_targets(rows)
    if targets:
        log("\nTargets\n" + targets)
    if not_started:
        log(f"\nNot started ({len(not_started)}):")
        for (entry, name), why in not_started.items():
            log(f"  {entry}: {name} ({why})")
    for line in failed:
        log(f"ENTRY FAILED: {line}")


def main(argv=None) -> int:
    begun = time.perf_counter()
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
                             "to split a long entry. A pattern that matches no case of the entries run on this "
                             "device is an error (exit 2)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no case after this many seconds (the case running then finishes; the cases "
                             "left are listed): to fit a device call")
    parser.add_argument("--skip-recorded", action="store_true",
                        help="leave out the cases the results JSON already holds for this device (some provider "
                             "timed, none wrong): a run split over several calls resumes where the last stopped")
    parser.add_argument("--output-dir", default=None,
                        help="where the JSON and the plot go, made if missing (default: benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    try:
        chosen = selected_entries(args.entries)
    except ValueError as error:
        parser.error(str(error))
    if args.molecules is not None and args.molecules < 1:
        parser.error(f"--molecules: expected a positive number; got {args.molecules}")
    if args.deadline_s is not None and not (math.isfinite(args.deadline_s) and args.deadline_s > 0):
        parser.error(f"--deadline-s: expected a positive number of seconds; got {args.deadline_s}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    if args.output_dir is not None and not args.output_dir.strip():  # Path("") is the current folder
        parser.error(f"--output-dir: expected a folder path; got {args.output_dir!r}")
    output_dir = RESULTS_DIR if args.output_dir is None else Path(args.output_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    partial = args.quick or args.molecules is not None
    if not partial:  # made now, not when the first case's rows arrive after minutes of work
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--output-dir: expected a folder that exists or can be made; got {str(output_dir)!r} "
                         f"({error.strerror or error})")
    results = output_dir / f"{device_slug(device)}.json"
    context = Context(device, args.quick, args.molecules, args.cases,
                      deadline=None if args.deadline_s is None else begun + args.deadline_s,
                      recorded=recorded_cases(results) if args.skip_recorded else frozenset())
    print(f"pyblend bench on {device_name(device)}{' (quick)' if args.quick else ''}", flush=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    rows, failed = run_entries(chosen, context, None if partial else results, log)
    report(rows, failed, context.not_started, log)
    # A blank pattern keeps every case; an entry that failed may have held the cases asked for.
    if (args.cases or "").strip(" ,&") and not context.matched and not failed:
        print(f"{parser.prog}: error: --cases: expected a pattern matching some case of {', '.join(chosen)} on "
              f"{device.type}; got {args.cases!r}, which matches none", file=sys.stderr, flush=True)
        return 2
    if rows and not partial:
        print(f"\nrows merged into {results}")
        # Every recorded row, so that a run split over several calls draws one plot of all of them.
        if not args.no_plot and plot(json.loads(results.read_text()), results.with_suffix(".png")):
            print(f"plot written to {results.with_suffix('.png')}")
    elif partial:
        print("\n(partial run: --quick or --molecules; results not recorded)")
    wrong = [r for r in rows if r["status"] == "wrong"]
    return 1 if failed or wrong else 0
