"""MolBind's multi-pair contrastive objective as a module, on :func:`pyblend.ops.multi_infonce`.

:class:`MultiPairContrastive` holds what MolBind's model holds around its loss: the modality pairs and their
weights, the temperature (MolBind: fixed 0.1; here also learnable, stored as CLIP's ``logit_scale = log(1 /
temperature)``), and optionally one projection head per modality (MolBind: ``Linear(d_in, 512)`` then L2
normalisation, which the op fuses). Across ranks it gathers as the op does (``gather=``; see
:mod:`pyblend.ops.multi_infonce` for what each rank gets back and how to scale under DDP).

Example (MolBind's four pairs, 0.25 each)::

    loss_fn = MultiPairContrastive(
        [("graph", "text"), ("conformer", "text"), ("graph", "conformer"), ("conformer", "pocket")],
        weights=[0.25] * 4, temperature=0.1,
        projections={"graph": 300, "text": 768, "conformer": 512, "pocket": 512})
    loss = loss_fn({"graph": g, "text": t, "conformer": c, "pocket": p}, masks={"pocket": has_pocket})
"""
from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._checks import (as_tensor, check_flag, check_linear_input, check_module_backend, check_positive_float,
                           check_sample_mask, describe, is_int, is_real)
from ..ops.multi_infonce import check_distinct, check_unique_pairs, pair_weights

__all__ = ["MultiPairContrastive"]


class MultiPairContrastive(nn.Module):
    """Weighted sum of symmetric InfoNCE losses over modality pairs, with masks for missing modalities.

    Args:
        pairs: ``(a, b)`` names of two different modalities.
        weights: one float per pair (default ``1 / len(pairs)`` each).
        temperature: the initial (learnable) or fixed temperature, a float > 0. MolBind: 0.1 fixed.
        learnable_temperature: learn it, as the parameter ``logit_scale = log(1 / temperature)`` (CLIP's).
        max_logit_scale: with a learnable temperature, clamp ``logit_scale`` to at most this in the forward
            (CLIP: ``log(100)``, i.e. temperature >= 0.01; the initial ``temperature`` must be at least
            ``exp(-max_logit_scale)``); None: no clamp. Beyond the cap the clamp's gradient is 0, as CLIP's: once
            an optimizer step takes ``logit_scale`` past it, the loss no longer pulls it back (momentum or weight
            decay alone move it) and the temperature stays at the cap. To keep it learnable there, clamp the
            parameter itself after each step, as open_clip's training loop does::

                optimizer.step()
                with torch.no_grad():
                    loss_fn.logit_scale.clamp_(max=loss_fn.max_logit_scale)

            (at the cap exactly the gradient passes, so a step can lower it again).
        projections: modality name -> input width ``d_in``: a ``Linear(d_in, projection_dim)`` head for it
            (``self.projections[name]``), each a modality of some pair; modalities not listed are used as given.
            None: no heads.
        projection_dim: the heads' output width, an int > 0 (MolBind: 512).
        normalize: L2-normalise each embedding (after its head) before the similarities (MolBind does).
        gather: across ranks, "autograd" (default), "no_grad" (MolBind's public code) or None; see
            :func:`pyblend.ops.multi_infonce`.
        process_group: the ``torch.distributed`` group to gather over (None: the default group).
        backend: passed to the op ("triton" | "reference" | None automatic).
        device, dtype: where and in what dtype the parameters (heads, ``logit_scale``) are created.

    Shapes (forward):
        embeddings: modality -> ``(B, d)`` float tensor (``d = d_in`` for a modality with a head; else the two
            modalities of a pair need one ``d``); one dtype, ``B`` and device for all.
        masks: modality -> ``(B,)`` bool, True where the sample has the modality (absent rows are never read,
            and are zeroed before a head so that NaN there cannot reach its weight gradient).
        returns: a 0-dim float32 tensor (float64 for float64 inputs).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], weights: Sequence[float] | None = None, *,
                 temperature: float = 0.1, learnable_temperature: bool = False,
                 max_logit_scale: float | None = math.log(100.0),
                 projections: Mapping[str, int] | None = None, projection_dim: int = 512,
                 normalize: bool = True, gather: str | None = "autograd", process_group=None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
            raise ValueError(f"pairs: expected a non-empty list of (modality, modality) tuples; got {pairs!r}")
        for pair in pairs:
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2 or \
                    not all(isinstance(name, str) for name in pair):
                raise ValueError(f"pairs: expected (modality, modality) tuples of str; got {pair!r}")
            check_distinct(pair)
        self.pairs = [tuple(pair) for pair in pairs]
        check_unique_pairs(self.pairs)
        # Checked here, as the op would at every forward: a bad weight should not wait for the first batch.
        self.weights = pair_weights(weights, len(self.pairs))
        check_positive_float(temperature, "temperature")
        temperature = float(temperature)
        if gather not in ("autograd", "no_grad", None):
            raise ValueError(f"gather: expected 'autograd', 'no_grad' or None; got {gather!r}")
        check_module_backend(backend, "multi_infonce")
        if max_logit_scale is not None and (not is_real(max_logit_scale) or not math.isfinite(max_logit_scale)):
            raise ValueError(f"max_logit_scale: expected a finite float or None; got {max_logit_scale!r}")
        self.learnable_temperature = check_flag(learnable_temperature, "learnable_temperature")
        self.max_logit_scale = None if max_logit_scale is None else float(max_logit_scale)
        if self.learnable_temperature and self.max_logit_scale is not None:
            # Compared as the forward compares, in the parameter's dtype (log(100) rounds up in float32, and a
            # temperature of 0.01 starts exactly at the cap, where the gradient still passes); on the CPU, even
            # under a meta device context (deferred initialisation).
            initial, cap = torch.tensor([math.log(1.0 / temperature), self.max_logit_scale], dtype=dtype,
                                        device="cpu").tolist()
            if initial > cap:
                raise ValueError(
                    f"temperature: expected at least exp(-max_logit_scale) = {math.exp(-self.max_logit_scale):.4g} "
                    f"for a learnable temperature (logit_scale = log(1 / temperature) is clamped at "
                    f"max_logit_scale = {self.max_logit_scale:.4g} in the forward, past which its gradient is 0: it "
                    f"would run at exp(-max_logit_scale) and never move); got {temperature!r}. Raise max_logit_scale "
                    f"or pass None for no clamp")
        self.initial_temperature = float(temperature)
        if self.learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature), device=device, dtype=dtype))
            self.fixed_temperature = None
        else:
            self.register_parameter("logit_scale", None)
            self.fixed_temperature = float(temperature)
        if not is_int(projection_dim) or projection_dim < 1:
            raise ValueError(f"projection_dim: expected the heads' output width (int > 0); got {projection_dim!r}")
        self.projection_dim = int(projection_dim)
        if projections is not None and not isinstance(projections, Mapping):
            raise TypeError(f"projections: expected None or a dict of modality name -> input width; got "
                            f"{type(projections).__name__}")
        if projections:
            paired = {name for pair in self.pairs for name in pair}
            for name, width in projections.items():
                if not is_int(width) or width <= 0:
                    raise ValueError(f"projections[{name!r}]: expected an input width (int > 0); got {width!r}")
                if name not in paired:
                    raise ValueError(f"projections: modality {name!r} is in no pair (the pairs use "
                                     f"{sorted(paired)}), so its head would never be used")
            self.projections = nn.ModuleDict({name: nn.Linear(int(width), self.projection_dim, device=device,
                                                              dtype=dtype) for name, width in projections.items()})
        else:
            self.projections = None
        self.normalize = check_flag(normalize, "normalize")
        self.gather = gather
        self.process_group = process_group
        self.backend = backend

    def reset_parameters(self) -> None:
        """The learnable temperature back to its initial value (the heads reset themselves)."""
        if self.logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.fill_(math.log(1.0 / self.initial_temperature))

    @property
    def temperature(self) -> float | Tensor:
        """The temperature in use: the fixed float, or ``exp(-clamp(logit_scale))`` (a 0-dim tensor)."""
        if self.logit_scale is None:
            return self.fixed_temperature
        scale = self.logit_scale
        if self.max_logit_scale is not None:
            # The parameter starts float32-rounded (log(100) rounds up): in float64, after .double(), it must still
            # sit at the cap, not past it where the gradient is 0.
            float32_cap = struct.unpack("f", struct.pack("f", self.max_logit_scale))[0]
            scale = scale.clamp(max=max(self.max_logit_scale, float32_cap))
        return torch.exp(-scale)

    def project(self, embeddings: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict:
        """The embeddings after their heads (unnormalised): modality -> ``(B, projection_dim)`` for a modality with
        a head, the input ``(B, d)`` otherwise."""
        if not isinstance(embeddings, Mapping):
            raise TypeError(f"embeddings: expected a dict of modality name -> (B, d) tensor; "
                            f"got {type(embeddings).__name__}")
        if masks is not None and not isinstance(masks, Mapping):
            raise TypeError(f"masks: expected None or a dict of modality name -> (B,) bool tensor; "
                            f"got {type(masks).__name__}")
        out = dict(embeddings)
        if self.projections is None:
            return out
        masks = masks or {}
        for name, head in self.projections.items():
            if name not in out:
                continue
            x = self._head_input(name, out[name], head.weight)
            if name in masks:  # NaN * 0 in the head's weight gradient would be NaN
                mask = check_sample_mask(masks[name], f"masks[{name!r}]", x.shape[0], x.device)
                x = torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
            out[name] = head(x)
        return out

    @staticmethod
    def _head_input(name: str, x, weight: Tensor) -> Tensor:
        """Checked before the head, whose matmul would fail with a message naming no modality."""
        label = f"embeddings[{name!r}]"
        x = as_tensor(x, label)
        if not x.is_floating_point():
            raise TypeError(f"{label}: expected a float tensor (B, d_in); got {describe(x)}")
        if x.dim() != 2 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"{label}: expected shape (B, d_in) = (?, {weight.shape[1]}), the input width of "
                             f"projections[{name!r}]; got {describe(x)}")
        check_linear_input(x, label, weight, f"projections[{name!r}]'s weight")
        return x

    def forward(self, embeddings: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """``embeddings``: modality -> ``(B, d)``; ``masks``: modality -> ``(B,)`` bool or None. Returns the 0-dim
        loss (across ranks: the global loss; see :func:`pyblend.ops.multi_infonce`)."""
        projected = self.project(embeddings, masks)
        dtypes = {x.dtype for x in projected.values() if isinstance(x, Tensor)}
        if len(dtypes) > 1:  # under autocast the heads give 16 bits and unprojected modalities keep theirs
            common = functools.reduce(torch.promote_types, dtypes)
            projected = {name: x.to(common) if isinstance(x, Tensor) else x for name, x in projected.items()}
        return ops.multi_infonce(projected, self.pairs, weights=self.weights, temperature=self.temperature,
                                 masks=masks, normalize=self.normalize, backend=self.backend, gather=self.gather,
                                 process_group=self.process_group)

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{a}-{b}: {w:g}" for (a, b), w in zip(self.pairs, self.weights))
        if self.logit_scale is None:
            temperature = f"temperature={self.fixed_temperature:g} (fixed)"
        else:
            clamp = "" if self.max_logit_scale is None else f", max_logit_scale={self.max_logit_scale:.4g}"
            if self.logit_scale.is_meta:  # deferred initialisation: no value yet
                temperature = f"temperature=? (learnable{clamp})"
            else:  # the one in use: past the cap, the clamped one
                temperature = f"temperature={float(self.temperature.detach()):.4g} (learnable{clamp})"
        parts = [f"pairs=[{pairs}]", temperature]
        if self.projections is not None:
            parts.append(f"projection_dim={self.projection_dim}")
        parts.append(f"normalize={self.normalize}")
        parts.append(f"gather={self.gather!r}")
        return ", ".join(parts)
