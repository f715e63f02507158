"""Dynamic gated fusion (IBM Dynamic Fusion, eq. 1-4): the fused Triton kernels against the reference.

Workloads (GPU): M = 4 modalities projected to a common width C = 768 (the width of the foundation-model
embeddings the paper fuses) and C = 2048, 20% of the (sample, modality) slots missing, bfloat16, forward +
backward, B = 8192 and 65536. The op takes what :class:`pyblend.nn.DynamicFusion` feeds it: the projected
embeddings ``h``, the gate logits ``W_s h`` (B, M, C) and the score logits (B, M); the projections themselves
are cuBLAS GEMMs outside the op, the same for every provider, so they are not timed here.

Providers: pyblend Triton; the reference (``pyblend.reference.gated_fusion``: softmax gate, gated features and
their weighted sum as separate tensors) in eager mode and under ``torch.compile``.

Check before timing: fused output, weights and entropy against the float64 reference, and the gradients of
``h``, ``gate_logits`` and ``score_logits`` for fixed random upstream gradients (relative error < 2e-2 in
bfloat16; 1e-4 for float32).

Bytes that must move (forward + backward): ``h`` and ``gate_logits`` read twice (forward, backward), their
gradients written once, ``6 * B * M * C`` elements; the (B, C) fused output and its gradient and the (B, M)
tensors are small next to it.

Target (forward+backward): pyblend >= 2x the faster of the eager and compiled reference (the issue's "gated
fusion fwd+bwd vs eager >= 2x", held against torch.compile too).

On the CPU (no Triton timing: its interpreter is far too slow), one small float32 case times the eager and
compiled reference.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .harness import Case, relative_error

ENTRY = "gated_fusion"
TRITON, EAGER, COMPILED = "pyblend Triton", "reference eager", "reference torch.compile"
MODALITIES = 4
MISSING = 0.2
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def _problem(batch: int, modalities: int, width: int, dtype: torch.dtype, device: torch.device, missing: float):
    generator = torch.Generator().manual_seed(batch * 7 + width)
    h, gate_logits = (torch.randn(batch, modalities, width, generator=generator) for _ in range(2))
    score_logits = torch.randn(batch, modalities, generator=generator)
    present = torch.rand(batch, modalities, generator=generator) >= missing
    present[:, 0] |= ~present.any(1)  # every sample keeps a modality (the op refuses an empty sample)
    inputs = tuple(t.to(device, dtype).requires_grad_() for t in (h, gate_logits, score_logits))
    upstream = (torch.randn(batch, width, generator=generator).to(device, dtype),
                torch.randn(batch, modalities, generator=generator).to(device),
                torch.randn(batch, generator=generator).to(device))
    return inputs, present.to(device), upstream


def _provider(fused_fn: Callable, inputs, present, upstream) -> Callable[[], tuple]:
    def run():
        outputs = fused_fn(*inputs, present)
        grads = torch.autograd.grad(outputs, inputs, [g.to(o.dtype) for g, o in zip(upstream, outputs)])
        return (*(o.detach() for o in outputs), *grads)
    return run


def case_name(batch: int, width: int, dtype: torch.dtype, modalities: int = MODALITIES,
              missing: float = MISSING) -> str:
    return f"B={batch}, M={modalities}, C={width}, {missing:.0%} missing, {str(dtype).split('.')[-1]}, forward+backward"


def build_case(batch: int, width: int, dtype: torch.dtype, device: torch.device, modalities: int = MODALITIES,
               missing: float = MISSING, targets: list | None = None, time_budget_s: float = 5.0,
               triton: bool = True) -> Case:
    from pyblend import ops, reference

    inputs, present, upstream = _problem(batch, modalities, width, dtype, device, missing)
    providers, skipped = {}, {}
    if triton:
        providers[TRITON] = _provider(lambda *a: ops.gated_fusion(*a, backend="triton"), inputs, present, upstream)
    else:
        skipped[TRITON] = "needs a CUDA device"
    providers[EAGER] = _provider(reference.gated_fusion, inputs, present, upstream)
    providers[COMPILED] = _provider(torch.compile(reference.gated_fusion, dynamic=False), inputs, present, upstream)

    wide = tuple(t.detach().double().requires_grad_() for t in inputs)
    expected = _provider(reference.gated_fusion, wide, present, tuple(g.double() for g in upstream))()
    labels = ("fused", "weights", "entropy", "dh", "dgate_logits", "dscore_logits")
    tolerance = TOLERANCE[dtype]

    def check(provider: str, result) -> None:
        for label, got, want in zip(labels, result, expected):
            error = relative_error(got, want)
            if not error < tolerance:
                raise AssertionError(f"{label}: relative error {error:.2e} against the float64 reference")

    element = torch.finfo(dtype).bits // 8
    config = {"batch": batch, "width": width, "modalities": modalities, "missing": missing,
              "dtype": str(dtype).split(".")[-1], "mode": "forward+backward"}
    name = case_name(batch, width, dtype, modalities, missing)
    return Case(entry=ENTRY, name=name, providers=providers, check=check, units=batch, unit="samples",
                config=config, targets=targets or [], skipped=skipped, time_budget_s=time_budget_s,
                bytes_moved=dict.fromkeys([*providers, *skipped], 6 * batch * modalities * width * element))


def cases(context) -> Iterator[Case]:
    """A generator: each case's tensors live only while it is built and run."""
    budget = context.time_budget_s
    if context.device.type != "cuda":
        if context.wants(ENTRY, case_name(2048, 256, torch.float32)):
            yield build_case(2048, 256, torch.float32, context.device, time_budget_s=budget, triton=False)
        return
    target = [(TRITON, (EAGER, COMPILED), 2.0)]
    shapes = ((8192, 768), (65536, 768)) if context.quick else ((8192, 768), (65536, 768), (65536, 2048))
    for batch, width in shapes:
        if context.wants(ENTRY, case_name(batch, width, torch.bfloat16)):
            # The previous case's compiled reference is done with; without the reset (and dynamic=False), this
            # case's shapes recompiled it for dynamic shapes, and its times depended on the cases' order.
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            yield build_case(batch, width, torch.bfloat16, context.device, targets=target, time_budget_s=budget)
