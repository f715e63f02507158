"""Relation-biased attention (``pyblend.ops.relation_attention``) against the reference and the generic peers.

Workloads (GPU, H = 32 heads, bfloat16): the real size distribution of the default molecule set, heavy atoms
(the first 1024 molecules) and with hydrogens (the first 512); a synthetic pocket-size set (16 molecules of
256-512 atoms, uniform); and a synthetic N = 128 set (256 molecules of exactly 128 atoms) for the memory claim of
the relation-table form. Only the sizes are real: q, k, v, the relation ids and the table are random (seeded).
Head dim 24 in both modes, "forward" (no autograd) and "forward+backward" (one backward with a random output
gradient; gradients of q, k, v and the bias, or of the table for the table form); head dims 16 and 32 on the
default-set batches, forward+backward. ``--quick`` runs d = 24 forward+backward only. Each case compiles its
own peers (the reference and FlexAttention, forward and backward): the full GPU run is 12 cases, the quick one 4.
``PYBLEND_BENCH_RELATION_ATTENTION="d=24&forward+backward,N = 128"`` runs only the cases whose names contain
all ``&``-joined parts of one comma-separated item (to split a long GPU run over several calls).

Every case's dense bias *is* ``rel_table[rel_index]`` (R = 128 relations, int8 ids), gathered once outside the
timed region, so every provider computes the same function: the dense-bias providers read that (B, H, N, N)
(packed (H, P)) tensor and return its gradient; the table form reads the (P,) ids and the (R, H) table and
returns the table's gradient.

Providers: pyblend Triton (packed, dense bias), the same with ``pyblend.set_value_checks(False)`` ("value checks
off": ``cu_seqlens`` is not read, so the call does not wait for the GPU), (packed, relation table) and (padded,
dense bias); the reference
in eager mode and under ``torch.compile`` (padded); ``scaled_dot_product_attention`` with a float mask (padded,
(B, H, N, D) views; the key-padding mask is folded into its bias once, outside the timed region, which favours
the peer; padded keys get -1e4, not -inf, so no row is NaN); FlexAttention (compiled) with a bias ``score_mod``
and a block mask of the real pairs (padded), and with a document block mask over the packed batch as one
sequence whose ``score_mod`` reads the packed bias by pair offset (packed). Block masks are built once, outside
the timed region (again favouring the peer). At N = 128 also "pyblend Triton (packed, dense bias gathered from
the table)": the gather ``rel_table[rel_index]`` inside the timed call, gradients to the table through autograd,
which is what a model needs without the table form.

Checks (before timing, by the harness): every output on real rows, and in forward+backward every gradient on real
atoms / real pairs (or the table's), against float32 reference results computed once (molecule chunks through the
reference) from the same rounded inputs: relative error ``||x - ref|| / ||ref||`` < 2e-2 for bfloat16 (1e-4 for
float32). A peer that cannot run (missing, fails to compile, out of memory) is tried once when the case is built and
listed as skipped with the reason; a pyblend provider that raises is reported as wrong, never skipped.

Bytes that must move (achieved GB/s; the roofline is the device's measured copy bandwidth). With ``X`` one
per-atom tensor, ``rows * H * D * s`` (rows = T packed, B * N padded; s the element size):

    forward          = 4 X (read q, k, v; write out) + bias_read
    forward+backward = forward + 8 X (read q, k, v, out, dout; write dq, dk, dv) + bias_read + bias_grad_write

    bias_read:  padded dense B*H*N^2*s, packed dense H*P*s, table P*s_index + R*H*s,
                gathered from the table: the table form's + 2*H*P*s (write the gathered bias, read it back)
    bias_grad_write: padded dense B*H*N^2*s, packed dense H*P*s, table R*H*s,
                gathered: H*P*s (dbias) + H*P*s (read back by the scatter into the table) + R*H*s

The log-sum-exp and other per-row statistics are left out (H*4 bytes a row, next to X's H*D*s). Useful FLOPs (the
real pairs only, the same for every provider): forward 4*P*H*D, forward+backward 3.5x that (flash-attn's 2.5x
for the backward).

Targets (forward+backward, default-set batches): the packed dense-bias form >= 5x the eager reference and >= 2x
the fastest of the reference under torch.compile, SDPA and both FlexAttention forms. At N = 128: the table form's
peak memory at least 8x below the dense-bias form that gathers its bias from the same table.

On the CPU (no Triton; its interpreter is far too slow to time): one small float32 case (64 molecules, H = 8,
d = 16, forward+backward) timing the eager reference, the compiled reference and SDPA.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pyblend import reference
from pyblend.layout import pack_atoms, pack_pairs, pad_atoms, pad_pairs, pair_offsets

from .harness import Case, name_selected, short_error

ENTRY = "relation_attention"
HEADS = 32
HEAD_DIMS = (24, 16, 32)
RELATIONS = 128
HEAVY_BATCH, HYDROGEN_BATCH = 1024, 512
POCKETS, POCKET_ATOMS = 16, (256, 512)
MEMORY_ATOMS, MEMORY_BATCH = 128, 256
PADDED_KEY = -1e4  # SDPA's additive mask at padded keys: finite, so fully padded rows give no NaN
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
MODES = ("forward", "forward+backward")

TRITON_PACKED = "pyblend Triton (packed, dense bias)"
TRITON_TABLE = "pyblend Triton (packed, relation table)"
TRITON_PADDED = "pyblend Triton (padded, dense bias)"
TRITON_GATHERED = "pyblend Triton (packed, dense bias gathered from the table)"
TRITON_UNCHECKED = "pyblend Triton (packed, dense bias, value checks off)"
EAGER = "reference eager (padded)"
COMPILED = "reference torch.compile (padded)"
SDPA = "SDPA float mask (padded)"
FLEX_PADDED = "FlexAttention bias score_mod (padded)"
FLEX_PACKED = "FlexAttention document mask (packed)"
PEERS = (COMPILED, SDPA, FLEX_PADDED, FLEX_PACKED)


@dataclass
class Problem:
    """One batch in both layouts, every tensor on ``device``; the dense bias is ``table[rel_index]``."""

    sizes: list[int]
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    backward: bool
    seed: int = 0
    packed: dict = field(init=False)
    padded: dict = field(init=False)

    def __post_init__(self):
        generator = torch.Generator().manual_seed(self.seed)
        lengths = torch.tensor(self.sizes, dtype=torch.int64)
        cu = torch.zeros(len(self.sizes) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        self.total, self.width = int(cu[-1]), int(lengths.max())
        self.pairs = int((lengths**2).sum())
        tokens = lambda: torch.randn(self.total, self.heads, self.head_dim, generator=generator)  # noqa: E731
        q, k, v, grad_out = tokens(), tokens(), tokens(), tokens()
        rel_index = torch.randint(0, RELATIONS, (self.pairs,), generator=generator, dtype=torch.int8)
        table = torch.randn(RELATIONS, self.heads, generator=generator)
        put = lambda x, grad=False: x.to(self.device, self.dtype if x.is_floating_point() else x.dtype  # noqa: E731
                                         ).requires_grad_(grad and self.backward)
        cu, rel_index = cu.to(self.device), rel_index.to(self.device)
        table = put(table, True)
        bias = reference.bias_from_relations(rel_index, table.detach()).contiguous()  # (H, P)
        self.packed = {"q": put(q, True), "k": put(k, True), "v": put(v, True), "grad_out": put(grad_out),
                       "bias": bias.detach().requires_grad_(self.backward), "rel_index": rel_index,
                       "table": table, "cu_seqlens": cu, "max_seqlen": self.width}
        mask = torch.arange(self.width, device=self.device)[None, :] < lengths.to(self.device)[:, None]
        pad = lambda x: pad_atoms(x.detach(), cu, self.width)  # noqa: E731
        bias_padded = pad_pairs(bias.transpose(0, 1), cu, self.width).permute(0, 3, 1, 2).contiguous()
        masked = bias_padded + torch.where(mask, 0.0, PADDED_KEY).to(self.dtype)[:, None, None, :]
        self.padded = {"q": pad(self.packed["q"]).requires_grad_(self.backward),
                       "k": pad(self.packed["k"]).requires_grad_(self.backward),
                       "v": pad(self.packed["v"]).requires_grad_(self.backward),
                       "grad_out": pad(self.packed["grad_out"]), "mask": mask,
                       "bias": bias_padded.requires_grad_(self.backward),
                       "masked_bias": masked.requires_grad_(self.backward)}

    def truth(self) -> tuple:
        """float32 reference: (out, dq, dk, dv, dbias (H, P), dtable (R, H)), packed; forward: (out,)."""
        packed, cu = self.packed, self.packed["cu_seqlens"].cpu()
        offsets = pair_offsets(cu)
        budget = (1 << 31) if self.device.type == "cuda" else (1 << 28)  # bytes of one float32 (b, H, n, n)
        pieces, start = [], 0
        while start < len(self.sizes):
            stop, widest = start, 0
            while stop < len(self.sizes):
                widest_next = max(widest, self.sizes[stop])
                if stop > start and (stop + 1 - start) * self.heads * widest_next**2 * 4 * 8 > budget:
                    break
                widest, stop = widest_next, stop + 1
            atoms, pairs = slice(int(cu[start]), int(cu[stop])), slice(int(offsets[start]), int(offsets[stop]))
            leaf = lambda x: x.detach()[atoms].float().requires_grad_(self.backward)  # noqa: E731
            q, k, v = leaf(packed["q"]), leaf(packed["k"]), leaf(packed["v"])
            bias = packed["bias"].detach()[:, pairs].float().requires_grad_(self.backward)
            chunk_cu = (packed["cu_seqlens"][start:stop + 1] - packed["cu_seqlens"][start]).contiguous()
            with torch.set_grad_enabled(self.backward):
                out = reference.relation_attention(q, k, v, bias, cu_seqlens=chunk_cu, max_seqlen=widest)
                grads = (torch.autograd.grad(out, (q, k, v, bias), packed["grad_out"][atoms].float())
                         if self.backward else ())
            pieces.append((out.detach(), *grads))
            start = stop
        out, *grads = (torch.cat(parts, dim=1 if i == 4 else 0) for i, parts in enumerate(zip(*pieces)))
        if not self.backward:
            return (out,)
        dtable = torch.zeros(RELATIONS, self.heads, device=self.device).index_add_(
            0, packed["rel_index"].long(), grads[3].transpose(0, 1))
        return (out, *grads, dtable)

    def bytes_moved(self, form: str) -> float:
        """The formula in the module docstring; ``form`` is padded | packed | table | gathered."""
        size = torch.finfo(self.dtype).bits // 8
        rows = len(self.sizes) * self.width if form == "padded" else self.total
        x = rows * self.heads * self.head_dim * size
        dense = (len(self.sizes) * self.width**2 if form == "padded" else self.pairs) * self.heads * size
        table = self.pairs * 1 + RELATIONS * self.heads * size
        bias_read = {"padded": dense, "packed": dense, "table": table, "gathered": table + 2 * dense}[form]
        forward = 4 * x + bias_read
        if not self.backward:
            return forward
        grad_write = {"padded": dense, "packed": dense, "table": RELATIONS * self.heads * size,
                      "gathered": 2 * dense + RELATIONS * self.heads * size}[form]
        return forward + 8 * x + bias_read + grad_write

    def flops(self) -> float:
        forward = 4.0 * self.pairs * self.heads * self.head_dim
        return forward * 3.5 if self.backward else forward


def _differentiate(problem: Problem, forward: Callable[[], torch.Tensor], inputs: tuple) -> Callable[[], tuple]:
    """Forward only (no autograd), or forward + one backward returning (out, *grads wrt inputs)."""
    if not problem.backward:
        def run_forward():
            with torch.no_grad():
                return (forward(),)
        return run_forward

    grad_out = problem.padded["grad_out"] if inputs[0].dim() == 4 else problem.packed["grad_out"]

    def run_backward():
        out = forward()
        return (out, *torch.autograd.grad(out, inputs, grad_out))
    return run_backward


def _canonical_padded(problem: Problem, result: tuple) -> tuple:
    """Padded (B, N, H, D) outputs and (B, H, N, N) bias gradient -> the packed layout, real rows/pairs only."""
    mask = problem.padded["mask"]
    atoms = [pack_atoms(x, mask) for x in result[:4]]
    if len(result) > 4:
        atoms.append(pack_pairs(result[4].permute(0, 2, 3, 1), mask).transpose(0, 1))
    return tuple(atoms)


def _enable_many_compilations() -> None:
    """Each case compiles the reference and FlexAttention for its own static shapes; keep dynamo from falling
    back to eager after its default 8 recompilations of one function."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))


def _peers(problem: Problem) -> dict[str, tuple[Callable[[], tuple], str]]:
    """name -> (provider, layout of its result). Building one may raise (the caller skips it)."""
    pad, pack = problem.padded, problem.packed
    dense_inputs = (pad["q"], pad["k"], pad["v"], pad["bias"])
    peers = {}

    def eager():
        return reference.relation_attention(pad["q"], pad["k"], pad["v"], pad["bias"], mask=pad["mask"])
    peers[EAGER] = lambda: (_differentiate(problem, eager, dense_inputs), "padded")

    def compiled():
        _enable_many_compilations()
        fn = torch.compile(reference.relation_attention, dynamic=False)
        return _differentiate(problem, lambda: fn(pad["q"], pad["k"], pad["v"], pad["bias"], mask=pad["mask"]),
                              dense_inputs), "padded"
    peers[COMPILED] = compiled

    def sdpa():
        from torch.nn.functional import scaled_dot_product_attention

        def forward():
            q, k, v = (pad[name].transpose(1, 2) for name in ("q", "k", "v"))
            return scaled_dot_product_attention(q, k, v, attn_mask=pad["masked_bias"]).transpose(1, 2)
        return _differentiate(problem, forward, (pad["q"], pad["k"], pad["v"], pad["masked_bias"])), "padded"
    peers[SDPA] = sdpa

    def flex_padded():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _enable_many_compilations()
        attend = torch.compile(flex_attention, dynamic=False)
        mask, bias = pad["mask"], pad["bias"]
        batch = len(problem.sizes)
        block_mask = create_block_mask(lambda b, h, i, j: mask[b, i] & mask[b, j], batch, None, problem.width,
                                       problem.width, device=problem.device)

        def score_mod(score, b, h, i, j):
            return score + bias[b, h, i, j]

        def forward():
            q, k, v = (pad[name].transpose(1, 2) for name in ("q", "k", "v"))
            return attend(q, k, v, score_mod=score_mod, block_mask=block_mask).transpose(1, 2)
        return _differentiate(problem, forward, dense_inputs), "padded"
    peers[FLEX_PADDED] = flex_padded

    def flex_packed():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _enable_many_compilations()
        attend = torch.compile(flex_attention, dynamic=False)
        cu, bias = pack["cu_seqlens"].long(), pack["bias"]
        lengths = cu[1:] - cu[:-1]
        document = torch.repeat_interleave(torch.arange(len(problem.sizes), device=problem.device), lengths)
        start = cu[:-1][document]
        # Pair (i, j) of one molecule sits at row_base[i] + j in the packed (H, P) bias.
        row_base = pair_offsets(pack["cu_seqlens"])[:-1][document] + (torch.arange(problem.total, device=cu.device)
                                                                       - start) * lengths[document] - start
        block_mask = create_block_mask(lambda b, h, i, j: document[i] == document[j], None, None, problem.total,
                                       problem.total, device=problem.device)

        def score_mod(score, b, h, i, j):
            at = torch.where(document[i] == document[j], row_base[i] + j, 0)  # no out-of-range read off the mask
            return score + bias[h, at]

        def forward():
            q, k, v = (pack[name].transpose(0, 1).unsqueeze(0) for name in ("q", "k", "v"))
            return attend(q, k, v, score_mod=score_mod, block_mask=block_mask)[0].transpose(0, 1)
        return _differentiate(problem, forward, (pack["q"], pack["k"], pack["v"], bias)), "packed"
    peers[FLEX_PACKED] = flex_packed
    return peers


def _pyblend(problem: Problem, attention: Callable, gathered: bool) -> dict[str, tuple[Callable[[], tuple], str]]:
    """pyblend's providers through ``attention`` (ops.relation_attention with backend="triton")."""
    pad, pack = problem.padded, problem.packed
    atoms = (pack["q"], pack["k"], pack["v"])
    layout = {"cu_seqlens": pack["cu_seqlens"], "max_seqlen": pack["max_seqlen"]}
    providers = {
        TRITON_PACKED: (_differentiate(problem, lambda: attention(*atoms, pack["bias"], **layout),
                                       (*atoms, pack["bias"])), "packed"),
        TRITON_UNCHECKED: (_differentiate(problem, lambda: _unchecked(attention, *atoms, pack["bias"], **layout),
                                          (*atoms, pack["bias"])), "packed"),
        TRITON_TABLE: (_differentiate(problem, lambda: attention(*atoms, rel_index=pack["rel_index"],
                                                                  rel_table=pack["table"], **layout),
                                      (*atoms, pack["table"])), "table"),
        TRITON_PADDED: (_differentiate(problem, lambda: attention(pad["q"], pad["k"], pad["v"], pad["bias"],
                                                                   mask=pad["mask"]),
                                       (pad["q"], pad["k"], pad["v"], pad["bias"])), "padded"),
    }
    if gathered:
        def gather_then_attend():
            return attention(*atoms, reference.bias_from_relations(pack["rel_index"], pack["table"]), **layout)
        providers[TRITON_GATHERED] = (_differentiate(problem, gather_then_attend, (*atoms, pack["table"])),
                                      "table")
    return providers


def _unchecked(attention: Callable, *args, **kwargs):
    from pyblend import set_value_checks

    with set_value_checks(False):
        return attention(*args, **kwargs)


def _triton_attention() -> Callable:
    from pyblend import ops

    op = ops.relation_attention  # AttributeError until the op lands: the caller skips these providers

    def attention(*args, **kwargs):
        return op(*args, backend="triton", **kwargs)
    return attention



def build_case(problem: Problem, name: str, units: str = "molecules", config: dict | None = None,
               targets: list | None = None, time_budget_s: float = 5.0, attention: Callable | None = None,
               pyblend_skip: str | None = None, peers: tuple[str, ...] | None = None, gathered: bool = False,
               trial: bool = True) -> Case:
    """A Case over ``problem``: the pyblend providers (through ``attention``; ``pyblend_skip`` lists them as
    skipped with that reason instead) and the peers (``peers``: which, default all), each peer tried once when
    ``trial`` (a failure lists it as skipped)."""
    providers, layouts, skipped = {}, {}, {}
    if pyblend_skip is None and attention is None:
        try:
            attention = _triton_attention()
        except (ImportError, AttributeError) as error:
            pyblend_skip = f"pyblend.ops.relation_attention is not available ({short_error(error)})"
    names = [TRITON_PACKED, TRITON_UNCHECKED, TRITON_TABLE, TRITON_PADDED] + ([TRITON_GATHERED] if gathered else [])
    if pyblend_skip is not None:
        skipped.update(dict.fromkeys(names, pyblend_skip))
    else:
        # They raise as they fail: the harness reports a provider that raises as wrong (when checked or timed), and
        # CUDA-graph timing finds one that waits for the GPU by its raising.
        for provider, (fn, layout) in _pyblend(problem, attention, gathered).items():
            providers[provider], layouts[provider] = fn, layout
    for provider, make in _peers(problem).items():
        if peers is not None and provider not in peers:
            continue
        try:
            fn, layout = make()
            if trial:
                fn()  # compiles; raises here rather than inside the harness
        except Exception as error:  # noqa: BLE001 - a peer that cannot run is skipped with the reason
            skipped[provider] = short_error(error)
            if problem.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        providers[provider], layouts[provider] = fn, layout

    truth = problem.truth()
    tolerance = TOLERANCE[problem.dtype]
    names_of = ("out", "dq", "dk", "dv")

    def check(provider: str, result) -> None:
        layout = layouts[provider]
        got = _canonical_padded(problem, result) if layout == "padded" else tuple(result)
        expected = truth[:4] + truth[5:] if layout == "table" else truth[:5]
        what = names_of + ("dtable" if layout == "table" else "dbias",)
        if len(got) != len(expected):
            raise AssertionError(f"{len(got)} results, expected {len(expected)}")
        for label, value, reference_value in zip(what, got, expected):
            if value.shape != reference_value.shape:
                raise AssertionError(f"{label}: shape {tuple(value.shape)}, expected {tuple(reference_value.shape)}")
            error = ((value.float() - reference_value).norm() / reference_value.norm().clamp(min=1e-30)).item()
            if not error < tolerance:  # NaN fails too
                raise AssertionError(f"{label}: relative error {error:.2e} against float32 (bound {tolerance:g})")

    forms = {TRITON_PACKED: "packed", TRITON_UNCHECKED: "packed", TRITON_TABLE: "table", TRITON_PADDED: "padded",
             TRITON_GATHERED: "gathered", EAGER: "padded", COMPILED: "padded", SDPA: "padded", FLEX_PADDED: "padded",
             FLEX_PACKED: "packed"}
    config = {"heads": problem.heads, "head_dim": problem.head_dim, "dtype": str(problem.dtype).split(".")[-1],
              "mode": MODES[problem.backward], "molecules": len(problem.sizes), "tokens": problem.total,
              "pairs": problem.pairs, "padded_width": problem.width, "relations": RELATIONS, **(config or {})}
    return Case(entry=ENTRY, name=name, providers=providers, check=check, units=len(problem.sizes), unit=units,
                config=config, targets=targets or [], skipped=skipped, time_budget_s=time_budget_s,
                bytes_moved={p: problem.bytes_moved(forms[p]) for p in (*providers, *skipped) if p in forms},
                flops=problem.flops())


def _speed_targets() -> list:
    return [(TRITON_PACKED, EAGER, 5.0), (TRITON_PACKED, PEERS, 2.0)]


def plan(context) -> list[dict]:
    """The GPU cases as specs (no tensors): label, sizes, head_dim, backward, targets, extra flags."""
    import random

    specs = []
    head_dims = HEAD_DIMS[:1] if context.quick else HEAD_DIMS
    modes = (True,) if context.quick else (False, True)
    sets = []
    for hydrogens, count in ((False, HEAVY_BATCH), (True, HYDROGEN_BATCH)):
        sizes = [graph.num_atoms for graph in context.molecules(hydrogens)[:count]]
        sets.append((f"default set{', with hydrogens' if hydrogens else ', heavy atoms'}", sizes, True,
                     {"sizes": "default set", "hydrogens": hydrogens}))
    rng = random.Random(0)
    sets.append(("pockets (synthetic)", [rng.randint(*POCKET_ATOMS) for _ in range(POCKETS)], False,
                 {"sizes": f"uniform {POCKET_ATOMS[0]}-{POCKET_ATOMS[1]}"}))
    for head_dim in head_dims:
        for label, sizes, realistic, extra in sets:
            if head_dim != HEAD_DIMS[0] and not realistic:
                continue  # pockets at d = 24 only
            for backward in modes if head_dim == HEAD_DIMS[0] else (True,):
                specs.append({"label": label, "sizes": sizes, "head_dim": head_dim, "backward": backward,
                              "targets": _speed_targets() if (realistic and backward) else [], "config": extra})
    for backward in modes:
        specs.append({"label": f"N = {MEMORY_ATOMS} (synthetic)", "sizes": [MEMORY_ATOMS] * MEMORY_BATCH,
                      "head_dim": HEAD_DIMS[0], "backward": backward, "gathered": True,
                      "config": {"sizes": f"all {MEMORY_ATOMS}"},
                      "targets": [(TRITON_TABLE, TRITON_GATHERED, 8.0, "memory")]})
    return specs


def _case_name(label: str, sizes: list[int], heads: int, head_dim: int, dtype: torch.dtype, backward: bool) -> str:
    return (f"{label}: {len(sizes)} molecules ({sum(sizes)} atoms, max {max(sizes)}), "
            f"H={heads} d={head_dim} {str(dtype).split('.')[-1]}, {MODES[backward]}")


def _selected(name: str, context=None) -> bool:
    """``--cases`` (``context.cases``), else ``PYBLEND_BENCH_RELATION_ATTENTION``, as
    :func:`harness.name_selected` reads them, e.g. "d=24&!backward" or "N = 128"; checked before a case is built
    (each compiles its peers)."""
    pattern = getattr(context, "cases", None) or os.environ.get("PYBLEND_BENCH_RELATION_ATTENTION")
    return name_selected(name, pattern)


def _gpu_cases(context) -> Iterator[Case]:
    for spec in plan(context):
        name = _case_name(spec["label"], spec["sizes"], HEADS, spec["head_dim"], torch.bfloat16, spec["backward"])
        if not (_selected(name, context) and context.wants(ENTRY, name)):
            continue
        torch._dynamo.reset()  # the previous case's compiled peers are done with (and free their memory)
        torch.cuda.empty_cache()
        problem = Problem(spec["sizes"], HEADS, spec["head_dim"], torch.bfloat16, context.device, spec["backward"])
        yield build_case(problem, name, config=spec["config"], targets=spec["targets"],
                         time_budget_s=context.time_budget_s, gathered=spec.get("gathered", False))


def _cpu_cases(context) -> Iterator[Case]:
    sizes = [graph.num_atoms for graph in context.molecules(False)[:64]]
    name = _case_name("default set, heavy atoms (CPU)", sizes, 8, 16, torch.float32, True)
    if not (_selected(name, context) and context.wants(ENTRY, name)):
        return
    problem = Problem(sizes, 8, 16, torch.float32, context.device, backward=True)
    yield build_case(problem, name, config={"sizes": "default set", "hydrogens": False},
                     targets=[], time_budget_s=context.time_budget_s, pyblend_skip="needs a CUDA device",
                     peers=(EAGER, COMPILED, SDPA, FLEX_PADDED, FLEX_PACKED))


def cases(context) -> Iterator[Case]:
    """A generator: each case's tensors (and compiled peers) live only while it is built and run."""
    if context.device.type == "cuda":
        yield from _gpu_cases(context)
    else:
        yield from _cpu_cases(context)
