"""The ``input_precision`` of the kernels' ``tl.dot`` calls, shared by the launchers."""
import torch


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands follow torch's matmul setting: "tf32" (tensor cores) only when the user allowed it, else
    "ieee" (FMA units). 16-bit operands run on the tensor cores whatever this says."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
