"""MoleBlend (seed 001): a relation-biased Transformer over 2D and 3D relations blended per atom pair, with its
pretraining objective (recover every relation from the blend, plus noisy-node denoising) and a fine-tuning head.

Built on pyblend's ops, nothing here computes a pair tensor by hand:

- SPD (:func:`pyblend.ops.shortest_path_routes`): a learned ``(R, H)`` table read inside the attention kernel
  (``rel_index`` / ``rel_table``); ids ``0..max_distance`` (longer paths share ``max_distance``), then one id for
  unreachable pairs and one for the virtual token's distance to every atom (Graphormer's learned
  ``graph_token_virtual_distance``).
- Edge (:func:`pyblend.ops.path_edge_bias`): per-bond embeddings (the mean over the 3 bond features of their
  embeddings) along the shortest path, hop k times its own H x H matrix, averaged over the hops.
- 3D (:class:`pyblend.nn.GaussianBasisBias`): Gaussian basis of the pair distances through Linear-GELU-Linear to
  the heads, and the per-atom sum of the Gaussians as a 3D atom feature (``Linear(K, dim) * 0.01``, as
  Transformer-M).
- Blending (:class:`pyblend.nn.RelationBlender`): in training every pair takes one of SPD / edge / 3D (0.2 / 0.2
  / 0.6); in eval every pair uses every channel its molecule has (2D only without a conformer).
- Pretraining heads (:mod:`pyblend.ops.outer_product`): per head, row and column projections Linear(dim, 32) ->
  GELU -> LayerNorm, their outer product through Linear(1024, C), fused with the loss: SPD classes (11: SPD 1 to
  10, and 11 or longer), edge classes per hop (bond type x stereo x conjugation, 24 joint classes, for each of
  the ``max_hops`` hops; :func:`edge_targets`), and 3D
  (predicted ``pos_j - pos_i``, loss 1 - cos). Noisy node: positions get Gaussian noise (scale 0.2) before the
  3D channel sees them and a node head predicts the noise (loss 1 - cos). Weights: 3D 0.5, SPD 0.1, edge 0.1,
  denoising 6 (the public code's).

The virtual token sits at position 0 of every molecule. A padded batch runs on the padded layout ``(B, 1 + N)``.
A packed batch (:func:`pyblend.collate` with ``layout="packed"``) runs packed end to end, every op on its packed
form: the attention sees ``T + B`` tokens (``cu_seqlens + arange(B + 1)``, ``max_seqlen + 1``) and
``P + 2T + B`` token pairs (:func:`pyblend.layout.prepend_token`), the heads and losses the ``T`` atoms and
``P`` atom pairs, so no ``(B, H, N, N)`` tensor is made (only the training blend draws ``(B, N, N)`` uniforms,
see :mod:`pyblend.ops.blend_relations`, and ``atom_feature_blend`` ``(B, N)`` ones, so that a packed batch gets the
padded batch's draws); :meth:`MoleBlend.forward` pads its final activations once, at the end, to keep returning
``(B, 1 + N, dim)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._values import set_value_checks, values_hidden
from ..features import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS
from ..data import LAYOUTS, MolBatch
from ..layout import atom_molecules, mask_from_cu_seqlens, pad_atoms, pair_index, prepend_token, seqlens
from ..nn import GaussianBasisBias, RelationBiasedAttention, RelationBlender
from ..ops import (
    blend_relations,
    outer_product_cosine_loss,
    outer_product_loss,
    path_edge_bias,
    relation_attention,
    shortest_path_routes,
)
from ..ops._checks import FLOAT_DTYPES, INTEGER_DTYPES, check_dtype, check_flag, check_generator
from ..ops.blend_relations import EDGE, GEOMETRY, SPD, check_blend_mode, check_blend_probs

__all__ = ["MoleBlend", "MoleBlendConfig", "MoleBlendPredictor", "convert_transformer_m_state_dict"]


LOSS_WEIGHTS = {"geometry": 0.5, "spd": 0.1, "edge": 0.1, "denoise": 6.0}


@dataclass
class MoleBlendConfig:
    """Hyper-parameters; the defaults are the paper's base model (Transformer-M / Graphormer base)."""

    layers: int = 12
    dim: int = 768
    heads: int = 32
    ffn_dim: int = 768
    # The public pretraining run's rates (fine-tuning there: dropout, activation dropout and drop-path 0).
    dropout: float = 0.0                 # embeddings, and residual branches of the layers without drop-path
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    droppath: float = 0.1                # stochastic depth of the last layer, from 0 at the first (Graphormer's)
    pre_layernorm: bool = False          # the public code is post-LN
    embedding_layernorm: bool = True     # LayerNorm of the summed embeddings (the base model's
                                         # encoder_normalize_before), ahead of post-LN layers too
    num_kernels: int = 128               # Gaussians of the 3D channel
    std_eps: float = 1e-2
    max_distance: int = 64               # SPD ids 0..64 (longer paths share 64)
    max_degree: int = 64
    max_hops: int = 5
    blend_probs: tuple = (0.2, 0.2, 0.6)
    blend_mode: str = "pair"
    atom_3d_feature: bool = True         # the per-atom Gaussian sums through atom_3d_proj (False: no atom_3d_proj)
    atom_feature_blend: tuple | None = None  # (degree, 3D): the public code's per-atom draw in training, (0.4, 0.6)
    head_width: int = 32                 # d1 = d2 of the outer-product heads
    spd_classes: int = 11                # SPD 1, 2, ..., spd_classes - 1, and the longer ones merged
    edge_classes: tuple = (4, 3, 2)      # bond type x stereo x conjugation of each hop: 24 joint classes
    noise_scale: float = 0.2
    geometry_reduction: str = "molecules"  # 3D head loss: mean of per-molecule means (public code) or "pairs"
    # The paper's weights; a dict naming only some parts overrides those and keeps the others' defaults.
    loss_weights: dict = field(default_factory=lambda: dict(LOSS_WEIGHTS))

    def __post_init__(self):
        positive = ("layers", "dim", "heads", "ffn_dim", "num_kernels", "max_hops", "head_width", "spd_classes")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int; got {value!r}")
        classes = self.edge_classes
        if (not isinstance(classes, (tuple, list)) or len(classes) != len(BOND_FEATURE_DIMS)
                or any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= vocabulary
                       for c, vocabulary in zip(classes, BOND_FEATURE_DIMS))):
            raise ValueError(f"edge_classes: expected {len(BOND_FEATURE_DIMS)} ints, each from 1 to its bond "
                             f"feature's vocabulary {BOND_FEATURE_DIMS}; got {classes!r}")
        self.edge_classes = tuple(classes)
        check_blend_mode(self.blend_mode, "blend_mode")
        check_blend_probs(self.blend_probs, "blend_probs")
        blend = self.atom_feature_blend
        if blend is not None:
            if (not isinstance(blend, (tuple, list)) or len(blend) != 2
                    or any(isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < math.inf
                           for p in blend) or sum(blend) <= 0):
                raise ValueError(f"atom_feature_blend: expected None or two non-negative numbers with a positive "
                                 f"sum (the probabilities of the degree embedding and the 3D atom feature); got "
                                 f"{blend!r}")
            if self.blend_mode == "molecule":
                raise ValueError("atom_feature_blend: blend_mode='molecule' already chooses each molecule's atom "
                                 "features from its drawn subset; use one or the other")
            if not self.atom_3d_feature:
                raise ValueError("atom_feature_blend: draws each atom's degree embedding or its 3D atom feature, and "
                                 "atom_3d_feature=False turns the latter off (the atoms drawing it would get neither)")
            self.atom_feature_blend = tuple(float(p) for p in blend)
        if self.geometry_reduction not in ("molecules", "pairs"):
            raise ValueError(f"geometry_reduction: expected 'molecules' or 'pairs'; got {self.geometry_reduction!r}")
        for name in ("max_distance", "max_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0; got {value!r}")
        for name in ("droppath", "dropout", "attention_dropout", "activation_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1); got {value!r}")
        # A truthy stand-in ("no", "False") would build the other model.
        for name in ("pre_layernorm", "embedding_layernorm", "atom_3d_feature"):
            setattr(self, name, check_flag(getattr(self, name), name))
        noise = self.noise_scale
        if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise_scale: expected a finite float >= 0 (the std of the position noise); got "
                             f"{noise!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not isinstance(self.loss_weights, Mapping):
            raise TypeError(f"loss_weights: expected a dict of part -> weight ({', '.join(LOSS_WEIGHTS)}); got "
                            f"{type(self.loss_weights).__name__}")
        unknown = set(self.loss_weights) - set(LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"loss_weights: unknown parts {sorted(unknown)}; expected {', '.join(LOSS_WEIGHTS)}")
        for name, weight in self.loss_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (math.isfinite(weight)
                                                                                       and weight >= 0):
                raise ValueError(f"loss_weights[{name!r}]: expected a finite number >= 0; got {weight!r}")
        self.loss_weights = {**LOSS_WEIGHTS, **self.loss_weights}


def spd_targets(spd: Tensor, classes: int) -> Tensor:
    """The SPD head's target, int64 of ``spd``'s shape: class ``min(s, classes) - 1`` for a distance ``s >= 1``
    (the longest class holds every longer distance), -100 (ignored) on the diagonal (``s = 0``), at unreachable
    pairs and padding (``s = -1``)."""
    return torch.where(spd <= 0, -100, spd.clamp(max=classes).long() - 1)


def edge_targets(routes: Tensor, bond_features: Tensor, classes: tuple) -> Tensor:
    """The edge head's target, int64 of ``routes``' shape ``(..., max_hops)``: for each hop of the shortest path,
    its bond's joint class ``(type * classes[1] + stereo) * classes[2] + conjugated`` (the public code's, with
    ``classes = (4, 3, 2)``: 24 classes); -100 (ignored) past the path's end and for a bond with a feature outside
    ``classes`` (the vocabulary's "other" bond type, and the rarer stereo labels: ``STEREOCIS``, ``STEREOTRANS``,
    ``STEREOANY``). ``routes``: bond ids, -1 past the end; ``bond_features``: ``(E, 3)``."""
    features = bond_features.long()
    kind, stereo, conjugated = features.unbind(-1)
    joint = (kind * classes[1] + stereo) * classes[2] + conjugated
    known = (features >= 0).all(-1) & (kind < classes[0]) & (stereo < classes[1]) & (conjugated < classes[2])
    joint = torch.where(known, joint, -100)
    # Hops past a path's end read an appended ignored row (which also exists when no molecule has a bond).
    joint = F.pad(joint, (0, 1), value=-100)
    return joint[torch.where(routes >= 0, routes.long(), joint.shape[0] - 1)]


@dataclass
class PackedIndex:
    """Index tensors of a packed batch (:mod:`pyblend.layout`), made once per batch by
    :meth:`MoleBlend.build_relations` so that no step loops over molecules."""

    atom_molecule: Tensor       # (T,) int64, the molecule of each atom
    pair_molecule: Tensor       # (P,) int64, the molecule of each atom pair
    pair_row: Tensor            # (P,) int64, the packed atom index of each pair's atom i
    pair_col: Tensor            # (P,) int64, ... of its atom j
    token_cu_seqlens: Tensor    # (B+1,) int32, the atoms with the virtual token first in every molecule
    atom_slots: Tensor          # (T,) int64, each atom's row among the T + B tokens
    pair_slots: Tensor          # (P,) int64, each atom pair's place among the P + 2T + B token pairs

    @classmethod
    def build(cls, cu_seqlens: Tensor, atoms: int, pairs: int) -> PackedIndex:
        molecule, i, j = pair_index(cu_seqlens, pairs)
        start = cu_seqlens.long()[molecule]
        token_cu_seqlens, atom_slots, pair_slots = prepend_token(cu_seqlens, atoms, pairs)
        return cls(atom_molecules(cu_seqlens, atoms), molecule, start + i, start + j, token_cu_seqlens, atom_slots,
                   pair_slots)

    @property
    def tokens(self) -> int:
        """``T + B``: the atoms and one virtual token per molecule."""
        return self.atom_slots.numel() + self.token_cu_seqlens.numel() - 1

    @property
    def token_pairs(self) -> int:
        """``sum (1 + N_i)^2 = P + 2T + B``."""
        return self.pair_slots.numel() + 2 * self.atom_slots.numel() + self.token_cu_seqlens.numel() - 1


@dataclass
class Relations:
    """A batch's relations, atoms only (no virtual token yet), in the batch's layout.

    Padded: ``mask (B, N)``, per-atom tensors ``(B, N, ...)``, per-pair ``(B, N, N, ...)``. Packed: ``mask`` None,
    ``cu_seqlens (B+1,)`` int32 and ``max_seqlen``, per-atom ``(T, ...)``, per-pair ``(P, ...)`` (molecule i's
    block row-major at ``sum_{j<i} N_j^2``), and ``index``, the batch's :class:`PackedIndex`.
    """

    mask: Tensor | None     # (B, N) bool; None when packed
    spd: Tensor             # (B, N, N) / (P,) int32, -1 unreachable / padding
    routes: Tensor          # (B, N, N, hops) / (P, hops) global bond ids, -1 past the end
    bond_features: Tensor   # (E, F_b) int64, every bond of the batch (global ids)
    atom_features: Tensor   # (B, N, F_a) / (T, F_a)
    positions: Tensor | None     # (B, N, 3) / (T, 3), zeros where unknown
    has_geometry: Tensor    # (B,) bool
    cu_seqlens: Tensor | None = None   # (B+1,) int32 when packed
    max_seqlen: int | None = None      # the longest molecule when packed
    index: PackedIndex | None = None   # when packed

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


class EncoderLayer(nn.Module):
    """Graphormer/Transformer-M layer: relation-biased attention and a feed-forward, post- or pre-LN.

    ``forward(x, mask, **attention)``: padded ``x (B, N, dim)`` with ``mask (B, N)``, or packed ``x (T, dim)`` with
    ``mask=None`` and ``cu_seqlens`` / ``max_seqlen`` among ``attention`` (the keyword arguments of
    :class:`pyblend.nn.RelationBiasedAttention`: ``attn_bias``, ``rel_index``, ``rel_table``...). Returns ``x``'s
    shape.

    ``droppath``: in training, each residual branch (attention, feed-forward) is dropped for a whole molecule
    with this probability and scaled by ``1 / (1 - droppath)`` where kept (stochastic depth, one draw per molecule
    and branch from torch's global generator, as dropout). Graphormer's own DropPath runs on its ``(N, B, dim)``
    layout and so draws per atom position shared by the batch; pyblend draws per molecule, as stochastic depth
    is defined. Packed, ``row_molecules`` gives each row's molecule (:func:`pyblend.layout.atom_molecules` of
    ``cu_seqlens``; made here when not given: :class:`MoleBlend` makes it once for all its layers). As in
    Graphormer / Transformer-M, drop-path takes the place of the residual branches' dropout (``config.dropout``),
    which only a layer with ``droppath == 0`` applies."""

    def __init__(self, config: MoleBlendConfig, droppath: float = 0.0):
        super().__init__()
        self.pre_layernorm = config.pre_layernorm
        self.droppath = float(droppath)
        self.self_attn = RelationBiasedAttention(config.dim, config.heads, dropout=config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(config.dim)
        self.fc1 = nn.Linear(config.dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.dim)
        self.final_layer_norm = nn.LayerNorm(config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, row_molecules: Tensor | None = None,
                **attention) -> Tensor:
        cu_seqlens = attention.get("cu_seqlens")
        molecules = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        if cu_seqlens is not None and row_molecules is None and self.training and self.droppath > 0.0:
            row_molecules = atom_molecules(cu_seqlens, x.shape[0])
        residual = x
        if self.pre_layernorm:
            x = self.self_attn_layer_norm(x)
        x = residual + self._residual_dropout(self.self_attn(x, mask=mask, **attention), molecules, row_molecules)
        if not self.pre_layernorm:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.pre_layernorm:
            x = self.final_layer_norm(x)
        x = self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))
        x = residual + self._residual_dropout(x, molecules, row_molecules)
        if not self.pre_layernorm:
            x = self.final_layer_norm(x)
        return x

    def _residual_dropout(self, branch: Tensor, molecules: int, row_molecules: Tensor | None) -> Tensor:
        """Drop-path: ``branch`` with each molecule's rows dropped or scaled (padded, ``row_molecules`` None: row
        b is molecule b); without drop-path, dropout."""
        if self.droppath == 0.0:
            return self.dropout(branch)
        if not self.training:
            return branch
        keep = 1.0 - self.droppath
        scale = (torch.rand(molecules, device=branch.device) < keep).to(branch.dtype) / keep
        return branch * (scale[:, None, None] if row_molecules is None else scale[row_molecules][:, None])


class _PairProjection(nn.Module):
    """Row or column projection of an outer-product head: Linear(dim, width) -> GELU -> LayerNorm (eps 1e-12, as
    the public code's ``TransformN2Head``)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.linear, self.norm = nn.Linear(dim, width), nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.gelu(self.linear(x)))


class _OuterProductHead(nn.Module):
    def __init__(self, dim: int, width: int, classes: int):
        super().__init__()
        self.row, self.col = _PairProjection(dim, width), _PairProjection(dim, width)
        self.out = nn.Linear(width * width, classes)

    def projected(self, atoms: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(row, col, out.weight, out.bias)`` for the fused ops, which take one dtype: under autocast the
        projections come out in 16 bits while the parameters stay float32, so these follow the rows (a
        differentiable cast, as autocast's own Linear makes)."""
        row, col = self.row(atoms), self.col(atoms)
        return row, col, self.out.weight.to(row.dtype), self.out.bias.to(row.dtype)


class NoisyNodeHead(nn.Module):
    """Transformer-M's atom head (``AtomTaskHead``, same parameter names): per-head attention over the atoms
    with the 3D bias, each pair's weight times the unit vector along ``pos_j - pos_i`` applied to the values,
    one Linear(dim, 1) per coordinate. The public code passes the whole attention bias of the last layer; this
    head takes the 3D channel's bias (the blended 2D channels carry no geometry). The public head also applies
    dropout 0.1 to its attention probabilities; this one has none (the packed form's factorisation below needs
    the undropped probabilities).

    Padded (``x (B, N, dim)``, ``positions (B, N, 3)``, ``bias (B, H, N, N)``, ``mask``): runs in torch, one
    layer on ``(B, H, N, N, 3)`` at the end of the model. Packed (``x (T, dim)``, ``positions (T, 3)``,
    ``bias (H, P)``, ``cu_seqlens``, ``max_seqlen``): one call of :func:`pyblend.ops.relation_attention`, so
    nothing larger than ``(H, P)`` is made. With ``w_ij = 1 / (|pos_j - pos_i| + 1e-5)``,
    ``sum_j softmax(S)_ij w_ij (pos_j - pos_i) v_j = m_i sum_j softmax(S + log w)_ij (pos_j - pos_i) v_j`` with
    ``m_i = sum_j softmax(S)_ij w_ij``, and the inner sum is the attention over the values
    ``[v, pos_x v, pos_y v, pos_z v]`` minus ``pos_i`` times its first part. It runs in float32 (the
    subtraction) with positions centred per molecule; ``m`` comes from the logits the op returns. Returns
    ``(B, N, 3)`` / ``(T, 3)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.force_proj1, self.force_proj2, self.force_proj3 = (nn.Linear(dim, 1) for _ in range(3))

    def forward(self, x: Tensor, positions: Tensor, bias: Tensor | None, mask: Tensor | None = None, *,
                cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                pair_atoms: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``pair_atoms``: packed only, the ``(P,)`` packed atom indices of every pair's i and j
        (:class:`PackedIndex` ``pair_row``, ``pair_col``), made from ``cu_seqlens`` when None."""
        if cu_seqlens is not None:
            if mask is not None:
                raise ValueError("mask: the packed layout (cu_seqlens given) has no padding; pass mask=None")
            return self._packed(x, positions, bias, cu_seqlens, max_seqlen, pair_atoms)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        batch, atoms, dim = x.shape
        split = (lambda t: t.view(batch, atoms, self.heads, -1).transpose(1, 2))
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        attention = torch.softmax(logits, dim=-1).nan_to_num(0.0)                      # (B, H, N, N)
        delta = positions[:, None, :] - positions[:, :, None]                          # pos_j - pos_i
        delta = (delta / (delta.norm(dim=-1, keepdim=True) + 1e-5)).to(v.dtype)        # (B, N, N, 3)
        rotated = torch.einsum("bhij,bijc,bhjd->bichd", attention, delta, v)           # (B, N, 3, H, dh)
        rotated = rotated.reshape(batch, atoms, 3, dim)
        return self._project(rotated)

    def _project(self, rotated: Tensor) -> Tensor:
        projections = (self.force_proj1, self.force_proj2, self.force_proj3)
        return torch.cat([proj(rotated[..., c, :]) for c, proj in enumerate(projections)], dim=-1)

    def _packed(self, x: Tensor, positions: Tensor, bias: Tensor | None, cu_seqlens: Tensor, max_seqlen: int | None,
                pair_atoms: tuple[Tensor, Tensor] | None) -> Tensor:
        atoms, dim = x.shape
        if pair_atoms is None:
            molecule, i, j = pair_index(cu_seqlens)
            start = cu_seqlens.long()[molecule]
            pair_atoms = (start + i, start + j)
        rows, cols = pair_atoms
        split = (lambda t: t.view(atoms, self.heads, -1).float())
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        head_dim = q.shape[-1]
        positions = positions.float()
        distance = (positions[cols] - positions[rows]).norm(dim=-1)
        # On the diagonal pos_j - pos_i is 0, so any finite weight gives the same sum; 1 keeps it tame.
        log_weight = torch.where(rows == cols, 0.0, -torch.log(distance + 1e-5))                       # (P,)
        molecule = atom_molecules(cu_seqlens, atoms)
        centre = torch.zeros(cu_seqlens.numel() - 1, 3, device=x.device).index_add_(0, molecule, positions)
        centre = centre / seqlens(cu_seqlens).clamp(min=1)[:, None]
        centred = positions - centre[molecule]                                                          # (T, 3)
        moments = torch.cat([torch.ones_like(centred[:, :1]), centred], dim=1)                          # (T, 4)
        values = (moments[:, None, :, None] * v[:, :, None, :]).reshape(atoms, self.heads, 4 * head_dim)
        widen = (lambda t: F.pad(t, (0, 3 * head_dim)))  # q, k, v share one shape; zeros leave q.k unchanged
        logit_bias = log_weight[None] if bias is None else bias.float() + log_weight
        weighted, logits = relation_attention(widen(q), widen(k), values, logit_bias, cu_seqlens=cu_seqlens,
                                              max_seqlen=max_seqlen, scale=head_dim ** -0.5, return_logits=True)
        # logits = S + log w (H, P): m_i = exp(lse_j(S + log w) - lse_j(S)).
        row_scale = torch.exp(_row_logsumexp(logits, rows, atoms) - _row_logsumexp(logits - log_weight, rows, atoms))
        weighted = weighted.view(atoms, self.heads, 4, head_dim)
        rotated = (weighted[:, :, 1:] - centred[:, None, :, None] * weighted[:, :, :1]) * row_scale.T[:, :, None, None]
        return self._project(rotated.transpose(1, 2).reshape(atoms, 3, dim).to(x.dtype))


def _row_logsumexp(values: Tensor, rows: Tensor, count: int) -> Tensor:
    """``values (H, P)`` -> ``(H, count)``: the log-sum-exp of each row's entries, ``rows (P,)`` naming the row of
    each entry (every row has at least one)."""
    index = rows[None].expand_as(values)
    peak = values.new_full((values.shape[0], count), float("-inf"))
    peak = peak.scatter_reduce(1, index, values, "amax").detach()  # a stabiliser: the result does not depend on it
    total = values.new_zeros(values.shape[0], count).index_add(1, rows, torch.exp(values - peak[:, rows]))
    return peak + total.log()


class MoleBlend(nn.Module):
    """The MoleBlend encoder and its pretraining objective.

    ``model(batch)`` -> ``(B, 1 + N, dim)`` atom representations, the virtual token first (its row is the CLS
    readout, also :meth:`readout`). ``model.pretrain_loss(batch)`` -> ``(loss, parts)``. ``batch`` is a
    :class:`pyblend.MolBatch` from :func:`pyblend.collate`, padded or packed (which runs packed throughout, see
    the module docstring); molecules without a conformer (``has_positions`` False) use the 2D channels only and
    skip the 3D and denoising losses.
    """

    def __init__(self, config: MoleBlendConfig | None = None):
        super().__init__()
        config = MoleBlendConfig() if config is None else config
        if not isinstance(config, MoleBlendConfig):
            raise TypeError(f"config: expected a MoleBlendConfig or None (MoleBlendConfig(**options) for a dict); "
                            f"got {type(config).__name__}")
        self.config = config
        dim, heads = config.dim, config.heads
        self.atom_encoder = nn.Embedding(sum(ATOM_FEATURE_DIMS), dim)
        self.register_buffer("atom_offsets", _offsets(ATOM_FEATURE_DIMS), persistent=False)
        self.register_buffer("atom_dims", torch.tensor(ATOM_FEATURE_DIMS), persistent=False)
        self.degree_encoder = nn.Embedding(config.max_degree + 1, dim)
        self.graph_token = nn.Embedding(1, dim)
        # SPD ids 0..max_distance, then unreachable, then the virtual token's distance.
        self.spatial_pos_encoder = nn.Embedding(config.max_distance + 3, heads)
        self.edge_encoder = nn.Embedding(sum(BOND_FEATURE_DIMS), heads)
        self.register_buffer("bond_offsets", _offsets(BOND_FEATURE_DIMS), persistent=False)
        self.register_buffer("bond_dims", torch.tensor(BOND_FEATURE_DIMS), persistent=False)
        self.edge_dis_encoder = nn.Embedding(config.max_hops * heads * heads, 1)
        # Pair types (z_i, V + z_j): as in the public code, atom i's and atom j's atomic numbers read different
        # rows of mul and bias, so the distance's affine map can tell the pair (C, O) from (O, C).
        self.gaussian = GaussianBasisBias(heads, num_kernels=config.num_kernels,
                                          num_pair_types=2 * ATOM_FEATURE_DIMS[0], std_eps=config.std_eps)
        # Only where it is used: a parameter no forward reads never gets a gradient, which DistributedDataParallel
        # refuses unless find_unused_parameters=True.
        self.atom_3d_proj = nn.Linear(config.num_kernels, dim) if config.atom_3d_feature else None
        self.blender = RelationBlender(config.blend_probs, config.blend_mode)
        self.emb_layer_norm = nn.LayerNorm(dim) if config.embedding_layernorm else None
        rates = [config.droppath * depth / max(config.layers - 1, 1) for depth in range(config.layers)]
        self.layers = nn.ModuleList(EncoderLayer(config, droppath=rate) for rate in rates)
        width = config.head_width
        self.spd_head = _OuterProductHead(dim, width, config.spd_classes)
        self.edge_head = _OuterProductHead(dim, width, config.max_hops * math.prod(config.edge_classes))
        self.geometry_head = _OuterProductHead(dim, width, 3)
        self.atom_proc = NoisyNodeHead(dim, heads)
        self._graphormer_init()
        # The index buffers are not in the state_dict (they follow from the feature vocabularies): refilled after
        # every load, a model built on the meta device or left uninitialised by to_empty() gets them too.
        self.register_load_state_dict_post_hook(_refill_feature_rows)

    @property
    def unreachable_id(self) -> int:
        return self.config.max_distance + 1

    @property
    def virtual_id(self) -> int:
        return self.config.max_distance + 2

    def reset_parameters(self) -> None:
        """Every parameter as at construction (after ``to_empty()`` they hold garbage, the feature-row index
        buffers too): each submodule's own initialisation, then Graphormer's."""
        _refill_feature_rows(self)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self._graphormer_init()

    def _graphormer_init(self) -> None:
        """Graphormer's init: Linear and Embedding weights N(0, 0.02), biases 0; the Gaussian layer keeps its own."""
        gaussian = {id(module) for module in self.gaussian.modules()}
        for module in self.modules():
            if id(module) in gaussian:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------------- encoder
    def forward(self, batch: MolBatch, *, positions: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Atom representations ``(B, 1 + N, dim)`` (virtual token at 0, N = the batch's ``max_seqlen``) of a
        padded or packed batch. A packed batch runs packed and its final ``(T + B, dim)`` activations are padded
        here, once. Rows past a molecule's end are 0 in both layouts, so pooling over every row cannot read them.

        ``positions`` overrides the batch's (padded ``(B, N, 3)``; for a packed batch ``(T, 3)`` or padded
        ``(B, N, 3)``); ``generator`` draws the blend in training mode."""
        relations = self.build_relations(batch, positions)
        x, _, _ = self._encode(relations, generator)
        if relations.packed:
            return pad_atoms(x, relations.index.token_cu_seqlens, relations.max_seqlen + 1)
        # Padded rows leave each layer non-zero (LayerNorm and the feed-forward of a zero attention output).
        real = F.pad(relations.mask, (1, 0), value=True)[..., None]
        return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def readout(self, batch: MolBatch, *, positions: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """The virtual token's final row per molecule, ``(B, dim)``: ``model(batch)[:, 0]`` without padding a
        packed batch. Arguments as :meth:`forward`."""
        relations = self.build_relations(batch, positions)
        x, _, _ = self._encode(relations, generator)
        if relations.packed:
            return x[relations.index.token_cu_seqlens[:-1].long()]
        return x[:, 0]

    def _atom_features(self, choice: Tensor, relations: Relations, generator: torch.Generator | None
                       ) -> tuple[Tensor | None, Tensor | None]:
        """Per atom (padded ``(B, N)``, packed ``(T,)``), whether it takes the degree embedding and whether the 3D
        atom feature; ``(None, None)`` where every atom takes every feature its molecule has (eval, and by
        default). ``choice``: the relation blend's pair choices, ``(B, N, N)`` / ``(P,)``.

        In training, ``blend_mode="molecule"`` (Transformer-M's modes) follows each molecule's drawn subset (the
        choice bits its pairs share): drawn 2D-only, no 3D atom feature; 3D-only, no degree embedding, so neither
        modality leaks into the other. ``atom_feature_blend`` (the public MoleBlend code's ``blend_atom_feature``)
        draws one of the two per atom from ``generator``; an atom of a molecule without a conformer keeps its
        degree embedding. The draw is padded ``(B, N)`` uniforms in both layouts, a packed batch reading its atoms'
        out of them (as :func:`pyblend.ops.sample_blend` draws its pairs), so a packed batch gets the padded
        batch's draw from the same generator."""
        if not self.blender.training:
            return None, None
        has_geometry, index = relations.has_geometry, relations.index
        if relations.packed:
            molecule = index.atom_molecule                                                              # (T,)
            known = has_geometry[molecule]
        else:
            known = has_geometry[:, None].expand(relations.mask.shape)                                  # (B, N)
        if self.blender.mode == "molecule":
            if relations.packed:
                subsets = choice.new_zeros(has_geometry.shape[0]).scatter_reduce(0, index.pair_molecule, choice,
                                                                                 "amax")[molecule]
            else:
                subsets = choice.amax(dim=(1, 2))[:, None].expand(known.shape)
            return (subsets & (SPD | EDGE)) != 0, ((subsets & GEOMETRY) != 0) & known
        probs = self.config.atom_feature_blend
        if probs is None:
            return None, None
        width = relations.max_seqlen if relations.packed else relations.mask.shape[1]
        # generator=None is left out of the call: torch.compile traces that overload with concrete sizes only.
        options = dict(device=known.device) if generator is None else dict(generator=generator, device=known.device)
        draw = torch.rand(has_geometry.shape[0], width, **options)                                      # (B, N)
        if relations.packed:
            position = torch.arange(molecule.numel(), device=molecule.device) - relations.cu_seqlens.long()[molecule]
            draw = draw[molecule, position]
        takes_3d = (draw >= probs[0] / (probs[0] + probs[1])) & known
        return ~takes_3d, takes_3d

    def _encode(self, relations: Relations, generator) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, attention, geometry_bias, drawn_3d = self._layer_inputs(relations, generator)
        mask = None if relations.packed else F.pad(relations.mask, (1, 0), value=True)
        row_molecules = None  # drop-path's token -> molecule map, made once for every layer
        if relations.packed and self.training and self.config.droppath > 0.0:
            row_molecules = atom_molecules(attention["cu_seqlens"], x.shape[0])
        for depth, layer in enumerate(self.layers):
            with _checked_by_the_first_layer(depth):
                x = layer(x, mask, row_molecules=row_molecules, **attention)
        return x, geometry_bias, drawn_3d

    def layer_inputs(self, relations: Relations, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, dict[str, Tensor | int | None], Tensor | None]:
        """What the first layer receives: the embeddings (after the embedding LayerNorm and dropout), the
        attention's inputs, and the 3D channel's bias (None without positions).

        Padded: ``(B, 1 + N, dim)``, ``{"attn_bias", "rel_index", "rel_table"}`` over ``1 + N`` positions,
        ``(B, H, N, N)``. Packed: ``(T + B, dim)`` with each molecule's virtual token first, ``{"attn_bias" (H, P +
        2T + B), "rel_index" (P + 2T + B,), "rel_table", "cu_seqlens", "max_seqlen"}`` over those tokens, ``(H, P)``.
        """
        return self._layer_inputs(relations, generator)[:3]

    def _layer_inputs(self, relations: Relations, generator: torch.Generator | None
                      ) -> tuple[Tensor, dict[str, Tensor | int | None], Tensor | None, Tensor | None]:
        """:meth:`layer_inputs`, and the atoms drawn to take the 3D atom feature (training with
        ``atom_feature_blend`` or ``blend_mode="molecule"``; else None: every atom of a molecule with a
        conformer), padded ``(B, N)`` / packed ``(T,)``."""
        if relations.packed:
            return self._packed_layer_inputs(relations, generator)
        config = self.config
        mask = relations.mask
        choice = self.blender(mask, has_geometry=relations.has_geometry, generator=generator)
        with_degree, with_3d = self._atom_features(choice, relations, generator)
        drawn_3d = with_3d  # as drawn: a default replaces None below
        x = self.atom_encoder(_rows(relations.atom_features, self.atom_offsets, self.atom_dims)).sum(dim=-2)
        degree = self.degree_encoder((relations.spd == 1).sum(-1).clamp(max=config.max_degree))
        x = x + (degree if with_degree is None else torch.where(with_degree[..., None], degree, 0.0))

        edge_bias = path_edge_bias(relations.routes, relations.spd, self._bond_embeddings(relations),
                                   self.edge_dis_encoder.weight.view(config.max_hops, config.heads, config.heads))
        geometry_bias = None
        if relations.positions is not None:
            # As the embeddings read them (an id outside the table would be a bad pair_types id).
            atom_types = _in_vocabulary(relations.atom_features[..., 0], ATOM_FEATURE_DIMS[0])
            pair_types = torch.stack(torch.broadcast_tensors(atom_types[:, :, None],
                                                             ATOM_FEATURE_DIMS[0] + atom_types[:, None, :]), -1)
            geometry_bias, atom_3d = self.gaussian(relations.positions, pair_types, mask=mask)
            known = relations.has_geometry
            geometry_bias = torch.where(known[:, None, None, None], geometry_bias, 0.0)
            if self.atom_3d_proj is not None:
                with_3d = known[:, None] if with_3d is None else with_3d
                x = x + torch.where(with_3d[..., None], self.atom_3d_proj(atom_3d) * 0.01, 0.0)

        spd_index = torch.where(relations.spd < 0, self.unreachable_id,
                                relations.spd.clamp(max=config.max_distance))
        blended = blend_relations(choice, spd_index=spd_index, spd_table=self.spatial_pos_encoder.weight,
                                  edge_bias=edge_bias, geometry_bias=geometry_bias)
        # The virtual token at position 0: its pairs always take the virtual distance, no edge or 3D bias.
        attention = {"rel_index": F.pad(blended["rel_index"], (1, 0, 1, 0), value=self.virtual_id),
                     "attn_bias": None if blended["bias"] is None else F.pad(blended["bias"], (1, 0, 1, 0)),
                     "rel_table": blended["rel_table"]}

        x = torch.cat([self.graph_token.weight.expand(len(x), 1, -1), x], dim=1)
        if self.emb_layer_norm is not None:
            x = self.emb_layer_norm(x)
        return F.dropout(x, config.dropout, self.training), attention, geometry_bias, drawn_3d

    def _packed_layer_inputs(self, relations: Relations, generator: torch.Generator | None
                             ) -> tuple[Tensor, dict[str, Tensor | int | None], Tensor | None, Tensor | None]:
        config, index = self.config, relations.index
        cu_seqlens, width = relations.cu_seqlens, relations.max_seqlen
        atoms = relations.atom_features.shape[0]
        known = relations.has_geometry
        # P from the relations' length: torch.compile would otherwise make the choice's length, read from
        # cu_seqlens' values, a size of its own, and meta tensors have no values to read it from.
        choice = self.blender(cu_seqlens=cu_seqlens, max_seqlen=width, has_geometry=known, generator=generator,
                              pairs=relations.spd.shape[0])
        with_degree, with_3d = self._atom_features(choice, relations, generator)
        drawn_3d = with_3d  # as drawn: a default replaces None below
        x = self.atom_encoder(_rows(relations.atom_features, self.atom_offsets, self.atom_dims)).sum(dim=-2)  # (T, dim)
        neighbours = (relations.spd == 1).long()
        degree = torch.zeros(atoms, dtype=torch.long, device=x.device).index_add_(0, index.pair_row, neighbours)
        degree = self.degree_encoder(degree.clamp(max=config.max_degree))
        x = x + (degree if with_degree is None else torch.where(with_degree[:, None], degree, 0.0))

        edge_bias = path_edge_bias(relations.routes, relations.spd, self._bond_embeddings(relations),
                                   self.edge_dis_encoder.weight.view(config.max_hops, config.heads, config.heads),
                                   cu_seqlens=cu_seqlens)                                                # (H, P)
        geometry_bias = None
        if relations.positions is not None:
            # As the embeddings read them (an id outside the table would be a bad pair_types id).
            atom_types = _in_vocabulary(relations.atom_features[..., 0], ATOM_FEATURE_DIMS[0])
            pair_types = torch.stack([atom_types[index.pair_row], ATOM_FEATURE_DIMS[0] + atom_types[index.pair_col]],
                                     dim=-1)                                                             # (P, 2)
            geometry_bias, atom_3d = self.gaussian(relations.positions, pair_types, cu_seqlens=cu_seqlens,
                                                   max_seqlen=width)                                     # (H, P)
            geometry_bias = torch.where(known[index.pair_molecule], geometry_bias, 0.0)
            if self.atom_3d_proj is not None:
                with_3d = known[index.atom_molecule] if with_3d is None else with_3d
                x = x + torch.where(with_3d[:, None], self.atom_3d_proj(atom_3d) * 0.01, 0.0)

        spd_index = torch.where(relations.spd < 0, self.unreachable_id,
                                relations.spd.clamp(max=config.max_distance))
        blended = blend_relations(choice, spd_index=spd_index, spd_table=self.spatial_pos_encoder.weight,
                                  edge_bias=edge_bias, geometry_bias=geometry_bias)
        # The virtual token first in every molecule: its pairs take the virtual distance and no edge or 3D bias.
        token_pairs, rel_index, bias = index.token_pairs, blended["rel_index"], blended["bias"]
        rel_index = rel_index.new_full((token_pairs,), self.virtual_id).index_copy(0, index.pair_slots, rel_index)
        if bias is not None:
            bias = bias.new_zeros(bias.shape[0], token_pairs).index_copy(1, index.pair_slots, bias)
        attention = {"rel_index": rel_index, "attn_bias": bias, "rel_table": blended["rel_table"],
                     "cu_seqlens": index.token_cu_seqlens, "max_seqlen": width + 1}

        x = self.graph_token.weight.expand(index.tokens, -1).index_copy(0, index.atom_slots, x)        # (T + B, dim)
        if self.emb_layer_norm is not None:
            x = self.emb_layer_norm(x)
        return F.dropout(x, config.dropout, self.training), attention, geometry_bias, drawn_3d

    def _bond_embeddings(self, relations: Relations) -> Tensor:
        """``(E, H)``: each bond's mean over its features of their embeddings."""
        return self.edge_encoder(_rows(relations.bond_features, self.bond_offsets, self.bond_dims)).mean(dim=-2)

    def build_relations(self, batch: MolBatch, positions: Tensor | None = None) -> Relations:
        """The atoms-only :class:`Relations` of a batch, in its layout, with shortest paths and global bond ids.

        ``positions`` overrides the batch's: padded ``(B, N, 3)``; for a packed batch ``(T, 3)`` or padded
        ``(B, N, 3)`` (N = ``batch.max_seqlen``), packed here. Molecules the batch marks as without a conformer
        (``has_positions`` False) stay 2D whatever the override holds for them (pretraining overrides with noised
        positions, which must not give them a 3D channel). The others' coordinates must be finite (checked with one
        host read, unless values are hidden: :class:`pyblend.set_value_checks`)."""
        if not isinstance(batch, MolBatch):
            raise TypeError(f"batch: expected a pyblend MolBatch (from pyblend.collate); got {type(batch).__name__}")
        if batch.layout not in LAYOUTS:
            raise ValueError(f"batch: expected layout 'padded' or 'packed'; got {batch.layout!r}")
        # Else torch's embedding or arithmetic errors, which name neither the batch nor the field.
        check_dtype(batch.atom_features, "batch.atom_features", INTEGER_DTYPES)
        if isinstance(positions, Tensor):
            check_dtype(positions, "positions", FLOAT_DTYPES)
        relations = self._packed_relations(batch, positions) if batch.layout == "packed" else \
            self._padded_relations(batch, positions)
        if relations.positions is not None and not values_hidden(relations.positions):
            # NaN or inf at one atom turned every part of the loss NaN, the 2D ones too (they share the encoder).
            finite = torch.isfinite(relations.positions).all(-1)
            molecule = relations.index.atom_molecule if relations.packed else None
            bad = ~finite if relations.packed else ~finite.all(-1)
            if bool(bad.any()):
                first = int(molecule[bad][0]) if relations.packed else int(bad.nonzero()[0])
                raise ValueError(f"positions: molecule {first} has a conformer (has_positions) but NaN or inf "
                                 f"coordinates")
        return relations

    def _padded_relations(self, batch: MolBatch, positions: Tensor | None) -> Relations:
        mask, atom_features = batch.mask, batch.atom_features
        bonds = batch.bond_features.shape[1]
        start = torch.arange(len(batch), device=mask.device, dtype=torch.int32)[:, None, None] * bonds
        bond_ids = torch.where(batch.bond_ids >= 0, batch.bond_ids + start, -1)
        bond_features = batch.bond_features.reshape(-1, batch.bond_features.shape[-1])
        batch_positions = batch.positions
        spd, routes = shortest_path_routes(bond_ids, mask, max_hops=self.config.max_hops)
        if positions is not None and (not isinstance(positions, Tensor) or positions.shape != (*mask.shape, 3)):
            got = f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, Tensor) else \
                type(positions).__name__
            raise ValueError(f"positions: expected padded (B, N, 3) = ({mask.shape[0]}, {mask.shape[1]}, 3) for this "
                             f"padded batch; got {got}")
        positions = batch_positions if positions is None else positions
        has_geometry = torch.zeros(len(batch), dtype=torch.bool, device=mask.device)
        if positions is not None:
            has_geometry = batch.has_positions.to(mask.device) if batch.has_positions is not None else \
                torch.ones_like(has_geometry)
            # Molecules without a conformer carry NaN positions: zero them (their 3D channel is never chosen).
            positions = torch.where((has_geometry[:, None] & mask)[..., None], positions, 0.0)
        return Relations(mask, spd, routes, bond_features, atom_features, positions, has_geometry)

    def _packed_relations(self, batch: MolBatch, positions: Tensor | None) -> Relations:
        cu_seqlens, width = batch.cu_seqlens, batch.max_seqlen
        atoms, pairs = batch.atom_features.shape[0], batch.bond_ids.shape[0]
        index = PackedIndex.build(cu_seqlens, atoms, pairs)
        # The packed bond ids are batch-wide already: they index batch.bond_features (E_total, F_b).
        spd, routes = shortest_path_routes(batch.bond_ids, cu_seqlens=cu_seqlens, max_hops=self.config.max_hops)
        positions = batch.positions if positions is None else _packed_positions(positions, cu_seqlens, width, atoms)
        has_geometry = torch.zeros(len(batch), dtype=torch.bool, device=cu_seqlens.device)
        if positions is not None:
            has_geometry = batch.has_positions.to(cu_seqlens.device) if batch.has_positions is not None else \
                torch.ones_like(has_geometry)
            # Molecules without a conformer carry NaN positions: zero them (their 3D channel is never chosen).
            positions = torch.where(has_geometry[index.atom_molecule, None], positions, 0.0)
        return Relations(None, spd, routes, batch.bond_features, batch.atom_features, positions, has_geometry,
                         cu_seqlens=cu_seqlens, max_seqlen=width, index=index)

    # ------------------------------------------------------------------------------------------- pretraining
    def pretrain_loss(self, batch: MolBatch, *, generator: torch.Generator | None = None,
                      noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """MoleBlend's objective on one batch: ``(weighted total, {"spd", "edge", "geometry", "denoise"})``.

        Noise (scale ``noise_scale``) is added to the positions of molecules with a conformer; the blended
        encoder then predicts, for every atom pair, the SPD class (:func:`spd_targets`), the bond class of each
        hop of the shortest path (:func:`edge_targets`) and the direction ``pos_j - pos_i`` (clean positions),
        and for every atom the noise direction.
        ``generator`` drives both the noise and the blend (default: torch's global generator), not dropout (seed
        torch too for a reproducible step with dropout); the noise is drawn in eval mode too (it is the
        denoising target), so an evaluation loss is fixed by ``generator`` or ``noise``. A packed batch runs
        packed: its blend draws are the padded batch's, its noise draw is not (``(T, 3)``, not ``(B, N, 3)``; pass
        ``noise`` to compare the layouts). ``noise``: see :meth:`relation_loss`.

        A batch in which no molecule has a conformer leaves the 3D parameters (``gaussian``, ``atom_3d_proj``
        where ``atom_3d_feature``, ``geometry_head``, ``atom_proc``) without gradient: under
        DistributedDataParallel, where a rank may draw such a batch, pass ``find_unused_parameters=True``.

        Under ``torch.compile``, a padded batch's whole loss traces with ``fullgraph=True``; a packed batch's
        :meth:`build_relations` (its shortest paths read ``cu_seqlens`` on the host) breaks the graph, so compile
        :meth:`relation_loss` (``fullgraph=True``, see there) and build the relations outside."""
        return self.relation_loss(self.build_relations(batch), generator=generator, noise=noise)

    def relation_loss(self, relations: Relations, *, generator: torch.Generator | None = None,
                      noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`pretrain_loss` from relations already built (``model.build_relations(batch)``: shortest paths,
        routes, positions, in the batch's layout), for loops and benchmarks that reuse them; ``relations`` is not
        modified. ``noise``: the position noise to add instead of drawing it (``noise_scale`` is not applied),
        shaped like ``relations.positions`` (padded ``(B, N, 3)``, packed ``(T, 3)``).

        Traces with ``torch.compile(fullgraph=True)``, ``dynamic=True`` too, padded or packed on either backend;
        not with a ``generator``, which torch.compile does not take (draw from torch's global one, or pass
        ``noise``). The compiled loss is the eager one, up to the order of the denoising mean's sum,
        except that the 3D parts of a batch without any conformer are computed (0, with zero gradients)."""
        check_generator(generator)
        config = self.config
        relations = dataclasses.replace(relations)
        clean = relations.positions
        if clean is None:
            if noise is not None:
                raise ValueError("noise: the relations have no positions to add noise to")
        elif noise is None:
            # generator=None left out: torch.compile traces that overload with concrete sizes only (as sample_blend).
            drawn = dict(device=clean.device, dtype=clean.dtype) if generator is None else \
                dict(generator=generator, device=clean.device, dtype=clean.dtype)
            noise = torch.randn(clean.shape, **drawn) * config.noise_scale
        elif not isinstance(noise, Tensor) or noise.shape != clean.shape:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise: expected the shape of the positions {tuple(clean.shape)}; got {got}")
        elif not values_hidden(noise):
            # Where it is used (atoms of molecules with a conformer) a NaN turned every part of the loss NaN.
            used = relations.has_geometry[relations.index.atom_molecule] if relations.packed else \
                relations.mask & relations.has_geometry[:, None]
            if not bool(torch.isfinite(noise[used]).all()):
                raise ValueError("noise: expected finite values at the atoms of molecules with a conformer; got "
                                 "NaN or inf")
        if clean is not None:
            relations.positions = clean + (noise if relations.packed else
                                           torch.where(relations.mask[..., None], noise, 0.0))
        x, geometry_bias, drawn_3d = self._encode(relations, generator)
        known = relations.has_geometry
        if relations.packed:
            index = relations.index
            atoms = x.index_select(0, index.atom_slots)                                              # (T, dim)
            layout = {"cu_seqlens": relations.cu_seqlens, "max_seqlen": relations.max_seqlen}
            known_atoms = known[index.atom_molecule]
        else:
            atoms = x[:, 1:]
            layout = {"mask": relations.mask}
            known_atoms = relations.mask & known[:, None]

        spd_target = spd_targets(relations.spd, config.spd_classes)
        parts = {"spd": self._pair_loss(self.spd_head, atoms, target=spd_target, **layout)}
        edge_target = edge_targets(relations.routes, relations.bond_features, config.edge_classes)
        parts["edge"] = self._pair_loss(self.edge_head, atoms, target=edge_target, groups=config.max_hops, **layout)

        zero = atoms.new_zeros((), dtype=torch.float32)
        parts["geometry"] = parts["denoise"] = zero
        # Eager mode skips the 3D parts of a batch without any conformer (their parameters get no gradient);
        # torch.compile cannot read that on the host and computes them for every batch: then 0, zero gradients
        # (so do meta and fake tensors, which have no values).
        values_unknown = values_hidden(known)
        if clean is not None and (values_unknown or bool(known.any())):
            head = self.geometry_head
            if relations.packed:
                # Only the molecules with a conformer: the others keep their place with no atoms.
                lengths = seqlens(relations.cu_seqlens) * known
                known_cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
                if values_unknown:
                    # The same rows in the same order by a stable partition (a boolean selection's length would
                    # depend on the data); the rows past cu_seqlens' end follow, and a compiled call, which
                    # trusts cu_seqlens, never reads them.
                    order = torch.argsort(~known_atoms, stable=True)
                    known_rows, known_clean = atoms.index_select(0, order), clean.index_select(0, order)
                else:
                    known_rows, known_clean = atoms[known_atoms], clean[known_atoms]
                parts["geometry"] = outer_product_cosine_loss(
                    *head.projected(known_rows), positions=known_clean, cu_seqlens=known_cu_seqlens,
                    max_seqlen=relations.max_seqlen, reduction=config.geometry_reduction)
                head_layout = {**layout, "pair_atoms": (index.pair_row, index.pair_col)}
            else:
                parts["geometry"] = outer_product_cosine_loss(*head.projected(atoms), positions=clean,
                                                              mask=known_atoms, reduction=config.geometry_reduction)
                head_layout = layout
            bias = None if geometry_bias is None else geometry_bias.to(atoms.dtype)
            predicted = self.atom_proc(atoms, relations.positions, bias, **head_layout)
            wide = torch.promote_types(predicted.dtype, torch.float32)  # float64 models keep float64
            cosine = F.cosine_similarity(predicted.to(wide), noise.to(wide), dim=-1, eps=1e-8)
            # Scored, as in the public criterion: atoms whose prediction is not exactly 0 (a one-atom molecule has
            # no neighbour direction to predict from, and the cosine's gradient there is ~1/eps: 1e8 at the first
            # step), and with a per-atom draw of features, the atoms that took the 3D one.
            scored = known_atoms & (predicted != 0).any(-1)
            if drawn_3d is not None:
                scored = scored & drawn_3d
            parts["denoise"] = _mean_where(1 - cosine, scored)
        total = sum(config.loss_weights[name] * value for name, value in parts.items())
        return total, parts

    @staticmethod
    def _pair_loss(head: _OuterProductHead, atoms: Tensor, target: Tensor, groups: int = 1, **layout) -> Tensor:
        """``layout``: ``mask`` (padded) or ``cu_seqlens`` and ``max_seqlen`` (packed)."""
        return outer_product_loss(*head.projected(atoms), target=target, groups=groups, ignore_index=-100,
                                  **layout)


class MoleBlendPredictor(nn.Module):
    """Fine-tuning: the encoder's virtual-token (CLS) row -> LayerNorm -> Linear to ``outputs``.

    Runs on 2D-only batches (no positions: SPD + edge channels) or 2D + 3D ones. ``loss(batch)``: binary
    cross-entropy per task (``task="classification"``) or MSE (``"regression"``) over the labels that are not NaN.
    The encoder's pretraining heads (``spd_head``, ``edge_head``, ``geometry_head``, ``atom_proc``) get no gradient
    here, nor do its 3D parameters (``gaussian``, ``atom_3d_proj``) on a 2D-only batch: under
    DistributedDataParallel pass ``find_unused_parameters=True`` (deleting the heads is not enough on 2D data).

    ``blend``: keep the pretraining blend (each pair's channels, and any per-atom feature draw, drawn afresh at
    every training step). Off by default, as the public fine-tuning runs without ``--blending``: the encoder's
    blender then stays in eval mode through ``train()``, and every pair gets every channel it has.

    The encoder keeps its own dropout rates; the public fine-tuning has no dropout, activation dropout or
    drop-path (attention dropout 0.1): build the encoder with ``dataclasses.replace(pretraining_config,
    activation_dropout=0.0, droppath=0.0)`` and load the pretrained state into it.
    """

    def __init__(self, encoder: MoleBlend, outputs: int, task: str = "classification", *, blend: bool = False):
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task: expected 'classification' or 'regression'; got {task!r}")
        if not isinstance(encoder, MoleBlend):
            raise TypeError(f"encoder: expected a pyblend MoleBlend; got {type(encoder).__name__}")
        if isinstance(outputs, bool) or not isinstance(outputs, numbers.Integral) or outputs < 1:
            raise ValueError(f"outputs: expected a positive int (the number of tasks); got {outputs!r}")
        self.encoder, self.task = encoder, task
        self.blend = check_flag(blend, "blend")
        self.norm = nn.LayerNorm(encoder.config.dim)
        self.head = nn.Linear(encoder.config.dim, outputs)
        self.train(self.training)

    def train(self, mode: bool = True) -> MoleBlendPredictor:
        super().train(mode)
        if not self.blend:
            self.encoder.blender.train(False)  # as BatchNorm layers are kept in eval mode for fine-tuning
        return self

    def forward(self, batch: MolBatch) -> Tensor:
        """``(B, outputs)`` logits (classification) or predictions (regression), padded or packed batch."""
        return self.head(self.norm(self.encoder.readout(batch)))

    def loss(self, batch: MolBatch) -> Tensor:
        if batch.labels is None:
            raise ValueError("batch: expected labels (MolBatch.labels); featurize with labels to fine-tune")
        if not isinstance(batch.labels, Tensor):
            raise TypeError(f"batch: expected labels as a tensor (B, outputs); got {type(batch.labels).__name__}")
        if not values_hidden(batch.labels):
            _check_labels(batch.labels, self.task)
        out = self(batch)
        labels = batch.labels.to(out.device)
        if labels.shape != out.shape:
            raise ValueError(f"batch: labels of shape {tuple(labels.shape)} do not match this head's outputs "
                             f"{tuple(out.shape)} (outputs = {out.shape[-1]})")
        known = ~torch.isnan(labels)
        # The mean over known labels; 0 (not the NaN of an empty mean) when a batch has none.
        labels = torch.where(known, labels, 0.0)
        if self.task == "classification":
            each = F.binary_cross_entropy_with_logits(out, labels, reduction="none")
        else:
            each = F.mse_loss(out, labels, reduction="none")
        return torch.where(known, each, 0.0).sum() / known.sum().clamp(min=1)


def _check_labels(labels: Tensor, task: str) -> None:
    """Labels are finite or NaN (missing), and a classification's lie in [0, 1]: binary cross-entropy takes a
    label of 2 or -1 without complaint and returns a loss no model can reach."""
    known = labels[~torch.isnan(labels)]
    if not bool(torch.isfinite(known).all()):
        raise ValueError("batch: expected finite labels (NaN = missing); got inf")
    if task == "classification" and known.numel() and not bool(((known >= 0) & (known <= 1)).all()):
        raise ValueError(f"batch: expected classification labels in [0, 1] (NaN = missing); got values from "
                         f"{known.min().item():g} to {known.max().item():g}")


def _checked_by_the_first_layer(depth: int):
    """Every layer's attention takes the same tensors (``cu_seqlens``, relation ids): the first layer checks their
    values on the host, the others trust them (:class:`pyblend.set_value_checks`) rather than wait for the GPU
    to read them again, twice a layer. (Under torch.compile nothing is read anyway.)"""
    if depth == 0 or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return set_value_checks(False)


def _mean_where(values: Tensor, selected: Tensor) -> Tensor:
    """The mean of ``values`` where the bool ``selected`` is True (NaN elsewhere is never read), 0 for an empty
    selection: the masked sum over the count (no data-dependent length, for torch.compile)."""
    total = torch.where(selected, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / selected.sum().clamp(min=1).to(total.dtype)


def _in_vocabulary(features: Tensor, dims) -> Tensor:
    """Integer features with a value outside its vocabulary ``[0, dims)`` read as the vocabulary's last, "other",
    index, as featurization maps it."""
    return torch.where((features >= 0) & (features < dims), features, dims - 1)


def _rows(features: Tensor, offsets: Tensor, dims: Tensor) -> Tensor:
    """Embedding rows of integer features ``(..., F)``, in their vocabularies (not the first row of the next
    feature)."""
    return _in_vocabulary(features, dims) + offsets


def _refill_feature_rows(model: MoleBlend, incompatible_keys=None) -> None:
    """The feature-row index buffers, made anew on the atom table's device: after ``to_empty()`` they hold
    garbage, and ``load_state_dict(assign=True)`` into a meta-device model leaves them on the meta device. Also
    a ``load_state_dict`` post-hook (``incompatible_keys`` unused)."""
    device = model.atom_encoder.weight.device
    for name, dims in (("atom", ATOM_FEATURE_DIMS), ("bond", BOND_FEATURE_DIMS)):
        setattr(model, f"{name}_offsets", _offsets(dims).to(device))
        setattr(model, f"{name}_dims", torch.tensor(dims, device=device))


def _offsets(dims) -> Tensor:
    """First row of each feature's block in the summed table (in Python: also under ``torch.device("meta")``)."""
    return torch.tensor([0, *itertools.accumulate(dims)][:-1], dtype=torch.long)


def _packed_positions(positions: Tensor, cu_seqlens: Tensor, width: int, atoms: int) -> Tensor:
    """A packed batch's position override: ``(T, 3)`` as it is, or padded ``(B, N, 3)`` packed."""
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions: expected a torch.Tensor, got {type(positions).__name__}")
    batch = cu_seqlens.numel() - 1
    if tuple(positions.shape) == (atoms, 3):
        return positions
    if tuple(positions.shape) == (batch, width, 3):
        return positions[mask_from_cu_seqlens(cu_seqlens, width)]
    raise ValueError(f"positions: expected packed (T, 3) = ({atoms}, 3) or padded (B, N, 3) = ({batch}, {width}, 3) "
                     f"for this packed batch; got {positions.dtype} {tuple(positions.shape)}")


def convert_transformer_m_state_dict(state: dict[str, Tensor], config: MoleBlendConfig,
                                     prefix: str = "encoder.molecule_encoder.") -> dict[str, Tensor]:
    """Map a Graphormer / Transformer-M (MoleBlend's public code) encoder state_dict onto :class:`MoleBlend`.

    Their embeddings index features shifted by their data pipeline, ``convert_to_single_emb`` (``1 + 512 f``
    for feature ``f``) then the collator's padding shifts (each ``+ 1``):

    - atom feature ``f`` value ``v``: row ``2 + 512 f + v`` of ``atom_encoder`` (single-emb, then
      ``pad_2d_unsqueeze``);
    - bond feature ``f`` value ``v`` on a path: row ``3 + 512 f + v`` of ``edge_encoder`` (single-emb, ``+ 1``
      in ``attn_edge_type``, then ``pad_3d_unsqueeze``);
    - degree ``d``: row ``d + 1`` of both ``in_degree_encoder`` and ``out_degree_encoder`` (summed: the graphs are
      undirected); SPD ``d``: row ``d + 1`` of ``spatial_pos_encoder``, unreachable pairs (their sentinel 510)
      row 511;
    - the Gaussian layer's pair type of atoms ``i, j`` with atomic-number ids ``z_i, z_j``: rows ``3 + z_i`` and
      ``515 + z_j`` of ``gbf.mul`` / ``gbf.bias`` (summed), which become pyblend's ``z_i`` and ``V + z_j``.

    The rows pyblend's vocabularies use are gathered from those; ``graph_token_virtual_distance`` becomes the
    virtual-token row of the SPD table; paths longer than ``config.max_distance`` share its row (theirs go up
    to 509). The layers, the embedding LayerNorm (``config.embedding_layernorm``: their
    ``encoder_normalize_before``, on in the base model), the atom (noisy-node) head and the Gaussian layer keep
    their names (``molecule_3d_bias.gbf`` / ``gbf_proj`` -> ``gaussian.gbf`` / ``gaussian.gbf_proj``,
    ``edge_proj`` -> ``atom_3d_proj``; with ``config.atom_3d_feature`` False the model has no ``atom_3d_proj``
    and ``edge_proj`` is left out, named in the warning). A MoleBlend checkpoint's relation heads map too
    (``blend_spd_pred_head`` / ``blend_edge_pred_head`` / ``blend_3d_pred_head``: the row / column projections and
    LayerNorms of ``transform_n2_head``, the output Linear; the 3D head's ``linear`` and its three ``force_proj``
    rows, with nothing between them, compose into one ``Linear(d^2, 3)``); a Transformer-M checkpoint has none:
    load the result with ``strict=False`` and check its report. Entries under ``prefix`` with no place in the
    model are named in a UserWarning.

    ``prefix`` is where the encoder sits in their checkpoint (e.g. ``"encoder.molecule_encoder."``); keys
    without it are ignored.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a state_dict (a mapping of names to tensors); got {type(state).__name__}")
    if not isinstance(config, MoleBlendConfig):
        raise TypeError(f"config: expected a MoleBlendConfig; got {type(config).__name__}")
    theirs = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    out: dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        if name not in theirs:
            raise KeyError(f"state: expected {prefix + name!r} in the checkpoint")
        return theirs.pop(name)

    def shifted_rows(name: str, dims, shift: int) -> Tensor:
        table = take(name)
        rows = torch.tensor([shift + 512 * feature + value
                             for feature, size in enumerate(dims) for value in range(size)])
        if len(table) <= int(rows[-1]):
            raise ValueError(f"state: {prefix + name} has {len(table)} rows; the features need rows up to "
                             f"{int(rows[-1])}")
        return table[rows]

    out["atom_encoder.weight"] = shifted_rows("atom_feature.atom_encoder.weight", ATOM_FEATURE_DIMS, shift=2)
    in_degree = take("atom_feature.in_degree_encoder.weight")
    out_degree = take("atom_feature.out_degree_encoder.weight")
    if config.max_degree + 2 > min(len(in_degree), len(out_degree)):
        raise ValueError(f"config: max_degree = {config.max_degree} needs degree rows up to {config.max_degree + 1}; "
                         f"the checkpoint's degree encoders have {min(len(in_degree), len(out_degree))} rows")
    degrees = torch.arange(config.max_degree + 1) + 1
    out["degree_encoder.weight"] = in_degree[degrees] + out_degree[degrees]
    out["graph_token.weight"] = take("atom_feature.graph_token.weight")
    spatial = take("molecule_attn_bias.spatial_pos_encoder.weight")
    # One column per head. Checked first: another head count passes the layers' dim x dim shapes, and the first
    # row count of edge_dis_encoder (max_hops x H x H) would read its per-hop matrices wrong.
    if spatial.dim() != 2 or spatial.shape[1] != config.heads:
        raise ValueError(f"config: heads = {config.heads}; the checkpoint's {prefix}molecule_attn_bias."
                         f"spatial_pos_encoder has shape {tuple(spatial.shape)} (one column per head)")
    if config.max_distance + 2 > 511 or len(spatial) < 512:
        raise ValueError(f"config: max_distance = {config.max_distance}: a Transformer-M SPD table holds distances "
                         f"up to 509 and the unreachable row 511; the checkpoint's has {len(spatial)} rows")
    virtual = take("molecule_attn_bias.graph_token_virtual_distance.weight")
    out["spatial_pos_encoder.weight"] = torch.cat([spatial[1:config.max_distance + 2], spatial[511:512], virtual])
    out["edge_encoder.weight"] = shifted_rows("molecule_attn_bias.edge_encoder.weight", BOND_FEATURE_DIMS, shift=3)
    hops = config.max_hops * config.heads * config.heads
    edge_distances = take("molecule_attn_bias.edge_dis_encoder.weight")
    if len(edge_distances) < hops:
        raise ValueError(f"config: max_hops x heads x heads = {config.max_hops} x {config.heads} x {config.heads} "
                         f"rows of {prefix}molecule_attn_bias.edge_dis_encoder, which has {len(edge_distances)}")
    out["edge_dis_encoder.weight"] = edge_distances[:hops]
    atom_types = ATOM_FEATURE_DIMS[0]
    for name in list(theirs):
        if name.startswith("molecule_3d_bias."):
            rest = name[len("molecule_3d_bias."):]
            if rest.startswith("edge_proj.") and not config.atom_3d_feature:
                continue  # no atom_3d_proj to take it: left for the warning
            value = take(name)
            if rest in ("gbf.mul.weight", "gbf.bias.weight"):
                if len(value) < 515 + atom_types:
                    raise ValueError(f"state: {prefix + name} has {len(value)} rows; atom j's atomic numbers read "
                                     f"rows 515 to {514 + atom_types}")
                value = torch.cat([value[3:3 + atom_types], value[515:515 + atom_types]])  # atom i's, atom j's
            out["atom_3d_proj." + rest[len("edge_proj."):] if rest.startswith("edge_proj.") else
                "gaussian." + rest] = value
        elif name.startswith(("emb_layer_norm.", "atom_proc.")) or (
                name.startswith("layers.") and int(name.split(".")[1]) < config.layers):
            out[name] = take(name)  # layers past config.layers stay behind, named in the warning
    width = config.head_width
    for theirs_head, ours, linear, classes in (
            ("blend_spd_pred_head.", "spd_head.", "linear", config.spd_classes),
            ("blend_edge_pred_head.", "edge_head.", "linear_map_feature",
             config.max_hops * math.prod(config.edge_classes)),
            ("blend_3d_pred_head.", "geometry_head.", "linear", None)):
        if not any(name.startswith(theirs_head) for name in theirs):
            continue  # a Transformer-M checkpoint: no MoleBlend heads
        for side, mine in (("row", "row"), ("column", "col")):
            for part in ("weight", "bias"):
                out[f"{ours}{mine}.linear.{part}"] = take(f"{theirs_head}transform_n2_head.{side}_head.{part}")
                out[f"{ours}{mine}.norm.{part}"] = take(f"{theirs_head}transform_n2_head.{side}_LayerNorm.{part}")
        if out[f"{ours}row.linear.weight"].shape[0] != width:
            raise ValueError(f"config: head_width = {width}; the checkpoint's {prefix}{theirs_head[:-1]} projects to "
                             f"{out[f'{ours}row.linear.weight'].shape[0]}")
        weight, bias = take(f"{theirs_head}{linear}.weight"), take(f"{theirs_head}{linear}.bias")
        if classes is None:
            # Their 3D head: Linear(d^2, P), then three Linear(P, 1) with nothing between: one Linear(d^2, 3).
            forces = [(take(f"{theirs_head}force_proj{k}.weight"), take(f"{theirs_head}force_proj{k}.bias"))
                      for k in (1, 2, 3)]
            projection = torch.cat([force for force, _ in forces])                               # (3, P)
            weight, bias = projection @ weight, projection @ bias + torch.cat([b for _, b in forces])
        elif weight.shape[0] != classes:
            raise ValueError(f"config: {ours[:-1]} has {classes} outputs (spd_classes, max_hops x edge_classes); "
                             f"the checkpoint's {prefix}{theirs_head}{linear} has {weight.shape[0]}")
        out[f"{ours}out.weight"], out[f"{ours}out.bias"] = weight, bias
    if theirs:
        warnings.warn(f"convert_transformer_m_state_dict: {len(theirs)} checkpoint entries under {prefix!r} have "
                      f"no place in MoleBlend and were left out: {', '.join(sorted(theirs)[:8])}"
                      f"{', ...' if len(theirs) > 8 else ''}", stacklevel=2)
    return out
