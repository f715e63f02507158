"""A Euclidean norm safe to differentiate twice."""
from __future__ import annotations

import torch
from torch import Tensor


def vector_norm(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """``torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)``, with every derivative finite at a zero vector
    (0 there). Torch's first derivative at zero is 0 but its second is NaN, which a gradient of a gradient (training
    on forces: d/dpos of a loss on d(energy)/dpos) meets at every diagonal pair of a distance matrix."""
    zero = (x == 0).all(dim, keepdim=True)
    norm = torch.linalg.vector_norm(torch.where(zero, torch.ones((), dtype=x.dtype, device=x.device), x), dim=dim,
                                    keepdim=True)
    norm = torch.where(zero, torch.zeros((), dtype=norm.dtype, device=norm.device), norm)
    return norm if keepdim else norm.squeeze(dim)
