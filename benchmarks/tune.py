"""Launch-configuration sweep: for each kernel of an op, time candidate tiles, warps and stages against the
configuration the launcher picks now, on a workload of the op's benchmark, and say which is fastest.

    python -m pyblend.benchmarks.tune [--ops relation_attention] [--dtype bfloat16] [--budget-s 480]

Each candidate replaces one kernel's configuration (the others keep theirs), runs the op's forward and backward,
and is kept only if every output and gradient matches the current configuration's within the dtype's bound
(||x - x_now|| / ||x_now||); a candidate that fails to compile or to match is reported as such. Times are medians
of the whole forward + backward (CUDA events through ``harness.measure``), so a kernel's row says what its
configuration is worth to the step. The rows go to a JSON file (``--output``); the table printed last lists, per
kernel, the current configuration, the fastest one and the step time of each. The launchers are not changed: a
faster configuration still has to pass the sm_90 spill checks of the tests before it replaces the current one.
On the CPU (Triton's interpreter) it runs the same sweep on a small workload, which checks the tool, not speed.

Ops, on a packed batch of 1024 molecules of 8-48 atoms (MoleBlend's base sizes): relation_attention (H = 32,
D = 24, a dense (H, P) bias and a 128-relation table; its kernels "forward", "gradients" (dK/dV), "dq" and "table"
run, "bias", the reduction of a broadcast bias's gradient, does not), gaussian_basis_bias (K = K_hidden = 128,
H = 32, two type ids per pair; "forward", "pairs", "weights") and outer_product (the SPD head's cross-entropy:
d = 32, C = 11; "forward", "rows", "cols"); and multi_infonce at MolBind's scale (one pair, B = 16384, d = 512;
"forward", "rows", "columns").
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .harness import device_name, device_slug, measure, relative_error, short_error

BOUND = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass
class OpSpec:
    module: str                      # the kernels module whose launch-configuration function is swept
    config_function: str             # its name there: (kernel, *sizes, dtype) -> dict of launch keywords
    kernels: tuple[str, ...]         # the ``kernel`` values it is asked for
    build: Callable[[torch.dtype, torch.device, bool], Callable[[], list[torch.Tensor]]]  # -> one op step
    grid: Callable[[dict], list[dict]]  # a kernel's current configuration -> the candidates to try on a GPU


def _relation_attention_step(dtype: torch.dtype, device: torch.device, small: bool):
    from pyblend import ops

    generator = torch.Generator().manual_seed(0)
    heads, head_dim, relations = (2, 24, 16) if small else (32, 24, 128)
    # Heavy-atom molecule sizes of drug-like sets (8-48 atoms), or a few tiny ones for the interpreter.
    lengths = torch.randint(3, 12, (2,), generator=generator) if small else \
        torch.randint(8, 49, (1024,), generator=generator)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    atoms, pairs = int(lengths.sum()), int((lengths * lengths).sum())
    q, k, v = (torch.randn(atoms, heads, head_dim, generator=generator).to(device, dtype).requires_grad_()
               for _ in range(3))
    bias = torch.randn(heads, pairs, generator=generator).to(device, dtype).requires_grad_()
    rel_index = torch.randint(0, relations, (pairs,), generator=generator, dtype=torch.int8).to(device)
    rel_table = torch.randn(relations, heads, generator=generator).to(device, dtype).requires_grad_()
    grad_out = torch.randn(atoms, heads, head_dim, generator=generator).to(device, dtype)
    leaves = (q, k, v, bias, rel_table)

    def step() -> list[torch.Tensor]:
        for leaf in leaves:
            leaf.grad = None
        out = ops.relation_attention(q, k, v, bias, cu_seqlens=cu_seqlens.to(device), max_seqlen=int(lengths.max()),
                                     rel_index=rel_index, rel_table=rel_table, backend="triton")
        out.backward(grad_out)
        return [out.detach()] + [leaf.grad for leaf in leaves]

    return step


def _gaussian_basis_bias_step(dtype: torch.dtype, device: torch.device, small: bool):
    from pyblend import ops

    generator = torch.Generator().manual_seed(0)
    types, (kernels, hidden, heads) = 7, ((16, 16, 2) if small else (128, 128, 32))
    lengths = torch.randint(3, 9, (2,), generator=generator) if small else \
        torch.randint(8, 49, (1024,), generator=generator)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    atoms, pairs = int(lengths.sum()), int((lengths * lengths).sum())
    positions = (torch.randn(atoms, 3, generator=generator) * 1.5).to(device).requires_grad_()
    pair_types = torch.randint(0, types, (pairs, 2), generator=generator).to(device)
    shapes = {"means": (kernels,), "stds": (kernels,), "mul": (types, 1), "bias": (types, 1),
              "w1": (hidden, kernels), "b1": (hidden,), "w2": (heads, hidden), "b2": (heads,)}
    params = {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}
    params["means"], params["stds"] = params["means"].abs() * 2, params["stds"].abs() + 0.3
    params["w1"], params["w2"] = params["w1"] / kernels ** 0.5, params["w2"] / hidden ** 0.5
    params = {name: x.to(device, dtype).requires_grad_() for name, x in params.items()}
    grad_attn = torch.randn(heads, pairs, generator=generator).to(device, dtype)
    grad_feat = torch.randn(atoms, kernels, generator=generator).to(device, dtype)
    leaves = (positions, *params.values())

    def step() -> list[torch.Tensor]:
        for leaf in leaves:
            leaf.grad = None
        attn, feat = ops.gaussian_basis_bias(positions, pair_types, *params.values(), cu_seqlens=cu_seqlens,
                                             max_seqlen=int(lengths.max()), backend="triton")
        torch.autograd.backward((attn, feat), (grad_attn.view_as(attn), grad_feat.view_as(feat)))
        return [attn.detach(), feat.detach()] + [leaf.grad for leaf in leaves]

    return step


def _outer_product_step(dtype: torch.dtype, device: torch.device, small: bool):
    from pyblend import ops

    generator = torch.Generator().manual_seed(0)
    width, classes = (8, 5) if small else (32, 11)  # MoleBlend's SPD head: 32 x 32 features, 11 distance classes
    lengths = torch.randint(3, 9, (2,), generator=generator) if small else \
        torch.randint(8, 49, (1024,), generator=generator)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    atoms, pairs = int(lengths.sum()), int((lengths * lengths).sum())
    row, col = (torch.randn(atoms, width, generator=generator).to(device, dtype).requires_grad_() for _ in range(2))
    weight = (torch.randn(classes, width * width, generator=generator) / width).to(device, dtype).requires_grad_()
    bias = torch.zeros(classes).to(device, dtype).requires_grad_()
    target = torch.randint(-1, classes, (pairs,), generator=generator)
    target = torch.where(target < 0, -100, target).to(device)  # some pairs ignored, as the diagonal is
    leaves = (row, col, weight, bias)

    def step() -> list[torch.Tensor]:
        for leaf in leaves:
            leaf.grad = None
        loss = ops.outer_product_loss(row, col, weight, bias, target, cu_seqlens=cu_seqlens,
                                      max_seqlen=int(lengths.max()), backend="triton")
        loss.backward()
        return [loss.detach()] + [leaf.grad for leaf in leaves]

    return step


def _multi_infonce_step(dtype: torch.dtype, device: torch.device, small: bool):
    from pyblend import ops

    generator = torch.Generator().manual_seed(0)
    batch, dim = (37, 24) if small else (16384, 512)  # MolBind's scale: B = 16k, d = 512
    embeddings = {name: torch.randn(batch, dim, generator=generator).to(device, dtype).requires_grad_()
                  for name in ("graph", "conformer")}

    def step() -> list[torch.Tensor]:
        for leaf in embeddings.values():
            leaf.grad = None
        loss = ops.multi_infonce(embeddings, [("graph", "conformer")], backend="triton", gather=None)
        loss.backward()
        return [loss.detach()] + [leaf.grad for leaf in embeddings.values()]

    return step


def _attention_grid(current: dict) -> list[dict]:
    """Tiles of 16-128 rows (square where the current ones are square: those kernels step both ways with one
    size), 2-8 warps, 1-3 stages."""
    sizes = [16, 32, 64, 128]
    square = current.get("BLOCK_M") == current.get("BLOCK_N")
    tiles = [(m, m) for m in sizes] if square else [(m, n) for m in sizes for n in sizes[:3] if n <= m]
    return [dict(current, BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
            for (m, n), warps, stages in itertools.product(tiles, (2, 4, 8), (1, 2, 3))]


def _pair_tile_grid(current: dict) -> list[dict]:
    """Pair tiles BLOCK_I x BLOCK_J of 16-128 pairs, hidden chunks of 16-64 (within the hidden width), 4 or 8
    warps, 1 or 2 stages."""
    chunks = [c for c in (16, 32, 64) if c <= current.get("BLOCK_KH", current["BLOCK_K"])]
    tiles = [(i, j) for i in (4, 8, 16) for j in (4, 8) if 16 <= i * j <= 128]
    return [dict(current, BLOCK_I=i, BLOCK_J=j, BLOCK_C=c, num_warps=warps, num_stages=stages)
            for (i, j), c, warps, stages in itertools.product(tiles, chunks, (4, 8), (1, 2))]


def _square_pair_grid(current: dict) -> list[dict]:
    """Square pair tiles of 16-64, 2-8 warps, 1-3 stages (the outer-product heads' kernels)."""
    return [dict(current, BLOCK_I=block, BLOCK_J=block, num_warps=warps, num_stages=stages)
            for block, warps, stages in itertools.product((16, 32, 64), (2, 4, 8), (1, 2, 3))]


OPS = {
    "relation_attention": OpSpec("pyblend.kernels.relation_attention", "_launch_config",
                                 ("forward", "bias", "gradients", "dq", "table"), _relation_attention_step,
                                 _attention_grid),
    "gaussian_basis_bias": OpSpec("pyblend.kernels.gaussian_basis_bias", "_launch_config",
                                  ("forward", "pairs", "weights"), _gaussian_basis_bias_step, _pair_tile_grid),
    "outer_product": OpSpec("pyblend.kernels.outer_product", "launch_config", ("forward", "rows", "cols"),
                            _outer_product_step, _square_pair_grid),
    "multi_infonce": OpSpec("pyblend.kernels.multi_infonce", "_launch_config", ("forward", "rows", "columns"),
                            _multi_infonce_step, _attention_grid),
}


def candidates(spec: OpSpec, current: dict, small: bool) -> list[dict]:
    """The current configuration first, then the op's grid (on a GPU) or one other warp count (on the CPU)."""
    found = [dict(current)]
    others = [dict(current, num_warps=2 if current.get("num_warps", 4) != 2 else 4)] if small else spec.grid(current)
    for config in others:
        if config not in found:
            found.append(config)
    return found


def poisoned_run(step: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """``step``'s results from a second run after NaN was written over the first run's: the allocator hands those
    freed blocks to the second run, so an element a candidate leaves unwritten shows as NaN, not as the value the
    last run left there."""
    for result in step():
        result.fill_(float("nan"))
    return step()


def _log(line: str) -> None:
    print(line, flush=True)  # a device call cut short still returns what was printed


def sweep(name: str, dtype: torch.dtype, device: torch.device, budget_s: float, log=_log,
          kernels: Sequence[str] | None = None, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Sweep ``name``'s kernels (``kernels``: only these) within ``budget_s``, shared fairly: each kernel gets an
    equal part of what is left when it starts, so the last ones are reached. ``on_row`` sees every row as it is
    made (the caller saves them as it goes)."""
    import importlib

    spec = OPS[name]
    module = importlib.import_module(spec.module)
    original = getattr(module, spec.config_function)
    small = device.type != "cuda"
    step = spec.build(dtype, device, small)
    reference = [x.clone() for x in poisoned_run(step)]
    asked: dict[str, dict] = {}

    def recording(kernel, *sizes):
        config = original(kernel, *sizes)
        asked.setdefault(kernel, dict(config))
        return config

    setattr(module, spec.config_function, recording)
    try:
        step()
    finally:
        setattr(module, spec.config_function, original)
    rows, deadline = [], time.perf_counter() + budget_s
    chosen = [kernel for kernel in spec.kernels if kernels is None or kernel in kernels]
    for kernel in chosen:
        if kernel not in asked:
            log(f"{name}: kernel {kernel!r} is not launched by this workload; skipped")
    chosen = [kernel for kernel in chosen if kernel in asked]
    for position, kernel in enumerate(chosen):
        kernel_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(chosen) - position)
        for index, config in enumerate(candidates(spec, asked[kernel], small)):
            if index and time.perf_counter() > kernel_deadline:  # the current configuration always runs
                log(f"{name}: {kernel}: its share of the time budget is spent; next kernel")
                break
            row = dict(op=name, kernel=kernel, dtype=str(dtype).removeprefix("torch."), config=config,
                       current=config == asked[kernel])

            def replaced(kernel_asked, *sizes, kernel=kernel, config=config):
                return dict(config) if kernel_asked == kernel else original(kernel_asked, *sizes)

            setattr(module, spec.config_function, replaced)
            try:
                results = poisoned_run(step)
                errors = [relative_error(x, ref) for x, ref in zip(results, reference)]
                worst = max(errors, key=lambda error: math.inf if math.isnan(error) else error)
                if not worst < BOUND[dtype]:  # NaN (an unwritten element) fails too
                    row.update(status="mismatch", max_error=worst)
                else:
                    timing = measure(step, device, time_budget_s=0.5 if device.type == "cuda" else 0.0,
                                     warmed_up=True, graphs=False)
                    row.update(status="ok", max_error=worst, median_ms=timing["median_ms"])
            except Exception as error:  # a candidate the compiler or the kernel's checks reject
                row.update(status="error", error=short_error(error))
            finally:
                setattr(module, spec.config_function, original)
            rows.append(row)
            on_row(row)
            log(f"{kernel:10s} {_brief(config):44s} {row['status']:8s} "
                f"{row.get('median_ms', float('nan')):9.4f} ms{'  (current)' if row['current'] else ''}")
    return rows


def _brief(config: dict) -> str:
    return " ".join(f"{key.removeprefix('BLOCK_').removeprefix('num_')}={value}" for key, value in config.items())


def summary(rows: list[dict]) -> str:
    lines = [f"{'op':20s} {'kernel':10s} {'now ms':>9s} {'best ms':>9s}  best configuration"]
    for (op, kernel), group in itertools.groupby(rows, key=lambda row: (row["op"], row["kernel"])):
        group = [row for row in group if row["status"] == "ok"]
        now = next((row for row in group if row["current"]), None)
        if not group or now is None:
            lines.append(f"{op:20s} {kernel:10s} (the current configuration did not run)")
            continue
        best = min(group, key=lambda row: row["median_ms"])
        lines.append(f"{op:20s} {kernel:10s} {now['median_ms']:9.4f} {best['median_ms']:9.4f}  "
                     f"{_brief(best['config'])}")
    return "\n".join(lines)


def _output_path(text: str | None, default: Path) -> tuple[Path | None, str | None]:
    """``--output`` as a path whose folder exists (made if missing, as run and lease make theirs), or why not: a bad
    output found only at the first row would end the call after its first candidate."""
    if text is not None and not text.strip():
        return None, f"expected a file path; got {text!r}"
    path = default if text is None else Path(text)
    if path.is_dir():
        return None, f"expected a file, not a folder; got {str(path)!r}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return None, (f"expected a file in a folder that exists or can be made; got {str(path)!r} "
                      f"({error.strerror or error})")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # the rows are written beside it, then renamed
        return None, f"expected a file in a folder this user can write to; got {str(path)!r}"
    return path, None


def _names(text: str) -> list[str]:
    """The comma-separated names of ``text``, each once, in order (a name given twice would be swept twice)."""
    return list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def main(argv: list[str] | None = None) -> int:
    # The first paragraph of the docstring, whole: its first line stops mid-sentence.
    description = " ".join((__doc__ or "").split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="python -m pyblend.benchmarks.tune", description=description)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="stop starting candidates after this many seconds (default 480)")
    parser.add_argument("--kernels", default=None,
                        help="comma-separated kernel names (e.g. dq,table for relation_attention; default: all)")
    parser.add_argument("--output", default=None,
                        help="JSON rows, rewritten after every candidate; its folder is made if missing, and an "
                             "earlier file is replaced only once a row exists (default: tune-<device>.json here)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):  # NaN never runs out, 0 sweeps nothing
        parser.error(f"--budget-s: expected a finite number of seconds > 0; got {args.budget_s:g}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = _names(args.ops)
    unknown = [name for name in ops if name not in OPS]
    if unknown or not ops:
        unknown_note = f" ({', '.join(unknown)} unknown)" if unknown else ""
        parser.error(f"--ops: expected names from {', '.join(OPS)}; got {args.ops!r}{unknown_note}")
    kernels = None if args.kernels is None else _names(args.kernels)
    if kernels is not None:
        known = {kernel for name in ops for kernel in OPS[name].kernels}
        if not kernels or set(kernels) - known:
            parser.error(f"--kernels: expected names from {', '.join(sorted(known))}; got {args.kernels!r}")
    output, problem = _output_path(args.output, Path(f"tune-{device_slug(device)}.json"))
    if problem:
        parser.error(f"--output: {problem}")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    dtype = getattr(torch, args.dtype)
    rows: list[dict] = []

    def save(row: dict) -> None:
        rows.append(row)
        # Written beside it, then renamed: a call cut short while writing keeps the rows of the last write.
        partial = output.with_name(output.name + ".partial")
        partial.write_text(json.dumps({"device": device_name(device), "rows": rows}, indent=1) + "\n")
        os.replace(partial, output)

    names = [name for name in ops if kernels is None or set(kernels) & set(OPS[name].kernels)]
    deadline = time.perf_counter() + args.budget_s
    for position, name in enumerate(names):
        remaining = deadline - time.perf_counter()
        if remaining <= 0:  # building another op's workload would overrun the call
            _log(f"time budget spent; {', '.join(names[position:])} not swept")
            break
        # Ops share the budget as kernels do: an equal part of what is left.
        sweep(name, dtype, device, remaining / (len(names) - position), kernels=kernels, on_row=save)
    print(summary(rows))
    print(f"rows: {output}" if rows else f"no rows measured; {output} not written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
