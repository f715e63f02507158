"""MM-Lego (seed 004): :class:`LegoBlock`, :class:`LegoMerge` / :func:`lego_merge` (no training) and
:class:`LegoFuse` (stack / weave, for fine-tuning), plus the task losses the MM-Lego code trains with.

**LegoBlock.** Wraps a modality encoder (any ``nn.Module`` giving tokens ``(B, N, E)`` or one vector ``(B, E)``,
treated as one token; None = the input is already tokens) and a learned latent ``(l_c, l_d)``. Each of the
``depth`` steps is one :func:`pyblend.ops.fourier_cross_attention` call (semantics:
:mod:`pyblend.reference.fourier_cross_attention`): normalise the latent over its channels, FFT (2-D over
(l_c, l_d) with ``fft_dims=2``, the paper; 1-D over l_c with ``fft_dims=1``, the public code), cross-attend with
the real part as query and the (FFT of the) tokens as context, gated-SELU feed-forward, put the kept imaginary
part back, inverse FFT except after the last step. The task head reads the frequency-domain latent:
``Linear(LayerNorm(mean over l_c of Re L))``.

Parameter names (one :class:`LegoLayer` per step, or one shared by every step with ``weight_sharing=True``)::

    latent                                  (l_c, l_d)      learned latent, torch.randn init (public code)
    layers.{i}.attention.norm               LayerNorm(l_d)  PreNorm of the query (Re FFT of the latent)
    layers.{i}.attention.context_norm       LayerNorm(E)    PreNorm of the context
    layers.{i}.attention.to_q               Linear(l_d, heads*head_dim, bias=False)
    layers.{i}.attention.to_kv              Linear(E, 2*heads*head_dim, bias=False)   keys first, then values
    layers.{i}.attention.to_out             Linear(heads*head_dim, l_d)   (then LeakyReLU(0.01), in the op)
    layers.{i}.feed_forward.norm            LayerNorm(l_d)
    layers.{i}.feed_forward.w_in            Linear(l_d, 2*ff_mult*l_d)    value first, then the SELU gate
    layers.{i}.feed_forward.w_out           Linear(ff_mult*l_d, l_d)
    head.norm, head.linear                  LayerNorm(l_d), Linear(l_d, outputs)
    encoder.*                               the wrapped encoder

**Missing modalities.** ``present (B,)`` False, or a sample whose ``mask`` row has no True, makes every step of
the block skip that sample (the op's rule: the latent is only normalised, and the last step returns its
spectrum). In :class:`LegoMerge` and :class:`LegoFuse` such a block does not count for that sample: the merge
uses only the present blocks' latents; in the fused chain the block's steps pass the latent on (normalised). An
input of None is a modality absent from every sample of the batch: the block's encoder does not run, and the
result is the one of that input given with ``present`` all False (the merge leaves the block out; in the fused
chain its steps get no token, so they only normalise the latent, as for an absent sample).

**LegoMerge** (no training): each block computes its frequency-domain latent from its own modality;
:func:`pyblend.ops.merge_latents` merges them per sample over the present blocks (harmonic mean of magnitudes,
circular mean of phases by default); the task heads are merged parameter tensor by parameter tensor with
:func:`pyblend.ops.lego_merge.slerp` (or linearly). For M blocks the merge is a running one: ``w <- w_1``, then
``w <- slerp(w, w_m, 1/m)`` for m = 2..M (t = 1/2 for two blocks). With ``head_method="linear"`` this is exactly
the mean; with SLERP it is the usual incremental approximation of the spherical mean (depends on block order for
M > 2, exact for M = 2). The merged head is a new trainable :class:`LegoHead` holding copies, made when the
LegoMerge is built (call :meth:`LegoMerge.merge_heads` again after changing the blocks). It is derived state:
``reset_parameters()`` (the LegoMerge's / LegoFuse's, or that of the head's LayerNorm and Linear) merges the
blocks' current heads again, in place, so deferred initialisation (build on the meta device, ``to_empty()``, then
``reset_parameters()`` on every submodule in ``modules()`` or ``apply()`` order, which reset the blocks first)
gives the model built directly from the reset blocks. Nothing else is derived: the merged latent is computed in
each forward, and LegoFuse's chain starts from ``blocks[0].latent`` itself.

**LegoFuse** (fine-tuning): one chain of LegoBlock steps over one latent, starting from the first block's learned
latent. ``"stack"`` runs block 1's steps, then block 2's, ...; ``"weave"`` runs, for step j = 0, 1, ..., step j
of every block (blocks with fewer steps drop out). The chain is treated as one long block: every step but the
last of the whole chain applies the inverse FFT, so each step sees a spatial-domain latent as in unimodal
training, and the merged head reads the last step's spectrum. (The public code passes the last step's
frequency-domain real part into the next block when stacking, and weaves only the first layer of each block
without FFTs: quirks we do not copy.) LegoFuse holds the blocks themselves, not copies: fine-tuning it trains
them (``copy.deepcopy`` the blocks first to keep the unimodal ones).

**Unpaired training.** Blocks are trained separately (each on the samples that have its modality, which need not
overlap); at inference a sample missing a modality passes ``present`` False for that block and is merged / fused
from the others.

**Losses.** :func:`survival_nll_loss` (discrete-time survival, MCAT / PORPOISE / MM-Lego ``nll_loss``),
:func:`survival_risk`, :func:`classification_loss`. Metrics (c-index, ROC-AUC) are in :mod:`pyblend.metrics`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._values import values_hidden
from ..ops._checks import (as_tensor, check_flag, check_linear_input, check_module_backend, check_positive_float,
                           check_same_device, describe, is_int, is_real)
from ..ops.fourier_cross_attention import fourier_cross_attention
from ..ops.lego_merge import MERGE_METHODS, merge_eps, merge_latents, slerp

__all__ = [
    "LegoAttention",
    "LegoBlock",
    "LegoFeedForward",
    "LegoFuse",
    "LegoHead",
    "LegoLayer",
    "LegoMerge",
    "classification_loss",
    "lego_merge",
    "merge_heads",
    "survival_nll_loss",
    "survival_risk",
]

HEAD_METHODS = ("slerp", "linear")
FUSE_MODES = ("stack", "weave")


def _positive_int(value, name: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int; got {value!r}")
    return int(value)


class LegoAttention(nn.Module):
    """Parameters of a LegoBlock step's cross-attention (PreNorm on the latent and on the context)."""

    def __init__(self, l_d: int, context_dim: int, heads: int, head_dim: int, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(l_d, **factory)
        self.context_norm = nn.LayerNorm(context_dim, **factory)
        self.to_q = nn.Linear(l_d, heads * head_dim, bias=False, **factory)
        self.to_kv = nn.Linear(context_dim, 2 * heads * head_dim, bias=False, **factory)
        self.to_out = nn.Linear(heads * head_dim, l_d, **factory)


class LegoFeedForward(nn.Module):
    """Parameters of a LegoBlock step's gated-SELU feed-forward (PreNorm): ``w_out(h * selu(g))``,
    ``(h, g) = split(w_in(norm(u)))``."""

    def __init__(self, l_d: int, mult: int, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(l_d, **factory)
        self.w_in = nn.Linear(l_d, 2 * mult * l_d, **factory)
        self.w_out = nn.Linear(mult * l_d, l_d, **factory)


class LegoLayer(nn.Module):
    """One LegoBlock step's parameters: ``attention`` and ``feed_forward``."""

    def __init__(self, l_d: int, context_dim: int, heads: int, head_dim: int, ff_mult: int, *, device=None,
                 dtype=None):
        super().__init__()
        self.attention = LegoAttention(l_d, context_dim, heads, head_dim, device=device, dtype=dtype)
        self.feed_forward = LegoFeedForward(l_d, ff_mult, device=device, dtype=dtype)


class LegoHead(nn.Module):
    """Task head on a frequency-domain latent: ``linear(norm(mean over l_c of Re L))``.

    ``forward(latent (B, l_c, l_d) complex or real) -> (B, outputs)`` in the head's dtype."""

    _norm_type: type[nn.LayerNorm] = nn.LayerNorm
    _linear_type: type[nn.Linear] = nn.Linear

    def __init__(self, l_d: int, outputs: int, *, device=None, dtype=None):
        super().__init__()
        self.norm = self._norm_type(l_d, device=device, dtype=dtype)
        self.linear = self._linear_type(l_d, outputs, device=device, dtype=dtype)

    def forward(self, latent: Tensor) -> Tensor:
        real = latent.real if latent.is_complex() else latent
        return self.linear(self.norm(real.mean(dim=1).to(self.linear.weight.dtype)))


class LegoBlock(nn.Module):
    """A modality encoder wrapped with a learned latent updated by Fourier-domain cross-attention (MM-Lego).

    Args:
        input_dim: E, the width of the tokens the encoder produces (of the input itself without an encoder).
        outputs: the task head's width (classes, or survival bins).
        encoder: an ``nn.Module`` mapping the input ``x`` (anything it takes: a tensor, a dict, ...) to tokens
            ``(B, N, E)`` or one vector per sample ``(B, E)``; None: ``x`` is the tokens / vector.
        l_c, l_d: latent channels and dimensions (64, 64 as the public code).
        depth: number of steps (2).
        heads, head_dim: cross-attention heads and per-head width (8 x 64).
        temperature: softmax temperature (0.5: ``softmax(2 * q k^T / sqrt(head_dim))``).
        ff_mult: feed-forward expansion (4).
        weight_sharing: one :class:`LegoLayer` shared by every step (True, the public code) or one per step.
        fft_dims: 2 (the paper: 2-D FFT over (l_c, l_d)) or 1 (the public code: over l_c).
        token_fft: attend to ``Re FFT`` of the tokens along the token axis (True, the public code) or to the raw
            tokens (False, the paper's eq. 3).
        normalize: L2-normalise the latent over its channels before each FFT (True).
        backend: passed to :func:`pyblend.ops.fourier_cross_attention` (None: automatic).
        device, dtype: where and how the parameters are created.

    ``forward(x, mask=None, present=None, latent=None, return_embeddings=False, final_inverse=False)``: see
    :meth:`forward`. Parameter names: the module docstring of :mod:`pyblend.nn.lego`.
    """

    def __init__(self, input_dim: int, outputs: int, encoder: nn.Module | None = None, *, l_c: int = 64,
                 l_d: int = 64, depth: int = 2, heads: int = 8, head_dim: int = 64, temperature: float = 0.5,
                 ff_mult: int = 4, weight_sharing: bool = True, fft_dims: int = 2, token_fft: bool = True,
                 normalize: bool = True, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        input_dim, outputs, l_c, l_d, depth, heads, head_dim, ff_mult = (
            _positive_int(value, name) for name, value in (
                ("input_dim", input_dim), ("outputs", outputs), ("l_c", l_c), ("l_d", l_d), ("depth", depth),
                ("heads", heads), ("head_dim", head_dim), ("ff_mult", ff_mult)))
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder: expected an nn.Module or None; got {type(encoder).__name__}")
        check_positive_float(temperature, "temperature")
        if not is_int(fft_dims) or fft_dims not in (1, 2):
            raise ValueError(f"fft_dims: expected 1 (FFT over l_c, the public code) or 2 (over (l_c, l_d), the "
                             f"paper); got {fft_dims!r}")
        fft_dims = int(fft_dims)
        weight_sharing = check_flag(weight_sharing, "weight_sharing")
        token_fft = check_flag(token_fft, "token_fft")
        normalize = check_flag(normalize, "normalize")
        check_module_backend(backend, "fourier_cross_attention")
        self.input_dim, self.outputs = input_dim, outputs
        self.l_c, self.l_d, self.depth = l_c, l_d, depth
        self.heads, self.head_dim, self.temperature, self.ff_mult = heads, head_dim, float(temperature), ff_mult
        self.weight_sharing, self.fft_dims, self.token_fft, self.normalize = \
            weight_sharing, fft_dims, token_fft, normalize
        self.backend = backend
        self.encoder = encoder
        self.latent = nn.Parameter(torch.randn(l_c, l_d, device=device, dtype=dtype))
        self.layers = nn.ModuleList([LegoLayer(l_d, input_dim, heads, head_dim, ff_mult, device=device, dtype=dtype)
                                     for _ in range(1 if weight_sharing else depth)])
        self.head = LegoHead(l_d, outputs, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """The latent back to N(0, 1), its initialisation (the layers and the head reset themselves)."""
        nn.init.normal_(self.latent)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, outputs={self.outputs}, l_c={self.l_c}, l_d={self.l_d}, "
                f"depth={self.depth}, heads={self.heads}, head_dim={self.head_dim}, "
                f"temperature={self.temperature}, ff_mult={self.ff_mult}, weight_sharing={self.weight_sharing}, "
                f"fft_dims={self.fft_dims}, token_fft={self.token_fft}, normalize={self.normalize}")

    # ------------------------------------------------------------------------------------------ pieces

    def encode(self, x, mask: Tensor | None = None, present: Tensor | None = None
               ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Run the encoder and combine the masks.

        Returns ``(tokens (B, N, E), token_mask (B, N) bool or None, present (B,) bool)``: ``token_mask`` is
        ``mask & present`` (None when neither is given: every token is real); the returned ``present`` is True
        where the sample has at least one real token (the samples the steps update).
        """
        if isinstance(present, Tensor) and present.dtype == torch.bool and isinstance(x, Tensor) \
                and x.is_floating_point() and x.dim() >= 1 and present.shape == x.shape[:1] \
                and present.device == x.device:
            # An absent sample's input may hold anything (NaN): zeroed before the encoder, whose weight gradients
            # would otherwise be 0 * NaN. Inputs that are not one batched float tensor reach the encoder as given.
            x = torch.where(present.reshape(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype,
                                                                                       device=x.device))
        device = self.latent.device
        try:
            tokens = self.encoder(x) if self.encoder is not None else x
        except RuntimeError as error:
            # Named here only once the encoder has failed: an encoder may move its input itself.
            if isinstance(x, Tensor) and x.device != device:
                raise ValueError(f"x: expected a tensor on {device} like the block's parameters; got {describe(x)} "
                                 f"(the encoder raised: {str(error).splitlines()[0] if str(error) else error!r})"
                                 ) from error
            raise
        if not isinstance(tokens, Tensor):
            raise TypeError(f"x: the encoder must return a tensor (B, N, E) or (B, E); got {type(tokens).__name__}")
        if not tokens.is_floating_point():
            raise TypeError(f"x: expected float tokens (B, N, E) or (B, E) from the encoder; got {describe(tokens)}")
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(1)
        if tokens.dim() != 3 or tokens.shape[-1] != self.input_dim:
            raise ValueError(f"x: expected encoder tokens of shape (B, N, E) or (B, E) with E = input_dim = "
                             f"{self.input_dim}; got {describe(tokens)}")
        if tokens.device != device:
            raise ValueError(f"x: expected encoder tokens on {device} like the block's parameters; "
                             f"got {describe(tokens)}")
        # The steps project the tokens themselves (to_kv), and the op computes in the tokens' dtype: float64 tokens
        # gave a float32 block a complex128 latent, float16 ones a float16 key/value projection, silently.
        label = "x" if self.encoder is None else "x: the encoder's tokens"
        check_linear_input(tokens, label, self.layers[0].attention.to_kv.weight, "the block's parameters")
        batch, count = tokens.shape[:2]
        # numpy masks are taken (on the CPU), as by the ops and the other modules.
        mask = as_tensor(mask, "mask") if isinstance(mask, np.ndarray) else mask
        present = as_tensor(present, "present") if isinstance(present, np.ndarray) else present
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (batch, count):
                got = describe(mask) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"mask: expected a bool tensor of shape (B, N) = ({batch}, {count}); got {got}")
            if mask.device != tokens.device:
                raise ValueError(f"mask: expected a tensor on {tokens.device} like the tokens; got {describe(mask)}")
        if present is not None:
            if not isinstance(present, Tensor) or present.dtype != torch.bool or present.shape != (batch,):
                got = describe(present) if isinstance(present, Tensor) else type(present).__name__
                raise ValueError(f"present: expected a bool tensor of shape (B,) = ({batch},); got {got}")
            if present.device != tokens.device:
                raise ValueError(f"present: expected a tensor on {tokens.device} like the tokens; "
                                 f"got {describe(present)}")
            # Absent samples' tokens may hold anything: zeroed, so that even a path that reads masked tokens
            # (token_fft=False multiplies them by zero attention weights) cannot turn them into NaN.
            tokens = torch.where(present[:, None, None], tokens, torch.zeros((), dtype=tokens.dtype,
                                                                             device=tokens.device))
            base = mask if mask is not None else torch.ones(batch, count, dtype=torch.bool, device=tokens.device)
            mask = base & present[:, None]
        has_tokens = mask.any(dim=1) if mask is not None else \
            torch.full((batch,), count > 0, dtype=torch.bool, device=tokens.device)
        return tokens, mask, has_tokens

    def initial_latent(self, batch: int) -> Tensor:
        """The learned latent broadcast to ``(B, l_c, l_d)``."""
        return self.latent.expand(batch, -1, -1)

    def step(self, latent: Tensor, tokens: Tensor, token_mask: Tensor | None, index: int, *,
             inverse: bool) -> Tensor:
        """Step ``index`` (0-based, < depth) on ``latent (B, l_c, l_d)`` with this block's context; returns the
        complex latent (spatial domain with ``inverse=True``, the spectrum otherwise)."""
        layer = self.layers[0 if self.weight_sharing else index]
        attention, ff = layer.attention, layer.feed_forward
        return fourier_cross_attention(
            latent, tokens, attention.to_q.weight, attention.to_kv.weight, attention.to_out.weight,
            attention.to_out.bias, heads=self.heads, backend=self.backend,
            latent_norm_weight=attention.norm.weight, latent_norm_bias=attention.norm.bias,
            context_norm_weight=attention.context_norm.weight, context_norm_bias=attention.context_norm.bias,
            ff_norm_weight=ff.norm.weight, ff_norm_bias=ff.norm.bias, ff_in_weight=ff.w_in.weight,
            ff_in_bias=ff.w_in.bias, ff_out_weight=ff.w_out.weight, ff_out_bias=ff.w_out.bias,
            token_mask=token_mask, temperature=self.temperature, fft_dims=self.fft_dims, token_fft=self.token_fft,
            normalize=self.normalize, inverse=inverse, eps=attention.norm.eps)

    def _check_latent(self, latent, batch: int, device) -> Tensor:
        if not isinstance(latent, Tensor):
            raise TypeError(f"latent: expected a tensor (B, l_c, l_d) or None; got {type(latent).__name__}")
        if latent.shape != (batch, self.l_c, self.l_d):
            raise ValueError(f"latent: expected shape (B, l_c, l_d) = ({batch}, {self.l_c}, {self.l_d}); "
                             f"got {describe(latent)}")
        if not (latent.is_complex() or latent.is_floating_point()):
            raise TypeError(f"latent: expected a float or complex tensor; got {describe(latent)}")
        if latent.device != device:
            raise ValueError(f"latent: expected a tensor on {device} like the tokens; got {describe(latent)}")
        return latent

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, x, mask: Tensor | None = None, present: Tensor | None = None, latent: Tensor | None = None,
                return_embeddings: bool = False, final_inverse: bool = False) -> Tensor:
        """Run the block.

        Args:
            x: the encoder's input (tokens ``(B, N, E)`` / ``(B, E)`` without an encoder). The tokens (the
                encoder's output) must have the block's dtype; under autocast, any float dtype but float64.
            mask: ``(B, N)`` bool over the encoder's output tokens, True = real token.
            present: ``(B,)`` bool, False = the sample lacks this modality (its steps are skipped).
            latent: optional ``(B, l_c, l_d)`` real or complex spatial-domain latent to start from instead of
                the learned one (e.g. a preceding block's ``forward(..., return_embeddings=True,
                final_inverse=True)``): the manual form of LegoFuse's stacking.
            return_embeddings: return the complex latent instead of the logits.
            final_inverse: apply the inverse FFT after the last step too (only with ``return_embeddings``), to
                hand the latent to another block.

        Returns:
            logits ``(B, outputs)`` in the parameters' dtype, or the complex latent ``(B, l_c, l_d)`` (complex64;
            complex128 for float64 parameters), in the frequency domain unless ``final_inverse``.
        """
        return_embeddings = check_flag(return_embeddings, "return_embeddings")
        final_inverse = check_flag(final_inverse, "final_inverse")
        if final_inverse and not return_embeddings:
            raise ValueError("final_inverse: the head reads the frequency-domain latent; final_inverse=True needs "
                             "return_embeddings=True")
        tokens, token_mask, _ = self.encode(x, mask, present)
        batch = tokens.shape[0]
        state = self.initial_latent(batch) if latent is None else self._check_latent(latent, batch, tokens.device)
        for index in range(self.depth):
            state = self.step(state, tokens, token_mask, index, inverse=final_inverse or index < self.depth - 1)
        return state if return_embeddings else self.head(state)


# --------------------------------------------------------------------------------------- merging heads

def _derive(target: nn.Module, sources: Sequence[nn.Module], method: str) -> None:
    """``target``'s own parameters, in place, <- the running merge of the same-named parameters of ``sources``
    (modules of one type: the merged head's LayerNorm or Linear and the merged heads' ones)."""
    with torch.no_grad():
        for name, parameter in target.named_parameters(recurse=False):
            values = [getattr(source, name).detach() for source in sources]
            if not parameter.is_meta and any(value.is_meta for value in values):
                # copy_ would fail with "Cannot copy out of meta tensor", naming neither module.
                raise RuntimeError(f"merged head: the heads it merges (the blocks' heads) are on the meta device, "
                                   f"so its {target._get_name()} {name} cannot be derived from them; materialise "
                                   "and reset the blocks first (modules() and apply() visit them before the merged "
                                   "head), or call the LegoMerge / LegoFuse's reset_parameters() after them")
            value = values[0].clone()
            for m, other in enumerate(values[1:], start=2):
                value = slerp(value, other, 1.0 / m) if method == "slerp" else value + (other - value) / m
            parameter.copy_(value)


class _Derived:
    """The merged head's LayerNorm / Linear: ``reset_parameters`` re-derives the parameters from the merged heads'
    current ones (``_sources``, the same layer of each head) rather than drawing an init, so that deferred
    initialisation (meta device, ``to_empty()``, ``reset_parameters()`` on every submodule) restores the merge.
    Any walk that resets the blocks before the merged head works: ``modules()`` (parents first) and ``apply``
    (children first) both do, as LegoMerge / LegoFuse register the blocks before the head. Plain nn.LayerNorm /
    nn.Linear while being constructed (no sources yet), so building one draws from the RNG as before."""

    _sources: tuple[nn.Module, ...] = ()
    _method = "slerp"

    def reset_parameters(self) -> None:
        if not self._sources:
            super().reset_parameters()
        else:
            _derive(self, self._sources, self._method)


class _DerivedLayerNorm(_Derived, nn.LayerNorm):
    def _get_name(self) -> str:
        return "LayerNorm"


class _DerivedLinear(_Derived, nn.Linear):
    def _get_name(self) -> str:
        return "Linear"


class _MergedHead(LegoHead):
    """A :class:`LegoHead` derived from other heads (:func:`merge_heads`); its layers re-derive themselves on
    ``reset_parameters``."""

    _norm_type = _DerivedLayerNorm
    _linear_type = _DerivedLinear

    def _get_name(self) -> str:
        return "LegoHead"


def _rederive(merged: LegoHead, heads: Sequence[LegoHead], method: str) -> None:
    """``merged``'s parameters, in place, <- the merge of ``heads``; its derived layers remember the heads, for
    their own ``reset_parameters``."""
    for layer in ("norm", "linear"):
        target, sources = getattr(merged, layer), tuple(getattr(head, layer) for head in heads)
        if isinstance(target, _Derived):
            target._sources, target._method = sources, method
        _derive(target, sources, method)


def merge_heads(heads: Sequence[LegoHead], method: str = "slerp") -> LegoHead:
    """A new :class:`LegoHead` whose every parameter tensor is the running merge of the heads' tensors:
    ``w <- w_1``, ``w <- merge(w, w_m, t = 1/m)`` for m = 2..M (SLERP or linear; linear gives the exact mean).
    The result holds detached copies (trainable parameters of its own). It is derived state: its LayerNorm's and
    Linear's ``reset_parameters`` merge the heads' current parameters again (in place) rather than drawing an
    init, so it keeps references to ``heads`` (not registered: not in its ``state_dict`` nor ``parameters``)."""
    if method not in HEAD_METHODS:
        raise ValueError(f"head_method: expected one of {HEAD_METHODS}; got {method!r}")
    _check_heads(heads)
    first = heads[0]
    merged = _MergedHead(first.linear.in_features, first.linear.out_features, device=first.linear.weight.device,
                         dtype=first.linear.weight.dtype)
    merged.norm.eps = first.norm.eps
    _rederive(merged, heads, method)
    return merged


def _check_heads(heads) -> None:
    if not isinstance(heads, (Sequence, nn.ModuleList)) or isinstance(heads, (str, Tensor)):
        raise TypeError(f"heads: expected a list of LegoHead (each a LegoBlock's .head); got {type(heads).__name__}")
    if len(heads) == 0:
        raise ValueError("heads: expected at least one LegoHead; got none")
    for index, head in enumerate(heads):
        if not isinstance(head, LegoHead):
            hint = f"; pass blocks[{index}].head" if isinstance(head, LegoBlock) else ""
            raise TypeError(f"heads[{index}]: expected a LegoHead (a LegoBlock's .head){hint}; got "
                            f"{type(head).__name__}")
    first = heads[0].linear.weight
    for index, head in enumerate(heads[1:], start=1):
        weight = head.linear.weight
        if weight.shape != first.shape:
            raise ValueError(f"heads[{index}]: expected a Linear({first.shape[1]}, {first.shape[0]}) like heads[0]; "
                             f"got Linear({weight.shape[1]}, {weight.shape[0]})")
        if weight.dtype != first.dtype:
            raise TypeError(f"heads[{index}]: expected parameters of dtype {first.dtype} like heads[0]; "
                            f"got {weight.dtype}")
        if weight.device != first.device:
            raise ValueError(f"heads[{index}]: expected parameters on {first.device} like heads[0]; "
                             f"got {weight.device}")


def _check_blocks(blocks, name: str = "blocks") -> list[LegoBlock]:
    if not isinstance(blocks, (Sequence, nn.ModuleList)) or isinstance(blocks, (str, Tensor)):
        raise TypeError(f"{name}: expected a list of LegoBlock; got {type(blocks).__name__}")
    blocks = list(blocks)
    if not blocks:
        raise ValueError(f"{name}: expected at least one LegoBlock; got none")
    for index, block in enumerate(blocks):
        if not isinstance(block, LegoBlock):
            raise TypeError(f"{name}[{index}]: expected a LegoBlock; got {type(block).__name__}")
    first = blocks[0]
    for index, block in enumerate(blocks[1:], start=1):
        if (block.l_c, block.l_d) != (first.l_c, first.l_d):
            raise ValueError(f"{name}[{index}]: expected latent shape (l_c, l_d) = ({first.l_c}, {first.l_d}) like "
                             f"{name}[0]; got ({block.l_c}, {block.l_d})")
        if block.outputs != first.outputs or block.head.norm.normalized_shape != first.head.norm.normalized_shape:
            raise ValueError(f"{name}[{index}]: expected a head Linear({first.l_d}, {first.outputs}) like "
                             f"{name}[0]; got Linear({block.l_d}, {block.outputs})")
        if block.head.linear.weight.dtype != first.head.linear.weight.dtype:
            raise TypeError(f"{name}[{index}]: expected head parameters of dtype {first.head.linear.weight.dtype} "
                            f"like {name}[0]; got {block.head.linear.weight.dtype}")
        if block.fft_dims != first.fft_dims:
            raise ValueError(f"{name}[{index}]: expected fft_dims = {first.fft_dims} like {name}[0] (the latents "
                             f"must live in the same frequency domain); got {block.fft_dims}")
    return blocks


def _per_block(values, count: int, name: str) -> list:
    if values is None:
        return [None] * count
    if isinstance(values, (Tensor, str)) or not isinstance(values, Sequence) or len(values) != count:
        raise ValueError(f"{name}: expected None or a list with one entry (or None) per block ({count}); got "
                         f"{type(values).__name__}" + (f" of length {len(values)}" if isinstance(values, Sequence)
                                                      else ""))
    return list(values)


class _LegoMulti(nn.Module):
    """Shared pieces of LegoMerge and LegoFuse: the blocks, the merged head, input handling."""

    def __init__(self, blocks, head_method: str):
        super().__init__()
        blocks = _check_blocks(blocks)
        if head_method not in HEAD_METHODS:
            raise ValueError(f"head_method: expected one of {HEAD_METHODS}; got {head_method!r}")
        self.blocks = nn.ModuleList(blocks)
        self.head_method = head_method
        self.head = merge_heads([block.head for block in blocks], head_method)

    def merge_heads(self) -> None:
        """Re-merge the head from the blocks' current heads (replaces ``self.head``)."""
        self.head = merge_heads([block.head for block in self.blocks], self.head_method)

    def reset_parameters(self) -> None:
        """Re-derive the head, in place, from the blocks' current heads: it is derived state (their running SLERP
        or mean), not an init draw. The blocks are not reset (as every module's ``reset_parameters``, this resets
        only what the module itself owns, and merging trained blocks must not lose them). Deferred init (meta
        device, ``to_empty()``, ``reset_parameters()`` on every submodule) gives the model built directly from the
        reset blocks: the head's own layers re-derive themselves when reset, after the blocks in ``modules()`` and
        ``apply()`` order; in another order, call this last."""
        heads = [block.head for block in self.blocks]
        _check_heads(heads)
        _rederive(self.head, heads, self.head_method)

    def _encode_all(self, inputs, masks, present):
        """Per block ``(tokens, token_mask, present)`` from its encoder, or None where the input is None (the
        modality absent from every sample), and the ``(M, B)`` flags of the samples each block updates."""
        count = len(self.blocks)
        if isinstance(inputs, (Tensor, str)) or not isinstance(inputs, Sequence) or len(inputs) != count:
            raise ValueError(f"inputs: expected a list with one input per block ({count}); got "
                             f"{type(inputs).__name__}" + (f" of length {len(inputs)}"
                                                           if isinstance(inputs, Sequence) else ""))
        masks = _per_block(masks, count, "masks")
        present = _per_block(present, count, "present")
        given = [index for index in range(count) if inputs[index] is not None]
        if not given:
            raise ValueError(f"inputs: every input is None (no modality in the batch); at least one of the {count} "
                             "blocks needs its input")
        encoded = [None] * count
        for index in given:
            try:
                encoded[index] = self.blocks[index].encode(inputs[index], masks[index], present[index])
            except (TypeError, ValueError) as error:
                raise type(error)(f"block {index}: {error}") from None
        first = given[0]
        batch, device = encoded[first][0].shape[0], encoded[first][0].device
        for index in given[1:]:
            tokens = encoded[index][0]
            if tokens.shape[0] != batch:
                raise ValueError(f"inputs[{index}]: expected batch size {batch} like inputs[{first}]; got tokens "
                                 f"{describe(tokens)}")
            if tokens.device != device:
                raise ValueError(f"inputs[{index}]: expected tokens on {device} like inputs[{first}]'s (every block "
                                 f"on one device); got {describe(tokens)}")
        rows = []
        for index in range(count):
            if encoded[index] is not None:
                rows.append(encoded[index][2])
                continue
            self._check_absent_block(index, masks[index], present[index], batch, device)
            rows.append(torch.zeros(batch, dtype=torch.bool, device=device))
        available = torch.stack(rows)                                                  # (M, B)
        # Not under torch.compile, where reading the flags would break the graph (as the ops' own checks).
        if not values_hidden(available):
            missing = (~available.any(dim=0)).nonzero().flatten()
            if len(missing):
                raise ValueError(f"present: sample(s) {missing.tolist()} have no modality present (no block with a "
                                 "present sample and a real token); every sample needs at least one")
        return encoded, available

    @staticmethod
    def _check_absent_block(index: int, mask, present, batch: int, device) -> None:
        """``inputs[index]`` is None: a token mask cannot describe tokens that do not exist, and a ``present``
        mask may only agree that the modality is absent (all False)."""
        if mask is not None:
            raise ValueError(f"masks[{index}]: expected None, as inputs[{index}] is None (the modality is absent "
                             f"from every sample, it has no tokens); got "
                             f"{describe(mask) if isinstance(mask, Tensor) else type(mask).__name__}")
        if present is None:
            return
        if not isinstance(present, Tensor) or present.dtype != torch.bool or present.shape != (batch,):
            got = describe(present) if isinstance(present, Tensor) else type(present).__name__
            raise ValueError(f"present[{index}]: expected None or a bool tensor of shape (B,) = ({batch},); "
                             f"got {got}")
        if present.device != device:
            raise ValueError(f"present[{index}]: expected a tensor on {device} like the tokens; "
                             f"got {describe(present)}")
        # One host read, only for this redundant mask; trusted where values are hidden (the None input wins).
        if not values_hidden(present):
            claimed = present.nonzero().flatten()
            if len(claimed):
                raise ValueError(f"present[{index}]: inputs[{index}] is None (the modality is absent from every "
                                 f"sample), but present[{index}] is True for sample(s) {claimed[:10].tolist()}; "
                                 "pass None or an all-False mask")


class LegoMerge(_LegoMulti):
    """LegoMerge: a multimodal model from unimodally trained LegoBlocks, without training.

    Args:
        blocks: M >= 1 LegoBlocks with equal ``(l_c, l_d)``, head shapes and ``fft_dims`` (held, not copied).
        method: latent merge of :func:`pyblend.ops.merge_latents`: "harmonic" (the paper), "mean" or "sum".
        head_method: "slerp" (the paper) or "linear"; see :func:`merge_heads`.
        eps: ``merge_latents``' eps.

    ``forward(inputs, masks=None, present=None, return_embeddings=False)``: ``inputs`` one input per block (in
    block order), None for a modality absent from every sample (that block's encoder and steps do not run; its
    ``masks`` entry must be None and its ``present`` entry None or all False); ``masks`` / ``present`` None or one
    entry (or None) per block, as :meth:`LegoBlock.forward`'s ``mask`` / ``present``. Returns logits
    ``(B, outputs)`` from the merged head, or the merged complex latent ``(B, l_c, l_d)``. Per sample only the
    blocks whose modality is present are merged; a sample with none, or every input None, is a ValueError (the
    check reads one (B,) mask back to the host per forward).
    """

    def __init__(self, blocks: Sequence[LegoBlock], method: str = "harmonic", head_method: str = "slerp", *,
                 eps: float = 1e-6):
        if method not in MERGE_METHODS:
            raise ValueError(f"method: expected one of {MERGE_METHODS}; got {method!r}")
        eps = merge_eps(eps)  # merge_latents' rule, checked here rather than at the first forward
        super().__init__(blocks, head_method)
        self.method = method
        self.eps = eps

    def extra_repr(self) -> str:
        return f"method={self.method!r}, head_method={self.head_method!r}, eps={self.eps}"

    def forward(self, inputs: Sequence, masks: Sequence | None = None, present: Sequence | None = None,
                return_embeddings: bool = False) -> Tensor:
        return_embeddings = check_flag(return_embeddings, "return_embeddings")
        encoded, available = self._encode_all(inputs, masks, present)
        latents, rows = [], []
        for m, (block, entry) in enumerate(zip(self.blocks, encoded)):
            if entry is None:  # absent from every sample: left out, as the merge leaves out an absent sample
                continue
            tokens, token_mask, _ = entry
            state = block.initial_latent(tokens.shape[0])
            for index in range(block.depth):
                state = block.step(state, tokens, token_mask, index, inverse=index < block.depth - 1)
            latents.append(state)
            rows.append(available[m])
        merged = merge_latents(latents, self.method, eps=self.eps, present=rows)
        return merged if return_embeddings else self.head(merged)


def lego_merge(blocks: Sequence[LegoBlock], method: str = "harmonic", head_method: str = "slerp", *,
               eps: float = 1e-6) -> LegoMerge:
    """:class:`LegoMerge` of ``blocks`` (no training)."""
    return LegoMerge(blocks, method, head_method, eps=eps)


class LegoFuse(_LegoMulti):
    """LegoFuse: the blocks' steps chained over one latent, for fine-tuning (module docstring: the schedule).

    Args:
        blocks: M >= 1 LegoBlocks (shared, not copied) with equal ``(l_c, l_d)``, head shapes and ``fft_dims``;
            depths may differ.
        mode: "stack" (every step of block 1, then of block 2, ...) or "weave" (step j of every block, j = 0, 1,
            ...).
        head_method: how the head is initialised from the blocks' heads ("slerp" or "linear"); it is then a
            trainable :class:`LegoHead`.

    ``forward(inputs, masks=None, present=None, return_embeddings=False)`` as :class:`LegoMerge`: a block whose
    modality a sample lacks leaves that sample's latent to the op's skip rule (normalised, passed on); an input of
    None (the modality absent from every sample) skips that block's encoder, and its steps run without tokens,
    which is that rule for every sample (the chain still starts from ``blocks[0].latent``); a sample with no
    modality at all is a ValueError, as in LegoMerge. The blocks' own heads, and the latents of every block but
    the first, are not used (no gradient: under DistributedDataParallel pass ``find_unused_parameters=True``; nor
    are the encoders of None inputs).
    """

    def __init__(self, blocks: Sequence[LegoBlock], mode: str = "stack", head_method: str = "slerp"):
        if mode not in FUSE_MODES:
            raise ValueError(f"mode: expected one of {FUSE_MODES}; got {mode!r}")
        super().__init__(blocks, head_method)
        self.mode = mode

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, head_method={self.head_method!r}"

    def schedule(self) -> list[tuple[int, int]]:
        """The chain as ``(block index, step index)`` pairs, in order."""
        if self.mode == "stack":
            return [(i, j) for i, block in enumerate(self.blocks) for j in range(block.depth)]
        deepest = max(block.depth for block in self.blocks)
        return [(i, j) for j in range(deepest) for i, block in enumerate(self.blocks) if j < block.depth]

    def forward(self, inputs: Sequence, masks: Sequence | None = None, present: Sequence | None = None,
                return_embeddings: bool = False) -> Tensor:
        return_embeddings = check_flag(return_embeddings, "return_embeddings")
        encoded, available = self._encode_all(inputs, masks, present)
        batch, device = available.shape[1], available.device
        contexts = []
        for block, entry in zip(self.blocks, encoded):
            if entry is None:
                # No token: the op skips every sample, exactly as with the input given and present all False.
                # Running the steps (rather than dropping them) keeps a sample's result independent of whether
                # the rest of its batch has the modality.
                entry = (torch.zeros(batch, 0, block.input_dim, dtype=block.latent.dtype, device=device), None, None)
            contexts.append(entry)
        order = self.schedule()
        state = self.blocks[0].initial_latent(batch)
        for position, (i, j) in enumerate(order):
            tokens, token_mask, _ = contexts[i]
            state = self.blocks[i].step(state, tokens, token_mask, j, inverse=position < len(order) - 1)
        return state if return_embeddings else self.head(state)


# ---------------------------------------------------------------------------------------------- losses

def _check_survival(logits: Tensor, event_bin: Tensor, censored: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        got = describe(logits) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a float tensor of shape (B, bins); got {got}")
    batch = logits.shape[0]
    if not isinstance(event_bin, Tensor) or event_bin.dtype not in (torch.int32, torch.int64) or \
            event_bin.shape != (batch,):
        got = describe(event_bin) if isinstance(event_bin, Tensor) else type(event_bin).__name__
        raise ValueError(f"event_bin: expected an int32/int64 tensor of shape (B,) = ({batch},); got {got}")
    if not isinstance(censored, Tensor) or censored.shape != (batch,) or \
            not (censored.dtype == torch.bool or censored.is_floating_point()):
        got = describe(censored) if isinstance(censored, Tensor) else type(censored).__name__
        raise ValueError(f"censored: expected a bool (or 0/1 float) tensor of shape (B,) = ({batch},); got {got}")
    check_same_device(logits, "logits", event_bin=event_bin, censored=censored)
    # Checked here: out of range, gather raises an error naming neither argument on the CPU and a device-side
    # assert on CUDA; a float censored flag other than 0 / 1 mixes the two likelihood terms into no likelihood.
    if values_hidden(logits, event_bin, censored):
        return
    bins = logits.shape[1]
    bad_bin = (event_bin < 0) | (event_bin >= bins)
    bad_flag = (censored != 0) & (censored != 1) if censored.is_floating_point() else torch.zeros_like(bad_bin)
    flags = torch.stack([bad_bin.any(), bad_flag.any()]).tolist()  # the one device-to-host read
    if flags[0]:
        _range_error("event_bin", event_bin, bad_bin, f"values in [0, bins) = [0, {bins})")
    if flags[1]:
        _range_error("censored", censored, bad_flag, "0 or 1")


def _range_error(name: str, values: Tensor, bad: Tensor, expected: str) -> None:
    where = bad.nonzero().flatten()
    first = int(where[0])
    raise ValueError(f"{name}: expected {expected}; {name}[{first}] = {values[first].item()} ({len(where)} such "
                     f"entr{'y' if len(where) == 1 else 'ies'})")


def survival_nll_loss(logits: Tensor, event_bin: Tensor, censored: Tensor, *, alpha: float = 0.4,
                      reduction: str = "mean") -> Tensor:
    """Discrete-time survival negative log-likelihood (MCAT / PORPOISE; MM-Lego's ``nll_loss``, alpha 0.4 there).

    With ``h_k = sigmoid(logits_k)`` the hazard of bin k, ``S_k = prod_{j<=k} (1 - h_j)``, ``S_{-1} = 1``, the
    event (or censoring) bin ``y`` and ``c`` = censored:

        uncensored = -(1 - c) * (log S_{y-1} + log h_y)      (survived to bin y, event in it)
        censored   = -c * log S_y                             (survived through bin y)
        loss       = (1 - alpha) * (uncensored + censored) + alpha * uncensored

    averaged (``reduction="mean"``) or summed over the batch. Computed in log space (``log h = logsigmoid(z)``,
    ``log(1 - h) = logsigmoid(-z)``), so no clamp is needed; the public code clamps the probabilities at 1e-7,
    which only differs where they are below it.

    Args:
        logits: ``(B, bins)`` float. event_bin: ``(B,)`` int in [0, bins). censored: ``(B,)`` bool or 0/1 float.
        alpha: weight of the extra uncensored term, in [0, 1].

    ``event_bin`` outside [0, bins) or a float ``censored`` other than 0 / 1 is a ValueError naming it (one
    device-to-host read; not checked under torch.compile or with :class:`pyblend.set_value_checks` off, where an
    ``event_bin`` out of range is an indexing error, a device-side assert on CUDA).
    """
    _check_survival(logits, event_bin, censored)
    if not is_real(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a float in [0, 1]; got {alpha!r}")
    alpha = float(alpha)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum'; got {reduction!r}")
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    c = censored.to(z.dtype)
    y = event_bin.long()[:, None]
    log_hazard = F.logsigmoid(z)
    log_survival = F.logsigmoid(-z).cumsum(dim=1)
    padded = torch.cat([torch.zeros_like(log_survival[:, :1]), log_survival], dim=1)     # log S_{k-1} at k
    uncensored = -(1 - c) * (padded.gather(1, y)[:, 0] + log_hazard.gather(1, y)[:, 0])
    censored_term = -c * padded.gather(1, y + 1)[:, 0]
    loss = (1 - alpha) * (uncensored + censored_term) + alpha * uncensored
    return loss.mean() if reduction == "mean" else loss.sum()


def survival_risk(logits: Tensor) -> Tensor:
    """Risk score for the c-index: ``-sum_k S_k`` (MCAT's), higher = earlier event. ``logits (B, bins)`` ->
    ``(B,)``."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        got = describe(logits) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a float tensor of shape (B, bins); got {got}")
    return -torch.sigmoid(-logits.float()).cumprod(dim=1).sum(dim=1)


def classification_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Classification loss: cross-entropy for ``logits (B, K)``, K >= 2, with ``target (B,)`` int class indices in
    [0, K); binary cross-entropy with logits for ``logits (B,)`` or ``(B, 1)`` with ``target (B,)`` 0/1 (bool or
    int) or a probability in [0, 1] (float: soft labels, e.g. label smoothing). Mean over the batch.

    A target out of range is a ValueError naming it (one device-to-host read; not checked under torch.compile or
    with :class:`pyblend.set_value_checks` off). Unchecked, a binary target of 2 gives a loss unbounded below
    (``-z + softplus(-z)``, which falls without limit as the logit grows), and a class index of -100 is silently
    left out of the mean (``F.cross_entropy``'s ``ignore_index``)."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() not in (1, 2):
        got = describe(logits) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a float tensor of shape (B, K) or (B,); got {got}")
    batch = logits.shape[0]
    if not isinstance(target, Tensor) or target.shape != (batch,):
        got = describe(target) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target: expected a tensor of shape (B,) = ({batch},); got {got}")
    check_same_device(logits, "logits", target=target)
    checked = not values_hidden(logits, target)
    if logits.dim() == 1 or logits.shape[1] == 1:
        if target.is_complex():
            raise TypeError(f"target: expected 0/1 (bool or int) or a probability in [0, 1] (float); "
                            f"got {describe(target)}")
        if checked and target.dtype != torch.bool:
            # NaN fails both comparisons, so it is out of range too.
            bad = ~((target >= 0) & (target <= 1))
            if bad.any():  # the one device-to-host read
                _range_error("target", target, bad, "0 or 1 (or a probability in [0, 1]) for binary logits (B,) "
                                                    "or (B, 1)")
        return F.binary_cross_entropy_with_logits(logits.reshape(batch), target.to(logits.dtype))
    if target.dtype not in (torch.int32, torch.int64, torch.uint8, torch.int16, torch.int8):
        raise TypeError(f"target: expected integer class indices for logits (B, K) with K >= 2; got {describe(target)}")
    classes = logits.shape[1]
    if checked:
        bad = (target < 0) | (target >= classes)
        if bad.any():  # the one device-to-host read
            _range_error("target", target, bad, f"class indices in [0, K) = [0, {classes}) for logits (B, K)")
    return F.cross_entropy(logits, target.long())
