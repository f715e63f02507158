"""One call on a lent GPU: the GPU tests, then the benchmark cases the open issues need, within a time budget.

    python -m pyblend.benchmarks.lease --out DIR [--budget-s 420] [--tests gpu|all|none] [--redo] [--allow-cpu]
    make lease LEASE_ARGS="--out DIR --budget-s 420"          (builds first, as `make bench` does)

A lent GPU comes for minutes (a drawn session has 15 of device time, start-up included), so the work goes in
priority order and every result is kept as soon as it exists:

1. the environment: device, driver, torch, triton; without a CUDA device the call fails (exit 2) unless
   ``--allow-cpu``; a results JSON that cannot be read fails it too, before the tests;
2. the tests (``pytest -m gpu``; ``--tests all`` runs the whole quick tier, its Triton kernels on the GPU),
   stopped after a third of the budget at most: 15 s before that they get SIGINT, so that pytest names the
   failures so far and writes its XML, then what is left is killed; log and JUnit XML in DIR;
3. the benchmark ``PLAN``: first the cases that carry the issues' targets, then every other case of the suite,
   each started only while more than ``--reserve-s`` of the budget is left (the case running then finishes) and
   while the last case of its entry in this call would still fit in what is left. Rows merge into
   ``DIR/<device>.json`` after each case; that file starts as a copy of ``benchmarks/results/<device>.json``, and
   the cases recorded there (some provider timed, none wrong, no pyblend provider skipped) are left out, so that
   successive calls go on where the last stopped (``--redo`` measures them again). A case whose construction
   raises is recorded as a "wrong" row, is not built again in this call, and its entry goes on with its other
   cases;
4. a summary, printed last: the test counts and failures, this call's rows, the targets (and those that could not
   be evaluated, with why), the cases not reached. On SIGTERM (the device tool's time limit) the case running is
   abandoned, the summary still prints, and the exit status is 143.

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
import threading
import time
from pathlib import Path

import torch

from .harness import RESULTS_DIR, device_name, device_slug, plot, recorded_cases
from .run import RECORDED, Context, report, run_entries

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


# After SIGINT, the time pytest gets to print its summary (the failed tests) and write the JUnit XML before the
# test processes are killed; part of the test step's limit, so the step still ends within it.
TESTS_STOP_S = 15.0


def run_tests(which: str, out: Path, limit_s: float) -> str:
    """Run the tests (``which``: "gpu" or "all") for at most ``limit_s`` seconds; output to ``out``. Returns a
    one-line summary (pytest's own, or why there is none).

    Tests still running ``TESTS_STOP_S`` (at most half the limit) before the limit get SIGINT, so that pytest
    names the failures so far and writes its XML; whatever is left at the limit is killed."""
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
    grace = min(TESTS_STOP_S, limit_s / 2)
    log(f"$ {' '.join(command)}  (interrupted after {limit_s - grace:.0f} s, stopped after {limit_s:.0f} s)")
    stopped = None
    with open(out / "tests.log", "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=TESTS.parent,
                                   start_new_session=True)  # a process group, so a stop reaches the workers
        try:
            process.wait(timeout=limit_s - grace)
        except subprocess.TimeoutExpired:
            stopped = f"STOPPED after {limit_s - grace:.0f} s ({_stop(process, grace)})"
        except BaseException:  # SIGTERM (Terminated): no test process may outlive this one
            _stop(process, min(grace, 2.0))
            raise
    lines = (out / "tests.log").read_text(errors="replace").splitlines()
    for line in lines:
        if line.startswith(("FAILED", "ERROR")):
            log(f"  {line}")
    summary = [line for line in lines if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    return (f"{stopped or f'exit {process.returncode}'}: "
            f"{summary[-1].strip(' =') if summary else 'no summary line (see tests.log for the tests that ran)'}")


def _stop(process: subprocess.Popen, grace_s: float) -> str:
    """Interrupt the test processes' group, kill what is left after ``grace_s`` seconds; says which it took."""
    how = "interrupted"
    _signal_group(process, signal.SIGINT)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        how = f"killed: still running {grace_s:.0f} s after SIGINT"
    _signal_group(process, signal.SIGKILL)  # xdist workers that outlived their controller too
    process.wait()
    return how


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the whole group has already exited
        pass


class Terminated(BaseException):
    """SIGTERM (the device tool's time limit), raised where the lease is: a BaseException, so that no entry's
    ``except Exception`` takes it for a failure of its own, while the summary still prints."""


class _Termination:
    """SIGTERM turned into :class:`Terminated`. Python drops an exception raised where it cannot propagate (a
    weakref callback or ``__del__``, which torch runs often: "Exception ignored in ..."), so the signal is also
    remembered, and :meth:`check`, run at each line the lease logs (between every two steps of a case), raises it
    again."""

    def __init__(self):
        self.signal: str | None = None

    def handler(self, signum, frame):
        self.signal = signal.Signals(signum).name
        raise Terminated(self.signal)

    def check(self) -> None:
        if self.signal is not None:
            raise Terminated(self.signal)


# The exit status after SIGTERM, as a shell reports a process it ended (128 + 15).
TERMINATED_EXIT = 128 + signal.SIGTERM


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
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run without a CUDA device (the tests of this command do); otherwise that is an error")
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
    if device.type != "cuda" and not args.allow_cpu:  # a lent GPU that torch cannot see would measure nothing
        parser.error("expected a CUDA device, but torch sees none (driver, CUDA build of torch?); "
                     "--allow-cpu runs on the CPU")
    # Read before the tests: a results file that cannot be read would otherwise end the call after them.
    results = args.out / f"{device_slug(device)}.json"
    committed = RESULTS_DIR / results.name
    copied = not results.exists() and committed.exists()
    if copied:
        shutil.copyfile(committed, results)
    try:
        recorded = recorded_cases(results)
    except ValueError as error:
        parser.error(f"{error} (a copy of {committed})" if copied else str(error))
    context = Context(device, quick=False, deadline=begun + args.budget_s - args.reserve_s,
                      recorded=frozenset() if args.redo else recorded, end=begun + args.budget_s)

    tests, rows, failed, begun_items, current, terminated = "not reached", [], [], 0, None, None
    termination = _Termination()
    previous = signal.signal(signal.SIGTERM, termination.handler) if _main_thread() else None

    def checked_log(line: str = "") -> None:
        log(line)
        termination.check()

    try:
        tests = "not run (--tests none)"
        if args.tests != "none":
            tests = "cut short (see tests.log)"
            tests = run_tests(args.tests, args.out, limit_s=args.budget_s / 3)
            checked_log(f"tests: {tests}  ({args.budget_s - left():.0f} s in)")
        for index, (entry, pattern, why) in enumerate(PLAN, 1):
            if left() < args.reserve_s:
                break
            begun_items = current = index
            checked_log(f"[{index}/{len(PLAN)}] {entry}: {pattern or 'every case'} ({why}; {left():.0f} s left)")
            context.cases = pattern
            # context.done keeps the cases run (or that failed to build) from being built again by a later item.
            run_entries([entry], context, results, checked_log, rows=rows, failed=failed)
            current = None
        termination.check()
    except Terminated as signalled:
        terminated = str(signalled)
    finally:
        if previous is not None:  # the summary is what a terminated call leaves: a second SIGTERM must not cut it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            summary(args, device, left(), tests, rows, failed, context, begun_items, current, terminated, results,
                    committed)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    if terminated:
        return TERMINATED_EXIT
    wrong = [row for row in rows if row["status"] == "wrong"]
    return 1 if failed or wrong or not tests.startswith(("exit 0", "not run")) else 0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal.signal works there only


def summary(args, device, left_s, tests, rows, failed, context, begun_items, current, terminated, results,
            committed) -> None:
    """The end of the lease's output: what ran, what it measured, what it did not reach."""
    spent = args.budget_s - left_s
    log("\n================ summary")
    if terminated:
        cut = context.building or context.running
        log(f"TERMINATED by {terminated} {spent:.0f} s in" + (f", during {cut[0]}: {cut[1]}" if cut else "")
            + "; what had finished follows")
    log(f"device: {device_name(device)}; {spent:.0f} s of {args.budget_s:.0f}")
    log(f"tests: {tests}")
    late = {key: why for key, why in context.not_started.items() if why != RECORDED}  # not the recorded ones
    report(rows, failed, late, log)
    if current is not None:
        entry, pattern, why = PLAN[current - 1]
        log(f"\nPlan item cut short: {entry}: {pattern or 'every case'} ({why})")
    if begun_items < len(PLAN):
        log(f"\nPlan items not begun ({len(PLAN) - begun_items}):")
        for entry, pattern, why in PLAN[begun_items:]:
            log(f"  {entry}: {pattern or 'every case'} ({why})")
    if results.exists():
        if not terminated:  # drawing takes seconds that a terminated call may not have; the JSON holds the rows
            plot(json.loads(results.read_text()), results.with_suffix(".png"))
        log(f"\nrows: {results} (copy it to {committed} and commit it)")


if __name__ == "__main__":
    sys.exit(main())
