"""One call on a lent GPU: the GPU tests, then the benchmark cases the open issues need, within a time budget.

    python -m pyblend.benchmarks.lease --out DIR [--budget-s 420] [--tests gpu|all|none] [--redo]
    make lease LEASE_ARGS="--out DIR --budget-s 420"          (builds first, as `make bench` does)

A lent GPU comes for minutes (a drawn session has 15 of device time, start-up included), so the work goes in
priority order and every result is kept as soon as it exists:

1. the environment: device, driver, torch, triton;
2. the tests (``pytest -m gpu``; ``--tests all`` runs the whole quick tier, its Triton kernels on the GPU),
   stopped after a third of the budget at most; log and JUnit XML in DIR;
3. the benchmark ``PLAN``: first the cases that carry the issues' targets, then every other case of the suite,
   each started only while more than ``--reserve-s`` of the budget is left (the case running then finishes). Rows
   merge into ``DIR/<device>.json`` after each case; that file starts as a copy of
   ``benchmarks/results/<device>.json``, and the cases recorded there (some provider timed, none wrong) are left
   out, so that successive calls go on where the last stopped (``--redo`` measures them again);
4. a summary, printed last: the test counts and failures, this call's rows, the targets, the cases not reached.

Copy ``DIR/<device>.json`` back to ``benchmarks/results/`` and commit it. The plot of every recorded row goes to
``DIR/<device>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from .harness import RESULTS_DIR, device_name, device_slug, plot, recorded_cases
from .run import Context, report, run_entries

TESTS = Path(__file__).resolve().parent.parent / "tests"  # present in a checkout (editable install), not a wheel

# (entry, --cases pattern, why): the cases that carry the open issues' targets, one case an item, most needed
# first; then the rest of each entry. Patterns join their pieces with "&" (a comma would separate alternatives).
# Left out: the shortest-path loader cases, CPU work (scipy, networkx, the torch reference over the whole set:
# minutes) that the CPU results already hold.
PLAN = [
    ("shortest_path", "one batch&!hydrogens", "issue 2: Triton >= 10x the C++ engine, 4096 molecules"),
    ("relation_attention", "heavy atoms&d=24&forward+backward", "issue 3: >= 5x eager, >= 2x the best peer"),
    ("gaussian_basis_bias", "forward+backward", "issue 4: >= 5x eager, >= 8x less peak memory"),
    ("outer_product", "heavy atoms&SPD head", "issue 4: >= 5x eager, >= 10x less peak memory"),
    ("moleblend", "packed", "issue 4: a training step >= 3x the reference model"),
    ("fourier_cross_attention", "latent 64x64&N=1000&!N=10000&forward+backward", "issue 5: >= 3x eager"),
    ("gated_fusion", "B=8192&C=768", "issue 6: >= 2x the faster reference"),
    ("multi_infonce", "B=16384&1 pair", "issue 6: >= 2x the faster reference"),
    ("relation_attention", "N = 128&forward+backward", "issue 3: the table form's peak memory >= 8x lower"),
    ("path_edge_bias", "heavy atoms&packed&forward+backward", "issue 4: edge encoding along the path"),
    ("outer_product", "heavy atoms&edge head", "issue 4: >= 5x eager, >= 10x less peak memory"),
    ("moleblend", "padded", "issue 4: a training step >= 3x the reference model"),
    ("relation_attention", "with hydrogens&d=24&forward+backward", "issue 3: >= 5x eager, >= 2x the best peer"),
    *((entry, None, "the rest of the suite") for entry in (
        "relation_attention", "gaussian_basis_bias", "outer_product", "fourier_cross_attention", "gated_fusion",
        "multi_infonce", "path_edge_bias", "moleblend")),
    ("shortest_path", "one batch", "the rest of the suite"),
]


def log(line: str = "") -> None:
    print(line, flush=True)


def environment(device: torch.device) -> None:
    log(f"device: {device_name(device)}")
    log(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {_version('triton')}")
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm,clocks.max.sm"
        shown = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                               text=True, timeout=30)
        log(shown.stdout.strip() or shown.stderr.strip())


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def run_tests(which: str, out: Path, limit_s: float) -> str:
    """Run the tests (``which``: "gpu" or "all") for at most ``limit_s`` seconds; output to ``out``. Returns a
    one-line summary (pytest's own, or why there is none)."""
    if not TESTS.is_dir():
        return f"no tests: {TESTS} is not there (an installed wheel; run from a checkout)"
    command = [sys.executable, "-m", "pytest", str(TESTS), "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={out / 'tests.xml'}"]
    if which == "gpu":
        command += ["-m", "gpu"]
    try:
        import xdist  # noqa: F401

        # One CUDA context a worker; Triton compiles on the CPU, so the workers mostly overlap compilation.
        command += ["--numprocesses", str(max(1, min(8, (os.cpu_count() or 2) // 2))), "--dist", "worksteal"]
    except ImportError:
        pass
    log(f"$ {' '.join(command)}  (stopped after {limit_s:.0f} s)")
    with open(out / "tests.log", "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=TESTS.parent,
                                   start_new_session=True)  # a process group, so a stop reaches the workers
        try:
            process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return f"STOPPED after {limit_s:.0f} s (see tests.log for the tests that ran)"
    lines = (out / "tests.log").read_text(errors="replace").splitlines()
    for line in lines:
        if line.startswith(("FAILED", "ERROR")):
            log(f"  {line}")
    summary = [line for line in lines if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    return f"exit {process.returncode}: {summary[-1].strip(' =') if summary else 'no summary line'}"


def main(argv=None) -> int:
    begun = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m pyblend.benchmarks.lease", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the logs, the JSON and the plot go (made if missing)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds this command may take, tests included (default 420); give the device call "
                             "a minute more for the build, and a margin")
    parser.add_argument("--reserve-s", type=float, default=90.0,
                        help="start no benchmark case with less than this left of the budget (default 90; less "
                             "than --budget-s)")
    parser.add_argument("--tests", choices=["gpu", "all", "none"], default="gpu",
                        help="gpu: the gpu-marked tests (default); all: the quick tier on this device; none")
    parser.add_argument("--redo", action="store_true", help="measure again the cases already recorded")
    args = parser.parse_args(argv)
    # NaN in either would make the cases' deadline NaN, which is never reached.
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        parser.error(f"--budget-s: expected a finite number of seconds > 0; got {args.budget_s:g}")
    if not (math.isfinite(args.reserve_s) and args.reserve_s >= 0):
        parser.error(f"--reserve-s: expected a finite number of seconds >= 0; got {args.reserve_s:g}")
    if args.reserve_s >= args.budget_s:  # no case could start
        parser.error(f"--reserve-s: expected less than --budget-s ({args.budget_s:g}); got {args.reserve_s:g}")
    if not args.out.strip():  # Path("") is the current folder
        parser.error(f"--out: expected a folder path; got {args.out!r}")
    args.out = Path(args.out)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out: expected a folder that exists or can be made; got {str(args.out)!r} "
                     f"({error.strerror or error})")
    left = lambda: args.budget_s - (time.perf_counter() - begun)  # noqa: E731

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    environment(device)
    tests = "not run (--tests none)"
    if args.tests != "none":
        tests = run_tests(args.tests, args.out, limit_s=args.budget_s / 3)
        log(f"tests: {tests}  ({args.budget_s - left():.0f} s in)")

    results = args.out / f"{device_slug(device)}.json"
    committed = RESULTS_DIR / results.name
    if not results.exists() and committed.exists():
        shutil.copyfile(committed, results)
    earlier = frozenset() if args.redo else recorded_cases(results)
    context = Context(device, quick=False, deadline=begun + args.budget_s - args.reserve_s, recorded=earlier)
    rows, failed, begun_items = [], [], 0
    for index, (entry, pattern, why) in enumerate(PLAN, 1):
        if left() < args.reserve_s:
            break
        begun_items = index
        log(f"[{index}/{len(PLAN)}] {entry}: {pattern or 'every case'} ({why}; {left():.0f} s left)")
        context.cases = pattern
        item_rows, item_failed = run_entries([entry], context, results, log)
        rows += item_rows
        failed += item_failed
        context.recorded = earlier | {(row["entry"], row["case"]) for row in rows}  # measured once a call

    log("\n================ summary")
    log(f"device: {device_name(device)}; {args.budget_s - left():.0f} s of {args.budget_s:.0f}")
    log(f"tests: {tests}")
    late = {key: why for key, why in context.not_started.items() if why == "deadline"}  # not the recorded ones
    report(rows, failed, late, log)
    if begun_items < len(PLAN):
        log(f"\nPlan items not begun ({len(PLAN) - begun_items}):")
        for entry, pattern, why in PLAN[begun_items:]:
            log(f"  {entry}: {pattern or 'every case'} ({why})")
    if results.exists():
        plot(json.loads(results.read_text()), results.with_suffix(".png"))
        log(f"\nrows: {results} (copy it to {committed} and commit it)")
    wrong = [row for row in rows if row["status"] == "wrong"]
    return 1 if failed or wrong or not tests.startswith(("exit 0", "not run")) else 0


if __name__ == "__main__":
    sys.exit(main())
