"""Graphormer / Uni-Mol self-attention with an additive per-head pair bias, on :func:`pyblend.ops.relation_attention`.

:class:`RelationBiasedAttention` has the parameters and the semantics of Graphormer's ``MultiheadAttention``
(microsoft/Graphormer, ``graphormer/modules/multihead_attention.py``, self-attention), so a Graphormer checkpoint
loads into it unchanged, and :meth:`RelationBiasedAttention.from_unimol_state_dict` maps Uni-Mol's
``SelfMultiheadAttention`` (dptech-corp/Uni-Core, fused ``in_proj``) onto it.

**Checkpoint mapping.**

==========================================  ========================================================
Graphormer ``self_attn.``                   this module
==========================================  ========================================================
``q_proj.weight (C, C)``, ``q_proj.bias``   ``q_proj.weight``, ``q_proj.bias`` (1:1, same for k, v)
``out_proj.weight (C, C)``, ``.bias``       ``out_proj.weight``, ``out_proj.bias``
==========================================  ========================================================

==========================================  ========================================================
Uni-Mol ``self_attn.``                      this module
==========================================  ========================================================
``in_proj.weight (3C, C)``                  rows ``[0:C]`` -> ``q_proj.weight``, ``[C:2C]`` -> ``k_proj``,
                                            ``[2C:3C]`` -> ``v_proj`` (``in_proj(x).chunk(3)`` order)
``in_proj.bias (3C,)``                      the same three chunks -> ``{q,k,v}_proj.bias``
``out_proj.weight``, ``out_proj.bias``      ``out_proj.weight``, ``out_proj.bias``
==========================================  ========================================================

**Calling convention: what differs from the originals.**

- Batch first: ``x (B, N, C)``. Graphormer's attention is time first, ``(N, B, C)``: transpose around the call.
  Uni-Mol is batch first already.
- ``mask (B, N)`` is True for a REAL atom (pyblend's convention). Graphormer's and Uni-Mol's
  ``key_padding_mask`` is True for PADDING: pass ``mask=~key_padding_mask``.
- ``attn_bias`` is ``(B|1, H|1, N, N)`` (Graphormer's ``(B, H, N, N)`` as it is); Uni-Mol's flattened
  ``(B*H, N, N)`` is accepted too. Graphormer's separate additive ``attn_mask`` is not a parameter: add it to the
  bias. A ``-inf`` bias excludes a pair; a row left with no key outputs zeros (before ``out_proj``), not NaN.
- It returns the output only (Graphormer returns ``(out, head-averaged weights)``); with ``return_logits`` it
  returns ``(out, S)``, ``S = Q K^T * scaling + bias`` per head, ``(B, H, N, N)``, 0 at pairs touching a padded
  atom (Uni-Mol's ``return_attn`` logits hold ``-inf`` at padded keys instead).
- Rows of padded atoms hold ``out_proj.bias`` (the op writes zeros there), where Graphormer and Uni-Mol let a
  padded query attend to the real keys: those rows carry no meaning in any of the three.
- The packed layout (``x (T, C)`` + ``cu_seqlens``) has no padding at all.

Swapping a Graphormer encoder layer's attention (its call site is time first)::

    attn = RelationBiasedAttention(768, 32, dropout=0.1)
    attn.load_state_dict(graphormer_layer.self_attn.state_dict())        # or the checkpoint's "...self_attn." keys
    # was: x, _ = self.self_attn(x, x, x, attn_bias=b, key_padding_mask=pad, need_weights=False)
    x = attn(x.transpose(0, 1), b, mask=~pad).transpose(0, 1)

Uni-Mol: ``RelationBiasedAttention.from_unimol_state_dict(sd, 64, prefix="encoder.layers.0.self_attn.")`` for one
layer, or :func:`convert_unimol_state_dict` over a whole checkpoint; then ``attn(x, attn_bias, mask=~padding_mask)``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import ops, reference
from ..ops._checks import as_tensor, check_flag, check_linear_input, check_mask, check_same_device, is_real

__all__ = ["RelationBiasedAttention", "bias_from_relations", "convert_unimol_state_dict"]


def bias_from_relations(rel_index: Tensor, rel_table: Tensor) -> Tensor:
    """The dense pair bias ``rel_table[rel_index]``, heads moved forward.

    Args:
        rel_index: integer relation ids, padded ``(B, N, N)`` or packed ``(P,)``, each in ``[0, R)`` (one outside
            gives a bias of 0 there, as in the kernels when value checks are off; not checked here).
        rel_table: float ``(R, H)``, one learnable value per (relation, head).

    Returns:
        ``(B, H, N, N)`` padded or ``(H, P)`` packed, in ``rel_table``'s dtype, differentiable in ``rel_table``.

    This materialises the bias. ``RelationBiasedAttention.forward(x, rel_index=..., rel_table=...)`` (and
    :func:`pyblend.ops.relation_attention`) gathers the same values inside the kernel instead, never allocating
    the ``(B, H, N, N)`` tensor, and gives ``rel_table`` the same gradient.
    """
    if not isinstance(rel_index, Tensor) or not isinstance(rel_table, Tensor):
        raise TypeError(f"bias_from_relations: expected tensors, got {type(rel_index).__name__} and "
                        f"{type(rel_table).__name__}")
    if rel_index.is_floating_point() or rel_index.is_complex() or rel_index.dtype == torch.bool:
        raise TypeError(f"rel_index: expected an integer tensor; got {rel_index.dtype} {tuple(rel_index.shape)}")
    if rel_index.dim() not in (1, 3) or rel_table.dim() != 2:
        raise ValueError(f"bias_from_relations: expected rel_index (B, N, N) or (P,) and rel_table (R, H); got "
                         f"rel_index {tuple(rel_index.shape)} and rel_table {tuple(rel_table.shape)}")
    check_same_device(rel_table, "rel_table", rel_index=rel_index)
    return reference.bias_from_relations(rel_index, rel_table)


def convert_unimol_state_dict(state_dict: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Rewrite Uni-Mol ``SelfMultiheadAttention`` keys into :class:`RelationBiasedAttention` keys.

    Every key named ``in_proj.weight`` / ``in_proj.bias`` or ending in ``.in_proj.weight`` / ``.in_proj.bias``
    (``(3C, C)`` / ``(3C,)``) is split into three ``C``-row chunks in q, k, v order, stored as
    ``q_proj.*``, ``k_proj.*``, ``v_proj.*`` under the same prefix. Every other key (``out_proj.*``, the rest of a
    whole-model checkpoint) is copied unchanged, so a Uni-Mol model whose attention layers were swapped for this
    module loads the result with ``strict=True``. The chunks are views of the input tensors.
    """
    converted: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        owner = prefix.rpartition(".")
        if owner[2] == "in_proj" and name in ("weight", "bias"):
            head = owner[0] + "." if owner[0] else ""
            if value.dim() != (2 if name == "weight" else 1) or value.shape[0] % 3:
                raise ValueError(f"{key}: expected shape {'(3C, C)' if name == 'weight' else '(3C,)'}; got "
                                 f"{tuple(value.shape)}")
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                converted[f"{head}{part}_proj.{name}"] = chunk
        else:
            converted[key] = value
    return converted


class _GraphormerLinear(nn.Linear):
    """``nn.Linear`` that keeps Graphormer's initialisation rule for ``reset_parameters``: nn.Linear's default,
    then a Xavier-uniform weight with ``gain`` and, with ``zero_bias``, a zero bias. Plain nn.Linear while being
    constructed (``gain`` None), so the construction draws as Graphormer does."""

    gain: float | None = None
    zero_bias = False

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.gain is not None:
            self.graphormer_init()

    def graphormer_init(self) -> None:
        nn.init.xavier_uniform_(self.weight, gain=self.gain)
        if self.zero_bias and self.bias is not None:
            nn.init.zeros_(self.bias)

    def _get_name(self) -> str:
        return "Linear"


class RelationBiasedAttention(nn.Module):
    """Multi-head self-attention with an additive per-head pair bias (Graphormer / Uni-Mol / MoleBlend).

    ``out = out_proj(softmax((q_proj(x) * scaling) k_proj(x)^T + bias) v_proj(x))`` per head, with keys of padded
    atoms excluded, run by the fused :func:`pyblend.ops.relation_attention` (Triton on CUDA, the plain-PyTorch
    reference on the CPU). The bias is a dense ``attn_bias``, a relation table gathered in the kernel
    (``rel_index``, ``rel_table``), or both summed. See the module docstring for the Graphormer / Uni-Mol mapping.

    Args:
        embed_dim: C, the width of ``x``; must be divisible by ``num_heads``.
        num_heads: H; the head dim is ``D = C // H``.
        dropout: dropout on the attention probabilities, applied in training mode only.
        bias: whether the four projections have a bias (Graphormer's ``bias``).
        scaling: the factor on ``q`` (default Graphormer's and Uni-Mol's ``D ** -0.5``).
        device, dtype: where and how the parameters are created (as ``nn.Linear``).

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, each ``nn.Linear(C, C, bias=bias)``,
    initialised as Graphormer's ``reset_parameters``: Xavier-uniform with gain ``1/sqrt(2)`` on the q/k/v weights
    (their biases keep ``nn.Linear``'s default), Xavier-uniform on ``out_proj.weight``, ``out_proj.bias = 0``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 scaling: float | None = None, *, device=None, dtype=None):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int; got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not is_real(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1); got {dropout!r}")
        bias = check_flag(bias, "bias")  # nn.Linear reads "no" as True and None as False
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        if scaling is not None and (not is_real(scaling) or not math.isfinite(scaling)):
            raise ValueError(f"scaling: expected None or a finite float; got {scaling!r}")
        self.scaling = float(self.head_dim ** -0.5 if scaling is None else scaling)
        factory = {"device": device, "dtype": dtype}
        # Graphormer's (fairseq's) order of draws: k, v, q and out made, then their weights redrawn in that order,
        # so that one seed gives both the same parameters; each projection keeps its rule for later resets.
        self.k_proj = _GraphormerLinear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = _GraphormerLinear(embed_dim, embed_dim, bias=bias, **factory)
        self.q_proj = _GraphormerLinear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = _GraphormerLinear(embed_dim, embed_dim, bias=bias, **factory)
        for proj, gain, zero_bias in ((self.k_proj, 1 / math.sqrt(2), False), (self.v_proj, 1 / math.sqrt(2), False),
                                      (self.q_proj, 1 / math.sqrt(2), False), (self.out_proj, 1.0, True)):
            proj.gain, proj.zero_bias = gain, zero_bias
            proj.graphormer_init()

    def reset_parameters(self) -> None:
        """Graphormer's initialisation (see the class docstring); each projection's own ``reset_parameters``
        gives the same, in any order (deferred initialisation after ``to_empty()``)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.reset_parameters()

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}, bias={self.q_proj.bias is not None}, scaling={self.scaling:.6g}")

    @classmethod
    def from_unimol_state_dict(cls, state_dict: Mapping[str, Tensor], num_heads: int, *, dropout: float = 0.0,
                               scaling_factor: float = 1.0, prefix: str = "", device=None,
                               dtype=None) -> RelationBiasedAttention:
        """Build the module from one Uni-Mol ``SelfMultiheadAttention``'s weights.

        Args:
            state_dict: holds ``{prefix}in_proj.weight (3C, C)``, ``{prefix}out_proj.weight (C, C)`` and, when the
                layer has biases, ``{prefix}in_proj.bias (3C,)``, ``{prefix}out_proj.bias (C,)``; other keys are
                ignored (so a whole-model checkpoint works with ``prefix="encoder.layers.0.self_attn."``).
            num_heads: the layer's head count (not stored in the checkpoint).
            dropout: attention dropout (Uni-Mol's default is 0.1; pass it for training).
            scaling_factor: Uni-Mol's ``scaling_factor``: ``scaling = (D * scaling_factor) ** -0.5``.
            device, dtype: default: those of ``in_proj.weight``.

        Returns:
            a module whose forward equals Uni-Mol's on the real rows (with ``mask=~key_padding_mask``).
        """
        key = f"{prefix}in_proj.weight"
        if key not in state_dict:
            raise KeyError(f"{key}: not in the state dict (Uni-Mol's SelfMultiheadAttention has in_proj.weight "
                           f"(3C, C)); keys seen: {sorted(state_dict)[:8]}")
        weight = state_dict[key]
        if weight.dim() != 2 or weight.shape[0] != 3 * weight.shape[1]:
            raise ValueError(f"{key}: expected shape (3C, C); got {tuple(weight.shape)}")
        embed_dim = weight.shape[1]
        own = {name: value for name, value in state_dict.items()
               if name.startswith(prefix) and name[len(prefix):] in
               ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias")}
        own = {name[len(prefix):]: value for name, value in own.items()}
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads: expected a positive int; got {num_heads!r}")
        if not is_real(scaling_factor) or not (math.isfinite(scaling_factor) and scaling_factor > 0):
            raise ValueError(f"scaling_factor: expected a finite float > 0 (scaling = (D * scaling_factor) ** -0.5); "
                             f"got {scaling_factor!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}, from {key}) must be divisible by num_heads ({num_heads})")
        head_dim = embed_dim // num_heads
        module = cls(embed_dim, num_heads, dropout=dropout, bias="in_proj.bias" in own,
                     scaling=(head_dim * scaling_factor) ** -0.5,
                     device=weight.device if device is None else device,
                     dtype=weight.dtype if dtype is None else dtype)
        module.load_state_dict(convert_unimol_state_dict(own), strict=True)
        return module

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, *, mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None, rel_index: Tensor | None = None,
                rel_table: Tensor | None = None, return_logits: bool = False, backend: str | None = None,
                generator: torch.Generator | None = None):
        """Attend over each molecule.

        Args:
            x: padded ``(B, N, C)`` or packed ``(T, C)`` (with ``cu_seqlens``).
            attn_bias: float pair bias added to the scaled logits: padded ``(B|1, H|1, N, N)`` or Uni-Mol's
                ``(B*H, N, N)``; packed ``(H|1, P)``, ``P = sum N_i^2`` (:mod:`pyblend.layout`).
            mask: ``(B, N)`` bool, True = real atom (padded layout; default all real). Graphormer/Uni-Mol's
                ``key_padding_mask`` is its negation.
            cu_seqlens: ``(B+1,)`` int32, selects the packed layout; ``max_seqlen``: its longest molecule.
            rel_index, rel_table: integer relation ids ``(B, N, N)`` (packed ``(P,)``) and a float ``(R, H)``
                table (e.g. an ``nn.Parameter``): adds ``rel_table[rel_index]`` to the bias inside the kernel,
                equal to ``attn_bias=bias_from_relations(rel_index, rel_table)`` without materialising it.
            return_logits: also return ``S = (q * scaling) k^T + bias``: ``(B, H, N, N)`` / ``(H, P)``.
            backend: "triton" | "reference" | None (automatic), passed to the op.
            generator: draws the dropout seed (training mode with ``dropout > 0``); default torch's global one.

        Returns:
            ``(B, N, C)`` / ``(T, C)``, or ``(out, logits)`` with ``return_logits``.
        """
        packed = cu_seqlens is not None
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        want = "packed (T, C) since cu_seqlens is given" if packed else "padded (B, N, C) (or packed (T, C) with " \
            "cu_seqlens)"
        if x.dim() != (2 if packed else 3):
            raise ValueError(f"x: expected the {want} layout with C = embed_dim = {self.embed_dim}; got "
                             f"{x.dtype} tensor of shape {tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected its last dimension to be embed_dim = {self.embed_dim}; got "
                             f"{x.dtype} tensor of shape {tuple(x.shape)}")
        check_linear_input(x, "x", self.q_proj.weight, "the module's parameters")
        heads = self.num_heads
        attn_bias = as_tensor(attn_bias, "attn_bias", optional=True)
        if attn_bias is not None and not packed and attn_bias.dim() == 3:  # Uni-Mol's (B*H, N, N)
            batch, atoms = x.shape[0], x.shape[1]
            if tuple(attn_bias.shape) != (batch * heads, atoms, atoms):
                raise ValueError(f"attn_bias: expected (B|1, H|1, N, N) or Uni-Mol's (B*H, N, N) = "
                                 f"({batch * heads}, {atoms}, {atoms}); got shape {tuple(attn_bias.shape)}")
            attn_bias = attn_bias.view(batch, heads, atoms, atoms)
        mask = as_tensor(mask, "mask", optional=True)
        if mask is not None:
            check_mask(mask, x.shape[:2], cu_seqlens)
            check_same_device(x, "x", mask=mask)
            # The projections' weight gradients sum x over every row, padding included: 0 * NaN there (a padded
            # batch filled with NaN, or an upstream layer that overflowed on padding) would poison them.
            x = torch.where(mask[..., None], x, 0)
        split = (*x.shape[:-1], heads, self.head_dim)
        q = self.q_proj(x).view(split)
        k = self.k_proj(x).view(split)
        v = self.v_proj(x).view(split)
        result = ops.relation_attention(
            q, k, v, attn_bias, mask=mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=self.scaling,
            dropout_p=self.dropout if self.training else 0.0, return_logits=return_logits, rel_index=rel_index,
            rel_table=rel_table, generator=generator, backend=backend)
        out, logits = result if return_logits else (result, None)
        out = self.out_proj(out.reshape(*x.shape[:-1], self.embed_dim))
        return (out, logits) if return_logits else out
