"""A whole MoleBlend pretraining step (forward + backward of :meth:`pyblend.models.MoleBlend.relation_loss`) on
pyblend's kernels against the same model built from the references.

Workload (GPU): the paper's base model (12 layers, width 768, 32 heads, K = 128 Gaussians), bfloat16 weights, 256
molecules of the default set with ETKDG + MMFF conformers (heavy atoms), training mode (blending and position noise;
dropout and drop-path off, so that both providers compute the same function and can be checked against a float32 run
of it: the kernels' attention dropout draws a different pattern from the reference's). The shortest paths and routes
are built once outside the timed step (a data-pipeline cost the two providers share); the step is the encoder, the
three relation heads with their losses and the noisy-node head, and the backward into every parameter.

Two cases on the same molecules: the padded batch (``collate(graphs)``, every pair tensor ``(B, ..., N, N)``)
and the packed one (``collate(graphs, layout="packed")``: the model runs on ``T + B`` tokens and
``sum (1 + N_i)^2`` token pairs, never a ``(B, H, N, N)`` tensor). The two draw their blend and noise in
different orders, so their losses differ; each case checks its own providers, and a padded timing is only
compared with the packed one as two rows of the same run.

Providers: "pyblend Triton" (every op on its kernels: relation attention with the SPD table, Gaussian-basis
bias, path edge bias, outer-product losses), the same with ``pyblend.set_value_checks(False)`` ("value checks
off": no host read, so no wait for the GPU inside the step) and "reference eager" (the same module with every op
forced to its plain-PyTorch reference through ``PYBLEND_BACKEND=reference``; it materialises the (B, N, N, K)
Gaussians, the (B, N, N, 1024) outer products and the (B, H, N, N) scores). A provider that runs out of memory is
listed as skipped.

Check before timing: each provider's loss (same weights, same blend and noise from a seeded generator) is finite
and within 3e-2 relative (bfloat16 end to end) of the same step on the references in float32, run once.

Target (the MoleBlend issue's): pyblend >= 3x the reference step.

On the CPU (no Triton timing), small float32 cases (2 layers, width 64, 8 heads, 16 molecules), padded and
packed, time the reference step.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .harness import Case, first_runs

ENTRY = "moleblend"
LAYOUTS = ("padded", "packed")
TRITON, EAGER = "pyblend Triton", "reference eager"
TRITON_UNCHECKED = "pyblend Triton (value checks off)"
MOLECULES = 256
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


@contextmanager
def _backend(name: str | None):
    previous = os.environ.get("PYBLEND_BACKEND")
    if name is None:
        os.environ.pop("PYBLEND_BACKEND", None)
    else:
        os.environ["PYBLEND_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYBLEND_BACKEND", None)
        else:
            os.environ["PYBLEND_BACKEND"] = previous


def _step(model, relations, backend: str | None, value_checks: bool = True):
    from pyblend import set_value_checks

    def run():
        model.zero_grad(set_to_none=True)
        generator = torch.Generator(relations.has_geometry.device).manual_seed(0)
        with _backend(backend), set_value_checks(value_checks):
            loss, _ = model.relation_loss(relations, generator=generator)
            loss.backward()
        return loss.detach().float()
    return run


def case_name(graphs, config, dtype: torch.dtype, layout: str) -> str:
    width = max(graph.num_atoms for graph in graphs)
    return (f"{len(graphs)} molecules (N <= {width}), {layout}, {config.layers} layers x {config.dim}, "
            f"{config.heads} heads, {str(dtype).split('.')[-1]}, pretraining step (forward+backward)")


def build_case(graphs, config, dtype: torch.dtype, device: torch.device, targets: list | None = None,
               time_budget_s: float = 5.0, triton: bool = True, layout: str = "padded") -> Case:
    """The pretraining step on ``graphs`` collated in ``layout`` ("padded" or "packed")."""
    from pyblend import collate
    from pyblend.models import MoleBlend

    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}; got {layout!r}")
    torch.manual_seed(0)
    config = dataclasses.replace(config, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, droppath=0.0)
    model = MoleBlend(config).to(device=device, dtype=dtype).train()
    batch = collate(graphs, layout=layout).to(device)
    with _backend(None):
        relations = model.build_relations(batch)
    candidates, skipped = {}, {}
    if triton:
        candidates[TRITON] = _step(model, relations, "triton")
        candidates[TRITON_UNCHECKED] = _step(model, relations, "triton", value_checks=False)
    else:
        skipped[TRITON] = skipped[TRITON_UNCHECKED] = "needs a CUDA device"
    candidates[EAGER] = _step(model, relations, "reference")
    providers, failed, results = first_runs(candidates, device, required=TRITON)
    skipped.update(failed)
    tolerance = TOLERANCE[dtype]
    # The truth: the same model and draws on the references in float32 (in a 16-bit run, comparing the providers
    # with each other would call both wrong when either drifts).
    if dtype == torch.float32:
        truth = results[EAGER].item() if EAGER in results else None
    else:
        truth = _step(copy.deepcopy(model).float(), relations, "reference")().item()

    def check(provider: str, result) -> None:
        loss = result.item()
        if not torch.isfinite(result):
            raise AssertionError(f"loss is {loss}")
        if truth is not None and abs(loss - truth) > tolerance * abs(truth):
            raise AssertionError(f"loss {loss:.6g} vs the float32 reference's {truth:.6g}: beyond {tolerance:.0e} "
                                 "relative")

    element = {"dtype": str(dtype).split(".")[-1]}
    shape = {"layers": config.layers, "width": config.dim, "heads": config.heads, "kernels": config.num_kernels,
             "molecules": len(graphs), "atoms": int(batch.num_atoms.sum()), "max_atoms": batch.max_seqlen}
    name = case_name(graphs, config, dtype, layout)
    return Case(entry=ENTRY, name=name, providers=providers, check=check, units=len(graphs), unit="molecules",
                config={**shape, **element, "layout": layout, "mode": "forward+backward"}, targets=targets or [],
                skipped=skipped, time_budget_s=time_budget_s)


def cases(context) -> Iterator[Case]:
    from pyblend.models import MoleBlendConfig

    if context.device.type != "cuda":
        config = MoleBlendConfig(layers=2, dim=64, heads=8, ffn_dim=64, num_kernels=16, head_width=8,
                                 max_distance=16)
        for layout in LAYOUTS:
            graphs = context.conformer_molecules(16)
            if context.wants(ENTRY, case_name(graphs, config, torch.float32, layout)):
                yield build_case(graphs, config, torch.float32, context.device, time_budget_s=context.time_budget_s,
                                 triton=False, layout=layout)
        return
    graphs = context.conformer_molecules(min(MOLECULES, context.limit or MOLECULES))
    for layout in LAYOUTS:
        if context.wants(ENTRY, case_name(graphs, MoleBlendConfig(), torch.bfloat16, layout)):
            yield build_case(graphs, MoleBlendConfig(), torch.bfloat16, context.device, targets=[(TRITON, EAGER, 3.0)],
                             time_budget_s=context.time_budget_s, layout=layout)
