"""pytest-benchmark view of the suite: `pytest benchmarks --benchmark-only [--benchmark-compare ...]`.

The same cases as `pyblend bench`, one test per (case, provider); each output is checked before it is timed.
Cases are built at collection and live until the session ends, so on a GPU select what to build:
`--bench-entries` and `--bench-cases` work as `pyblend bench`'s `--entries` and `--cases` (pytest's `-k` only
deselects after every case is built). `--bench-molecules N` limits the default molecule set (default: all).
"""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-molecules", type=int, default=None, help="first N molecules of the default set")
    parser.addoption("--bench-entries", default=None,
                     help="comma-separated entries to build (default: all), as `pyblend bench --entries`")
    parser.addoption("--bench-cases", default=None,
                     help="keep the cases whose names match, as `pyblend bench --cases` (e.g. 'd=24&!backward')")


_CASES = {}


def _cases(config):
    if not _CASES:
        from pyblend.benchmarks.harness import name_selected
        from pyblend.benchmarks.run import ENTRIES, Context, selected_entries

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pattern = config.getoption("--bench-cases")
        context = Context(device, quick=False, molecules=config.getoption("--bench-molecules"), cases=pattern)
        option = config.getoption("--bench-entries")
        try:
            chosen = list(ENTRIES) if option is None else selected_entries(option, "--bench-entries")
        except ValueError as error:
            raise pytest.UsageError(str(error)) from None
        for name in chosen:
            try:
                for case in ENTRIES[name].cases(context):
                    if not name_selected(case.name, pattern):
                        continue
                    for provider in case.providers:
                        _CASES[f"{name}/{case.name}/{provider}"] = pytest.param((case, provider))
            except Exception as error:  # e.g. no RDKit for the default set: that entry is skipped, not the view
                _CASES[f"{name}/not built"] = pytest.param(None, marks=pytest.mark.skip(
                    reason=f"{name}: its cases could not be built: {type(error).__name__}: {error}"))
    return _CASES


def pytest_generate_tests(metafunc):
    if "case_and_provider" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("case_and_provider", list(cases.values()), ids=list(cases))
