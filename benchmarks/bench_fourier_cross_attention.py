"""Fourier-domain cross-attention (one MM-Lego LegoBlock step): the fused Triton path against the reference.

Workloads (GPU): latents C x D from 32 x 32 to 256 x 256, 8 heads x 64, token widths E = 256 and 1024, token
counts N from 1 to 10^4 (the paper's shapes: latent 64 x 64, E = 1024, N ~ 10^3..10^4), the public code's
feed-forward on, bfloat16 tokens and weights, forward and forward + backward. Inputs are random (seeded).

Providers: pyblend Triton (``pyblend.ops.fourier_cross_attention``: latent DFTs fused with the query path, flash
attention over the token blocks, recombination and inverse DFT in-kernel; token FFT, context LayerNorm and the
K/V GEMM in torch); the reference (``pyblend.reference.fourier_cross_attention``: torch.fft, the (B, H, C, N)
score tensor, separate ops) in eager mode and under ``torch.compile``.

Check before timing: the output latent against the float64 reference (relative error < 2e-2 for bf16, 1e-4 for
float32); forward + backward also the gradients of the latent, the tokens and the K/V weight against the eager
reference's.

FLOPs (useful, the same for every provider): the attention ``4 B H C N Dh`` (forward), the K/V projection
``4 B N E H Dh``, the latent-side products ``2 B C (D H Dh) * 2`` and the DFTs ``~8 B C D (C + D)``; x3 forward +
backward. Bytes that must move: the tokens read once (forward; and their gradient written, forward + backward).

Target (forward + backward and forward): pyblend >= 3x the eager reference on the paper's shapes.

On the CPU (no Triton timing: its interpreter is far too slow), one small float32 case times the eager and
compiled reference.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .harness import Case, first_runs, relative_error

ENTRY = "fourier_cross_attention"
TRITON, EAGER, COMPILED = "pyblend Triton", "reference eager", "reference torch.compile"
HEADS, HEAD_DIM = 8, 64
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
GRADIENTS = ("latent", "tokens", "kv_weight")
MODES = {False: "forward", True: "forward+backward"}


def _problem(batch: int, channels: int, dim: int, tokens: int, width: int, heads: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(channels * 7919 + dim * 31 + tokens + width)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    inner, hidden = heads * head_dim, 2 * dim
    return dict(latent=randn(batch, channels, dim), tokens=randn(batch, tokens, width),
                q_weight=randn(inner, dim, scale=dim ** -0.5), kv_weight=randn(2 * inner, width, scale=width ** -0.5),
                out_weight=randn(dim, inner, scale=inner ** -0.5), out_bias=randn(dim, scale=0.1),
                latent_norm_weight=torch.ones(dim, device=device, dtype=dtype),
                latent_norm_bias=torch.zeros(dim, device=device, dtype=dtype),
                context_norm_weight=torch.ones(width, device=device, dtype=dtype),
                context_norm_bias=torch.zeros(width, device=device, dtype=dtype),
                ff_norm_weight=torch.ones(dim, device=device, dtype=dtype),
                ff_norm_bias=torch.zeros(dim, device=device, dtype=dtype),
                ff_in_weight=randn(2 * hidden, dim, scale=dim ** -0.5), ff_in_bias=randn(2 * hidden, scale=0.1),
                ff_out_weight=randn(dim, hidden, scale=hidden ** -0.5), ff_out_bias=randn(dim, scale=0.1))


def _provider(fn: Callable, problem: dict, heads: int, backward: bool) -> Callable[[], tuple]:
    leaves = {name: x.detach().clone().requires_grad_(backward) for name, x in problem.items()}
    arguments = dict(leaves)
    latent, tokens = arguments.pop("latent"), arguments.pop("tokens")
    upstream = torch.randn(*latent.shape, 2, generator=torch.Generator().manual_seed(5)).to(latent.device)

    def run():
        out = fn(latent, tokens, heads=heads, **arguments)
        if not backward:
            return (out.detach(),)
        grads = torch.autograd.grad((torch.view_as_real(out) * upstream).sum(), [leaves[n] for n in GRADIENTS])
        return (out.detach(), *grads)
    return run



def case_name(batch: int, channels: int, dim: int, tokens: int, width: int, dtype: torch.dtype, backward: bool,
              heads: int = HEADS, head_dim: int = HEAD_DIM) -> str:
    return (f"B={batch}, latent {channels}x{dim}, N={tokens}, E={width}, {heads}x{head_dim}, "
            f"{str(dtype).split('.')[-1]}, {MODES[backward]}")


def build_case(batch: int, channels: int, dim: int, tokens: int, width: int, dtype: torch.dtype,
               device: torch.device, backward: bool = True, heads: int = HEADS, head_dim: int = HEAD_DIM,
               targets: list | None = None, time_budget_s: float = 5.0, triton: bool = True) -> Case:
    from pyblend import ops, reference

    problem = _problem(batch, channels, dim, tokens, width, heads, head_dim, dtype, device)
    providers, skipped = {}, {}
    candidates = {}
    if triton:
        candidates[TRITON] = _provider(lambda *a, **k: ops.fourier_cross_attention(*a, **k, backend="triton"),
                                       problem, heads, backward)
    else:
        skipped[TRITON] = "needs a CUDA device"
    candidates[EAGER] = _provider(reference.fourier_cross_attention, problem, heads, backward)
    compiled = torch.compile(reference.fourier_cross_attention, dynamic=False)
    candidates[COMPILED] = _provider(compiled, problem, heads, backward)
    ran, failed, results = first_runs(candidates, device, required=TRITON)
    providers.update(ran)
    skipped.update(failed)
    wide = {name: x.double() for name, x in problem.items()}
    latent, tokens_ = wide.pop("latent"), wide.pop("tokens")
    with torch.no_grad():
        expected_out = reference.fourier_cross_attention(latent, tokens_, heads=heads, **wide)
    expected_grads = results[EAGER][1:] if EAGER in results and backward else None
    tolerance = TOLERANCE[dtype]
    results.clear()

    def check(provider: str, result) -> None:
        error = relative_error(result[0], expected_out)
        if not error < tolerance:
            raise AssertionError(f"output: relative error {error:.2e} against float64")
        if expected_grads is None or provider == EAGER:
            return
        for name, got, want in zip(GRADIENTS, result[1:], expected_grads):
            error = relative_error(got, want)
            if not error < tolerance:
                raise AssertionError(f"d{name}: relative error {error:.2e} against the eager reference")

    element = torch.finfo(dtype).bits // 8
    inner = heads * head_dim
    flops = (4 * batch * heads * channels * tokens * head_dim + 4 * batch * tokens * width * inner
             + 4 * batch * channels * dim * inner + 8 * batch * channels * dim * (channels + dim))
    config = {"batch": batch, "channels": channels, "dim": dim, "tokens": tokens, "width": width, "heads": heads,
              "head_dim": head_dim, "dtype": str(dtype).split(".")[-1], "mode": MODES[backward]}
    name = case_name(batch, channels, dim, tokens, width, dtype, backward, heads, head_dim)
    return Case(entry=ENTRY, name=name, providers=providers, check=check, units=batch, unit="samples",
                config=config, targets=targets or [], skipped=skipped, time_budget_s=time_budget_s,
                bytes_moved=dict.fromkeys([*providers, *skipped],
                                          (2 if backward else 1) * batch * tokens * width * element),
                flops=(3 if backward else 1) * flops)


# (batch, C, D, N, E): the paper's shapes first (target), then the size sweep.
PAPER = [(16, 64, 64, 1000, 1024), (4, 64, 64, 10000, 1024)]
SWEEP = [(16, 32, 32, 1, 256), (16, 32, 32, 1000, 256), (8, 128, 128, 2000, 512), (2, 256, 256, 4000, 1024)]
CPU_SHAPE = (2, 16, 16, 64, 32)  # the references only, float32, 2 heads of 8


def cases(context) -> Iterator[Case]:
    """A generator: each case's tensors live only while it is built and run."""
    budget = context.time_budget_s
    if context.device.type != "cuda":
        if context.wants(ENTRY, case_name(*CPU_SHAPE, torch.float32, True, heads=2, head_dim=8)):
            yield build_case(*CPU_SHAPE, torch.float32, context.device, heads=2, head_dim=8, time_budget_s=budget,
                             triton=False)
        return
    for backward in (False, True):
        shapes = [(shape, True) for shape in (PAPER[:1] if context.quick else PAPER)]
        shapes += [] if context.quick else [(shape, False) for shape in SWEEP]
        for shape, paper in shapes:
            if context.wants(ENTRY, case_name(*shape, torch.bfloat16, backward)):
                # The previous case's compiled reference is done with; without the reset (and dynamic=False), this
                # case's shapes recompiled it for dynamic shapes, and its times depended on the cases' order.
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                yield build_case(*shape, torch.bfloat16, context.device, backward=backward,
                                 targets=[(TRITON, EAGER, 3.0)] if paper else [], time_budget_s=budget)
