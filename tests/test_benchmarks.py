"""The benchmark harness: wrong providers are never timed, rows merge by key, the runner works end to end."""
import json
import subprocess
import sys

import torch

from pyblend.benchmarks.harness import Case, format_targets, record, run_case


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
