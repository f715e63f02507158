"""A recorder of the tensors torch ops create, for tests that prove a kernel path never allocates a big tensor."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Allocations(TorchDispatchMode):
    """Records the element count of every tensor a torch op creates (``sizes``)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for x in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(x, torch.Tensor):
                self.sizes.append(x.numel())
        return result
