"""Backend choice for pyblend ops.

Each op lists the backends it has; each backend says why it cannot run given inputs (an empty list means it
can). Without a request, CUDA tensors go to Triton and CPU tensors to the C++ engine (data-pipeline ops) or the
plain-PyTorch reference. A request comes from the op's ``backend=`` argument or the ``PYBLEND_BACKEND``
environment variable; a request that cannot be met raises with every reason, never silently falls back. Without a
request, CUDA inputs the kernels cannot take run on the reference with a warning that names the reasons (once
per op and reasons, as SDPA warns when its fused kernels refuse inputs); other fallbacks log at DEBUG.

Only the reference has forward-mode derivatives: the Triton and C++ ops register a backward alone, and under
``torch.func.jvp`` or ``torch.autograd.forward_ad`` their outputs would carry a zero tangent, silently. Inputs that
carry a tangent therefore make those backends refuse, as for any other input they cannot take.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.autograd import forward_ad

from .._extension import extension_available

logger = logging.getLogger("pyblend.ops")
_WARNED: set[tuple[str, str]] = set()

BACKENDS = ("triton", "cpp", "reference")
_PREFERENCE = {"cuda": ["triton", "reference", "cpp"], "cpu": ["cpp", "reference", "triton"]}


def triton_reasons(device: torch.device, *dtypes: torch.dtype) -> list[str]:
    """Why Triton cannot run an op on ``device`` whose floating inputs have ``dtypes`` (empty: it can)."""
    reasons = []
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reasons.append(f"tensors are on {device.type}; Triton needs CUDA tensors (or TRITON_INTERPRET=1 set "
                       "before triton is imported, to run its interpreter on the CPU)")
    elif device.type != "cuda" and torch.bfloat16 in dtypes:
        # Seen with triton 3.6: a 16 x 16 bfloat16 tl.dot off by 1e10, and the ops' outputs by 1e9, silently.
        reasons.append("Triton's interpreter computes bfloat16 wrongly (its bfloat16 casts, arithmetic and tl.dot); "
                       "bfloat16 needs CUDA tensors, float16 and float32 run in the interpreter")
    try:
        import triton  # noqa: F401
    except ImportError as error:
        reasons.append(f"triton is not importable ({error})")
    return reasons


def cpp_reasons(device: torch.device) -> list[str]:
    reasons = []
    if device.type != "cpu":
        reasons.append(f"the C++ engine runs on CPU tensors, got {device.type} tensors")
    if not extension_available():
        reasons.append("pyblend._C is not built (`make build`, or `pip install --no-build-isolation -e .`)")
    return reasons


def forward_ad_reasons(inputs) -> list[str]:
    """The reason a backend without forward-mode derivatives refuses ``inputs`` (tensors, None, or lists, tuples
    and dicts of them), or none. Outside a forward-AD level (the usual case) this costs one attribute read."""
    if torch.compiler.is_compiling() or getattr(forward_ad, "_current_level", 0) < 0:
        return []
    pending = [inputs]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, torch.Tensor) and forward_ad.unpack_dual(item).tangent is not None:
            return ["an input carries a forward-mode AD tangent (torch.func.jvp, torch.autograd.forward_ad); "
                    "only the reference has forward-mode derivatives"]
    return []


def choose_backend(op: str, requested: str | None, device: torch.device,
                   candidates: dict[str, Callable[[], Sequence[str]]], inputs=()) -> str:
    """Return the backend ``op`` runs on.

    Args:
        op: the op's name, for messages.
        requested: ``backend=`` as the caller gave it (None: ``PYBLEND_BACKEND``, else automatic).
        device: where the inputs live.
        candidates: the op's backends: name -> function returning the reasons it cannot run (empty: it can).
            Automatic choice prefers Triton on CUDA, and the C++ engine then the reference on the CPU (Triton's
            interpreter runs only on request).
        inputs: the op's differentiable inputs (tensors, or lists, tuples and dicts of them): every backend but
            the reference refuses them when they carry forward-mode AD tangents.
    """
    tangent_reasons = forward_ad_reasons(inputs)
    if tangent_reasons:
        candidates = {name: (reasons if name == "reference" else
                             lambda reasons=reasons: [*reasons(), *tangent_reasons])
                      for name, reasons in candidates.items()}
    source = "backend"
    if requested is None:
        requested = os.environ.get("PYBLEND_BACKEND") or None
        source = "backend (from the environment variable PYBLEND_BACKEND)"
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: {source} must be one of {BACKENDS} or None, got {requested!r}")
        if requested not in candidates:
            raise ValueError(f"{op}: has no {requested!r} backend, asked for by {source}; "
                             f"it has {sorted(candidates)}")
        reasons = list(candidates[requested]())
        if reasons:
            raise ValueError(f"{op}: {source} {requested!r} cannot run these inputs: " + "; ".join(reasons))
        return requested
    preference = _PREFERENCE["cuda" if device.type == "cuda" else "cpu"]
    refused = {}
    for name in sorted(candidates, key=preference.index):
        reasons = list(candidates[name]())
        if not reasons:
            if refused:
                message = f"{op}: runs on the {name} backend; skipped " + "; ".join(
                    f"{skipped}: {', '.join(why)}" for skipped, why in refused.items())
                # Not while compiling: a warning would break a fullgraph trace, and eager calls warn anyway.
                if device.type == "cuda" and (op, message) not in _WARNED and not torch.compiler.is_compiling():
                    _WARNED.add((op, message))
                    warnings.warn(message + " (pass backend= to choose one)", stacklevel=3)
                logger.debug(message)
            return name
        refused[name] = reasons
    raise ValueError(f"{op}: no backend can run these inputs: " +
                     "; ".join(f"{name}: {', '.join(r)}" for name, r in refused.items()))
