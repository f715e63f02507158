"""Benchmark harness: check, then time every provider of a case in the same run, and record rows.

A row is one (entry, case, provider) measurement: median / p20 / p80 time, throughput, peak memory,
speedups over every other provider timed in the same run, where the case gives them achieved GB/s (against the
device's measured copy bandwidth) and TFLOP/s, and where it ran (device, versions, timestamp).
Rows are appended to ``benchmarks/results/<device>.json``, replacing older rows with the same key.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class CheckFailed(AssertionError):
    """A provider's output disagrees with the reference: it is reported, never timed."""


@dataclass
class Case:
    """One workload measured across providers.

    ``providers`` maps a name to a zero-argument callable doing the whole work once; ``check(name, output)``
    raises (AssertionError) when that output is wrong; ``units``/``unit`` give throughput (e.g. molecules).
    ``targets`` are (provider, over, ratio) claims: provider must be at least ``ratio`` times faster; ``over``
    may be a tuple of providers (the claim is then over the fastest of them timed in the run, "the best peer");
    a 4th item ``"memory"`` makes it a peak-memory claim: provider's peak memory (as :func:`measure` takes it on
    the device) at least ``ratio`` times below ``over``'s (the leanest of them for a tuple). ``bytes_moved``
    (provider -> bytes the work must move) and ``flops`` (useful FLOPs, the same for every provider) add achieved
    GB/s and TFLOP/s to the rows. ``other_processes`` names the providers that do their work in other processes
    (provider -> how): on the CPU their rows carry no peak memory, since this process's own would understate it.
    """

    entry: str
    name: str
    providers: dict[str, Callable[[], Any]]
    check: Callable[[str, Any], None]
    units: float
    unit: str
    config: dict = field(default_factory=dict)
    targets: list[tuple] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    time_budget_s: float = 5.0
    bytes_moved: dict[str, float] = field(default_factory=dict)
    flops: float | None = None
    other_processes: dict[str, str] = field(default_factory=dict)


def name_selected(name: str, pattern: str | None) -> bool:
    """Whether a case named ``name`` is kept by ``pattern``: comma-separated items, each of ``&``-joined pieces
    that the name must all contain (a piece ``!text``: must not contain). None or blank keeps every case; e.g.
    ``"d=24&forward&!backward,N = 128"``."""
    items = [item for item in (pattern or "").split(",") if item.strip()]
    return not items or any(all((piece.strip()[1:] not in name) if piece.strip().startswith("!")
                                else (piece.strip() in name) for piece in item.split("&") if piece.strip())
                            for item in items)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (complex tensors as their real and imaginary parts)."""
    if got.is_complex():
        got, want = torch.view_as_real(got), torch.view_as_real(want)
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def short_error(error: BaseException) -> str:
    """One line naming a provider's failure: the exception type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def first_runs(candidates: dict[str, Callable[[], Any]], device: torch.device, required: str | None = None
               ) -> tuple[dict[str, Callable[[], Any]], dict[str, str], dict[str, Any]]:
    """Run each candidate provider once (it compiles, and shows whether it fits in memory).

    Returns ``(providers that ran, {name: reason} for those that raised, {name: first result})``. A failure of
    ``required`` (the provider the case measures) propagates unless it is running out of memory: a broken kernel
    must fail the run, not disappear from it."""
    providers, skipped, results = {}, {}, {}
    for name, fn in candidates.items():
        try:
            results[name] = fn()
        except Exception as error:  # noqa: BLE001 - a peer that cannot run is skipped with the reason
            if name == required and not isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            skipped[name] = short_error(error)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        providers[name] = fn
    return providers, skipped, results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{device.type} {device_name(device)}".lower()).strip("-")


def _environment(device: torch.device) -> dict:
    from pyblend import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type, "pyblend": __version__,
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _quantiles(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": statistics.median(ordered), "p20_ms": pick(0.2), "p80_ms": pick(0.8),
            "repeats": len(ordered)}


# On a GPU, a call slower than this is timed by the wall clock: do_bench would make at least 8 more calls (its
# estimate, warm-up and timed runs), minutes for the CPU peers (scipy, networkx, the reference) of some entries.
SLOW_CALL_S = 0.25


def measure(fn: Callable[[], Any], device: torch.device, time_budget_s: float = 5.0, warmed_up: bool = False,
            graphs: bool = True) -> dict:
    """Time ``fn`` and take its peak memory: CUDA events through triton.testing.do_bench and the CUDA caching
    allocator's peak on a GPU, the wall clock and the process's resident-set peak on the CPU.

    The first call (compilation, caches) is never timed; pass ``warmed_up=True`` when the caller already made
    it. By the wall clock, calls repeat until the budget is spent (at least 3, at most 50: a single call over the
    budget is still measured 3 times, for p20/p80). The call that measures peak memory is the first timed one on
    the CPU; on a GPU it is timed when it is slower than ``SLOW_CALL_S`` (a CPU-bound peer), which then goes on by
    the wall clock. On a GPU a call faster than ``GRAPH_BELOW_MS`` is timed once more from CUDA-graph replays
    (:func:`graph_timing`) unless ``graphs`` is False.

    ``peak_memory_bytes`` is what the call adds at its peak to what was held before it: on a GPU the bytes of
    live tensors (``torch.cuda.max_memory_allocated``), on the CPU the resident set of this whole process (Linux
    VmHWM, reset for the call: every allocator, numpy and the C++ extension included; None where the kernel
    cannot reset it). ``peak_memory_of`` says which of the two.
    """
    if not warmed_up:
        fn()
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first_ms = (time.perf_counter() - begin) * 1e3
        peak = int(torch.cuda.max_memory_allocated(device) - baseline)
        if first_ms > SLOW_CALL_S * 1e3:
            return {**_quantiles(_wall_clock(fn, time_budget_s, [first_ms], torch.cuda.synchronize)),
                    "peak_memory_bytes": peak, "peak_memory_of": CUDA_PEAK}
        times = triton.testing.do_bench(fn, warmup=25, rep=max(100, int(time_budget_s * 200)),
                                        return_mode="all")
        timing = {**_quantiles(list(times)), "peak_memory_bytes": peak, "peak_memory_of": CUDA_PEAK}
        if graphs and timing["median_ms"] < GRAPH_BELOW_MS:
            timing.update(graph_timing(fn, timing["median_ms"], time_budget_s))
        return timing
    baseline = _reset_resident_peak()
    begin = time.perf_counter()
    fn()
    first_ms = (time.perf_counter() - begin) * 1e3
    peak = None if baseline is None else max(0, _resident_kib()[1] * 1024 - baseline)
    return {**_quantiles(_wall_clock(fn, time_budget_s, [first_ms], lambda: None)), "peak_memory_bytes": peak,
            "peak_memory_of": None if peak is None else RESIDENT_PEAK}


CUDA_PEAK = "CUDA tensors (max_memory_allocated)"
RESIDENT_PEAK = "process resident set (VmHWM)"


def _resident_kib() -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of this process in KiB, from /proc/self/status; None without it (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS:", "VmHWM:")))
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


# After a reset VmHWM is VmRSS; a kernel that ignores the request (Linux before 4.0) leaves it where it was.
_RESET_SLACK_KIB = 1024


def _reset_resident_peak() -> int | None:
    """Start a fresh resident-set peak for this process and return the resident bytes it starts from (None: the
    peak cannot be reset here).

    Garbage is collected and glibc's free heap pages go back to the kernel first (``malloc_trim``): pages a
    previous call freed and glibc kept would be reused without raising the resident set, hiding part of the
    next call's peak."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one
    except OSError:
        return None
    resident = _resident_kib()
    if resident is None or resident[1] - resident[0] > _RESET_SLACK_KIB:
        return None
    return resident[0] * 1024


# A call faster than this is also timed as CUDA-graph replays (DESIGN: "CUDA graphs for small ops"): for such a call
# the eager time is mostly the host launching kernels, and the graph time shows what the GPU itself spends.
GRAPH_BELOW_MS = 1.0
# Calls captured in one graph: enough that one replay lasts about this long by the eager time (an upper bound).
GRAPH_REPLAY_MS = 2.0
GRAPH_MAX_CALLS = 100


def graph_timing(fn: Callable[[], Any], eager_median_ms: float, time_budget_s: float) -> dict:
    """Time ``fn`` (already warm) as replays of a CUDA graph holding ``graph_calls`` calls of it.

    Returns ``graph_median_ms`` / ``graph_p20_ms`` / ``graph_p80_ms`` per call, ``graph_repeats`` (replays) and
    ``graph_calls``; or ``graph_error`` naming why there is no graph time. A call that waits for the GPU on the
    host (``.item()``, a copy to the CPU: pyblend's value checks) cannot be captured; it is found by one call
    under ``torch.cuda.set_sync_debug_mode("error")`` before any capture is tried. The calls in a replay follow
    each other with no L2 flush between them, as in ``triton.testing.do_bench_cudagraph``: inputs that fit in
    L2 stay there, so no GB/s is derived from this time.
    """
    # Capture wants a warm-up on a side stream (cuBLAS workspaces, autograd's streams); the graph gets a new
    # stream of its own, so that a failed capture leaves nothing routed to its memory pool behind.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    mode = torch.cuda.get_sync_debug_mode()
    try:
        with torch.cuda.stream(side):
            torch.cuda.set_sync_debug_mode("error")
            try:
                output = fn()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
    except Exception as error:  # noqa: BLE001 - the reason goes in the row
        torch.cuda.synchronize()
        return {"graph_error": f"waits for the GPU on the host, not capturable: {short_error(error)}"}
    torch.cuda.current_stream().wait_stream(side)
    if _tensor_devices(output) == {"cpu"}:
        # A CPU peer in a GPU run (the C++ engine): its graph would hold no work and replay in no time.
        return {"graph_error": "its output is on the CPU: a graph would capture none of its work"}
    calls = max(1, min(GRAPH_MAX_CALLS, int(GRAPH_REPLAY_MS / max(eager_median_ms, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            for _ in range(calls):
                fn()
    except Exception as error:  # noqa: BLE001
        # capture_end's own error (the capture was invalidated) hides the call's: name the first one.
        first = error.__context__ if error.__context__ is not None else error
        del graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return {"graph_error": f"capture failed: {short_error(first)}"}
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    times = []
    started = time.perf_counter()
    while len(times) < 5 or (len(times) < 50 and time.perf_counter() - started < min(time_budget_s, 1.0)):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / calls)
    del graph
    torch.cuda.empty_cache()
    quantiles = _quantiles(times)
    return {"graph_median_ms": quantiles["median_ms"], "graph_p20_ms": quantiles["p20_ms"],
            "graph_p80_ms": quantiles["p80_ms"], "graph_repeats": quantiles["repeats"], "graph_calls": calls}


def _tensor_devices(output: Any) -> set[str]:
    """The device types of the tensors in ``output`` (nested in tuples, lists, dicts, dataclasses)."""
    if isinstance(output, torch.Tensor):
        return {output.device.type}
    if isinstance(output, dict):
        output = list(output.values())
    elif hasattr(output, "__dataclass_fields__"):
        output = [getattr(output, name) for name in output.__dataclass_fields__]
    if isinstance(output, (list, tuple)):
        return set().union(*map(_tensor_devices, output))
    return set()


def _wall_clock(fn: Callable[[], Any], time_budget_s: float, times: list[float], synchronize) -> list[float]:
    started = time.perf_counter() - sum(times) / 1e3
    while len(times) < 3 or (len(times) < 50 and time.perf_counter() - started < time_budget_s):
        begin = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


_COPY_BANDWIDTH: dict[str, float] = {}


def copy_bandwidth(device: torch.device) -> float:
    """The device's measured memory roofline in GB/s: read + write bytes of a 256 MiB device-to-device copy
    (median; measured once per device and process)."""
    key = str(device)
    if key not in _COPY_BANDWIDTH:
        size = 256 << 20
        source = torch.empty(size, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        timing = measure(lambda: target.copy_(source), device, time_budget_s=0.5, graphs=False)
        _COPY_BANDWIDTH[key] = 2 * size / (timing["median_ms"] / 1e3) / 1e9
        del source, target
    return _COPY_BANDWIDTH[key]


def _throughput_fields(case: Case, provider: str, median_ms: float, device: torch.device) -> dict:
    fields = {}
    if provider in case.bytes_moved:
        fields["bytes_moved"] = case.bytes_moved[provider]
        fields["gbps"] = case.bytes_moved[provider] / (median_ms / 1e3) / 1e9
        fields["gbps_roofline"] = copy_bandwidth(device)
    if case.flops is not None:
        fields["flops"] = case.flops
        fields["tflops"] = case.flops / (median_ms / 1e3) / 1e12
    return fields


def _not_timed(provider: str, by_provider: dict[str, dict], metric: str) -> str:
    """Why ``provider`` has no usable ``metric`` in this case's rows."""
    row = by_provider.get(provider)
    if row is None:
        return f"{provider} did not run"
    if row["status"] != "ok":
        return f"{provider} {row['status']}: {row.get('reason', row.get('error', ''))}"
    return f"{provider} has no {metric}" if row.get(metric) is None else f"{provider}'s {metric} is 0"


def _apply_targets(case: Case, rows: list[dict]) -> None:
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    by_provider = {r["provider"]: r for r in rows}
    for target in case.targets:
        provider, over, ratio = target[:3]
        kind = target[3] if len(target) > 3 else "time"
        candidates = [over] if isinstance(over, str) else list(over)
        metric = "median_ms" if kind == "time" else "peak_memory_bytes"
        values = {name: ok[name][metric] for name in candidates if name in ok and ok[name].get(metric) is not None}
        if provider not in ok or ok[provider].get(metric) in (None, 0) or not values:
            # Said in the row and the summary: a target that silently vanished read as one nobody had set.
            reason = (_not_timed(provider, by_provider, metric) if provider not in ok or ok[provider].get(metric)
                      in (None, 0) else "; ".join(_not_timed(name, by_provider, metric) for name in candidates))
            missed = {"over": over if isinstance(over, str) else candidates, "at_least": ratio, "reason": reason}
            if kind != "time":
                missed["kind"] = kind
            holder = by_provider.get(provider, rows[0] if rows else None)
            if holder is not None:
                holder.setdefault("targets_not_evaluated", []).append({"provider": provider, **missed})
            continue
        best = min(values, key=values.get)
        measured = values[best] / ok[provider][metric]
        record = {"over": best, "at_least": ratio, "measured": measured, "met": measured >= ratio}
        if kind != "time":
            record["kind"] = kind
        if not isinstance(over, str):
            record["best_of"] = candidates
        ok[provider].setdefault("targets", []).append(record)


def run_case(case: Case, device: torch.device, log: Callable[[str], None] = print) -> list[dict]:
    """Check every provider's output, time the ones that pass, and return one row per provider."""
    environment = _environment(device)
    rows = []
    for provider, fn in case.providers.items():
        row = {"entry": case.entry, "case": case.name, "provider": provider, "unit": case.unit,
               "units": case.units, "config": case.config, **environment}
        # A provider that raises (a Triton compile error, out of memory, a missing extension) is reported with
        # the others' rows instead of ending the entry.
        try:
            case.check(provider, fn())
        except Exception as failure:
            wrong = isinstance(failure, AssertionError)
            reason = str(failure) if wrong else short_error(failure)
            log(f"  {case.name} / {provider}: {'WRONG OUTPUT' if wrong else 'RAISED'}, not timed: {reason}")
            rows.append({**row, "status": "wrong", "error": reason})
            _release(device)
            continue
        try:  # the checked call above was the warm-up
            timing = measure(fn, device, case.time_budget_s, warmed_up=True)
        except Exception as failure:
            log(f"  {case.name} / {provider}: FAILED WHILE TIMED: {short_error(failure)}")
            rows.append({**row, "status": "wrong", "error": f"raised while timed: {short_error(failure)}"})
            _release(device)
            continue
        if provider in case.other_processes and timing.get("peak_memory_of") == RESIDENT_PEAK:
            timing.update(peak_memory_bytes=None, peak_memory_of=None, peak_memory_note=(
                f"not taken: works in {case.other_processes[provider]}, this process's peak would understate it"))
        rows.append({**row, "status": "ok", **timing, "throughput": case.units / (timing["median_ms"] / 1e3),
                     **_throughput_fields(case, provider, timing["median_ms"], device)})
        graph = (f"; {timing['graph_median_ms']:.4f} ms from CUDA-graph replays" if "graph_median_ms" in timing
                 else f"; no graph time: {timing['graph_error']}" if "graph_error" in timing else "")
        log(f"  {case.name} / {provider}: {timing['median_ms']:.3f} ms median over {timing['repeats']}{graph}")
    for provider, reason in case.skipped.items():
        rows.append({"entry": case.entry, "case": case.name, "provider": provider, "status": "skipped",
                     "reason": reason, "config": case.config, **environment})
    for metric, speedups in (("median_ms", "speedup_over"), ("graph_median_ms", "graph_speedup_over")):
        timed = {r["provider"]: r[metric] for r in rows if r["status"] == "ok" and metric in r}
        for row in rows:
            if row["provider"] in timed:
                row[speedups] = {other: t / row[metric] for other, t in timed.items() if other != row["provider"]}
    _apply_targets(case, rows)
    return rows


# The provider of the row that records a case whose construction raised (the case's own providers never ran).
BUILD_PROVIDER = "(building the case)"


def build_failure_row(entry: str, case: str, error: BaseException, device: torch.device) -> dict:
    """The row of a case whose construction raised (a broken required kernel, out of memory while allocating its
    tensors): status "wrong", as a provider that raises, so that the case is reported and measured again later."""
    return {"entry": entry, "case": case, "provider": BUILD_PROVIDER, "status": "wrong",
            "error": f"raised while built: {short_error(error)}", "config": {}, **_environment(device)}


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _key(row: dict) -> tuple:
    return (row["entry"], row["case"], row["provider"], row["device"],
            json.dumps(row.get("config", {}), sort_keys=True))


def record(rows: list[dict], path: Path) -> None:
    """Merge ``rows`` into the JSON list at ``path``: a new row replaces an old one with the same key, and a case's
    new rows replace its build-failure row (:func:`build_failure_row`), which has a key of its own. The file is
    replaced whole (written beside it, then renamed), so a run killed while writing leaves the previous rows."""
    old = json.loads(path.read_text()) if path.exists() else []
    # A failure to build that a later call got past would otherwise mark the case wrong for good.
    rebuilt = {(row["entry"], row["case"], row["device"]) for row in rows if row["provider"] != BUILD_PROVIDER}
    old = [row for row in old
           if not (row["provider"] == BUILD_PROVIDER and (row["entry"], row["case"], row["device"]) in rebuilt)]
    merged = {_key(row): row for row in old}
    merged.update({_key(row): row for row in rows})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(sorted(merged.values(), key=_key), indent=1) + "\n")
    os.replace(partial, path)


def recorded_cases(path: Path) -> frozenset:
    """The (entry, case) pairs that the results JSON at ``path`` holds a finished measurement of: some provider
    timed, none wrong (a case with a wrong provider, or that failed to build, is measured again) and, on a GPU, no
    pyblend provider skipped (out of memory, say: the case's targets were not evaluated). A ValueError names a
    file that is not a list of result rows."""
    if not path.exists():
        return frozenset()
    timed, unfinished = set(), set()
    try:
        rows = json.loads(path.read_text())
        for row in rows:
            key = (row["entry"], row["case"])
            if row["status"] == "ok":
                timed.add(key)
            elif row["status"] == "wrong" or (row["status"] == "skipped" and _pyblend_skipped_on_a_gpu(row)):
                unfinished.add(key)
    except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: expected a JSON list of result rows; {type(error).__name__}: {error}") from None
    return frozenset(timed - unfinished)


def _pyblend_skipped_on_a_gpu(row: dict) -> bool:
    # On the CPU the Triton providers are skipped by design ("needs a CUDA device"); on a GPU a skipped pyblend
    # provider is the measurement the case exists for, missing.
    return row["provider"].startswith("pyblend") and row.get("device_type") == "cuda"


def format_table(rows: list[dict]) -> str:
    header = ("case", "provider", "median ms", "p20 ms", "p80 ms", "graph ms", "throughput", "GB/s", "TFLOP/s",
              "peak MiB", "speedups")
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append((row["case"], row["provider"], row["status"], "", "", "", "", "", "", "",
                          row.get("reason", row.get("error", ""))[:60]))
            continue
        graph = (f"{row['graph_median_ms']:.4f}" if "graph_median_ms" in row
                 else "not capturable" if "graph_error" in row else "")
        speedups = ", ".join(f"{v:.1f}x vs {k}" for k, v in row["speedup_over"].items() if v >= 1)
        gbps = (f"{row['gbps']:.4g} ({100 * row['gbps'] / row['gbps_roofline']:.0f}%)"
                if row.get("gbps") is not None else "")
        tflops = f"{row['tflops']:.3g}" if row.get("tflops") is not None else ""
        peak = f"{row['peak_memory_bytes'] / 2**20:.1f}" if row.get("peak_memory_bytes") is not None else ""
        lines.append((row["case"], row["provider"], f"{row['median_ms']:.3f}", f"{row['p20_ms']:.3f}",
                      f"{row['p80_ms']:.3f}", graph, f"{row['throughput']:.4g} {row['unit']}/s", gbps, tflops, peak,
                      speedups))
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    render = lambda line: "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()  # noqa
    return "\n".join([render(header), render(tuple("-" * w for w in widths)), *map(render, lines)])


def format_targets(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        for target in row.get("targets", []):
            verdict = "met" if target["met"] else "MISSED"
            over = target["over"] + (f" (the best of {len(target['best_of'])})" if "best_of" in target else "")
            if target.get("kind") == "memory":
                claim = f"uses {target['measured']:.1f}x less peak memory than {over}"
            else:
                claim = f"is {target['measured']:.1f}x {over}"
            lines.append(f"{row['case']}: {row['provider']} {claim} (target >= {target['at_least']:g}x): {verdict}")
        for target in row.get("targets_not_evaluated", []):
            over = target["over"] if isinstance(target["over"], str) else f"the best of {len(target['over'])}"
            claim = "less peak memory than" if target.get("kind") == "memory" else "faster than"
            lines.append(f"{row['case']}: {target['provider']} {target['at_least']:g}x {claim} {over}: "
                         f"target not evaluated: {target['reason']}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """Bar chart of median time per provider, one panel per case (log scale). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r["status"] == "ok"]
    cases = list(dict.fromkeys((r["entry"], r["case"]) for r in timed))
    if not cases:
        return False
    figure, axes = plt.subplots(len(cases), 1, figsize=(9, 2.2 * len(cases) + 0.6), squeeze=False)
    for axis, (entry, name) in zip(axes[:, 0], cases):
        chosen = [r for r in timed if (r["entry"], r["case"]) == (entry, name)]
        axis.barh([r["provider"] for r in chosen], [r["median_ms"] for r in chosen],
                  xerr=[[r["median_ms"] - r["p20_ms"] for r in chosen], [r["p80_ms"] - r["median_ms"] for r in chosen]],
                  color="tab:blue")
        axis.set_xscale("log")
        axis.set_title(f"{entry}: {name}", fontsize=9)
        axis.set_xlabel("median time (ms), whiskers p20-p80", fontsize=8)
        axis.tick_params(labelsize=8)
    figure.suptitle(f"pyblend benchmarks on {timed[0]['device']}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
