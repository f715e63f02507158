"""pyblend ops: validation, backend dispatch (triton | cpp | reference) and torch.library registration.

Every op with more than one implementation takes ``backend=None`` (automatic: Triton for CUDA tensors, the C++
engine or the reference for CPU tensors); ``PYBLEND_BACKEND=triton|cpp|reference`` forces one for all of them.
``blend_relations``, ``sample_blend``, ``every_channel``, ``merge_latents`` and ``slerp`` are plain torch.
"""
from .blend_relations import blend_relations, every_channel, sample_blend
from .fourier_cross_attention import fourier_cross_attention
from .gated_fusion import gated_fusion
from .gaussian_basis import gaussian_basis, pair_distances
from .gaussian_basis_bias import gaussian_basis_bias
from .lego_merge import merge_latents, slerp
from .multi_infonce import multi_infonce
from .outer_product import outer_product_cosine_loss, outer_product_logits, outer_product_loss
from .path_edge_bias import path_edge_bias
from .relation_attention import relation_attention
from .shortest_path import shortest_path, shortest_path_routes

__all__ = [
    "blend_relations", "every_channel", "fourier_cross_attention", "gated_fusion", "gaussian_basis",
    "gaussian_basis_bias", "merge_latents", "multi_infonce", "outer_product_cosine_loss", "outer_product_logits",
    "outer_product_loss", "pair_distances", "path_edge_bias", "relation_attention", "sample_blend", "shortest_path",
    "shortest_path_routes", "slerp",
]
