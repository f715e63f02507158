"""MoleBlend's modality blending as a module: draws the relation channel of every atom pair in training."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops._checks import check_generator
from ..ops.blend_relations import blend_relations, every_channel, sample_blend

__all__ = ["RelationBlender"]


class RelationBlender(nn.Module):
    """Per-pair choice of SPD, edge or 3D relation (MoleBlend eq. 8), for :func:`pyblend.ops.relation_attention`.

    In training mode :meth:`forward` draws the choices (:func:`pyblend.ops.sample_blend`); in eval
    mode every pair uses every channel it has (all three where the molecule has a conformer, SPD + edge where
    not), so inference is deterministic. :meth:`blend` combines the chosen biases.

    Args:
        probs: (SPD, edge, 3D) probabilities, the paper's 0.2 / 0.2 / 0.6 by default; for ``mode="molecule"``
            the probabilities of the subsets (2D, 3D, 2D + 3D).
        mode: "pair" (the paper), "batch" (one draw shared by the batch, the public code) or "molecule"
            (one subset per molecule, Transformer-M).
        symmetric: pair (j, i) reuses pair (i, j)'s draw.

    Example::

        blender = RelationBlender()
        choice = blender(mask, has_geometry=has_conformer, generator=g)      # (B, N, N) uint8 bits
        blended = blender.blend(choice, spd_index=spd, spd_table=spd_embedding.weight,
                                edge_bias=edge, geometry_bias=gaussian_bias)
        out = ops.relation_attention(q, k, v, mask=mask, **blended)
    """

    def __init__(self, probs=(0.2, 0.2, 0.6), mode: str = "pair", symmetric: bool = False):
        super().__init__()
        # Validates probs, mode and symmetric: on the CPU, also when the module is built under torch.device("meta").
        with torch.device("cpu"):
            sample_blend(torch.ones(1, 1, dtype=torch.bool), probs=probs, mode=mode, symmetric=symmetric)
        self.probs, self.mode, self.symmetric = tuple(float(p) for p in probs), mode, symmetric

    def extra_repr(self) -> str:
        return f"probs={self.probs}, mode={self.mode!r}, symmetric={self.symmetric}"

    def forward(self, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None, has_geometry: Tensor | None = None,
                generator: torch.Generator | None = None, pairs: int | None = None) -> Tensor:
        """The choices, uint8 ``(B, N, N)`` (``mask (B, N)``) or ``(P,)`` (``cu_seqlens``, and ``pairs = P`` when
        known); see ``sample_blend``."""
        check_generator(generator)  # in eval mode too, where nothing is drawn
        if self.training:
            return sample_blend(mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, probs=self.probs,
                                mode=self.mode, symmetric=self.symmetric, has_geometry=has_geometry,
                                generator=generator, pairs=pairs)
        return every_channel(mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, has_geometry=has_geometry,
                             pairs=pairs)

    @staticmethod
    def blend(choice: Tensor, **biases) -> dict[str, Tensor | None]:
        """:func:`pyblend.ops.blend_relations`: ``bias`` / ``rel_index`` / ``rel_table``."""
        return blend_relations(choice, **biases)

