"""Plain-PyTorch implementations of every pyblend op: ground truth for tests, baseline for benchmarks, and the
CPU path. Nothing here imports a kernel."""
from .fourier_cross_attention import fourier_cross_attention
from .gated_fusion import gated_fusion
from .gaussian_basis import gaussian_basis, pair_distances, pair_distances_packed
from .gaussian_basis_bias import gaussian_basis_bias
from .multi_infonce import multi_infonce
from .outer_product import outer_product_cosine_loss, outer_product_logits, outer_product_loss
from .path_edge_bias import path_edge_bias
from .relation_attention import bias_from_relations, relation_attention
from .shortest_path import (check_routes, shortest_path, shortest_path_packed, shortest_path_routes,
                            shortest_path_routes_packed)

__all__ = [
    "fourier_cross_attention", "gated_fusion",
    "gaussian_basis", "gaussian_basis_bias", "pair_distances", "pair_distances_packed", "multi_infonce",
    "outer_product_cosine_loss", "outer_product_logits", "outer_product_loss", "path_edge_bias",
    "bias_from_relations", "relation_attention",
    "check_routes", "shortest_path", "shortest_path_packed", "shortest_path_routes", "shortest_path_routes_packed",
]
