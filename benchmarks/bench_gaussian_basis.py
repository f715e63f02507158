"""Pair distances + Gaussian-basis features (K = 128) for a data pipeline on the CPU: C++ vs the reference."""
from __future__ import annotations

import torch

from pyblend import ops

from .harness import Case

ENTRY = "gaussian_basis"
KERNELS = 128
MOLECULES = 256


def cases(context) -> list[Case]:
    from pyblend import collate

    if context.device.type != "cpu":
        return []  # the fused GPU kernel comes with the MoleBlend bias op
    graphs = context.conformer_molecules(min(MOLECULES, context.limit or MOLECULES))
    name = f"{len(graphs)} molecules with conformers, padded to {max(g.num_atoms for g in graphs)} atoms, K={KERNELS}"
    if not context.wants(ENTRY, name):
        return []
    batch = collate(graphs)
    generator = torch.Generator().manual_seed(0)
    means = torch.rand(KERNELS, generator=generator) * 3
    stds = torch.rand(KERNELS, generator=generator) * 3
    mul, bias = 1 + 0.1 * torch.randn(128, 1, generator=generator), 0.1 * torch.randn(128, 1, generator=generator)
    atom_type = batch.atom_features[..., 0]
    pair_types = torch.stack(torch.broadcast_tensors(atom_type[:, :, None], atom_type[:, None, :]), -1)

    def features(backend):
        with torch.no_grad():
            distances = ops.pair_distances(batch.positions, batch.mask, backend=backend)
            return ops.gaussian_basis(distances, pair_types, means, stds, mul, bias, backend=backend)

    expected = ops.gaussian_basis(ops.pair_distances(batch.positions.double(), batch.mask, backend="reference"),
                                  pair_types, means.double(), stds.double(), mul.double(), bias.double(),
                                  backend="reference")

    def check(provider, out):
        error = ((out.double() - expected).norm() / expected.norm()).item()
        if not error < 1e-5:
            raise AssertionError(f"relative error {error:.2e} against the float64 reference")

    return [Case(entry=ENTRY, providers={"pyblend C++": lambda: features("cpp"),
                                         "reference (torch eager)": lambda: features("reference")},
                 name=name, check=check, units=len(batch), unit="molecules",
                 config={"kernels": KERNELS, "float": "float32"},
                 time_budget_s=context.time_budget_s)]
