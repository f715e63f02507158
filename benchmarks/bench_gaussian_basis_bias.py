"""Fused Gaussian-basis bias (``pyblend.ops.gaussian_basis_bias``: positions -> K = 128 Gaussians -> MLP -> H = 32
heads, plus the per-atom feature sums) against the reference that materialises the (B, N, N, K) features.

Workloads (GPU, bfloat16 parameters, float32 positions): the molecules of the default set with an RDKit conformer
(heavy atoms; the first 512, fewer with ``--molecules``), real positions and pair types (Transformer-M style:
two ids per pair, the atoms' first feature and 128 + the other's); molecules whose conformer failed are padding
(fully padded rows). Modes "forward" (no autograd) and "forward+backward" (gradients of the positions and all eight
parameters under random upstream gradients of both outputs).

Providers: pyblend Triton packed and padded; the reference (``pyblend.reference.gaussian_basis_bias``, padded)
in eager mode and under ``torch.compile``. A reference that runs out of memory is tried once when the case is
built and listed as skipped with the reason; a pyblend provider that raises is reported.

Checks (before timing, by the harness): both outputs and, forward+backward, every gradient against float32
reference results computed once from the same rounded inputs; relative error ``||x - ref|| / ||ref||`` < 2e-2
(bfloat16; positions' gradient on real atoms only).

Bytes that must move (achieved GB/s): forward, positions (T * 12) and pair ids (P * 2 * 8) read, the bias
(H * P * s) and features (T * K * s) written; forward+backward adds the ids and positions read twice more, the two
upstream gradients read, the per-pair scalars (P * 8) written and read, and the position gradient written.
Padded providers move B * N instead of T atoms and B * N^2 instead of P pairs. Useful FLOPs (real pairs):
forward ``2 P (K K_h + K_h H)``, forward+backward 3x that.

Targets (the MoleBlend issue's): pyblend packed >= 5x faster than the eager reference and peak memory >= 8x
below it, each mode. Not yet measured on a GPU.

On the CPU (no Triton timing: its interpreter is far too slow), one small float32 case (64 molecules,
forward+backward) times the eager reference.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .harness import Case

ENTRY = "gaussian_basis_bias"
KERNELS, HEADS = 128, 32
TYPES = 256
MOLECULES = 512
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
TRITON_PACKED, TRITON_PADDED = "pyblend Triton (packed)", "pyblend Triton (padded)"
EAGER, COMPILED = "reference eager (padded)", "reference torch.compile (padded)"
NAMES = ("attn_bias", "atom_features", "dpositions", "dmeans", "dstds", "dmul", "dbias", "dw1", "db1", "dw2", "db2")


def _problem(context, count: int, dtype: torch.dtype, device: torch.device):
    """Padded and packed inputs of the default set's conformer molecules, and the eight parameters."""
    from pyblend import collate
    from pyblend.layout import cu_seqlens_from_mask, pack_atoms, pack_pairs

    batch = collate(context.conformer_molecules(count))
    mask = batch.mask
    if batch.has_positions is not None:
        mask = mask & batch.has_positions[:, None]
    positions = torch.where(mask[..., None], batch.positions.nan_to_num(), 0.0)
    atom = batch.atom_features[..., 0].clamp(0, 127)
    types = torch.stack(torch.broadcast_tensors(atom[:, :, None], 128 + atom[:, None, :]), -1)
    # collate puts each molecule's atoms first and a failed conformer masks its whole row: masks are prefixes,
    # so packing the padded batch keeps every pair block in order.
    cu, longest = cu_seqlens_from_mask(mask)
    generator = torch.Generator().manual_seed(count)
    params = [torch.rand(KERNELS, generator=generator) * 3, torch.rand(KERNELS, generator=generator) * 3,
              1 + 0.1 * torch.randn(TYPES, 1, generator=generator), 0.1 * torch.randn(TYPES, 1, generator=generator),
              torch.randn(KERNELS, KERNELS, generator=generator) / KERNELS**0.5,
              0.1 * torch.randn(KERNELS, generator=generator),
              torch.randn(HEADS, KERNELS, generator=generator) / KERNELS**0.5,
              0.1 * torch.randn(HEADS, generator=generator)]
    params = [p.to(device, dtype) for p in params]
    padded = dict(positions=positions.to(device), types=types.to(device), mask=mask.to(device))
    packed = dict(positions=pack_atoms(positions, mask).to(device), types=pack_pairs(types, mask).to(device),
                  cu=cu.to(device), max_seqlen=longest)
    return padded, packed, params


def case_name(graphs, dtype: torch.dtype, backward: bool) -> str:
    width = max(graph.num_atoms for graph in graphs)
    return (f"{len(graphs)} conformer molecules (N <= {width}), K={KERNELS}, H={HEADS}, {str(dtype).split('.')[-1]}, "
            f"{'forward+backward' if backward else 'forward'}")


def build_case(context, count: int, dtype: torch.dtype, device: torch.device, backward: bool,
               triton: bool = True) -> Case:
    from pyblend.layout import pack_pairs
    from pyblend.ops.gaussian_basis_bias import gaussian_basis_bias as op
    from pyblend.reference.gaussian_basis_bias import (
        gaussian_basis_bias as reference_op,
    )

    padded, packed, params = _problem(context, count, dtype, device)
    generator = torch.Generator().manual_seed(1)
    mask = padded["mask"]
    batch, width = mask.shape
    real_pairs = int((mask.sum(1) ** 2).sum())
    upstream_padded = (torch.randn(batch, HEADS, width, width, generator=generator).to(device, dtype),
                       torch.randn(batch, width, KERNELS, generator=generator).to(device, dtype))
    pair_mask = mask[:, :, None] & mask[:, None, :]
    upstream_packed = (pack_pairs(upstream_padded[0].permute(0, 2, 3, 1), mask).t().contiguous(),
                       upstream_padded[1][mask].contiguous())
    # The padded upstream gradient is zero off real pairs, as the packed one does not exist there.
    upstream_padded = (upstream_padded[0] * pair_mask[:, None], upstream_padded[1] * mask[..., None])

    def provider(fn, layout, upstream):
        def run():
            leaves = [layout["positions"].requires_grad_(backward)] + [p.requires_grad_(backward) for p in params]
            with torch.set_grad_enabled(backward):
                outputs = fn(*leaves)
            if not backward:
                return outputs
            grads = torch.autograd.grad(outputs, leaves, upstream)
            return (*outputs, *grads)
        return run

    def packed_call(positions, *weights):
        return op(positions, packed["types"], *weights, cu_seqlens=packed["cu"], max_seqlen=packed["max_seqlen"],
                  backend="triton")

    def padded_call(positions, *weights):
        return op(positions, padded["types"], *weights, mask=mask, backend="triton")

    def eager_call(positions, *weights):
        return reference_op(positions, padded["types"], *weights, mask=mask)

    compiled_reference = torch.compile(reference_op)

    def compiled_call(positions, *weights):
        return compiled_reference(positions, padded["types"], *weights, mask=mask)

    candidates, skipped = {}, {}
    if triton:
        candidates[TRITON_PACKED] = provider(packed_call, packed, upstream_packed)
        candidates[TRITON_PADDED] = provider(padded_call, padded, upstream_padded)
    else:
        skipped[TRITON_PACKED] = skipped[TRITON_PADDED] = "needs a CUDA device"
    candidates[EAGER] = provider(eager_call, padded, upstream_padded)
    if device.type == "cuda":
        candidates[COMPILED] = provider(compiled_call, padded, upstream_padded)

    # Expected results: the reference in float32 from the same rounded inputs, once.
    float_params = [p.detach().float() for p in params]
    leaves = [padded["positions"].detach().float().requires_grad_(backward)] + \
        [p.clone().requires_grad_(backward) for p in float_params]
    with torch.set_grad_enabled(backward):
        expected = reference_op(leaves[0], padded["types"], *leaves[1:], mask=mask)
    if backward:
        expected = (*expected, *torch.autograd.grad(expected, leaves, tuple(u.float() for u in upstream_padded)))
    expected = tuple(x.detach() for x in expected)

    providers = {}
    for name, fn in candidates.items():
        try:
            fn()  # compiles, and shows whether it fits in memory
        except torch.cuda.OutOfMemoryError as error:
            skipped[name] = f"OutOfMemoryError: {str(error).splitlines()[0][:160]}"
            torch.cuda.empty_cache()
            continue
        except Exception as error:  # noqa: BLE001 - a peer that cannot run is skipped with the reason
            if name in (TRITON_PACKED, TRITON_PADDED):
                raise
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            continue
        providers[name] = fn

    def check(provider_name: str, result) -> None:
        for index, (got, want) in enumerate(zip(result, expected)):
            name = NAMES[index]
            if provider_name == TRITON_PACKED and name == "attn_bias":
                want = pack_pairs(want.permute(0, 2, 3, 1), mask).t()
            elif provider_name == TRITON_PACKED and name in ("atom_features", "dpositions"):
                want = want[mask]
            elif name == "dpositions":
                got, want = got[mask], want[mask]
            error = ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()
            if not error < TOLERANCE[dtype]:
                raise AssertionError(f"{name}: relative error {error:.2e} against the float32 reference")

    element = torch.finfo(dtype).bits // 8
    total, pairs = int(mask.sum()), real_pairs
    rows, squares = batch * width, batch * width * width

    def traffic(atoms, pair_count):
        forward = atoms * 12 + pair_count * 16 + HEADS * pair_count * element + atoms * KERNELS * element
        if not backward:
            return forward
        return (forward + 2 * (atoms * 12 + pair_count * 16) + HEADS * pair_count * element
                + atoms * KERNELS * element + pair_count * 8 * 2 + atoms * 12)

    bytes_moved = {TRITON_PACKED: traffic(total, pairs), TRITON_PADDED: traffic(rows, squares),
                   EAGER: traffic(rows, squares), COMPILED: traffic(rows, squares)}
    mode = "forward+backward" if backward else "forward"
    config = {"molecules": batch, "width": width, "atoms": total, "pairs": pairs, "kernels": KERNELS,
              "heads": HEADS, "dtype": str(dtype).split(".")[-1], "mode": mode}
    return Case(entry=ENTRY, name=case_name(context.conformer_molecules(count), dtype, backward),
                providers=providers, check=check, units=batch, unit="molecules", config=config,
                targets=[(TRITON_PACKED, EAGER, 5.0), (TRITON_PACKED, EAGER, 8.0, "memory")] if triton else [],
                skipped=skipped,
                time_budget_s=context.time_budget_s,
                bytes_moved={k: v for k, v in bytes_moved.items() if k in providers},
                flops=2 * pairs * (KERNELS * KERNELS + KERNELS * HEADS) * (3 if backward else 1))


def cases(context) -> Iterator[Case]:
    count = min(MOLECULES, context.limit or MOLECULES)
    if context.device.type != "cuda":
        if context.wants(ENTRY, case_name(context.conformer_molecules(min(64, count)), torch.float32, True)):
            yield build_case(context, min(64, count), torch.float32, context.device, backward=True, triton=False)
        return
    for backward in (False, True):
        if context.wants(ENTRY, case_name(context.conformer_molecules(count), torch.bfloat16, backward)):
            yield build_case(context, count, torch.bfloat16, context.device, backward=backward)
