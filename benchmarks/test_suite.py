"""One pytest-benchmark test per (case, provider) of the suite; see benchmarks/conftest.py."""


def test_provider(benchmark, case_and_provider):
    case, provider = case_and_provider
    run = case.providers[provider]
    case.check(provider, run())  # never time a wrong answer
    benchmark.extra_info.update({"case": case.name, "unit": case.unit, "units": case.units, **case.config})
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
