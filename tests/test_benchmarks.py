"""The benchmark harness: wrong providers are never timed, rows merge by key, the runner works end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyblend.benchmarks.harness import Case, _apply_targets, format_table, format_targets, record, run_case

REPOSITORY = Path(__file__).resolve().parent.parent


def test_wrong_provider_is_reported_not_timed():
    def check(provider, output):
        if output != 4:
            raise AssertionError(f"got {output}")

    case = Case(entry="toy", name="sum", providers={"right": lambda: 2 + 2, "wrong": lambda: 5},
                check=check, units=1, unit="items", targets=[("right", "wrong", 1.0)], time_budget_s=0.01)
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert rows["right"]["status"] == "ok" and rows["right"]["median_ms"] >= 0
    assert rows["wrong"]["status"] == "wrong" and "median_ms" not in rows["wrong"] and "got 5" in rows["wrong"]["error"]
    assert "speedup_over" in rows["right"] and rows["right"]["speedup_over"] == {}, "no speedup over a wrong provider"
    assert "targets" not in rows["right"]


def test_a_provider_that_raises_is_reported_and_the_others_still_run():
    calls = {"flaky": 0}

    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] > 1:
            raise RuntimeError("CUDA out of memory.\nmore text")
        return 4

    def broken():
        raise RuntimeError("pyblend._C is not built")

    case = Case(entry="toy", name="sum", providers={"broken": broken, "flaky": flaky, "right": lambda: 4},
                check=lambda provider, output: None, units=1, unit="items", time_budget_s=0.01)
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert rows["broken"]["status"] == "wrong" and rows["broken"]["error"] == "RuntimeError: pyblend._C is not built"
    assert rows["flaky"]["status"] == "wrong"
    assert rows["flaky"]["error"] == "raised while timed: RuntimeError: CUDA out of memory."
    assert rows["right"]["status"] == "ok"


def test_slow_calls_on_a_gpu_are_timed_by_the_wall_clock(monkeypatch):
    """A CPU-bound peer in a GPU run (scipy, networkx, the reference) is not handed to do_bench, which would make
    at least 8 more calls; the timed peak-memory call counts as the first sample."""
    import time

    import triton.testing

    from pyblend.benchmarks import harness

    for name, stub in (("synchronize", lambda: None), ("memory_allocated", lambda device: 0),
                       ("reset_peak_memory_stats", lambda device: None), ("max_memory_allocated", lambda device: 0)):
        monkeypatch.setattr(torch.cuda, name, stub)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *args, **kwargs: pytest.fail("slow call sent to do_bench"))
    monkeypatch.setattr(harness, "SLOW_CALL_S", 0.005)
    calls = []
    timing = harness.measure(lambda: (calls.append(1), time.sleep(0.01)), torch.device("cuda"), time_budget_s=0.0,
                             warmed_up=True)
    assert len(calls) == 3 and timing["repeats"] == 3 and timing["median_ms"] >= 10
    assert timing["peak_memory_bytes"] == 0


def test_graph_times_get_their_own_speedups_and_table_column(monkeypatch):
    """A row timed from CUDA-graph replays shows that time in the table and compares it only with other graph
    times; a provider that cannot be captured says so instead of a number."""
    from pyblend.benchmarks import harness

    timings = {"kernel": {"median_ms": 0.05, "graph_median_ms": 0.01},
               "peer": {"median_ms": 0.04, "graph_median_ms": 0.03},
               "syncing": {"median_ms": 0.06, "graph_error": "waits for the GPU on the host, not capturable: x"}}
    monkeypatch.setattr(harness, "measure", lambda fn, *args, **kwargs: {
        "p20_ms": 0.0, "p80_ms": 0.1, "repeats": 3, "peak_memory_bytes": None, **timings[fn()]})
    case = Case(entry="toy", name="small", providers={name: (lambda name=name: name) for name in timings},
                check=lambda provider, output: None, units=1, unit="items")
    lines = []
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lines.append)}
    assert rows["kernel"]["graph_speedup_over"] == {"peer": pytest.approx(3.0)}
    assert rows["peer"]["graph_speedup_over"] == {"kernel": pytest.approx(1 / 3)}
    assert "graph_speedup_over" not in rows["syncing"]
    assert rows["kernel"]["speedup_over"] == {"peer": pytest.approx(0.8), "syncing": pytest.approx(1.2)}
    assert any("0.0100 ms from CUDA-graph replays" in line for line in lines)
    assert any("no graph time: waits for the GPU" in line for line in lines)
    table = format_table(list(rows.values())).splitlines()
    assert "graph ms" in table[0]
    assert "0.0100" in next(line for line in table if " kernel " in line)
    assert "not capturable" in next(line for line in table if " syncing " in line)


def _filling(mebibytes: int):
    """A call that allocates and writes ``mebibytes`` MiB of float32 and frees it on return."""
    return lambda: float(torch.empty(mebibytes << 18, dtype=torch.float32).fill_(1.0).sum())


def test_cpu_peak_memory_is_the_resident_set_a_call_adds():
    """Measured again after the same call, a call's peak is still all of it: glibc keeps the pages a call freed
    and would hand them to the next call without raising the resident set (the second 16 MiB measurement read 0
    before the measure handed them back)."""
    from pyblend.benchmarks import harness

    if harness._reset_resident_peak() is None:
        pytest.skip("this kernel cannot reset the resident-set peak (/proc/self/clear_refs)")
    cpu = torch.device("cpu")
    for mebibytes in (16, 16, 4, 4):
        timing = harness.measure(_filling(mebibytes), cpu, time_budget_s=0.0)
        assert timing["peak_memory_of"] == harness.RESIDENT_PEAK
        assert mebibytes << 20 <= timing["peak_memory_bytes"] < (mebibytes + 2) << 20, (mebibytes, timing)
    assert harness.measure(lambda: None, cpu, time_budget_s=0.0)["peak_memory_bytes"] < 1 << 20


def test_cpu_rows_of_work_in_other_processes_carry_no_peak_memory():
    """A provider whose work runs in worker processes would look leaner than it is by this process's peak."""
    from pyblend.benchmarks import harness

    if harness._reset_resident_peak() is None:
        pytest.skip("this kernel cannot reset the resident-set peak (/proc/self/clear_refs)")
    case = Case(entry="toy", name="fill", providers={"here": _filling(8), "pooled": _filling(8)},
                check=lambda provider, output: None, units=1, unit="items", time_budget_s=0.0,
                other_processes={"pooled": "a pool of 2 worker processes"})
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert rows["here"]["peak_memory_bytes"] >= 8 << 20 and "peak_memory_note" not in rows["here"]
    assert rows["pooled"]["peak_memory_bytes"] is None and rows["pooled"]["peak_memory_of"] is None
    assert "a pool of 2 worker processes" in rows["pooled"]["peak_memory_note"]
    table = format_table(list(rows.values())).splitlines()
    assert "8.0" in next(line for line in table if " here " in line)


def _counting_call(size: int = 1 << 16, kernels: int = 1):
    """A GPU call of ``kernels`` small launches that counts its own executions in a device tensor."""
    counter = torch.zeros((), dtype=torch.int64, device="cuda")
    data = torch.randn(size, device="cuda")

    def call():
        counter.add_(1)
        out = data
        for _ in range(kernels):
            out = out * 1.0001
        return out

    return call, counter


@pytest.mark.gpu
def test_gpu_graph_timing_replays_the_captured_calls():
    """Every replay runs the captured calls: the device counter advances by exactly the calls the timing made
    (the one checked under the sync debug mode, which is the warm-up too, then the upload replay and the timed
    replays; capture runs nothing)."""
    from pyblend.benchmarks.harness import graph_timing

    call, counter = _counting_call(kernels=20)
    call()
    torch.cuda.synchronize()
    eager_ms = 0.5
    timing = graph_timing(call, eager_ms, time_budget_s=0.2)
    assert "graph_error" not in timing, timing
    calls, repeats = timing["graph_calls"], timing["graph_repeats"]
    assert calls == 4 and repeats >= 5
    assert counter.item() == 1 + 1 + calls * (1 + repeats)
    assert 0 < timing["graph_p20_ms"] <= timing["graph_median_ms"] <= timing["graph_p80_ms"]


@pytest.mark.gpu
def test_gpu_small_calls_get_a_graph_time_below_their_launch_bound_eager_time():
    """Twenty tiny launches a call: eager time is the host launching them, graph replays remove it."""
    from pyblend.benchmarks.harness import measure

    call, _ = _counting_call(size=1024, kernels=20)
    timing = measure(call, torch.device("cuda"), time_budget_s=0.2)
    assert timing["median_ms"] < 1.0 and "graph_error" not in timing, timing
    assert timing["graph_median_ms"] < timing["median_ms"]
    assert "graph_median_ms" not in measure(call, torch.device("cuda"), time_budget_s=0.2, graphs=False)


@pytest.mark.gpu
def test_gpu_a_call_that_waits_for_the_gpu_is_not_captured_and_timing_goes_on():
    from pyblend.benchmarks.harness import graph_timing

    data = torch.randn(1024, device="cuda")
    timing = graph_timing(lambda: data.sum().item(), 0.05, time_budget_s=0.1)
    assert set(timing) == {"graph_error"} and "not capturable" in timing["graph_error"]
    assert torch.cuda.get_sync_debug_mode() == 0
    cpu_only = graph_timing(lambda: torch.ones(8).cumsum(0), 0.05, time_budget_s=0.1)
    assert set(cpu_only) == {"graph_error"} and "on the CPU" in cpu_only["graph_error"]
    call, _ = _counting_call()
    assert "graph_median_ms" in graph_timing(call, 0.05, time_budget_s=0.1)


@pytest.mark.gpu
def test_gpu_packed_relation_attention_with_value_checks_off_is_captured_forward_and_backward():
    """What the benchmarks' "value checks off" providers rely on: the packed op, forward + backward by
    ``torch.autograd.grad``, is graph-timed with the checks off; with them on it reads ``cu_seqlens`` on the host
    and is reported as not capturable."""
    import pyblend
    from pyblend import ops
    from pyblend.benchmarks.harness import graph_timing

    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths = [7, 33, 20]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 4, 16, device="cuda", dtype=torch.float16, generator=generator,
                           requires_grad=True) for _ in range(3))
    bias = torch.randn(4, sum(n * n for n in lengths), device="cuda", dtype=torch.float16, generator=generator,
                       requires_grad=True)
    upstream = torch.randn_like(q)

    def step():
        out = ops.relation_attention(q, k, v, bias, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
        return torch.autograd.grad(out, (q, k, v, bias), upstream)

    step()
    assert "graph_error" in graph_timing(step, 0.2, time_budget_s=0.1)
    with pyblend.set_value_checks(False):
        step()
        timing = graph_timing(step, 0.2, time_budget_s=0.1)
    assert "graph_median_ms" in timing, timing


def test_speedups_and_targets():
    slow = lambda: sum(range(20000))  # noqa: E731
    case = Case(entry="toy", name="sum", providers={"fast": lambda: 199990000, "slow": slow},
                check=lambda provider, output: None, units=1, unit="items",
                targets=[("fast", "slow", 2.0), ("slow", "fast", 2.0)], time_budget_s=0.05)
    rows = run_case(case, torch.device("cpu"), log=lambda line: None)
    text = format_targets(rows)
    assert "fast is" in text and ": met" in text and "MISSED" in text


def test_record_replaces_rows_with_the_same_key(tmp_path):
    path = tmp_path / "results.json"
    row = {"entry": "e", "case": "c", "provider": "p", "device": "d", "config": {"k": 1}, "median_ms": 1.0}
    record([row], path)
    record([{**row, "median_ms": 2.0}, {**row, "provider": "q"}], path)
    rows = json.loads(path.read_text())
    assert len(rows) == 2 and {r["provider"]: r["median_ms"] for r in rows} == {"p": 2.0, "q": 1.0}


def test_runner_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pyblend", "bench", "--molecules", "24", "--entries",
                             "shortest_path,gaussian_basis", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pyblend C++ (packed)" in result.stdout and "scipy csgraph (per molecule)" in result.stdout
    assert "WRONG" not in result.stdout and "partial run" in result.stdout


def test_runner_records_each_entry_as_it_finishes(tmp_path, monkeypatch, capsys):
    """A full (not partial) run merges an entry's rows into the JSON when the entry ends, so a later entry that
    fails (or a device call cut short) keeps them; --cases drops the cases it does not name."""
    import json
    import types

    from pyblend.benchmarks import run

    def toy_cases(context):
        for name in ("small", "large"):
            yield Case(entry="toy", name=name, providers={"p": lambda: 4}, check=lambda provider, output: None,
                       units=1, unit="items", time_budget_s=0.0)

    def broken_cases(context):
        raise RuntimeError("simulated: this entry cannot run here")
        yield

    monkeypatch.setattr(run, "ENTRIES", {"toy": types.SimpleNamespace(cases=toy_cases),
                                         "broken": types.SimpleNamespace(cases=broken_cases)})
    assert run.main(["--entries", "toy,broken", "--cases", "small", "--device", "cpu", "--output-dir",
                     str(tmp_path), "--no-plot"]) == 1
    rows = json.loads((tmp_path / f"{run.device_slug(torch.device('cpu'))}.json").read_text())
    assert [(row["entry"], row["case"], row["status"]) for row in rows] == [("toy", "small", "ok")]
    assert "ENTRY FAILED: broken: RuntimeError: simulated" in capsys.readouterr().out
    # A second call adds its rows; the plot draws every recorded row, the first call's included.
    assert run.main(["--entries", "toy", "--cases", "large", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / f"{run.device_slug(torch.device('cpu'))}.json").read_text())
    assert sorted(row["case"] for row in rows) == ["large", "small"]
    if "plot written" in capsys.readouterr().out:  # matplotlib is optional
        assert (tmp_path / f"{run.device_slug(torch.device('cpu'))}.png").stat().st_size > 0


def test_runner_refuses_bad_options_and_selects_cases(capsys):
    from pyblend.benchmarks import run

    for argv, message in [(["--entries", ",,"], "--entries: no entry named"),
                          (["--molecules", "0"], "--molecules: expected a positive number; got 0"),
                          (["--device", "tpu"], "invalid choice: 'tpu'")]:
        with pytest.raises(SystemExit) as exit_info:
            run.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run.main(["--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err
    from pyblend.benchmarks.harness import name_selected

    assert name_selected("512 molecules with hydrogens, one batch", "4096,with hydrogens&one batch")
    assert not name_selected("512 molecules, one batch", "with hydrogens, 4096")
    assert name_selected("anything", None) and name_selected("anything", " ")
    # "forward" is part of "forward+backward": a negated piece tells them apart.
    assert name_selected("d=24, forward", "d=24&forward&!backward")
    assert not name_selected("d=24, forward+backward", "d=24&forward&!backward")


def test_pytest_benchmark_view_builds_only_the_selected_entries_and_cases():
    """The pytest view builds its cases at collection: --bench-entries / --bench-cases select before building."""
    pytest.importorskip("rdkit")

    def collect(*options):
        return subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q",
                               "-p", "no:cacheprovider", "--bench-molecules", "8", *options],
                              capture_output=True, text=True, cwd=REPOSITORY, timeout=300)

    found = collect("--bench-entries", "featurize,gaussian_basis", "--bench-cases", "no conformers")
    assert found.returncode == 0, found.stdout + found.stderr
    ids = [line for line in found.stdout.splitlines() if "::test_provider[" in line]
    assert len(ids) == 2 and all("featurize/default set: 8 SMILES, no conformers/" in line for line in ids), ids
    refused = collect("--bench-entries", "featurize,nope")
    assert refused.returncode != 0 and "--bench-entries: unknown entries ['nope']" in refused.stdout + refused.stderr


def test_bytes_flops_and_memory_targets():
    from pyblend.benchmarks import harness

    case = Case(entry="toy", name="sum", providers={"a": _filling(2), "b": _filling(16)}, check=lambda p, o: None,
                units=1, unit="items", bytes_moved={"a": 1e6}, flops=2e9, time_budget_s=0.01,
                targets=[("a", ("b",), 1.0), ("a", "b", 2.0, "memory")])
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert rows["a"]["gbps"] == pytest.approx(1e6 / (rows["a"]["median_ms"] / 1e3) / 1e9)
    assert rows["a"]["gbps_roofline"] > 0 and "gbps" not in rows["b"]
    assert rows["b"]["tflops"] == pytest.approx(2e9 / (rows["b"]["median_ms"] / 1e3) / 1e12)
    # A best-of target names the fastest of its list; on the CPU a memory claim compares resident-set peaks
    # (16 MiB over 2 MiB), where the kernel can reset them.
    speed, *memory = rows["a"]["targets"]
    assert speed["over"] == "b" and speed["best_of"] == ["b"] and "kind" not in speed
    if harness._reset_resident_peak() is not None:
        assert [(t["kind"], t["over"], t["met"]) for t in memory] == [("memory", "b", True)]
        assert 4 < memory[0]["measured"] < 8.5, memory
    else:
        assert memory == []
    assert "GB/s" in format_table(list(rows.values()))

    fake = [{"provider": "lean", "status": "ok", "median_ms": 2.0, "peak_memory_bytes": 100, "case": "c"},
            {"provider": "fat", "status": "ok", "median_ms": 1.0, "peak_memory_bytes": 900, "case": "c"},
            {"provider": "fatter", "status": "ok", "median_ms": 3.0, "peak_memory_bytes": 1800, "case": "c"}]
    _apply_targets(Case(entry="toy", name="c", providers={}, check=None, units=1, unit="items",
                        targets=[("lean", ("fat", "fatter"), 8.0, "memory"), ("lean", "fat", 1.0)]), fake)
    memory, speed = fake[0]["targets"]
    assert memory["kind"] == "memory" and memory["over"] == "fat" and memory["measured"] == 9.0 and memory["met"]
    assert speed["measured"] == 0.5 and not speed["met"]
    text = format_targets(fake)
    assert "9.0x less peak memory than fat (the best of 2)" in text and "MISSED" in text


def test_relation_attention_cases_build_with_gpu_shapes_on_cpu():
    """The GPU plan, scaled down to run on the CPU: every provider's plumbing (layouts, gradients, the table
    form, the gathered form) through the reference standing in for Triton, the eager peers, bytes and targets."""
    from types import SimpleNamespace

    from pyblend import reference
    from pyblend.benchmarks import bench_relation_attention as bench

    sizes = [5, 17, 9, 30, 2, 12, 60, 1, 44, 23] * 120
    molecules = lambda hydrogens: [SimpleNamespace(num_atoms=n * (2 if hydrogens else 1)) for n in sizes]  # noqa
    for quick, expected in ((False, 12), (True, 4)):
        specs = bench.plan(SimpleNamespace(quick=quick, molecules=molecules))
        assert len(specs) == expected
    assert {len(s["sizes"]) for s in specs} == {bench.HEAVY_BATCH, bench.HYDROGEN_BATCH, bench.POCKETS,
                                                bench.MEMORY_BATCH}
    stand_in = lambda *args, **kwargs: reference.relation_attention(*args, **kwargs)  # noqa: E731
    names = {bench.TRITON_PACKED, bench.TRITON_TABLE, bench.TRITON_PADDED, bench.TRITON_GATHERED, *bench.PEERS,
             bench.EAGER}
    for spec in bench.plan(SimpleNamespace(quick=False, molecules=molecules)):
        small = spec["sizes"][:3] if spec["sizes"][0] > 100 else spec["sizes"][:12]
        problem = bench.Problem(small, 2, spec["head_dim"], torch.float32, torch.device("cpu"), spec["backward"])
        case = bench.build_case(problem, "dry", targets=spec["targets"], attention=stand_in,
                                gathered=spec.get("gathered", False), peers=(bench.EAGER, bench.SDPA))
        assert not case.skipped, case.skipped
        for provider, fn in case.providers.items():
            case.check(provider, fn())
            assert case.bytes_moved[provider] > 0
        assert case.flops > 0 and case.config["mode"] == ("forward+backward" if spec["backward"] else "forward")
        for target in case.targets:
            assert target[0] in names and all(over in names for over in (
                [target[1]] if isinstance(target[1], str) else target[1]))


def test_relation_attention_check_rejects_a_wrong_gradient():
    from pyblend.benchmarks import bench_relation_attention as bench

    problem = bench.Problem([7, 3, 11], 2, 16, torch.float32, torch.device("cpu"), True)
    case = bench.build_case(problem, "dry", pyblend_skip="needs a CUDA device", peers=(bench.EAGER,))
    out, dq, dk, dv, dbias = case.providers[bench.EAGER]()
    with pytest.raises(AssertionError, match="dk: relative error"):
        case.check(bench.EAGER, (out, dq, dk * 1.1, dv, dbias))


def test_relation_attention_pyblend_provider_that_raises_once_checked_is_not_timed():
    """A pyblend provider passing its check and raising on later calls (out of memory on the timed calls, say) used
    to be timed as an instant success (its wrapper returned the exception), and looked capturable to the CUDA-graph
    timing, whose probe needs the call to raise: it raises, and its row is wrong."""
    from pyblend import reference
    from pyblend.benchmarks import bench_relation_attention as bench

    calls = []

    def attention(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated: out of memory on a later call")
        return reference.relation_attention(*args, **kwargs)

    problem = bench.Problem([7, 3, 11], 2, 16, torch.float32, torch.device("cpu"), True)
    case = bench.build_case(problem, "dry", attention=attention, peers=(bench.EAGER,), time_budget_s=0.01)
    case.providers = {name: case.providers[name] for name in (bench.TRITON_PACKED, bench.EAGER)}
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert rows[bench.TRITON_PACKED]["status"] == "wrong", rows[bench.TRITON_PACKED]
    assert rows[bench.TRITON_PACKED]["error"] == "raised while timed: RuntimeError: simulated: out of memory on a " \
                                                 "later call"
    assert rows[bench.EAGER]["status"] == "ok" and rows[bench.EAGER]["speedup_over"] == {}
    with pytest.raises(RuntimeError, match="simulated"):
        case.providers[bench.TRITON_PACKED]()


def test_relation_attention_entry_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pyblend", "bench", "--molecules", "24", "--entries",
                             "relation_attention", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reference eager (padded)" in result.stdout and "SDPA float mask (padded)" in result.stdout
    assert "WRONG" not in result.stdout and "ENTRY FAILED" not in result.stdout


@pytest.mark.full
def test_relation_attention_compiled_peers_on_cpu():
    """The compiled peers' plumbing (FlexAttention's padded bias score_mod, its packed document mask reading the
    bias by pair offset, the compiled reference) on the CPU, forward only: FlexAttention has no CPU backward."""
    from pyblend.benchmarks import bench_relation_attention as bench

    problem = bench.Problem([5, 9, 1, 3, 7, 20], 2, 24, torch.float32, torch.device("cpu"), backward=False)
    case = bench.build_case(problem, "dry", pyblend_skip="needs a CUDA device",
                            peers=(bench.COMPILED, bench.FLEX_PADDED, bench.FLEX_PACKED))
    assert set(case.providers) == {bench.COMPILED, bench.FLEX_PADDED, bench.FLEX_PACKED}, case.skipped
    for provider, fn in case.providers.items():
        case.check(provider, fn())


def test_relation_attention_case_selection(monkeypatch):
    from pyblend.benchmarks import bench_relation_attention as bench

    name = bench._case_name("pockets (synthetic)", [300, 400], 32, 24, torch.bfloat16, True)
    assert bench._selected(name)
    monkeypatch.setenv("PYBLEND_BENCH_RELATION_ATTENTION", "d=16, N = 128")
    assert not bench._selected(name)
    monkeypatch.setenv("PYBLEND_BENCH_RELATION_ATTENTION", "d=16,pockets&d=24&forward+backward")
    assert bench._selected(name)

    class Context:
        cases = "pockets&!backward"  # --cases wins over the environment

    assert not bench._selected(name, Context())


def test_multi_infonce_case_checks_every_provider_with_the_kernel():
    """The GPU case's construction and checks, run small on the CPU with Triton's interpreter."""
    from pyblend.benchmarks import bench_multi_infonce

    case = bench_multi_infonce.build_case(48, 3, 32, torch.float32, torch.device("cpu"), missing=0.2,
                                          time_budget_s=0.01, targets=[(bench_multi_infonce.TRITON,
                                                                        (bench_multi_infonce.EAGER,), 0.0)])
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert set(rows) == {bench_multi_infonce.TRITON, bench_multi_infonce.EAGER, bench_multi_infonce.COMPILED}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows[bench_multi_infonce.TRITON]["targets"][0]["over"] == bench_multi_infonce.EAGER


def test_gated_fusion_case_checks_every_provider_with_the_kernel():
    """The GPU case's construction and checks, run small on the CPU with Triton's interpreter."""
    from pyblend.benchmarks import bench_gated_fusion

    case = bench_gated_fusion.build_case(37, 24, torch.float32, torch.device("cpu"), time_budget_s=0.01,
                                         targets=[(bench_gated_fusion.TRITON, (bench_gated_fusion.EAGER,), 0.0)])
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert set(rows) == {bench_gated_fusion.TRITON, bench_gated_fusion.EAGER, bench_gated_fusion.COMPILED}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows[bench_gated_fusion.TRITON]["targets"][0]["over"] == bench_gated_fusion.EAGER


def test_gated_fusion_check_rejects_a_wrong_gradient():
    from pyblend.benchmarks import bench_gated_fusion

    case = bench_gated_fusion.build_case(16, 8, torch.float32, torch.device("cpu"), triton=False)
    result = list(case.providers[bench_gated_fusion.EAGER]())
    case.check(bench_gated_fusion.EAGER, result)
    result[4] = result[4] * 1.01  # d(gate_logits) off by 1%
    with pytest.raises(AssertionError, match="dgate_logits"):
        case.check(bench_gated_fusion.EAGER, result)


def test_compiled_references_are_compiled_afresh_for_each_gpu_case(monkeypatch):
    """Each GPU case of gated fusion, InfoNCE and the LegoBlock step compiled the same reference function again with
    dynamo's state of the previous case: the second shape was compiled for dynamic shapes, so a case's time
    depended on the cases run before it. Now dynamo is reset before each case is built, and compiles static
    shapes, as relation attention, outer product and path edge bias do."""
    import torch._dynamo

    from pyblend.benchmarks import bench_fourier_cross_attention, bench_gated_fusion, bench_multi_infonce, run

    class EveryCase(run.Context):
        def __init__(self):
            super().__init__(torch.device("cuda"), quick=False)

        def wants(self, entry, name):
            return True

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    for bench in (bench_gated_fusion, bench_multi_infonce, bench_fourier_cross_attention):
        resets.clear()
        built = []
        monkeypatch.setattr(bench, "build_case", lambda *args, **kwargs: built.append(len(resets)))
        list(bench.cases(EveryCase()))
        assert len(built) > 1 and built == list(range(1, len(built) + 1)), (bench.ENTRY, built)
        monkeypatch.undo()
        monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(options) or fn)
    cpu = torch.device("cpu")
    bench_gated_fusion.build_case(8, 4, torch.float32, cpu, triton=False)
    bench_multi_infonce.build_case(8, 2, 4, torch.float32, cpu, triton=False)
    bench_fourier_cross_attention.build_case(*bench_fourier_cross_attention.CPU_SHAPE, torch.float32, cpu, heads=2,
                                             head_dim=8, triton=False)
    assert compiled == [{"dynamic": False}] * 3, compiled


def test_moleblend_step_on_the_kernels_matches_the_reference_model():
    """The whole pretraining step with every op on its Triton kernel (interpreter), value checks on and off, gives
    the reference model's loss: the benchmark's check, run small."""
    from pyblend import featurize_many
    from pyblend.benchmarks import bench_moleblend
    from pyblend.models import MoleBlendConfig

    graphs, _ = featurize_many(["CCO", "c1ccccc1O", "CC(=O)N"], conformer=True, progress=False)
    config = MoleBlendConfig(layers=1, dim=16, heads=2, ffn_dim=16, num_kernels=8, head_width=4, max_distance=4,
                             max_hops=3)
    case = bench_moleblend.build_case(graphs, config, torch.float32, torch.device("cpu"), time_budget_s=0.01,
                                      targets=[(bench_moleblend.TRITON, bench_moleblend.EAGER, 0.0)])
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert set(rows) == {bench_moleblend.TRITON, bench_moleblend.TRITON_UNCHECKED, bench_moleblend.EAGER}
    assert all(row["status"] == "ok" for row in rows.values()), rows


def test_moleblend_packed_case_builds_on_cpu():
    """The packed case next to the padded one: its own name and config, the reference step runs and checks."""
    from pyblend import featurize_many
    from pyblend.benchmarks import bench_moleblend
    from pyblend.models import MoleBlendConfig

    graphs, _ = featurize_many(["CCO", "c1ccccc1O", "C"], conformer=True, progress=False)
    config = MoleBlendConfig(layers=1, dim=16, heads=2, ffn_dim=16, num_kernels=8, head_width=4, max_distance=4,
                             max_hops=3)
    case = bench_moleblend.build_case(graphs, config, torch.float32, torch.device("cpu"), time_budget_s=0.01,
                                      triton=False, layout="packed")
    assert case.config["layout"] == "packed" and "packed" in case.name
    rows = {row["provider"]: row for row in run_case(case, torch.device("cpu"), log=lambda line: None)}
    assert rows[bench_moleblend.EAGER]["status"] == "ok", rows
    with pytest.raises(ValueError, match="layout"):
        bench_moleblend.build_case(graphs, config, torch.float32, torch.device("cpu"), triton=False, layout="ragged")


def tuner_rows(tmp_path, monkeypatch, op, kernels, other, *options):
    """The tuner run with ``options`` on ``op``'s ``kernels`` (interpreter, small workload) with two candidates per
    kernel, the current configuration and it updated with ``other``: the rows of its JSON."""
    import dataclasses
    import json

    from pyblend.benchmarks import tune

    monkeypatch.setitem(tune.OPS, op, dataclasses.replace(tune.OPS[op], kernels=kernels))
    monkeypatch.setattr(tune, "candidates", lambda spec, current, small: [dict(current), dict(current, **other)])
    output = tmp_path / "rows.json"
    assert tune.main(["--ops", op, "--dtype", "float16", "--output", str(output), *options]) == 0
    return json.loads(output.read_text())["rows"]


def run_sweep(tmp_path, monkeypatch, op, kernels, other):
    """The tuner's rows for every candidate of ``op``'s ``kernels`` (see :func:`tuner_rows`)."""
    rows = tuner_rows(tmp_path, monkeypatch, op, kernels, other)
    assert [(row["kernel"], row["current"]) for row in rows] == [
        (kernels[0], True), (kernels[0], False), (kernels[1], True), (kernels[1], False)]
    for row in rows:
        if row["current"]:
            assert row["status"] == "ok" and row["max_error"] == 0 and row["median_ms"] > 0, row
    return rows


def test_launch_configuration_sweep_keeps_only_matching_candidates(tmp_path, monkeypatch, capsys):
    """Relation attention: a candidate whose head tile is narrower than D = 24 is reported, never timed as if it
    were right; the table names each kernel."""
    kernels = ("forward", "gradients")
    rows = run_sweep(tmp_path, monkeypatch, "relation_attention", kernels, {"BLOCK_D": 16})
    for row in rows:
        if not row["current"]:
            assert row["status"] in ("mismatch", "error") and "median_ms" not in row, row
    table = capsys.readouterr().out
    assert all(f"relation_attention   {kernel}" in table for kernel in kernels), table


@pytest.mark.parametrize("op, kernels", [("gaussian_basis_bias", ("forward", "weights")),
                                         ("outer_product", ("forward", "rows")),
                                         ("multi_infonce", ("forward", "columns"))])
def test_launch_configuration_sweep_of_the_other_ops(tmp_path, monkeypatch, op, kernels):
    """Each op's workload runs, and another warp count gives the same results and a time. (A tile that misses part
    of the problem is not tried here: under the interpreter the Gaussian kernels then read out of bounds.)"""
    rows = run_sweep(tmp_path, monkeypatch, op, kernels, {"num_warps": 2})
    assert all(row["status"] == "ok" and row["median_ms"] > 0 for row in rows), rows


def test_launch_configuration_sweep_shares_its_budget_and_takes_a_kernel_list(tmp_path, monkeypatch):
    """Out of budget, every kernel still times its current configuration (a baseline for the next call), and
    ``--kernels`` sweeps only those named; the JSON is written as rows come."""
    from pyblend.benchmarks import tune

    kernels, other = ("forward", "rows"), {"num_warps": 2}
    rows = tuner_rows(tmp_path, monkeypatch, "outer_product", kernels, other, "--budget-s", "0.5")
    assert [(row["kernel"], row["current"]) for row in rows] == [("forward", True), ("rows", True)]
    rows = tuner_rows(tmp_path, monkeypatch, "outer_product", kernels, other, "--kernels", "rows")
    assert [(row["kernel"], row["current"]) for row in rows] == [("rows", True), ("rows", False)]
    with pytest.raises(SystemExit):
        tune.main(["--ops", "outer_product", "--kernels", "dq"])


def stub_sweep(monkeypatch, rows_per_op=1):
    """The tuner's sweep replaced by one that makes ``rows_per_op`` rows an op (and no workload): the ops and kernel
    lists it is asked for, in order."""
    from pyblend.benchmarks import tune

    asked = []

    def sweep(name, dtype, device, budget_s, log=None, kernels=None, on_row=lambda row: None):
        asked.append((name, kernels))
        rows = [dict(op=name, kernel="forward", dtype="float16", config={"num_warps": 4}, current=True,
                     status="ok", max_error=0.0, median_ms=1.0) for _ in range(rows_per_op)]
        for row in rows:
            on_row(row)
        return rows

    monkeypatch.setattr(tune, "sweep", sweep)
    return asked


def test_tuner_refuses_a_budget_that_is_not_a_finite_positive_time(tmp_path, monkeypatch, capsys):
    """NaN never ran out (every candidate was tried); 0 or less swept nothing after emptying an earlier JSON."""
    from pyblend.benchmarks import tune

    asked = stub_sweep(monkeypatch)
    output = tmp_path / "rows.json"
    earlier = '{"device": "earlier", "rows": [{"op": "earlier"}]}\n'
    output.write_text(earlier)
    for budget in ("nan", "inf", "0", "-5"):
        with pytest.raises(SystemExit) as exit_info:
            tune.main(["--ops", "outer_product", "--output", str(output), "--budget-s", budget])
        assert exit_info.value.code == 2
        assert f"--budget-s: expected a finite number of seconds > 0; got {float(budget):g}" in capsys.readouterr().err
    assert asked == [] and output.read_text() == earlier


def test_tuner_replaces_its_json_only_with_rows(tmp_path, monkeypatch, capsys):
    """A call that measures nothing (no kernel launched) leaves an earlier JSON as it was; one that measures
    replaces it whole, leaving no partial file."""
    import json

    from pyblend.benchmarks import tune

    stub_sweep(monkeypatch, rows_per_op=0)
    output = tmp_path / "rows.json"
    earlier = '{"device": "earlier", "rows": [{"op": "earlier"}]}\n'
    output.write_text(earlier)
    assert tune.main(["--ops", "outer_product", "--output", str(output)]) == 0
    assert output.read_text() == earlier
    assert f"no rows measured; {output} not written" in capsys.readouterr().out
    stub_sweep(monkeypatch, rows_per_op=2)
    assert tune.main(["--ops", "outer_product", "--output", str(output)]) == 0
    assert [row["op"] for row in json.loads(output.read_text())["rows"]] == ["outer_product"] * 2
    assert [path.name for path in tmp_path.iterdir()] == ["rows.json"]


def test_tuner_checks_its_output_before_it_measures(tmp_path, monkeypatch, capsys):
    """A missing folder is made (as run and lease make theirs); an output that cannot be written is refused before
    any workload is built, where it used to end in a traceback after the first candidate."""
    import json

    from pyblend.benchmarks import tune

    asked = stub_sweep(monkeypatch)
    (tmp_path / "file").write_text("")
    for output, message in [("", "--output: expected a file path; got ''"),
                            (str(tmp_path), f"--output: expected a file, not a folder; got '{tmp_path}'"),
                            (str(tmp_path / "file" / "rows.json"),
                             "--output: expected a file in a folder that exists or can be made; got "
                             f"'{tmp_path / 'file' / 'rows.json'}'")]:
        with pytest.raises(SystemExit) as exit_info:
            tune.main(["--ops", "outer_product", "--output", output])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, output
    assert asked == []
    output = tmp_path / "new" / "deeper" / "rows.json"
    assert tune.main(["--ops", "outer_product", "--output", str(output)]) == 0
    assert [row["op"] for row in json.loads(output.read_text())["rows"]] == ["outer_product"]


def test_tuner_help_describes_it_in_whole_sentences(monkeypatch, capsys):
    from pyblend.benchmarks import tune

    monkeypatch.setenv("COLUMNS", "1000")  # unwrapped: argparse may break a line at a hyphen
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "time candidate tiles, warps and stages against the configuration the launcher picks now, on a workload " \
           "of the op's benchmark, and say which is fastest." in shown, shown


def toy_entry(names, seconds=0.0, provider=None):
    """A benchmark entry whose cases ask the context before they are built, as the suite's entries do; each case's
    one provider sleeps ``seconds`` or calls ``provider``."""
    import time
    import types

    def cases(context):
        for name in names:
            if context.wants("toy", name):
                yield Case(entry="toy", name=name, providers={"p": provider or (lambda: time.sleep(seconds))},
                           check=lambda provider, output: None, units=1, unit="items", time_budget_s=0.0)
    return types.SimpleNamespace(cases=cases)


def test_runner_stops_at_its_deadline_and_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """--deadline-s starts no case once it has passed (the one running finishes) and lists the rest; each case's
    rows are recorded as it ends; --skip-recorded then leaves out the recorded cases and runs the others."""
    from pyblend.benchmarks import run

    monkeypatch.setattr(run, "ENTRIES", {"toy": toy_entry(["first", "second", "third"], seconds=0.3)})
    options = ["--entries", "toy", "--device", "cpu", "--output-dir", str(tmp_path), "--no-plot"]
    assert run.main([*options, "--deadline-s", "0.2"]) == 0
    path = tmp_path / f"{run.device_slug(torch.device('cpu'))}.json"
    assert [row["case"] for row in json.loads(path.read_text())] == ["first"]
    out = capsys.readouterr().out
    assert "toy: second (deadline)" in out and "toy: third (deadline)" in out
    assert run.main([*options, "--skip-recorded"]) == 0
    assert sorted(row["case"] for row in json.loads(path.read_text())) == ["first", "second", "third"]
    out = capsys.readouterr().out
    assert "toy: first (recorded in an earlier run)" in out and "toy: second\n" in out
    with pytest.raises(SystemExit):
        run.main([*options, "--deadline-s", "0"])
    assert "--deadline-s: expected a positive number" in capsys.readouterr().err


def test_runner_says_when_no_case_matches_its_pattern(tmp_path, monkeypatch, capsys):
    """A --cases pattern that matches no case of the entries run is an error naming it (exit 2), not an empty
    table and exit 0; cases left out by --skip-recorded or by the deadline did match, and are not that error."""
    from pyblend.benchmarks import run

    monkeypatch.setattr(run, "ENTRIES", {"toy": toy_entry(["first", "second"])})
    options = ["--entries", "toy", "--device", "cpu", "--output-dir", str(tmp_path), "--no-plot"]
    assert run.main([*options, "--cases", "zzz"]) == 2
    out, err = capsys.readouterr()
    assert "--cases: expected a pattern matching some case of toy on cpu; got 'zzz', which matches none" in err
    assert "toy: first" not in out and not list(tmp_path.glob("*.json"))
    assert run.main([*options, "--cases", "first"]) == 0
    capsys.readouterr()
    assert run.main([*options, "--cases", "first", "--skip-recorded"]) == 0
    out, err = capsys.readouterr()
    assert "toy: first (recorded in an earlier run)" in out and "--cases" not in err
    assert run.main([*options, "--cases", "second", "--deadline-s", "1e-9"]) == 0
    out, err = capsys.readouterr()
    assert "toy: second (deadline)" in out and "--cases" not in err


def test_runner_checks_its_output_folder_and_deadline_before_it_runs(tmp_path, monkeypatch, capsys):
    """An empty --output-dir used to write into the current folder; one that cannot be made failed only when the
    first case's rows were recorded; an infinite deadline is no deadline."""
    from pyblend.benchmarks import run

    monkeypatch.setattr(run, "ENTRIES", {"toy": toy_entry(["first"])})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    for options, message in [(["--output-dir", ""], "--output-dir: expected a folder path; got ''"),
                             (["--output-dir", str(tmp_path / "file")],
                              f"--output-dir: expected a folder that exists or can be made; got '{tmp_path / 'file'}'"),
                             (["--deadline-s", "inf"], "--deadline-s: expected a positive number of seconds; got inf")]:
        with pytest.raises(SystemExit) as exit_info:
            run.main(["--entries", "toy", "--device", "cpu", "--no-plot", *options])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, options
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_an_entry_or_op_named_twice_runs_once(tmp_path, monkeypatch, capsys):
    from pyblend.benchmarks import run

    assert run.selected_entries("featurize, shortest_path,featurize") == ["featurize", "shortest_path"]
    monkeypatch.setattr(run, "ENTRIES", {"toy": toy_entry(["only"])})
    assert run.main(["--entries", "toy,toy", "--device", "cpu", "--output-dir", str(tmp_path), "--no-plot"]) == 0
    assert capsys.readouterr().out.count("toy: done in") == 1
    asked = stub_sweep(monkeypatch)
    from pyblend.benchmarks import tune

    assert tune.main(["--ops", "outer_product,outer_product", "--kernels", "rows,forward,rows", "--output",
                      str(tmp_path / "rows.json")]) == 0
    assert asked == [("outer_product", ["rows", "forward"])]


def test_a_case_with_a_wrong_provider_is_not_counted_as_recorded(tmp_path):
    from pyblend.benchmarks.harness import recorded_cases

    path = tmp_path / "results.json"
    rows = [{"entry": "e", "case": "good", "provider": "p", "status": "ok"},
            {"entry": "e", "case": "bad", "provider": "p", "status": "ok"},
            {"entry": "e", "case": "bad", "provider": "q", "status": "wrong"},
            {"entry": "e", "case": "peers only skipped", "provider": "q", "status": "skipped"}]
    path.write_text(json.dumps(rows))
    assert recorded_cases(path) == {("e", "good")} and recorded_cases(tmp_path / "none.json") == frozenset()


def test_every_gpu_entry_selects_before_it_builds_and_the_lease_plan_names_one_case_an_item():
    """Every entry's GPU cases, named without a GPU: each entry asks ``context.wants`` before building anything
    (so ``--cases``, the deadline and --skip-recorded cost no build), and each targeted item of the lease's plan
    selects exactly one GPU case of its entry."""
    pytest.importorskip("rdkit")
    from pyblend.benchmarks import lease, run
    from pyblend.benchmarks.harness import name_selected

    class Naming(run.Context):
        """The GPU context, on 40 molecules, that builds nothing: it records the names it is asked about."""

        def __init__(self):
            super().__init__(torch.device("cuda"), quick=False, molecules=40)
            self.workers = 1
            self.asked = []

        def wants(self, entry, name):
            self.asked.append((entry, name))
            return False

    context = Naming()
    for entry in run.ENTRIES:
        assert list(run.ENTRIES[entry].cases(context)) == [], entry
    names = {entry: [name for asked, name in context.asked if asked == entry] for entry in run.ENTRIES}
    assert len(names["relation_attention"]) == 12 and len(names["fourier_cross_attention"]) == 12
    assert not names["gaussian_basis"], "a CPU-only entry"
    for entry, pattern, why in lease.PLAN:
        chosen = [name for name in names[entry] if name_selected(name, pattern)]
        if why.startswith("issue"):
            assert len(chosen) == 1, (entry, pattern, chosen)
        else:
            assert chosen, (entry, pattern)
    planned = {entry for entry, _, _ in lease.PLAN}
    assert planned == set(run.ENTRIES) - {"gaussian_basis", "featurize"}, "every GPU entry is in the lease's plan"


def test_lease_runs_its_plan_within_the_budget_and_resumes(tmp_path, monkeypatch, capsys):
    """The lease on toy entries: rows land in --out as each case ends, starting from the committed results; a
    second call leaves out what is recorded; the summary names what was not reached."""
    import time
    import types

    from pyblend.benchmarks import lease, run

    # The slow case moves the lease's clock a minute on, not the wall clock: how long the first item really takes
    # on a loaded machine (1.4 s seen under a CI run beside other jobs) cannot decide what begins.
    skipped = [0.0]
    monkeypatch.setattr(lease, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0]))
    slow = toy_entry(["s"], provider=lambda: skipped.__setitem__(0, skipped[0] + 60.0))
    monkeypatch.setattr(run, "ENTRIES", {"toy": toy_entry(["a", "b", "c"]), "slow": slow})
    monkeypatch.setattr(lease, "PLAN", [("toy", "a", "first"), ("slow", None, "second"), ("toy", None, "rest")])
    committed = tmp_path / "committed"
    monkeypatch.setattr(lease, "RESULTS_DIR", committed)
    slug = run.device_slug(torch.device("cpu"))
    committed.mkdir()
    (committed / f"{slug}.json").write_text(json.dumps([
        {"entry": "toy", "case": "c", "provider": "p", "status": "ok", "device": "earlier", "config": {},
         "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}]))
    out = tmp_path / "out"
    options = ["--out", str(out), "--tests", "none", "--reserve-s", "1.0", "--allow-cpu"]
    # The first item ends within budget - reserve (59 s), so the slow one begins, which then outlasts it.
    assert lease.main([*options, "--budget-s", "60"]) == 0
    assert sorted(row["case"] for row in json.loads((out / f"{slug}.json").read_text())) == ["a", "c", "s"]
    text = capsys.readouterr().out
    assert "toy: every case (rest)" in text.split("Plan items not begun (1)")[1], "the third item had no time left"
    assert lease.main([*options, "--budget-s", "60"]) == 0
    assert sorted(row["case"] for row in json.loads((out / f"{slug}.json").read_text())) == ["a", "b", "c", "s"]
    text = capsys.readouterr().out
    assert "toy: b\n" in text and "toy: a\n" not in text and "slow: s\n" not in text and "not begun" not in text


def test_lease_refuses_a_budget_it_could_not_keep(tmp_path, monkeypatch, capsys):
    """NaN in --budget-s or --reserve-s made the cases' deadline NaN (never reached), a reserve of the whole budget
    left no time to start any case, and an empty --out wrote into the current folder."""
    from pyblend.benchmarks import lease

    monkeypatch.setattr(lease, "PLAN", [])
    monkeypatch.setattr(lease, "RESULTS_DIR", tmp_path / "committed")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    (tmp_path / "file").write_text("")
    for options, message in [
            (["--out", out, "--reserve-s", "nan"], "--reserve-s: expected a finite number of seconds >= 0; got nan"),
            (["--out", out, "--reserve-s", "-1"], "--reserve-s: expected a finite number of seconds >= 0; got -1"),
            (["--out", out, "--budget-s", "nan"], "--budget-s: expected a finite number of seconds > 0; got nan"),
            (["--out", out, "--budget-s", "inf"], "--budget-s: expected a finite number of seconds > 0; got inf"),
            (["--out", out, "--budget-s", "60", "--reserve-s", "60"],
             "--reserve-s: expected less than --budget-s (60); got 60"),
            (["--out", ""], "--out: expected a folder path; got ''"),
            (["--out", str(tmp_path / "file")],
             f"--out: expected a folder that exists or can be made; got '{tmp_path / 'file'}'")]:
        with pytest.raises(SystemExit) as exit_info:
            lease.main([*options, "--tests", "none", "--allow-cpu"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, options
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_lease_tests_step_reports_and_stops(tmp_path, monkeypatch):
    """Tests still running near the step's limit get SIGINT first: pytest then names the failures so far and writes
    its XML (killed outright, it left neither); a test that ignores SIGINT is killed at the limit, its workers too."""
    import os
    import time

    from pyblend.benchmarks import lease

    folder = tmp_path / "tests"
    folder.mkdir()
    (folder / "test_toy.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                        "def test_wrong():\n    assert False\n\n"
                                        "def test_slow():\n    time.sleep(60)\n")
    monkeypatch.setattr(lease, "TESTS", folder)
    out = tmp_path / "out"
    out.mkdir()
    summary = lease.run_tests("all", out, limit_s=16)
    assert summary.startswith("STOPPED after 8 s (interrupted): 1 failed, 1 passed"), summary
    assert "FAILED" in (out / "tests.log").read_text() and 'name="test_wrong"' in (out / "tests.xml").read_text()

    (folder / "test_toy.py").write_text("import os, signal, time\n\ndef test_deaf():\n"
                                        f"    open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
                                        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n    time.sleep(60)\n")
    monkeypatch.setattr(lease, "TESTS_STOP_S", 2.0)
    summary = lease.run_tests("all", out, limit_s=10)
    assert summary.startswith("STOPPED after 8 s (killed: still running 2 s after SIGINT)"), summary
    pid = int((tmp_path / "pid").read_text())
    for _ in range(50):  # the orphaned worker is reaped by init, soon
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the test process {pid} outlived the stop")

    (folder / "test_toy.py").write_text("def test_quick():\n    pass\n\ndef test_wrong():\n    assert False\n")
    summary = lease.run_tests("all", out, limit_s=60)
    assert summary.startswith("exit 1: 1 failed, 1 passed"), summary


def failing_build_entry(built: list):
    """A benchmark entry whose case "target" raises while it is built (a broken kernel that the case requires, or
    out of memory allocating its tensors); ``built`` lists the cases it began building."""
    import types

    def cases(context):
        for name in ("target", "other1", "other2"):
            if context.wants("toy", name):
                built.append(name)
                if name == "target":
                    raise RuntimeError("simulated: Triton compile error while building 'target'")
                yield Case(entry="toy", name=name, providers={"p": lambda: 4}, check=lambda provider, output: None,
                           units=1, unit="items", time_budget_s=0.0)
    return types.SimpleNamespace(cases=cases)


def test_a_case_that_fails_to_build_is_recorded_and_its_entry_goes_on(tmp_path, monkeypatch, capsys):
    """It used to end its entry with no row: the entry's other cases were never measured, and each later plan item
    (and call) built the same broken case first. Now it is one wrong row, built once a call, and the entry goes on;
    a later call that builds it replaces that row."""
    from pyblend.benchmarks import lease, run
    from pyblend.benchmarks.harness import BUILD_PROVIDER, recorded_cases

    built = []
    monkeypatch.setattr(run, "ENTRIES", {"toy": failing_build_entry(built)})
    monkeypatch.setattr(lease, "PLAN", [("toy", "target", "issue"), ("toy", None, "the rest")])
    monkeypatch.setattr(lease, "RESULTS_DIR", tmp_path / "committed")
    out = tmp_path / "out"
    assert lease.main(["--out", str(out), "--tests", "none", "--budget-s", "60", "--reserve-s", "1",
                       "--allow-cpu"]) == 1
    assert built == ["target", "other1", "other2"]
    path = out / f"{run.device_slug(torch.device('cpu'))}.json"
    rows = {row["case"]: row for row in json.loads(path.read_text())}
    assert rows["target"]["provider"] == BUILD_PROVIDER and rows["target"]["status"] == "wrong"
    assert rows["target"]["error"] == "raised while built: RuntimeError: simulated: Triton compile error while " \
                                      "building 'target'"
    assert rows["other1"]["status"] == rows["other2"]["status"] == "ok"
    text = capsys.readouterr().out
    assert "target: RAISED while built, not measured" in text and "ENTRY FAILED" not in text
    assert recorded_cases(path) == {("toy", "other1"), ("toy", "other2")}, "measured again by the next call"
    fixed = Case(entry="toy", name="target", providers={"p": lambda: 4}, check=lambda provider, output: None,
                 units=1, unit="items", time_budget_s=0.0)
    record(run_case(fixed, torch.device("cpu"), log=lambda line: None), path)
    assert [row["provider"] for row in json.loads(path.read_text()) if row["case"] == "target"] == ["p"]
    assert ("toy", "target") in recorded_cases(path)


def test_lease_starts_no_case_its_entry_would_not_finish_in_time(tmp_path, monkeypatch, capsys):
    """Before the reserve is reached, a case is still left out when the last case of its entry took longer than what
    is left of the budget; it is listed with why."""
    import types

    from pyblend.benchmarks import lease, run

    clock = [0.0]
    fake = types.SimpleNamespace(perf_counter=lambda: clock[0])
    monkeypatch.setattr(lease, "time", fake)
    monkeypatch.setattr(run, "time", fake)

    def cases(context):
        for name in ("s1", "s2", "s3"):
            if context.wants("toy", name):
                clock[0] += 40.0  # its build: compiling the peers is most of a real case's time
                yield Case(entry="toy", name=name, providers={"p": lambda: 4}, check=lambda provider, output: None,
                           units=1, unit="items", time_budget_s=0.0)

    monkeypatch.setattr(run, "ENTRIES", {"toy": types.SimpleNamespace(cases=cases)})
    monkeypatch.setattr(lease, "PLAN", [("toy", None, "every case")])
    monkeypatch.setattr(lease, "RESULTS_DIR", tmp_path / "committed")
    out = tmp_path / "out"
    assert lease.main(["--out", str(out), "--tests", "none", "--budget-s", "100", "--reserve-s", "1",
                       "--allow-cpu"]) == 0
    path = out / f"{run.device_slug(torch.device('cpu'))}.json"
    assert sorted(row["case"] for row in json.loads(path.read_text())) == ["s1", "s2"]
    text = capsys.readouterr().out
    assert "toy: s3 (would not end in time: the last toy case took 40 s, 20 s were left)" in text, text


SIGTERMED_LEASE = """
import os, signal, sys, time, types, weakref
from pathlib import Path
from pyblend.benchmarks import lease, run
from pyblend.benchmarks.harness import Case


def terminate():  # as the device tool does at its time limit
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)


class Dropped:
    pass


def provider(name):
    def call():
        if name == "second" and sys.argv[2] == "during a call":
            terminate()
            time.sleep(30)
        elif name == "second":  # the callback runs as the object goes; Python prints its exception, and goes on
            ref = weakref.ref(Dropped(), lambda ref: terminate())
            assert ref() is None
    return call


def cases(context):
    for name in ("first", "second", "third"):
        if context.wants("toy", name):
            yield Case(entry="toy", name=name, providers={"p": provider(name)}, check=lambda p, o: None,
                       units=1, unit="items", time_budget_s=0.0)


run.ENTRIES = {"toy": types.SimpleNamespace(cases=cases)}
lease.PLAN = [("toy", None, "every case"), ("toy", "third", "again")]
lease.RESULTS_DIR = Path(sys.argv[1]) / "committed"
sys.exit(lease.main(["--out", sys.argv[1] + "/out", "--tests", "none", "--budget-s", "600", "--reserve-s", "1",
                     "--allow-cpu"]))
"""


@pytest.mark.parametrize("where", ["during a call", "in a weakref callback"])
def test_lease_prints_its_summary_when_terminated(tmp_path, where):
    """SIGTERM (the device tool's time limit) used to end the lease at once, with no summary: the case running is
    abandoned, the summary of what finished prints, the finished rows stay, and the exit status says it; also when
    the signal arrives where Python drops the exception it raises."""
    from pyblend.benchmarks import lease, run

    result = subprocess.run([sys.executable, "-c", SIGTERMED_LEASE, str(tmp_path), where], capture_output=True,
                            text=True, timeout=300, cwd=REPOSITORY)
    assert result.returncode == lease.TERMINATED_EXIT, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout.split("================ summary")[1]
    assert "TERMINATED by SIGTERM" in text and "during toy: second" in text, text
    assert "first" in text and "Plan item cut short: toy: every case" in text, text
    assert "Plan items not begun (1):\n  toy: third (again)" in text, text
    path = tmp_path / "out" / f"{run.device_slug(torch.device('cpu'))}.json"
    assert [row["case"] for row in json.loads(path.read_text())] == ["first"]


def test_a_gpu_case_whose_pyblend_provider_was_skipped_is_not_recorded_and_its_target_says_why(tmp_path):
    """A pyblend provider skipped on a GPU (out of memory, say) left the case counted as recorded, so no later call
    tried it again, and its target vanished from the summary. On the CPU, where Triton is skipped by design, the case
    stays recorded."""
    from pyblend.benchmarks.harness import recorded_cases

    case = Case(entry="toy", name="big", providers={"peer": lambda: 4}, check=lambda provider, output: None, units=1,
                unit="items", time_budget_s=0.0, skipped={"pyblend Triton": "OutOfMemoryError: CUDA out of memory"},
                targets=[("pyblend Triton", "peer", 2.0), ("peer", ("pyblend Triton",), 1.0)])
    rows = run_case(case, torch.device("cpu"), log=lambda line: None)
    text = format_targets(rows)
    assert "big: pyblend Triton 2x faster than peer: target not evaluated: pyblend Triton skipped: " \
           "OutOfMemoryError: CUDA out of memory" in text, text
    assert "big: peer 1x faster than the best of 1: target not evaluated: pyblend Triton skipped" in text
    path = tmp_path / "results.json"
    record(rows, path)
    assert recorded_cases(path) == {("toy", "big")}
    path.write_text(json.dumps([{**row, "device": "a GPU", "device_type": "cuda"} for row in rows]))
    assert recorded_cases(path) == frozenset()


def test_lease_refuses_a_machine_without_cuda_and_an_unreadable_results_file_before_the_tests(tmp_path, monkeypatch,
                                                                                             capsys):
    """Without CUDA the lease measured nothing and exited 0; a results JSON that does not parse ended the call
    after the tests had taken their third of the budget."""
    from pyblend.benchmarks import lease, run

    tests = []
    monkeypatch.setattr(lease, "run_tests", lambda *args, **kwargs: tests.append(args) or "exit 0: 1 passed")
    monkeypatch.setattr(lease, "PLAN", [])
    committed = tmp_path / "committed"
    monkeypatch.setattr(lease, "RESULTS_DIR", committed)
    out = tmp_path / "out"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            lease.main(["--out", str(out), "--tests", "all"])
        assert exit_info.value.code == 2
        assert "expected a CUDA device, but torch sees none" in capsys.readouterr().err
    committed.mkdir()
    broken = committed / f"{run.device_slug(torch.device('cpu'))}.json"
    broken.write_text('[{"entry": "toy", "case"')
    with pytest.raises(SystemExit) as exit_info:
        lease.main(["--out", str(out), "--tests", "all", "--allow-cpu"])
    assert exit_info.value.code == 2 and tests == []
    err = capsys.readouterr().err
    assert "expected a JSON list of result rows; JSONDecodeError" in err and f"(a copy of {broken})" in err, err


def test_path_edge_bias_names_its_cases_with_the_pairs_it_builds():
    """The name is made before the case is built (from the molecules' sizes): its pair count must be the one the
    built problem has, padded (B N^2) and packed (sum N_i^2)."""
    pytest.importorskip("rdkit")
    from pyblend import featurize_many
    from pyblend.benchmarks import bench_path_edge_bias as bench

    graphs, _ = featurize_many(["CCO", "c1ccccc1O", "C", "CC(=O)N"], progress=False)
    for layout in ("padded", "packed"):
        routes = bench._problem(graphs, layout, 2, 3, torch.float32, torch.device("cpu"))[0]
        name = bench.case_name(graphs, layout, torch.float32, True, heads=2, hops=3)
        assert f"{layout} ({routes[..., 0].numel()} pairs)" in name, name
