"""A recorder of the tensors torch ops create, for tests that prove a kernel path never allocates a big tensor."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Allocations(TorchDispatchMode):
    """Records every tensor a torch op returns on new storage (not a view or an in-place result of its inputs):
    its element count in ``sizes``, its shape in ``shapes``. pyblend's custom ops are entered, so what their
    implementations allocate (workspaces, partials) is recorded too, not only their outputs."""

    def __init__(self):
        super().__init__()
        self.sizes = []
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "pyblend":
            device = next(x.device for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor))
            key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                result = func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        else:
            result = func(*args, **kwargs)
        inputs = {x.untyped_storage().data_ptr() for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)}
        for x in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(x.numel())
                self.shapes.append(tuple(x.shape))
        return result
