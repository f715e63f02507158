"""Dynamic multimodal fusion (IBM, "Dynamic Multi-Modal Fusion", eq. 1-5) on :func:`pyblend.ops.gated_fusion`.

There is no public code; this follows the paper. Per sample, with the modalities in ``input_dims`` order:

    h_m      = project_m(x_m)                       Linear(d_m, dim): every modality to the common width
    g_m      = softmax_dim(gate_m(h_m))             eq. 1, gate_m = Linear(dim, dim) is W_s (per modality)
    x~_m     = gate_scale * g_m * h_m               eq. 2 (gate_scale 1, or dim with rescale_gate=True)
    s        = softmax over the present modalities of score_m(h_m),   score_m = Linear(dim, 1)
    fused    = sum_m s_m x~_m                       eq. 3: missing modalities get s_m = 0 exactly
    H        = -sum_m s_m log(s_m + eps)            eq. 4
    L_rec    = mean over modalities of the MSE of decode_m(fused) = Linear(dim, d_m) against x_m, over the
               samples where modality m is present (every present modality is reconstructed from the fused one)
    L_total  = L_rec - entropy_weight * mean_b(H)   eq. 5, with the sign of the paper's intent (below)

**The entropy sign.** Eq. 5 as printed is ``L_rec + lambda * L_entropy`` with ``L_entropy = -sum s log s`` (eq.
4), the entropy itself; minimising it would push the weights towards one modality, the collapse the paper says
the term counteracts ("promotes diversity", "a higher lambda enforces greater modality diversity"). We implement
the intent: the regulariser is the *negative* entropy, ``L_total = L_rec - lambda * H``, so a larger
``entropy_weight`` spreads the weights. ``last_entropy`` holds ``H`` itself (>= 0).

**Choices the paper leaves open.** The score ``s`` is computed from each modality's projected embedding
``h_m`` (the paper does not say from what); the gating network reads ``h_m`` (the projection to the common width
comes first, so all gates have one shape). Reconstruction targets are the original embeddings, detached (the
fusion learns to reconstruct them; it does not move them). Modality dropout (the paper omits modalities at
random in training): in training mode each present modality of a sample is dropped with probability
``modality_dropout``; where that would drop every present modality of a sample, one of them, chosen uniformly,
is kept. A dropped modality still counts as present for the reconstruction (the fused embedding learns to
reconstruct it from the others).

**Missing modalities.** ``present[name]`` is a ``(B,)`` bool mask; a modality absent from ``embeddings`` is
missing for every sample. A missing modality's values are never read: NaN there reaches neither the output nor
a gradient (the inputs are zero-filled with ``torch.where`` before the projection, and the op never reads a
missing slot). A sample with no present modality is a ValueError naming it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._checks import (check_flag, check_generator, check_linear_input, check_module_backend,
                           check_positive_float, describe, is_int, is_real)

__all__ = ["DynamicFusion"]


class DynamicFusion(nn.Module):
    """Intra-modal soft gating + inter-modal gated sum of M modality embeddings of different widths (IBM
    Dynamic Fusion), with its self-supervised objective (reconstruction + entropy regulariser). See the module
    docstring for the formulas and the entropy sign.

    Args:
        input_dims: modality name -> its embedding width ``d_m`` (e.g. ``{"smiles": 768, "selfies": 1024}``);
            the order fixes the columns of the returned weights.
        dim: the common width C of the fused embedding.
        entropy_weight: lambda of eq. 5 (>= 0); the loss subtracts ``lambda * mean entropy`` (more diversity).
        modality_dropout: probability, in training mode, of dropping each present modality of each sample (never
            the last present one of a sample).
        rescale_gate: multiply the gated feature by ``dim`` so that an all-equal gate is the identity (the
            paper's eq. 2 leaves each feature scaled by ~1/dim). Default False: the paper's.
        eps: eq. 4's stabiliser.
        bias: whether the linear maps have a bias.
        backend: passed to :func:`pyblend.ops.gated_fusion` (None: automatic).
        device, dtype: where and how the parameters are created (as ``nn.Linear``).

    Parameters (``nn.ModuleDict`` keyed by modality): ``project[m] = Linear(d_m, dim)``, ``gate[m] =
    Linear(dim, dim)`` (W_s), ``score[m] = Linear(dim, 1)``, ``decode[m] = Linear(dim, d_m)``.

    ``forward(embeddings, present=None, *, generator=None) -> (fused (B, dim), weights (B, M))`` and sets
    ``last_entropy`` ``(B,)`` and ``last_present`` ``(B, M)`` (the mask after modality dropout; neither is
    copied or pickled with the module); ``loss(embeddings, present=None, *, generator=None)`` runs it and returns
    eq. 5's total.
    """

    def __init__(self, input_dims: Mapping[str, int], dim: int, *, entropy_weight: float = 0.01,
                 modality_dropout: float = 0.0, rescale_gate: bool = False, eps: float = 1e-8, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(input_dims, Mapping) or not input_dims:
            raise ValueError(f"input_dims: expected a non-empty dict of modality name -> width; got {input_dims!r}")
        for name, width in input_dims.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"input_dims: expected modality names as non-empty str; got {name!r}")
            if not is_int(width) or width < 1:
                raise ValueError(f"input_dims[{name!r}]: expected a positive int; got {width!r}")
        if not is_int(dim) or dim < 1:
            raise ValueError(f"dim: expected a positive int; got {dim!r}")
        if not is_real(entropy_weight) or not (math.isfinite(entropy_weight) and entropy_weight >= 0):
            raise ValueError(f"entropy_weight: expected a finite float >= 0; got {entropy_weight!r}")
        if not is_real(modality_dropout) or not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout: expected a float in [0, 1); got {modality_dropout!r}")
        rescale_gate = check_flag(rescale_gate, "rescale_gate")
        bias = check_flag(bias, "bias")
        check_positive_float(eps, "eps")
        check_module_backend(backend, "gated_fusion")
        input_dims = {name: int(width) for name, width in input_dims.items()}
        dim = int(dim)
        self.input_dims = input_dims
        self.modalities = list(self.input_dims)
        self.dim = dim
        self.entropy_weight = float(entropy_weight)
        self.modality_dropout = float(modality_dropout)
        self.rescale_gate = rescale_gate
        self.eps = float(eps)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.project = nn.ModuleDict({m: nn.Linear(d, dim, bias=bias, **factory) for m, d in input_dims.items()})
        self.gate = nn.ModuleDict({m: nn.Linear(dim, dim, bias=bias, **factory) for m in input_dims})
        self.score = nn.ModuleDict({m: nn.Linear(dim, 1, bias=bias, **factory) for m in input_dims})
        self.decode = nn.ModuleDict({m: nn.Linear(dim, d, bias=bias, **factory) for m, d in input_dims.items()})
        self.last_entropy: Tensor | None = None
        self.last_present: Tensor | None = None

    def __getstate__(self) -> dict:
        # The last forward's outputs hold its autograd graph, which copy.deepcopy (an EMA or best-model copy) and
        # pickling refuse: a copy starts without them.
        state = super().__getstate__()
        state.update(last_entropy=None, last_present=None)
        return state

    @property
    def gate_scale(self) -> float:
        return float(self.dim) if self.rescale_gate else 1.0

    def extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, dim={self.dim}, entropy_weight={self.entropy_weight}, "
                f"modality_dropout={self.modality_dropout}, rescale_gate={self.rescale_gate}, eps={self.eps}")

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Fuse.

        Args:
            embeddings: modality name -> ``(B, d_m)`` float tensor; any subset of ``input_dims`` (a modality left
                out is missing for every sample).
            present: modality name -> ``(B,)`` bool, True = present; a modality without a mask is present in every
                sample. None: every given modality is present.
            generator: the ``torch.Generator`` for modality dropout (training mode only); None uses the global RNG.

        Returns:
            ``(fused (B, dim), weights (B, M))``: the weights float32, columns in ``input_dims`` order, summing to
            1 over each sample's (kept) modalities, exactly 0 at missing or dropped ones.
        """
        check_generator(generator)
        inputs, mask = self._inputs(embeddings, present)
        kept = self._drop(mask, generator) if self.training and self.modality_dropout > 0 else mask
        projections = {name: self.project[name](x) for name, x in inputs.items()}
        # A modality missing everywhere gets zeros (never read by the op) in the dtype the given ones were projected
        # to: under autocast that is 16-bit, not the parameters' dtype, and torch.stack would promote h to float32
        # while the gate and score logits stay 16-bit.
        given = next(iter(projections.values()))
        h, gate_logits, score_logits = [], [], []
        for name in self.modalities:
            projected = projections[name] if name in projections else given.new_zeros(given.shape[0], self.dim)
            h.append(projected)
            gate_logits.append(self.gate[name](projected))
            score_logits.append(self.score[name](projected))
        h = torch.stack(h, dim=1)
        fused, weights, entropy = ops.gated_fusion(h, torch.stack(gate_logits, dim=1),
                                                   torch.cat(score_logits, dim=1), kept, eps=self.eps,
                                                   gate_scale=self.gate_scale, backend=self.backend)
        self.last_entropy = entropy
        self.last_present = kept
        return fused, weights

    def reconstruction_loss(self, fused: Tensor, embeddings: Mapping[str, Tensor],
                            present: Mapping[str, Tensor] | None = None) -> Tensor:
        """Eq. 5's reconstruction term: the mean over modalities (those present in at least one sample) of
        ``mean((decode_m(fused) - x_m)^2)`` over the samples where ``m`` is present (``present`` as given, before
        any modality dropout), targets detached. A float32 0-dim tensor (float64 for a float64 module)."""
        inputs, mask = self._inputs(embeddings, present)
        if fused.dim() != 2 or fused.shape != (mask.shape[0], self.dim):
            raise ValueError(f"fused: expected shape (B, dim) = ({mask.shape[0]}, {self.dim}); got {describe(fused)}")
        check_linear_input(fused, "fused", next(iter(self.decode.values())).weight, "the module's parameters")
        compute = torch.float64 if fused.dtype == torch.float64 else torch.float32
        total = fused.new_zeros((), dtype=compute)
        count = fused.new_zeros((), dtype=compute)
        for index, name in enumerate(self.modalities):
            if name not in inputs:
                continue
            rows = mask[:, index]
            target = inputs[name].detach().to(compute)
            error = (self.decode[name](fused).to(compute) - target).square()
            error = torch.where(rows[:, None], error, 0.0)
            present_rows = rows.sum().to(compute)
            total = total + error.sum() / (present_rows * target.shape[1]).clamp(min=1)
            count = count + (present_rows > 0).to(compute)
        return total / count.clamp(min=1)

    def loss(self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None, *,
             generator: torch.Generator | None = None) -> Tensor:
        """Eq. 5 with the diversity-promoting sign: ``reconstruction_loss - entropy_weight * mean(entropy)``.
        Runs the forward (modality dropout included in training mode)."""
        fused, _ = self(embeddings, present, generator=generator)
        return self.objective(fused, embeddings, present)

    def objective(self, fused: Tensor, embeddings: Mapping[str, Tensor],
                  present: Mapping[str, Tensor] | None = None) -> Tensor:
        """:meth:`loss` for a ``fused (B, dim)`` this module's last forward returned (its entropy is reused),
        so a model that already ran the forward does not run it again. An empty batch gives 0 for each term."""
        entropy = self.last_entropy
        if entropy is None:
            raise RuntimeError("objective: reuses the entropy of this module's last forward, and there was none "
                               "(or the module was copied since); call the module first, or use loss()")
        if fused.dim() != 2 or fused.shape[0] != entropy.shape[0]:
            raise ValueError(f"fused: expected the (B, dim) output of this module's last forward, B = "
                             f"{entropy.shape[0]}; got {describe(fused)}")
        reconstruction = self.reconstruction_loss(fused, embeddings, present)
        mean_entropy = entropy.to(reconstruction.dtype).sum() / max(entropy.shape[0], 1)
        return reconstruction - self.entropy_weight * mean_entropy

    # ----------------------------------------------------------------------------------------- helpers

    def _inputs(self, embeddings, present) -> tuple[dict[str, Tensor], Tensor]:
        """Validated inputs, missing rows zero-filled, and the ``(B, M)`` presence mask."""
        if not isinstance(embeddings, Mapping) or not embeddings:
            raise TypeError("embeddings: expected a non-empty dict of modality name -> (B, d_m) tensor; got "
                            f"{type(embeddings).__name__ if not isinstance(embeddings, Mapping) else 'an empty dict'}")
        first_name = None
        for name, x in embeddings.items():
            label = f"embeddings[{name!r}]"
            if name not in self.input_dims:
                raise ValueError(f"{label}: unknown modality; this DynamicFusion has {self.modalities}")
            if not isinstance(x, Tensor):
                raise TypeError(f"{label}: expected a torch.Tensor; got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{label}: expected a float tensor; got {describe(x)}")
            if x.dim() != 2 or x.shape[1] != self.input_dims[name]:
                raise ValueError(f"{label}: expected shape (B, d_m) = (?, {self.input_dims[name]}); "
                                 f"got {describe(x)}")
            # Before project[name], whose matmul would fail naming neither the modality nor what it expects.
            check_linear_input(x, label, self.project[name].weight, "the module's parameters")
            if first_name is None:
                first_name, first = name, x
            elif x.shape[0] != first.shape[0]:
                raise ValueError(f"{label}: expected batch size B = {first.shape[0]} like "
                                 f"embeddings[{first_name!r}]; got {describe(x)}")
            elif x.device != first.device:
                raise ValueError(f"{label}: expected a tensor on {first.device} like embeddings[{first_name!r}]; "
                                 f"got {describe(x)}")
        batch = first.shape[0]
        present = {} if present is None else present
        if not isinstance(present, Mapping):
            raise TypeError(f"present: expected None or a dict of modality name -> (B,) bool tensor; got "
                            f"{type(present).__name__}")
        for name, mask in present.items():
            label = f"present[{name!r}]"
            if name not in embeddings:
                raise ValueError(f"{label}: modality {name!r} is not in embeddings (which has {sorted(embeddings)})")
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (batch,):
                got = describe(mask) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"{label}: expected a bool tensor of shape (B,) = ({batch},); got {got}")
            if mask.device != first.device:
                raise ValueError(f"{label}: expected a tensor on {first.device} like the embeddings; "
                                 f"got {describe(mask)}")
        columns, inputs = [], {}
        for name in self.modalities:
            if name not in embeddings:
                columns.append(torch.zeros(batch, dtype=torch.bool, device=first.device))
                continue
            x = embeddings[name]
            if name in present:
                x = torch.where(present[name][:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
                columns.append(present[name])
            else:
                columns.append(torch.ones(batch, dtype=torch.bool, device=first.device))
            inputs[name] = x
        return inputs, torch.stack(columns, dim=1)

    def _drop(self, mask: Tensor, generator: torch.Generator | None) -> Tensor:
        """Drop each present modality with probability ``modality_dropout``, keeping (uniformly at random) one
        present modality of a sample that would lose them all."""
        where = mask.device if generator is None else generator.device
        draws = torch.rand((2, *mask.shape), generator=generator, device=where).to(mask.device)
        kept = mask & (draws[0] >= self.modality_dropout)
        priority = torch.where(mask, draws[1], -1.0)
        rescue = torch.zeros_like(mask).scatter_(1, priority.argmax(dim=1, keepdim=True), True) & mask
        return kept | (rescue & ~kept.any(dim=1, keepdim=True))
