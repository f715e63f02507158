"""Featurization throughput on the default molecule set (molecules/s), with and without conformers."""
from __future__ import annotations

import os
from collections.abc import Iterator

from .harness import Case

ENTRY = "featurize"
CONFORMER_MOLECULES = 64


def _checker(smiles, expected_failures, conformer):
    def check(provider, result):
        graphs, failures = result
        # Conformer embedding may fail for a valid molecule (it is then reported): only parsing is predictable.
        if expected_failures is not None and [f.index for f in failures] != expected_failures:
            raise AssertionError(f"failed inputs {[f.index for f in failures][:10]} differ from RDKit's "
                                 f"{expected_failures[:10]}")
        if len(graphs) + len(failures) != len(smiles):
            raise AssertionError(f"{len(graphs)} graphs + {len(failures)} failures != {len(smiles)} inputs")
        if conformer and any(g.positions is None for g in graphs):
            raise AssertionError("a molecule came back without positions and without a failure")
    return check


def _case(context, smiles, conformer, expected_failures, name) -> Case:
    from pyblend import featurize_many

    workers = os.cpu_count() or 1
    run = lambda n: featurize_many(smiles, errors="skip", workers=n, progress=False, conformer=conformer)  # noqa
    providers, pooled = {"featurize_many, 1 process": lambda: run(1)}, {}
    if workers > 1:
        providers[f"featurize_many, {workers} processes"] = lambda: run(workers)
        pooled[f"featurize_many, {workers} processes"] = f"a pool of {workers} worker processes"
    return Case(entry=ENTRY, name=name, providers=providers,
                check=_checker(smiles, expected_failures, conformer), units=len(smiles), unit="molecules",
                config={"conformer": conformer}, time_budget_s=context.time_budget_s, other_processes=pooled)


def cases(context) -> Iterator[Case]:
    smiles = context.smiles()
    invalid = context.invalid_indices()
    valid = [text for i, text in enumerate(smiles) if i not in set(invalid)][:CONFORMER_MOLECULES]
    for inputs, conformer, failures, name in (
            (smiles, False, invalid, f"default set: {len(smiles)} SMILES, no conformers"),
            (valid, True, None, f"first {len(valid)} valid molecules, ETKDG + MMFF conformers")):
        if context.wants(ENTRY, name):
            yield _case(context, inputs, conformer, failures, name)
