"""Relative-error bounds against a float64 reference, ||out - ref|| / ||ref|| (../shared/DESIGN.md), in one place."""
import torch

RELATIVE_ERROR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-300)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    error = relative_error(out, ref)
    bound = RELATIVE_ERROR[dtype]
    assert error < bound, f"{what}: relative error {error:.3e} exceeds {bound:.0e} for {dtype}"
