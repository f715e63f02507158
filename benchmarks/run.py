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
    build_failure_row,
    device_name,
    device_slug,
    format_table,
    format_targets,
    name_selected,
    plot,
    record,
    recorded_cases,
    run_case,
    short_error,
)

ENTRIES = {"featurize": bench_featurize, "shortest_path": bench_shortest_path, "gaussian_basis": bench_gaussian_basis,
           "relation_attention": bench_relation_attention, "multi_infonce": bench_multi_infonce,
           "gated_fusion": bench_gated_fusion, "path_edge_bias": bench_path_edge_bias,
           "outer_product": bench_outer_product, "gaussian_basis_bias": bench_gaussian_basis_bias,
           "fourier_cross_attention": bench_fourier_cross_attention, "moleblend": bench_moleblend}


RECORDED = "recorded in an earlier run"  # why Context.wants leaves out a case --skip-recorded found


class Context:
    """What entries share: the device, the time budget, which cases to run, and the default molecule set
    featurized once."""

    def __init__(self, device: torch.device, quick: bool, molecules: int | None = None, cases: str | None = None,
                 deadline: float | None = None, recorded: frozenset = frozenset(), end: float | None = None):
        self.device = device
        self.cases = cases  # --cases
        self.deadline = deadline  # a time.perf_counter() value after which no case is started (None: no limit)
        # A time.perf_counter() value by which cases should have ended (None: none): a case is not started when the
        # last case of its entry in this call took longer than what is left.
        self.end = end
        self.recorded = recorded  # (entry, case) pairs to leave out (--skip-recorded)
        self.not_started: dict[tuple[str, str], str] = {}  # (entry, case) -> why it was left out
        # (entry, case) pairs run, or that failed to build, in this call: an entry started again after a case failed
        # to build, or a later item of the lease's plan, does not build them again.
        self.done: set[tuple[str, str]] = set()
        self.durations: dict[str, float] = {}  # entry -> seconds its last case took in this call, build included
        self.building: tuple[str, str, float] | None = None  # (entry, case, start) let through, not yielded yet
        self.running: tuple[str, str] | None = None  # the case being measured
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
        if (entry, name) in self.done:
            return False
        if (entry, name) in self.recorded:
            self.not_started[(entry, name)] = RECORDED
            return False
        now = time.perf_counter()
        if self.deadline is not None and now >= self.deadline:
            self.not_started[(entry, name)] = "deadline"
            return False
        expected = self.durations.get(entry)
        if self.end is not None and expected is not None and now + expected > self.end:
            self.not_started[(entry, name)] = (f"would not end in time: the last {entry} case took {expected:.0f} s, "
                                               f"{max(0.0, self.end - now):.0f} s were left")
            return False
        self.building = (entry, name, now)
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


def run_entries(names: list[str], context: Context, results: Path | None = None, log=print,
                rows: list[dict] | None = None, failed: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Run the cases of the entries ``names`` that ``context`` wants, in order; with ``results``, merge each
    case's rows into that JSON as soon as the case ends (a run cut short keeps every finished case). Returns
    ``(rows, failures)``, also appended to ``rows`` and ``failed`` when given (a caller cut short by an exception
    keeps what finished): an entry that raises is one failure line and the next entry still runs. A case whose
    construction raises (the case ``context.wants`` let through last) is one "wrong" row instead, and its entry
    goes on with its other cases."""
    rows = [] if rows is None else rows
    failed = [] if failed is None else failed
    for name in names:
        started = time.perf_counter()
        # The entry's generator ends with an exception raised inside it: after a case that failed to build, the
        # entry starts again, and context.done keeps the cases already handled from being built again.
        while True:
            context.building = None
            try:
                for case in ENTRIES[name].cases(context):
                    building, context.building = context.building, None
                    if not name_selected(case.name, context.cases):
                        continue
                    key = (name, case.name)
                    context.matched.add(key)  # an entry may not ask context.wants
                    begun = building[2] if building is not None and building[:2] == key else time.perf_counter()
                    context.running = key
                    log(f"{name}: {case.name}")
                    case_rows = run_case(case, context.device, log=log)
                    del case  # its tensors go before the next case is built (two big cases may not fit at once)
                    context.running = None
                    context.done.add(key)
                    context.durations[name] = time.perf_counter() - begun
                    rows += case_rows
                    if results is not None and case_rows:
                        record(case_rows, results)
            except Exception as error:  # one broken entry must not hide the others' results
                traceback.print_exc()
                context.running = None
                building, context.building = context.building, None
                if building is None or building[0] != name:
                    failed.append(f"{name}: {type(error).__name__}: {error}")
                    break
                case_name = building[1]
                log(f"  {case_name}: RAISED while built, not measured: {short_error(error)}")
                context.done.add((name, case_name))
                context.durations[name] = time.perf_counter() - building[2]
                row = build_failure_row(name, case_name, error, context.device)
                rows.append(row)
                if results is not None:
                    record([row], results)
            else:
                break
            if context.device.type == "cuda":  # out of the except clause: its traceback held the case's tensors
                torch.cuda.empty_cache()
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
