"""LegoMerge primitives (MM-Lego, seed 004, eq. 4 and the SLERP of the task heads): :func:`merge_latents` and
:func:`slerp`.

No kernel: both are elementwise (or one reduction) over tensors of a few KB per sample (a (64, 64) complex latent
is 32 KB; a task head a few hundred floats), so they are memory-bound on tiny data and a handful of fused
elementwise torch launches already run at bandwidth; a custom kernel would save nothing measurable next to the
LegoBlock steps that produce the latents. They run wherever the tensors live and are differentiable.

**merge_latents, method="harmonic"** (the paper's merge, done correctly; the public code's quirks are listed in
REFERENCES.md). For M latents ``l_m`` (complex, equal shapes), elementwise:

    magnitude = M / sum_m 1 / (|l_m| + eps)  -  eps          (the harmonic mean of |l_m| + eps, shifted back)
    direction = s / |s|,   s = sum_m l_m / |l_m|               (circular mean of the phases; l_m = 0 adds 0)
    merged    = magnitude * direction

``eps`` keeps a zero magnitude finite: ``1 / (0 + eps)`` instead of ``1 / 0``. Shifting by ``+eps`` then ``-eps``
makes the merge exact where it must be: M = 1 gives ``|l|`` back, and M equal magnitudes give that magnitude
(up to rounding), while a zero among them pulls the result to ``<= eps`` (the harmonic mean's limit, 0). The
harmonic mean of values ``>= eps`` is ``>= eps``, so the magnitude is ``>= 0`` (clamped at 0 against rounding).

The phase is the angle of the resultant of the unit phasors, so +pi-0.1 and -pi+0.1 merge to pi (an arithmetic
mean of angles, the public code's, gives 0). Where the resultant is shorter than ``M * eps`` (every ``l_m`` is
zero, or the phasors cancel, e.g. 1 and -1) the phase is undefined; we define it as 0 (the merged value is the
real number ``magnitude``), finite with finite gradients. ``present`` restricts the merge, per sample, to the
latents whose modality the sample has (M becomes that sample's count).

**slerp**: see :func:`slerp`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._values import values_hidden
from ..reference._norm import vector_norm
from ._checks import as_tensor, describe, is_finite, is_real

__all__ = ["MERGE_METHODS", "merge_latents", "slerp"]

MERGE_METHODS = ("harmonic", "mean", "sum")
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def _check_latents(latents) -> list[Tensor]:
    if isinstance(latents, Tensor) or not isinstance(latents, Sequence):
        raise TypeError(f"latents: expected a list or tuple of complex tensors; got {type(latents).__name__}")
    if len(latents) == 0:
        raise ValueError("latents: expected at least one latent; got an empty sequence")
    for index, latent in enumerate(latents):
        if not isinstance(latent, Tensor):
            raise TypeError(f"latents[{index}]: expected a torch.Tensor; got {type(latent).__name__}")
        if latent.dtype not in COMPLEX_DTYPES:
            raise TypeError(f"latents[{index}]: expected a complex64 or complex128 tensor (a frequency-domain "
                            f"latent); got {describe(latent)}")
        first = latents[0]
        if latent.shape != first.shape:
            raise ValueError(f"latents[{index}]: expected shape {tuple(first.shape)} like latents[0]; "
                             f"got {describe(latent)}")
        if latent.dtype != first.dtype:
            raise TypeError(f"latents[{index}]: expected dtype {first.dtype} like latents[0]; got {describe(latent)}")
        if latent.device != first.device:
            raise ValueError(f"latents[{index}]: expected a tensor on {first.device} like latents[0]; "
                             f"got {describe(latent)}")
    return list(latents)


def _bool_array_as_tensor(value, name: str, device: torch.device):
    """A bool numpy array as a tensor on ``device`` (host data has no device of its own: it goes where the latents
    are, as a tensor given on the CPU would not); anything else is returned as given, for the caller to check."""
    if isinstance(value, np.ndarray) and value.dtype == np.bool_:
        return as_tensor(value, name).to(device)
    return value


def _got(value) -> str:
    if isinstance(value, Tensor):
        return describe(value)
    if isinstance(value, np.ndarray):
        return f"{value.dtype} numpy array of shape {value.shape}"
    return type(value).__name__


def _check_present(present, count: int, first: Tensor) -> Tensor | None:
    """``present``: None, or M bool masks ``(B,)`` (a sequence, or one ``(M, B)`` tensor), each a tensor or a bool
    numpy array -> ``(M, B)`` bool on the latents' device."""
    if present is None:
        return None
    if first.dim() == 0:
        raise ValueError(f"present: needs latents with a leading batch axis; got latents[0] {describe(first)}")
    batch = first.shape[0]
    given = present
    present = _bool_array_as_tensor(present, "present", first.device)
    if isinstance(present, Tensor) or isinstance(given, np.ndarray):
        if not isinstance(present, Tensor) or present.dim() != 2 or present.shape[0] != count:
            raise ValueError(f"present: expected a bool tensor of shape (M, B) = ({count}, {batch}); "
                             f"got {_got(given)}")
        rows = list(present.unbind(0))
    elif isinstance(present, Sequence):
        rows = list(present)
        if len(rows) != count:
            raise ValueError(f"present: expected one (B,) mask per latent (M = {count}); got {len(rows)}")
    else:
        raise TypeError(f"present: expected None, a sequence of (B,) bool tensors or an (M, B) bool tensor (or "
                        f"bool numpy arrays); got {type(present).__name__}")
    for index, given in enumerate(rows):
        row = rows[index] = _bool_array_as_tensor(given, f"present[{index}]", first.device)
        if not isinstance(row, Tensor) or row.dtype != torch.bool or row.shape != (batch,):
            raise ValueError(f"present[{index}]: expected a bool tensor of shape (B,) = ({batch},); "
                             f"got {_got(given)}")
        if row.device != first.device:
            raise ValueError(f"present[{index}]: expected a tensor on {first.device} like the latents; "
                             f"got {describe(row)}")
    return torch.stack(rows)


def merge_latents(latents: Sequence[Tensor], method: str = "harmonic", *, eps: float = 1e-6,
                  present: Sequence[Tensor | np.ndarray] | Tensor | np.ndarray | None = None) -> Tensor:
    """Merge M frequency-domain latents into one (LegoMerge, eq. 4).

    Args:
        latents: M >= 1 complex tensors (complex64 or complex128) of one shape, dtype and device, e.g.
            ``(B, C, D)`` block latents.
        method: ``"harmonic"`` (harmonic mean of the magnitudes, circular mean of the phases: see the module
            docstring for the formula and how ``eps`` is used), ``"mean"`` or ``"sum"`` (plain complex mean/sum).
        eps: > 0, the floor that keeps ``1 / |l|`` finite at zero magnitude, and the length below which the
            resultant of the phasors counts as cancelled (times M). Used by "harmonic" only.
        present: optional per-sample selection: M bool masks ``(B,)`` (or one ``(M, B)`` tensor) over the latents'
            first axis, tensors on the latents' device or bool numpy arrays (copied there); sample b merges only
            the latents m with ``present[m][b]``. A sample with none gets 0 (callers such as
            :class:`pyblend.nn.LegoMerge` reject such samples before merging).

    Returns:
        The merged complex tensor, same shape and dtype as each latent.
    """
    latents = _check_latents(latents)
    if method not in MERGE_METHODS:
        raise ValueError(f"method: expected one of {MERGE_METHODS}; got {method!r}")
    eps = merge_eps(eps)
    mask = _check_present(present, len(latents), latents[0])
    stacked = torch.stack(latents)                                                  # (M, ...)
    real_dtype = stacked.real.dtype
    if mask is None:
        weight = torch.ones((), dtype=real_dtype, device=stacked.device)
        count = torch.tensor(float(len(latents)), dtype=real_dtype, device=stacked.device)
    else:
        selected = mask.reshape(*mask.shape, *([1] * (stacked.dim() - 2)))
        # Unselected entries are never read: 0 * NaN would leak into the sample's result and gradients.
        stacked = torch.where(selected, stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device))
        weight = selected.to(real_dtype)
        count = weight.sum(0)
    if method == "sum":
        return (stacked * weight).sum(0)
    if method == "mean":
        return (stacked * weight).sum(0) / count.clamp_min(1)

    magnitude = stacked.abs()
    inverse = (weight / (magnitude + eps)).sum(0)
    # A sample with no latent has count 0 and inverse 0: the clamps keep it finite (its result is 0 below).
    harmonic = (count / inverse.clamp_min(torch.finfo(real_dtype).tiny) - eps).clamp_min(0) * (count > 0)
    # Unit phasors; the double torch.where keeps the gradient of l / |l| finite where l = 0.
    nonzero = magnitude > 0
    safe = torch.where(nonzero, stacked, torch.ones((), dtype=stacked.dtype, device=stacked.device))
    unit = torch.where(nonzero, safe / safe.abs(), torch.zeros((), dtype=stacked.dtype, device=stacked.device))
    resultant = (unit * weight).sum(0)
    length = resultant.abs()
    defined = length > eps * count
    safe_resultant = torch.where(defined, resultant, torch.ones((), dtype=stacked.dtype, device=stacked.device))
    direction = torch.where(defined, safe_resultant / safe_resultant.abs(),
                            torch.ones((), dtype=stacked.dtype, device=stacked.device))
    return harmonic * direction


def merge_eps(eps) -> float:
    """:func:`merge_latents`' ``eps``, checked (a finite number > 0; :class:`pyblend.nn.LegoMerge` checks its own
    with it when built), as a float."""
    if not is_real(eps):
        raise TypeError(f"eps: expected a finite float > 0; got {eps!r}")
    if not (is_finite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite float > 0; got {eps!r}")
    return float(eps)


def slerp(a: Tensor, b: Tensor, t: float | Tensor, *, eps: float = 1e-7) -> Tensor:
    """Spherical linear interpolation from ``a`` (t = 0) to ``b`` (t = 1), over the flattened tensors.

    The norm is interpolated linearly and the direction along the great circle:

        r(t) = ((1 - t) |a| + t |b|) * (sin((1 - t) theta) a^ + sin(t theta) b^) / sin(theta)

    with ``a^ = a / |a|``, ``b^ = b / |b|``, ``theta = acos(a^ . b^)`` (the textbook SLERP of the unit vectors,
    rescaled). Degenerate cases, all finite with finite gradients:

    - either input zero: linear interpolation ``(1 - t) a + t b`` (no direction to follow);
    - parallel (``1 - cos theta <= eps``): the normalised linear mix of the directions (its limit), times the norm;
    - opposite (``1 + cos theta <= eps``): the great circle is not unique; we fall back to linear interpolation
      ``(1 - t) a + t b``, deterministic and continuous in t, exact at t = 0 (a) and t = 1 (b). Two opposite heads
      of equal norm merge to zero at t = 1/2: the models disagree completely, and no direction is preferred.
      (The public code returns NaN for parallel inputs.)

    Args:
        a, b: float tensors of one shape, dtype and device (e.g. a task head's weight).
        t: a float in [0, 1], or a 0-dim float tensor on the device of ``a`` or on the CPU. A CPU tensor's value
            is checked like a float's (outside torch.compile and with value checks on); a tensor on an
            accelerator is not, as reading it would wait for the device.
        eps: tolerance on ``|cos theta|`` for the parallel / opposite cases, a float in [0, 1): 0 takes only
            exactly (anti)parallel inputs as such; from 1 on, the two cases would overlap (orthogonal inputs
            counting as both) and every pair of inputs would be degenerate.

    Returns:
        A tensor of the shape and dtype of ``a``. The scalars (norms, angle) are computed in float64.
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a float tensor; got {describe(x)}")
    if b.shape != a.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} like a; got {describe(b)}")
    if b.dtype != a.dtype:
        raise TypeError(f"b: expected dtype {a.dtype} like a; got {describe(b)}")
    if b.device != a.device:
        raise ValueError(f"b: expected a tensor on {a.device} like a; got {describe(b)}")
    if not is_real(eps):
        raise TypeError(f"eps: expected a float in [0, 1); got {eps!r}")
    if not (is_finite(eps) and 0 <= eps < 1):
        raise ValueError(f"eps: expected a finite float in [0, 1) (the tolerance on |cos theta|; from 1 on the "
                         f"parallel and opposite cases overlap); got {eps!r}")
    if isinstance(t, Tensor):
        if t.dim() != 0 or not t.is_floating_point():
            raise ValueError(f"t: expected a float in [0, 1] or a 0-dim float tensor; got {describe(t)}")
        if t.device != a.device and t.device.type != "cpu":
            raise ValueError(f"t: expected a tensor on {a.device} like a, or on the CPU; got {describe(t)}")
        # A CPU value is read without waiting for any device; outside [0, 1] the formula extrapolates silently.
        if t.device.type == "cpu" and not values_hidden(t):
            value = float(t.detach())
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"t: expected a value in [0, 1]; got a 0-dim tensor holding {value!r}")
        t = t.to(device=a.device, dtype=torch.float64)
    elif not is_real(t) or not 0.0 <= t <= 1.0:
        raise ValueError(f"t: expected a float in [0, 1]; got {t!r}")
    else:
        t = torch.tensor(float(t), dtype=torch.float64, device=a.device)
    eps = float(eps)

    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    norm_a, norm_b = vector_norm(x, dim=0), vector_norm(y, dim=0)
    linear = (1 - t) * x + t * y
    degenerate = (norm_a == 0) | (norm_b == 0)
    one = torch.ones((), dtype=torch.float64, device=a.device)
    ux = x / torch.where(degenerate, one, norm_a)
    uy = y / torch.where(degenerate, one, norm_b)
    cos = (ux * uy).sum().clamp(-1.0, 1.0)
    parallel = ~degenerate & (cos >= 1 - eps)
    opposite = ~degenerate & (cos <= -1 + eps)
    generic = ~(degenerate | parallel | opposite)
    # The angle is taken from a safe cosine outside the generic case: acos' gradient is infinite at +-1.
    theta = torch.acos(torch.where(generic, cos, torch.zeros((), dtype=torch.float64, device=a.device)))
    sin = torch.sin(theta)
    great_circle = (torch.sin((1 - t) * theta) * ux + torch.sin(t * theta) * uy) / sin
    mixed = (1 - t) * ux + t * uy
    near = mixed / torch.where(parallel, vector_norm(mixed, dim=0), one)
    direction = torch.where(generic, great_circle, near)
    spherical = ((1 - t) * norm_a + t * norm_b) * direction
    out = torch.where(generic | parallel, spherical, linear)
    return out.reshape(a.shape).to(a.dtype)
