"""Multi-pair InfoNCE (MolBind's loss) at contrastive batch sizes: the blockwise Triton kernel against the reference.

Workloads (GPU): two modalities of width d = 512, one pair, temperature 0.1, L2-normalised, bfloat16, forward
+ backward, B = 4096, 16384, 65536 (MolBind trains with all ranks' batches gathered, so B is the global batch);
and three modalities with the three pairs and missing samples at B = 16384. Embeddings are random (seeded):
the loss does not depend on molecules.

Providers: pyblend Triton; the reference (``pyblend.reference.multi_infonce``: materialises each (B, B) logit
matrix) in eager mode and under ``torch.compile``. A provider that runs out of memory (the reference does first:
one float32 (B, B) matrix is 16 GiB at B = 65536) is tried once when the case is built and listed as skipped.

Check before timing: the loss against a float64 computation done in row chunks (every size), and the gradients
against the eager reference's where it ran (relative error < 2e-2 in bfloat16).

Bytes that must move: every embedding read once and its gradient written once, ``2 * M * B * d * 2`` bytes for
M modalities (forward reads them once more: ``3 * M * B * d * 2`` in all). FLOPs: ``2 B^2 d`` per pair forward
(the logit tiles), 5x that forward + backward (recomputed in the backward for each of the two directions).

Targets (forward+backward): pyblend >= 2x the faster of the eager and compiled reference at B = 16384; its peak
memory is printed for every B (it should grow linearly in B).

On the CPU (no Triton timing: its interpreter is far too slow), one small float32 case (B = 1024, d = 128)
times the eager and compiled reference.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .harness import Case, first_runs

ENTRY = "multi_infonce"
TRITON, EAGER, COMPILED = "pyblend Triton", "reference eager", "reference torch.compile"
WIDTH = 512
TEMPERATURE = 0.1
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def _problem(batch: int, modalities: int, width: int, dtype: torch.dtype, device: torch.device, missing: float):
    generator = torch.Generator().manual_seed(batch * 31 + modalities)
    names = ["graph", "conformer", "text"][:modalities]
    embeddings = {name: torch.randn(batch, width, generator=generator).to(device, dtype).requires_grad_()
                  for name in names}
    masks = None
    if missing:
        masks = {name: (torch.rand(batch, generator=generator) >= missing).to(device) for name in names}
    pairs = [(names[i], names[j]) for i in range(modalities) for j in range(i + 1, modalities)]
    return names, embeddings, masks, pairs


def _chunked_loss(embeddings, masks, pairs, rows: int = 4096) -> float:
    """The loss in float64 with at most ``rows`` logit rows in memory at a time."""
    total = 0.0
    for a, b in pairs:
        x, y = (torch.nn.functional.normalize(embeddings[n].detach().double(), dim=1) for n in (a, b))
        keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if masks is not None:
            keep = masks[a] & masks[b]
        x, y = x[keep], y[keep]
        count = x.shape[0]
        if count == 0:
            continue
        pair = 0.0
        for first, second in ((x, y), (y, x)):
            for start in range(0, count, rows):
                logits = first[start:start + rows] @ second.T / TEMPERATURE
                positive = logits.diagonal(start)
                pair += (torch.logsumexp(logits, 1) - positive).sum().item()
        total += pair / (2 * count) / len(pairs)
    return total


def _provider(loss_fn: Callable, embeddings, masks, pairs) -> Callable[[], tuple]:
    inputs = tuple(embeddings.values())

    def run():
        loss = loss_fn(embeddings, pairs, temperature=TEMPERATURE, masks=masks)
        return (loss.detach(), *torch.autograd.grad(loss, inputs))
    return run



def case_name(batch: int, modalities: int, width: int, dtype: torch.dtype, missing: float = 0.0) -> str:
    pairs = modalities * (modalities - 1) // 2  # every pair of modalities, as _problem builds them
    return (f"B={batch}, d={width}, {pairs} pair{'s' * (pairs > 1)}" + (f", {missing:.0%} missing" if missing else "")
            + f", {str(dtype).split('.')[-1]}, forward+backward")


def build_case(batch: int, modalities: int, width: int, dtype: torch.dtype, device: torch.device,
               missing: float = 0.0, targets: list | None = None, time_budget_s: float = 5.0,
               triton: bool = True) -> Case:
    from pyblend import ops, reference

    names, embeddings, masks, pairs = _problem(batch, modalities, width, dtype, device, missing)
    providers, skipped = {}, {}
    candidates = {}
    if triton:
        candidates[TRITON] = _provider(lambda *a, **k: ops.multi_infonce(*a, **k, backend="triton"),
                                       embeddings, masks, pairs)
    else:
        skipped[TRITON] = "needs a CUDA device"
    candidates[EAGER] = _provider(reference.multi_infonce, embeddings, masks, pairs)
    candidates[COMPILED] = _provider(torch.compile(reference.multi_infonce, dynamic=False), embeddings, masks, pairs)
    ran, failed, results = first_runs(candidates, device, required=TRITON)
    providers.update(ran)
    skipped.update(failed)
    expected_loss = _chunked_loss(embeddings, masks, pairs)
    expected_grads = results[EAGER][1:] if EAGER in results else None
    tolerance = TOLERANCE[dtype]
    results.clear()

    def check(provider: str, result) -> None:
        loss, grads = result[0].item(), result[1:]
        error = abs(loss - expected_loss) / max(abs(expected_loss), 1e-30)
        if not error < tolerance:
            raise AssertionError(f"loss {loss:.6g} vs float64 {expected_loss:.6g}: relative error {error:.2e}")
        if expected_grads is None or provider == EAGER:
            return
        for name, got, want in zip(names, grads, expected_grads):
            error = ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()
            if not error < tolerance:
                raise AssertionError(f"d{name}: relative error {error:.2e} against the eager reference")

    element = torch.finfo(dtype).bits // 8
    config = {"batch": batch, "width": width, "modalities": modalities, "pairs": len(pairs), "missing": missing,
              "dtype": str(dtype).split(".")[-1], "mode": "forward+backward", "temperature": TEMPERATURE}
    name = case_name(batch, modalities, width, dtype, missing)
    return Case(entry=ENTRY, name=name, providers=providers, check=check, units=batch, unit="samples",
                config=config, targets=targets or [], skipped=skipped, time_budget_s=time_budget_s,
                bytes_moved=dict.fromkeys([*providers, *skipped], 3 * modalities * batch * width * element),
                flops=5 * 2 * batch * batch * width * len(pairs))


def cases(context) -> Iterator[Case]:
    """A generator: each case's tensors live only while it is built and run."""
    budget = context.time_budget_s
    if context.device.type != "cuda":
        if context.wants(ENTRY, case_name(1024, 2, 128, torch.float32)):
            yield build_case(1024, 2, 128, torch.float32, context.device, time_budget_s=budget, triton=False)
        return
    target = [(TRITON, (EAGER, COMPILED), 2.0)]
    shapes = [(4096, 2, 0.0), (16384, 2, 0.0)] + ([] if context.quick else [(65536, 2, 0.0), (16384, 3, 0.2)])
    for batch, modalities, missing in shapes:
        if context.wants(ENTRY, case_name(batch, modalities, WIDTH, torch.bfloat16, missing)):
            # The previous case's compiled reference is done with; without the reset (and dynamic=False), this
            # case's shapes recompiled it for dynamic shapes, and its times depended on the cases' order.
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            yield build_case(batch, modalities, WIDTH, torch.bfloat16, context.device, missing=missing,
                             targets=target if (batch, modalities) == (16384, 2) else [], time_budget_s=budget)
