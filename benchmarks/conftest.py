"""pytest-benchmark view of the suite: `pytest benchmarks --benchmark-only [--benchmark-compare ...]`.

The same cases as `pyblend bench`, one test per (case, provider); each output is checked before it is timed.
`--bench-molecules N` limits the default molecule set (default: all).
"""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-molecules", type=int, default=None, help="first N molecules of the default set")


_CASES = {}


def _cases(config):
    if not _CASES:
        from pyblend.benchmarks.run import ENTRIES, Context

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        context = Context(device, quick=False, molecules=config.getoption("--bench-molecules"))
        for name, entry in ENTRIES.items():
            try:
                for case in entry.cases(context):
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
