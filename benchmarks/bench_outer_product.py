"""Outer-product relation heads fused with their losses (``pyblend.ops.outer_product_loss``, MoleBlend eq. 10-11)
against the materialising reference.

Workloads (GPU, bfloat16, forward + backward, d1 = d2 = 32): the real size distribution of the default molecule
set, heavy atoms (the first 1024 molecules) and with hydrogens (the first 256); for each, the SPD head (C = 11,
one softmax) and the edge head (C = 120 = 5 hops x 24 classes, G = 5 softmaxes); ``--quick`` runs the heavy-atom
batch only. Only the sizes are real: the row/col features (unit Gaussian, as after a LayerNorm), the head
(``nn.Linear(1024, C)``-sized) and the targets (about 15% ignored, plus the diagonal) are random (seeded).

Providers: pyblend Triton (packed layout); the reference (``pyblend.reference.outer_product_loss``: materialises
the (B, N, N, 1024) outer products and the (B, N, N, C) logits, padded layout) in eager mode and under
``torch.compile``. A reference provider that runs out of memory is tried once when the case is built and listed
as skipped with the reason; a pyblend provider that raises is an error.

Check before timing: the loss and the gradients of row, col, weight and bias against a float32 computation of the
reference done molecule chunk by chunk (the same rounded inputs): relative error < 2e-2 in bfloat16.

Bytes that must move (``s`` the element size, T atoms, P pairs): forward reads row, col (``T (d1 + d2) s``), the
targets (``P G`` bytes, int8) and writes one float32 log-sum-exp per (pair, group); the backward reads row, col,
the targets and those statistics and writes the gradients of row and col: ``3 T (d1 + d2) s + 2 P G + 8 P G``
(the head's weights, ``C d1 d2 s``, are negligible). FLOPs: ``2 P d1 d2 C`` for the logits; forward + backward
counts 3x that (the kernels recompute the logits in the backward, so they execute about 4x).

Targets (forward+backward, default-set batches; the MoleBlend issue's): pyblend >= 5x faster than the eager
reference with peak memory >= 10x below it; the compiled reference is timed alongside. Not yet measured on a GPU.

On the CPU (no Triton timing: its interpreter is far too slow), one small float32 case (16 synthetic molecules
of 8-24 atoms, SPD head) times the eager and compiled reference.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from .harness import Case, first_runs

ENTRY = "outer_product"
TRITON, EAGER, COMPILED = "pyblend Triton (packed)", "reference eager (padded)", "reference torch.compile (padded)"
FEATURES = 32
HEADS = {"SPD": (11, 1), "edge": (120, 5)}  # name: (C, G)
HEAVY_BATCH, HYDROGEN_BATCH = 1024, 256
IGNORE = -100
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
TRUTH_CHUNK = 64  # molecules per float32 reference chunk


class Problem:
    """One batch in both layouts on ``device``: packed leaves (the Triton provider's) and padded leaves (the
    reference's) hold the same values."""

    def __init__(self, sizes: list[int], classes: int, groups: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0):
        from pyblend.layout import pad_atoms, pad_pairs, pair_offsets

        generator = torch.Generator().manual_seed(seed)
        self.sizes, self.classes, self.groups, self.dtype, self.device = sizes, classes, groups, dtype, device
        lengths = torch.tensor(sizes, dtype=torch.int64)
        cu = torch.zeros(len(sizes) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        self.total, self.width = int(cu[-1]), int(lengths.max())
        self.pairs = int(pair_offsets(cu)[-1])
        row = torch.randn(self.total, FEATURES, generator=generator).to(dtype)
        col = torch.randn(self.total, FEATURES, generator=generator).to(dtype)
        weight = (torch.randn(classes, FEATURES**2, generator=generator) / FEATURES).to(dtype)
        bias = (torch.randn(classes, generator=generator) * 0.1).to(dtype)
        target = torch.randint(0, classes // groups, (self.pairs, groups), generator=generator, dtype=torch.int8)
        target[torch.rand(target.shape, generator=generator) < 0.15] = IGNORE
        offsets = pair_offsets(cu)
        for b, n in enumerate(sizes):  # the diagonal
            target[offsets[b] + torch.arange(n) * (n + 1)] = IGNORE
        if groups == 1:
            target = target[:, 0]
        self.cu = cu
        self.host = {"row": row, "col": col, "weight": weight, "bias": bias, "target": target}
        put = lambda x: x.to(device, copy=True).requires_grad_(x.is_floating_point())  # noqa: E731
        self.packed = {name: put(x) for name, x in self.host.items()}
        self.packed["cu_seqlens"] = cu.to(device)
        mask = torch.arange(self.width)[None, :] < lengths[:, None]
        self.padded = {"row": put(pad_atoms(row, cu, self.width)), "col": put(pad_atoms(col, cu, self.width)),
                       "weight": put(weight.clone()), "bias": put(bias.clone()),
                       "target": pad_pairs(target, cu, self.width, value=IGNORE).to(device), "mask": mask.to(device)}

    def truth(self) -> tuple:
        """float32 ``(loss, drow, dcol, dweight, dbias)`` (packed layout), from the reference chunk by chunk."""
        from pyblend.reference.outer_product import outer_product_loss

        host = {k: v.float() if v.is_floating_point() else v for k, v in self.host.items()}
        leaves = {k: host[k].detach().clone().requires_grad_() for k in ("row", "col", "weight", "bias")}
        total_loss, total_count = 0.0, 0
        offsets = [0]
        for n in self.sizes:
            offsets.append(offsets[-1] + n * n)
        for first in range(0, len(self.sizes), TRUTH_CHUNK):
            last = min(first + TRUTH_CHUNK, len(self.sizes))
            atoms = slice(int(self.cu[first]), int(self.cu[last]))
            pairs = slice(offsets[first], offsets[last])
            cu = self.cu[first:last + 1] - self.cu[first]
            target = host["target"][pairs]
            count = int((target != IGNORE).sum())
            loss = outer_product_loss(leaves["row"][atoms], leaves["col"][atoms], leaves["weight"], leaves["bias"],
                                      target, groups=self.groups, ignore_index=IGNORE, cu_seqlens=cu,
                                      max_seqlen=max(self.sizes[first:last]))
            (loss * count).backward()  # the chunk's sum: the gradients add up
            total_loss += loss.item() * count
            total_count += count
        scale = 1.0 / max(total_count, 1)
        return (total_loss * scale, *(leaves[k].grad * scale for k in ("row", "col", "weight", "bias")))


def _triton_provider(problem: Problem):
    from pyblend.ops.outer_product import outer_product_loss

    inputs = problem.packed
    leaves = [inputs[k] for k in ("row", "col", "weight", "bias")]

    def run():
        loss = outer_product_loss(*leaves, inputs["target"], groups=problem.groups, ignore_index=IGNORE,
                                  cu_seqlens=inputs["cu_seqlens"], max_seqlen=problem.width, backend="triton")
        return (loss.detach(), *torch.autograd.grad(loss, leaves))
    return run


def _reference_provider(problem: Problem, compiled: bool):
    from pyblend.reference.outer_product import outer_product_loss

    function = torch.compile(outer_product_loss) if compiled else outer_product_loss
    inputs = problem.padded
    leaves = [inputs[k] for k in ("row", "col", "weight", "bias")]
    mask = inputs["mask"]

    def run():
        loss = function(*leaves, inputs["target"], groups=problem.groups, ignore_index=IGNORE, mask=mask)
        drow, dcol, dweight, dbias = torch.autograd.grad(loss, leaves)
        return loss.detach(), drow[mask], dcol[mask], dweight, dbias  # the packed layout's rows
    return run



def case_name(label: str, sizes: list[int], head: str, dtype: torch.dtype) -> str:
    classes, groups = HEADS[head]
    return (f"{label}: {len(sizes)} molecules ({sum(sizes)} atoms, max {max(sizes)}), {head} head C={classes} "
            f"G={groups}, d1=d2={FEATURES}, {str(dtype).split('.')[-1]}, forward+backward")


def build_case(label: str, sizes: list[int], head: str, dtype: torch.dtype, device: torch.device,
               targets: list | None = None, time_budget_s: float = 5.0, triton: bool = True) -> Case:
    classes, groups = HEADS[head]
    problem = Problem(sizes, classes, groups, dtype, device)
    candidates, providers, skipped = {}, {}, {}
    if triton:
        candidates[TRITON] = _triton_provider(problem)
    else:
        skipped[TRITON] = "needs a CUDA device"
    candidates[EAGER] = _reference_provider(problem, compiled=False)
    candidates[COMPILED] = _reference_provider(problem, compiled=True)
    ran, failed, _ = first_runs(candidates, device, required=TRITON)
    providers.update(ran)
    skipped.update(failed)
    expected = problem.truth()
    tolerance = TOLERANCE[dtype]

    def check(provider: str, result) -> None:
        loss = result[0].item()
        error = abs(loss - expected[0]) / max(abs(expected[0]), 1e-30)
        if not error < tolerance:
            raise AssertionError(f"loss {loss:.6g} vs float32 reference {expected[0]:.6g}: relative error "
                                 f"{error:.2e}")
        for name, got, want in zip(("drow", "dcol", "dweight", "dbias"), result[1:], expected[1:]):
            got, want = got.detach().float().cpu(), want.float()
            error = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
            if not error < tolerance:
                raise AssertionError(f"{name}: relative error {error:.2e} against the float32 reference")

    element = torch.finfo(dtype).bits // 8
    moved = 3 * problem.total * 2 * FEATURES * element + 2 * problem.pairs * groups + 8 * problem.pairs * groups
    config = {"sizes": label, "molecules": len(sizes), "atoms": problem.total, "pairs": problem.pairs,
              "d1": FEATURES, "d2": FEATURES, "classes": classes, "groups": groups, "head": head,
              "dtype": str(dtype).split(".")[-1], "mode": "forward+backward"}
    name = case_name(label, sizes, head, dtype)
    return Case(entry=ENTRY, name=name, providers=providers, check=check, units=len(sizes), unit="molecules",
                config=config, targets=targets or [], skipped=skipped, time_budget_s=time_budget_s,
                bytes_moved=dict.fromkeys([*providers, *skipped], moved),
                flops=3 * 2 * problem.pairs * FEATURES * FEATURES * classes)


def cases(context) -> Iterator[Case]:
    """A generator: each case's tensors live only while it is built and run."""
    budget = context.time_budget_s
    if context.device.type != "cuda":
        rng = random.Random(0)
        sizes = [rng.randint(8, 24) for _ in range(16)]
        if context.wants(ENTRY, case_name("synthetic 8-24 atoms", sizes, "SPD", torch.float32)):
            yield build_case("synthetic 8-24 atoms", sizes, "SPD", torch.float32, context.device,
                             time_budget_s=budget, triton=False)
        return
    targets = [(TRITON, EAGER, 5.0), (TRITON, EAGER, 10.0, "memory")]
    sets = [("default set, heavy atoms", False, HEAVY_BATCH)]
    if not context.quick:
        sets.append(("default set, with hydrogens", True, HYDROGEN_BATCH))
    for label, hydrogens, count in sets:
        sizes = [graph.num_atoms for graph in context.molecules(hydrogens)[:count]]
        for head in HEADS:
            if not context.wants(ENTRY, case_name(label, sizes, head, torch.bfloat16)):
                continue
            torch._dynamo.reset()  # the previous case's compiled reference is done with
            torch.cuda.empty_cache()
            yield build_case(label, sizes, head, torch.bfloat16, context.device, targets=targets,
                             time_budget_s=budget)
