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


def assert_close_to_sum(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype,
                        what: str = "output") -> None:
    """For a sum of terms of both signs: the error relative to ``magnitude``, the same sum over the terms' absolute
    values. Rounding error in a sum scales with that, not with the result, which cancellation can make tiny."""
    assert out.shape == ref.shape == magnitude.shape, f"{what}: shapes {tuple(out.shape)}, {tuple(ref.shape)}, " \
        f"{tuple(magnitude.shape)} differ"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    assert (magnitude.double() >= ref.double().abs() * (1 - 1e-9)).all(), f"{what}: magnitude below |reference|"
    error = ((out.double() - ref.double()).norm() / magnitude.double().norm().clamp(min=1e-300)).item()
    bound = RELATIVE_ERROR[dtype]
    assert error < bound, f"{what}: error {error:.3e} relative to the terms' magnitude exceeds {bound:.0e} for {dtype}"
