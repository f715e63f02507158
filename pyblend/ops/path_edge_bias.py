"""Edge encoding along the shortest path (Graphormer / MoleBlend "multi_hop"): a per-head attention bias from
the bonds of each pair's shortest path, each hop through its own H x H matrix, averaged over the hops.

The split between the module and the op: the per-bond embedding (the mean over a bond's features of their
embeddings) is a small gather the module does; the op takes one H-vector per bond and the routes of
:func:`pyblend.ops.shortest_path_routes`, and computes the bias without writing the ``(pairs, K, H)`` gathered
tensor (forward or backward). Its output feeds :func:`pyblend.ops.relation_attention` as ``bias``: padded
``(B, H, N, N)``, packed ``(H, P)``.

Backends: Triton (CUDA tensors, or the interpreter on request) and the plain-PyTorch reference. The Triton path
is one torch.library custom op (``pyblend::path_edge_bias``) whose backward is another
(``pyblend::path_edge_bias_backward``), both with fake implementations, so ``torch.compile`` traces it; the
backward is deterministic (no atomics). Semantics and the equivalence with Graphormer's divisor:
:mod:`pyblend.reference.path_edge_bias`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._values import values_hidden
from ..reference.path_edge_bias import path_edge_bias as _reference
from ._autograd import call, refuse_double_backward
from ._checks import FLOAT_DTYPES, as_tensor, check_dtype, check_same_device, describe, host_sizes, id_range
from ._dispatch import choose_backend, triton_reasons

__all__ = ["path_edge_bias"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROUTE_DTYPES = (torch.int32, torch.int64)
_DISTANCE_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
_MAX_HEADS = 64  # kernels.path_edge_bias.MAX_HEADS: larger float32 tiles spill registers


def path_edge_bias(routes, distances, edge_embedding: Tensor, hop_weights: Tensor, *, cu_seqlens=None,
                   backend: str | None = None) -> Tensor:
    """Graphormer's multi-hop edge encoding as a per-head attention bias.

    For a pair (i, j) with a shortest path of ``d_ij >= 1`` hops::

        bias[h, i, j] = (1 / clamp(d_ij, 1, K)) * sum_{k < K, route_k >= 0} sum_{h'} E[route_k, h'] W_k[h', h]

    and 0 where ``d_ij <= 0`` (the diagonal, unreachable pairs, padding). On every real pair this equals
    Graphormer's ``edge_type="multi_hop"`` bias with ``multi_hop_max_dist = K`` (it divides by its
    ``spatial_pos = SPD + 1`` mapped back to ``clamp(SPD, 1, K)``; see :mod:`pyblend.reference.path_edge_bias`),
    up to which of several equally short paths is taken.

    Args:
        routes: int32/int64, padded ``(B, N, N, K)`` or packed ``(P, K)`` (with ``cu_seqlens``): the bond id of hop
            k of the path i -> j, -1 past its end, as :func:`pyblend.ops.shortest_path_routes` returns. Ids index
            ``edge_embedding``'s rows; the packed ``MolBatch.bond_ids`` are batch-wide, the padded ones are per
            molecule (add each molecule's first bond row to use them with one ``(E, H)`` table).
        distances: integer, ``(B, N, N)`` / ``(P,)``: the distances from the same call (0 on the diagonal, -1
            unreachable or padding).
        edge_embedding: ``(E, H)`` float16, bfloat16 or float32 (float64: reference backend only), one H-vector
            per bond, ``E`` > every id in ``routes``.
        hop_weights: ``(K_max, H, H)``, ``K_max >= K``, the dtype of ``edge_embedding``: hop k's matrix
            (Graphormer's ``edge_dis_encoder.weight`` reshaped to ``(-1, H, H)``); hops ``>= K`` are unused.
        cu_seqlens: ``(B+1,)`` int32, selects the packed layout (molecule b's pairs at ``sum_{c<b} N_c^2``).
        backend: "triton" | "reference" | None (automatic: Triton for CUDA tensors; ``PYBLEND_BACKEND``).

    Returns:
        padded ``(B, H, N, N)`` / packed ``(H, P)`` in the dtype of ``edge_embedding`` (accumulated in float32),
        differentiable in ``edge_embedding`` and ``hop_weights``. Validation reads ``routes`` and ``cu_seqlens``
        on the host once (ids < E, pair count), skipped under torch.compile.
    """
    routes, distances, edge_embedding, hop_weights, cu_seqlens = _validate(routes, distances, edge_embedding,
                                                                           hop_weights, cu_seqlens)
    chosen = choose_backend("path_edge_bias", backend, edge_embedding.device, {
        "triton": lambda: _triton_reasons(edge_embedding),
        "reference": lambda: [],
    }, inputs=(edge_embedding, hop_weights))
    if chosen == "reference":
        return _reference(routes, distances, edge_embedding, hop_weights).contiguous()
    # Distances past the K hops divide by K, so clamping first changes nothing and keeps int64 ones from wrapping.
    hops = routes.shape[-1]
    return call(_bias_op, routes.to(torch.int32).contiguous(),
                distances.clamp(-1, hops).to(torch.int32).contiguous(),
                edge_embedding.contiguous(), hop_weights.contiguous())


def _triton_reasons(edge_embedding: Tensor) -> list[str]:
    reasons = triton_reasons(edge_embedding.device, edge_embedding.dtype)
    if edge_embedding.dtype not in _KERNEL_DTYPES:
        reasons.append(f"the kernel computes in float16, bfloat16 or float32, got {edge_embedding.dtype}")
    if edge_embedding.shape[1] > _MAX_HEADS:
        reasons.append(f"H = {edge_embedding.shape[1]} heads > {_MAX_HEADS}")
    return reasons


def _validate(routes, distances, edge_embedding, hop_weights, cu_seqlens):
    routes = as_tensor(routes, "routes")
    distances = as_tensor(distances, "distances")
    edge_embedding = as_tensor(edge_embedding, "edge_embedding")
    hop_weights = as_tensor(hop_weights, "hop_weights")
    cu_seqlens = as_tensor(cu_seqlens, "cu_seqlens", optional=True)
    check_dtype(routes, "routes", _ROUTE_DTYPES)
    check_dtype(distances, "distances", _DISTANCE_DTYPES)
    check_dtype(edge_embedding, "edge_embedding", FLOAT_DTYPES)
    check_same_device(edge_embedding, "edge_embedding", routes=routes, distances=distances, hop_weights=hop_weights,
                      cu_seqlens=cu_seqlens)

    if cu_seqlens is None:
        if routes.dim() != 4 or routes.shape[1] != routes.shape[2]:
            hint = " (a packed (P, K) routes tensor needs cu_seqlens)" if routes.dim() == 2 else ""
            raise ValueError(f"routes: expected shape (B, N, N, K){hint}; got {describe(routes)}")
        pair_shape, meaning = tuple(routes.shape[:3]), "(B, N, N)"
    else:
        if routes.dim() != 2:
            raise ValueError(f"routes: expected shape (P, K) in the packed layout (cu_seqlens given); "
                             f"got {describe(routes)}")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens: expected an int32 tensor of shape (B+1,); got {describe(cu_seqlens)}")
        if not values_hidden(cu_seqlens):  # value checks read the host; torch.compile traces without them
            _, _, pairs = host_sizes(cu_seqlens)
            if pairs != routes.shape[0]:
                raise ValueError(f"cu_seqlens: describes {pairs} pairs (sum of N_i^2) but routes holds "
                                 f"{routes.shape[0]} ({describe(routes)})")
        pair_shape, meaning = (routes.shape[0],), "(P,)"
    hops = routes.shape[-1]
    if hops < 1:
        raise ValueError(f"routes: expected K >= 1 hops in the last dimension; got {describe(routes)}")
    if tuple(distances.shape) != pair_shape:
        raise ValueError(f"distances: expected shape {meaning} = {pair_shape} like routes; got {describe(distances)}")

    if edge_embedding.dim() != 2 or edge_embedding.shape[1] == 0:
        raise ValueError(f"edge_embedding: expected shape (E, H) with H >= 1; got {describe(edge_embedding)}")
    heads = edge_embedding.shape[1]
    if hop_weights.dtype != edge_embedding.dtype:
        raise TypeError(f"hop_weights: expected the dtype of edge_embedding ({edge_embedding.dtype}); "
                        f"got {describe(hop_weights)}")
    if hop_weights.dim() != 3 or tuple(hop_weights.shape[1:]) != (heads, heads):
        raise ValueError(f"hop_weights: expected shape (K_max, H, H) = (?, {heads}, {heads}) with H from "
                         f"edge_embedding; got {describe(hop_weights)}")
    if hop_weights.shape[0] < hops:
        raise ValueError(f"hop_weights: expected K_max >= K = {hops} (the hops in routes); "
                         f"got {describe(hop_weights)}")

    if routes.numel() and not values_hidden(routes):
        low, high = id_range(routes)  # the one device-to-host read
        if low < -1:
            raise ValueError(f"routes: expected bond ids >= 0 and -1 past a path's end; got {low}")
        if high >= edge_embedding.shape[0]:
            raise ValueError(f"routes: bond id {high} is out of range for edge_embedding with "
                             f"E = {edge_embedding.shape[0]} rows ({describe(edge_embedding)})")
    return routes, distances, edge_embedding, hop_weights, cu_seqlens


# --------------------------------------------------------------------------------------- torch.library ops


def _output_shape(routes: Tensor, heads: int) -> tuple:
    return (routes.shape[0], heads, routes.shape[1], routes.shape[2]) if routes.dim() == 4 else (heads,
                                                                                               routes.shape[0])


@torch.library.custom_op("pyblend::path_edge_bias", mutates_args=())
def _bias_op(routes: Tensor, distances: Tensor, edge_embedding: Tensor, hop_weights: Tensor) -> Tensor:
    """routes (B, N, N, K) / (P, K) int32, distances int32, all contiguous -> (B, H, N, N) / (H, P)."""
    from ..kernels import path_edge_bias as kernel

    return kernel.path_edge_bias_forward(routes, distances, edge_embedding, hop_weights)


@_bias_op.register_fake
def _(routes, distances, edge_embedding, hop_weights):
    return edge_embedding.new_empty(_output_shape(routes, edge_embedding.shape[1]))


@torch.library.custom_op("pyblend::path_edge_bias_backward", mutates_args=())
def _backward_op(grad: Tensor, routes: Tensor, distances: Tensor, edge_embedding: Tensor,
                 hop_weights: Tensor) -> tuple[Tensor, Tensor]:
    """(d edge_embedding (E, H), d hop_weights (K_max, H, H)) in the inputs' dtypes."""
    from ..kernels import path_edge_bias as kernel

    return kernel.path_edge_bias_backward(grad, routes, distances, edge_embedding, hop_weights)


@_backward_op.register_fake
def _(grad, routes, distances, edge_embedding, hop_weights):
    return torch.empty_like(edge_embedding), torch.empty_like(hop_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    routes, distances, edge_embedding, hop_weights = ctx.saved_tensors
    dembedding, dweights = call(_backward_op, grad, routes, distances, edge_embedding,
                                hop_weights)
    return None, None, dembedding, dweights


_bias_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_backward_op, "path_edge_bias")
