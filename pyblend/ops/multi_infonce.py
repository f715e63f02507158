"""Multi-pair InfoNCE (MolBind): a weighted sum of symmetric contrastive losses over modality pairs, computed
blockwise so that no ``(B, B)`` similarity matrix is ever materialised.

Backends: Triton (CUDA tensors, or the interpreter on request) and the plain-PyTorch reference. The Triton path
splits each pair's loss into

    loss_ab = sum_{i present} (row_lse_i + col_lse_i - 2 S_ii) / (2 n),   S_ij = (a_i . b_j) * sa_i * sb_j,

with ``sa = 1 / (||a|| * temperature)`` and ``sb = 1 / ||b||`` (``1 / temperature`` and 1 without
normalisation). The scales, the diagonal ``S_ii`` and the sum are differentiable torch ops on ``(B,)`` /
``(B, d)`` tensors, so the gradients of the normalisation and of a learnable temperature come from autograd;
the row and column log-sum-exps, the only ``O(B^2 d)`` part, are one torch.library custom op
(``pyblend::multi_infonce_lse``, its backward another, both with fake implementations) so ``torch.compile``
traces it. Normalisation is fused that way: the embeddings are never rewritten normalised (their norms are one
float32 ``(B,)`` reduction); the kernels read them in their own dtype and scale each float32 tile. With a mask,
a zero-filled copy of the modality feeds the torch-side terms (norms, diagonal) so that NaN in an absent row
cannot reach a gradient; the kernels read the original, masked.
Semantics: :mod:`pyblend.reference.multi_infonce`.

**Across ranks** (``gather="autograd"`` or ``"no_grad"`` with ``torch.distributed`` initialised and more than one
rank in ``process_group``): each rank passes its local batch ``(M, d)`` per modality, the same ``M`` on every rank;
the global batch is every rank's samples in rank order (``N = world_size * M``), masks included. Each modality used
by a pair is all-gathered once, and the masks in one more all-gather (stacked): a modality's mask is gathered when
any rank passes one, all True from the ranks that pass none, so a rank may pass a mask only when its batch lacks a
sample. First, the ranks all-gather a small header and read it on the host: the local ``M``, ``gather``, the dtype,
the modalities and widths, the pairs, weights, ``normalize`` and a float temperature, which embeddings require a
gradient (the autograd gather's backward is a collective for each), and which masks each rank has. Any of them but
the masks that differs raises a ValueError on every rank, naming it and the ranks (not a gloo abort or an NCCL hang
in a collective that does not line up). With value checks off or under ``torch.compile``
(:func:`pyblend.set_value_checks`) nothing is read: no header, the ranks are trusted to agree, and every used
modality's mask is gathered (all True where a rank has none); every rank must then run with value checks in the same
state (and compiled alike), or their collectives differ. Rank ``r`` then computes only its own rows, offset
``r * M``: the log-sum-exp of its local ``x_i`` against every gathered ``y`` and of its local ``y_i`` against every
gathered ``x`` (the rectangular kernels, ``pyblend::multi_infonce_row_lse``: ``O(M N d)`` per pair, no rank forms
the ``(N, N)`` matrix), minus the positives at column ``r * M + i``, over ``2 n`` with ``n`` the pair's global
count. That is rank r's *share* ``c_r``; the single-process loss of the global batch is ``L = sum_r c_r``.

What a rank gets back, and its gradient:

- **Value**: ``L``, the global loss, the same on every rank (one scalar ``all_reduce`` of the detached shares).
- **Gradient**: that of ``c_r``. With ``gather="autograd"`` the gathered copies carry autograd history (an
  all-gather whose backward sums every rank's gradient for a sample back to the rank that owns it: a
  reduce-scatter on NCCL, an all-reduce and a slice on gloo), so after every rank's ``backward()`` the gradient
  of each rank's local embeddings is exactly the single-process ``dL/d(embedding)`` of those samples. A
  parameter replicated on every rank (a learnable temperature, the encoders' weights) receives on each rank its
  share; the shares **sum** over the ranks to the single-process gradient. DDP **averages** gradients, so under
  DDP the parameters see ``dL/dtheta / world_size``: multiply the loss by ``world_size`` before ``backward()``
  to train at the single-process gradient scale (SGD; Adam is nearly invariant to it).
- ``gather="no_grad"`` is the public MolBind code's behaviour (``concat_all_gather`` under ``torch.no_grad``):
  the gathered copies are constants, so only the direct terms of the local rows reach the local embeddings
  (``x_i`` through its own row's softmax and positive, not through the columns it occupies in other rows). That
  is a different, biased gradient: the single-process one without its column terms. The public code divides by
  the local count instead of the global one, so its per-rank gradient is ``world_size`` times this one (equal
  local counts), and so are the parameters' gradients under DDP: multiply the loss by ``world_size`` to get the
  public code's gradients (the value then reads ``world_size * L``; the public code's per-rank values average
  to ``L``).

Under DDP, then, ``(loss * world_size).backward()`` gives the parameters the single-process gradient with
``"autograd"`` and the public code's with ``"no_grad"`` (``tests/test_multi_infonce_distributed.py``: 2 gloo
processes, DDP-wrapped heads and a learnable temperature).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._values import values_hidden
from .. import reference
from ..reference.multi_infonce import local_multi_infonce as _reference_local
from ._autograd import call, refuse_double_backward
from ._checks import as_tensor, check_dtype, check_flag, check_sample_mask, describe, is_finite, is_real
from ._dispatch import choose_backend, triton_reasons

__all__ = ["multi_infonce"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_MAX_DIM = 1024  # wider: a (16, D) tile would not fit the registers (the compile test lowers D up to 1024)
_NORM_EPS = 1e-12  # F.normalize's


def multi_infonce(embeddings: Mapping[str, Tensor], pairs: Sequence[tuple[str, str]], *,
                  weights: Sequence[float] | None = None, temperature: float | Tensor = 0.1,
                  masks: Mapping[str, Tensor] | None = None, normalize: bool = True,
                  backend: str | None = None, gather: str | None = "autograd", process_group=None) -> Tensor:
    """Weighted sum over modality pairs of the symmetric InfoNCE loss, differentiable in every embedding and in
    a tensor temperature.

    For a pair ``(a, b)``, over the samples present in both (``masks``): with ``x = a``, ``y = b`` (L2-normalised
    along ``d`` when ``normalize``), ``logits = x y^T / temperature`` restricted to the present rows and columns,
    ``loss_ab = (CE(logits, diag) + CE(logits^T, diag)) / 2``, each cross-entropy a mean over the present samples.
    **A pair with no present sample in common contributes 0** (value and gradient), never NaN.

    Args:
        embeddings: modality name -> ``(B, d)`` float tensor; float16, bfloat16 or float32 (float64: reference
            backend only), one dtype, one ``B`` and one device for all; ``d >= 1`` may differ between
            modalities that are not paired together. Every modality must be in some pair (one in none is
            refused, not ignored).
        pairs: ``(a, b)`` names of two different modalities; each pair's two embeddings must have the same ``d``.
        weights: one float per pair, used as given. Default: ``1 / len(pairs)`` each.
        temperature: a float > 0, or a 0-dim float tensor (learnable: it gets a gradient). A tensor's value is
            checked only when it is on the CPU and outside torch.compile (no device-to-host copy).
        masks: modality name -> ``(B,)`` bool, True = the sample has this modality. A modality without a mask is
            present everywhere. Absent samples are never read (they may hold NaN).
        normalize: L2-normalise the embeddings along ``d`` first (as MolBind does).
        backend: "triton" | "reference" | None (automatic: Triton for CUDA tensors; ``PYBLEND_BACKEND``).
        gather: how to build the global batch when ``torch.distributed`` is initialised and ``process_group`` has
            more than one rank (otherwise ignored: the inputs are the whole batch). "autograd" (default): the
            loss and the gradients of the global batch; "no_grad": the public MolBind code's gathering, whose
            gradient reaches the local embeddings only through their own rows (biased, see the module
            docstring); None: no communication, each rank's batch on its own.
        process_group: the ``torch.distributed`` group to gather over (None: the default group). Every rank of
            it must call with the same pairs, weights, modalities, dtype and local ``B`` (checked, a ValueError on
            every rank, unless value checks are off; see the module docstring); masks may differ.

    Returns:
        a 0-dim tensor, float32 (float64 for float64 embeddings). Across ranks: the global loss on every rank,
        with the gradient of this rank's share (module docstring: under DDP, scale by the world size).
    """
    embeddings, pairs, weights, masks, normalize = _validate(embeddings, pairs, weights, temperature, masks,
                                                             normalize)
    if gather not in ("autograd", "no_grad", None):
        raise ValueError(f"gather: expected 'autograd', 'no_grad' or None; got {gather!r}")
    world = _world(gather, process_group)
    first = next(iter(embeddings.values()))
    chosen = choose_backend("multi_infonce", backend, first.device, {
        "triton": lambda: _triton_reasons(embeddings, pairs),
        "reference": lambda: [],
    }, inputs=(embeddings, temperature))
    if world is not None:  # the ranks agree first on which modalities are in no pair, then all refuse them
        return _distributed(embeddings, pairs, weights, temperature, masks, normalize, chosen, gather,
                            process_group, *world)
    _refuse_unpaired(_unpaired(embeddings, pairs), pairs)
    if chosen == "reference":
        return reference.multi_infonce(embeddings, pairs, weights=weights, temperature=temperature, masks=masks,
                                       normalize=normalize)

    # Per modality, once: absent rows zeroed for the torch-side terms (the kernels read the raw tensor, masked)
    # and the float32 inverse norms.
    used = sorted({name for pair in pairs for name in pair})
    safe, inverse_norm = {}, {}
    for name in used:
        x = embeddings[name]
        mask = masks.get(name)
        safe[name] = x if mask is None else torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype,
                                                                                          device=x.device))
        if normalize:
            norm = torch.linalg.vector_norm(safe[name], dim=-1, dtype=torch.float32)
            inverse_norm[name] = 1.0 / norm.clamp(min=_NORM_EPS)
        else:
            inverse_norm[name] = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    total = None
    for (a, b), weight in zip(pairs, weights):
        loss = weight * _pair_loss(embeddings[a], embeddings[b], safe[a], safe[b], inverse_norm[a] / temperature,
                                   inverse_norm[b], _both(masks.get(a), masks.get(b)))
        total = loss if total is None else total + loss
    return total


def _pair_loss(x, y, x_safe, y_safe, x_scale, y_scale, present):
    x_scale = x_scale.to(torch.float32).contiguous()
    y_scale = y_scale.to(torch.float32).contiguous()
    row_lse, col_lse = call(_lse_op, x, y, x_scale, y_scale, present)
    diagonal = (x_safe.float() * y_safe.float()).sum(-1) * x_scale * y_scale
    terms = row_lse + col_lse - 2.0 * diagonal
    if present is None:
        return terms.sum() / (2 * max(x.shape[0], 1))
    terms = torch.where(present, terms, 0.0)
    return terms.sum() / (2 * present.sum().clamp(min=1))  # nothing in common: 0 / 2


# --------------------------------------------------------------------------------------------- across ranks


def _world(gather, group):
    """(rank, world size) when gathering across ranks, else None."""
    if gather is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    size = dist.get_world_size(group)
    if size == 1:
        return None
    return dist.get_rank(group), size


def _all_gather(x, gather, group, size):
    """``(size * M, ...)``: every rank's ``x`` in rank order; differentiable with ``gather="autograd"``."""
    if gather == "autograd":
        return _GatherWithGradient.apply(x, group, size)
    return _gather(x.detach(), group, size)


def _gather(x, group, size):
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for a rank's slice back to that rank (a reduce-scatter;
    an all-reduce and a slice on backends without one, such as gloo). Public ``torch.distributed`` calls only
    (``torch.distributed.nn.functional.all_gather`` does the same and is deprecated)."""

    @staticmethod
    def forward(ctx, x, group, size):
        import torch.distributed as dist

        ctx.group, ctx.size, ctx.rank, ctx.rows = group, size, dist.get_rank(group), x.shape[0]
        return _gather(x, group, size)

    @staticmethod
    @once_differentiable  # the collectives below have no derivative: a second differentiation must refuse
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        if "nccl" in str(dist.get_backend(ctx.group)):
            out = torch.empty_like(grad[:ctx.rows])
            parts = [grad[i * ctx.rows:(i + 1) * ctx.rows] for i in range(ctx.size)]
            dist.reduce_scatter(out, parts, group=ctx.group)
        else:
            total = grad.clone()
            dist.all_reduce(total, group=ctx.group)
            out = total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
        return out, None, None


def _distributed(embeddings, pairs, weights, temperature, masks, normalize, chosen, gather, group, rank, size):
    import torch.distributed as dist

    used = sorted({name for pair in pairs for name in pair})
    first = next(iter(embeddings.values()))
    local_batch = first.shape[0]
    offset = rank * local_batch
    if values_hidden(*embeddings.values()):
        # No host read (torch.compile, value checks off): nothing is checked, and every used modality's mask is
        # gathered (all True where a rank passes none), so that the collectives line up whichever masks each
        # rank passes; what the header would check is trusted.
        _refuse_unpaired(_unpaired(embeddings, pairs), pairs)
        with_mask = used
    else:
        with_mask = _check_ranks(embeddings, pairs, weights, temperature, masks, normalize, gather, used, group,
                                 rank, size)
    # Absent local rows are zeroed before the gather, so no rank ever receives another's NaN.
    local, gathered = {}, {}
    for name in used:
        x = embeddings[name]
        mask = masks.get(name)
        local[name] = x if mask is None else torch.where(mask[:, None], x, torch.zeros((), dtype=x.dtype,
                                                                                        device=x.device))
        gathered[name] = _all_gather(local[name], gather, group, size)
    gathered_masks = _gather_masks(masks, with_mask, local_batch, first.device, group, size)

    if chosen == "reference":
        share = _reference_local(local, gathered, pairs, offset=offset, weights=weights, temperature=temperature,
                                 gathered_masks=gathered_masks, normalize=normalize)
    else:
        def inverse_norm(x):
            if not normalize:
                return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
            return 1.0 / torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp(min=_NORM_EPS)

        local_scale = {name: inverse_norm(local[name]) / temperature for name in used}
        gathered_scale = {name: inverse_norm(gathered[name]) for name in used}
        share = None
        for (a, b), weight in zip(pairs, weights):
            present = _both(gathered_masks.get(a), gathered_masks.get(b))
            loss = weight * _local_pair_loss(local[a], local[b], gathered[a], gathered[b],
                                             local_scale[a], local_scale[b], gathered_scale[a], gathered_scale[b],
                                             present, offset)
            share = loss if share is None else share + loss

    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total - share.detach())  # the global value, this rank's share's gradient


# The header each rank all-gathers before anything else (int64, one fixed length so that this first collective
# lines up whatever the ranks pass): what must agree for the gathers to line up and for the shares to add up to
# one loss, and the union of the masks.
_HEADER = ("local batch size B", "gather", "dtype", "modalities used by the pairs", "embedding widths",
           "pairs, weights, normalize and a float temperature", "masks", "modalities requiring a gradient",
           "modalities in no pair")


def _check_ranks(embeddings, pairs, weights, temperature, masks, normalize, gather, used, group, rank, size):
    """One all-gather of a small header, read on the host: a ValueError on every rank (all of them see every
    header, so they all raise, and none is left waiting in a collective) naming what differs between the ranks.
    Returns the used modalities some rank has a mask for, in ``used`` order: every rank gathers those."""
    import zlib

    def bit(index):  # past 62 modalities (unlikely) they share the last bit: all of them gather a mask then
        return 1 << min(index, 62)

    def bits(names):
        value = 0
        for i, name in enumerate(used):
            if name in names:
                value |= bit(i)
        return value

    def digest(value):  # the same on every rank (Python's str hash is salted per process)
        return zlib.crc32(repr(value).encode())

    first = embeddings[used[0]]
    grad = gather == "autograd" and torch.is_grad_enabled()
    mine = {
        "local batch size B": first.shape[0],
        "gather": ("autograd", "no_grad").index(gather),
        "dtype": _FLOAT_DTYPES.index(first.dtype),
        "modalities used by the pairs": used,
        "embedding widths": {name: embeddings[name].shape[1] for name in used},
        "pairs, weights, normalize and a float temperature": (
            pairs, weights, normalize, None if isinstance(temperature, Tensor) else float(temperature)),
        "masks": bits(masks),
        # the autograd gather's backward is a collective for each gathered modality that requires a gradient
        "modalities requiring a gradient": bits([name for name in used if grad and embeddings[name].requires_grad]),
        "modalities in no pair": _unpaired(embeddings, pairs),
    }
    header = torch.tensor([value if isinstance(value, int) else digest(value) for value in mine.values()],
                          dtype=torch.int64, device=first.device)
    columns = list(zip(*_gather(header, group, size).view(size, len(_HEADER)).tolist()))
    shown = {
        "gather": lambda value: repr(("autograd", "no_grad")[value]),
        "dtype": lambda value: _FLOAT_DTYPES[value],
        "modalities requiring a gradient": lambda value: [name for i, name in enumerate(used) if value & bit(i)],
    }
    problems = []
    for field, values in zip(_HEADER, columns):
        if field == "masks" or len(set(values)) == 1:  # masks may differ: the union is gathered
            continue
        if field in ("local batch size B", "gather", "dtype"):
            show = shown.get(field, str)
            problems.append(f"{field} ({', '.join(f'rank {r}: {show(value)}' for r, value in enumerate(values))})")
            continue
        # a digest, or bits of this rank's modality list: the groups of ranks that agree, and this rank's own
        groups = {}
        for r, value in enumerate(values):
            groups.setdefault(value, []).append(r)
        own = shown[field](values[rank]) if field in shown else mine[field]
        problems.append(f"{field} (ranks that agree: {', '.join(map(str, groups.values()))}; this rank, {rank}, has "
                        f"{own})")
    if problems:
        raise ValueError(f"multi_infonce across ranks: every rank of process_group must pass the same "
                         f"{'; the same '.join(problems)}")
    _refuse_unpaired(mine["modalities in no pair"], pairs)  # the same on every rank: all of them raise
    union = 0
    for value in columns[_HEADER.index("masks")]:
        union |= value
    return [name for i, name in enumerate(used) if union & bit(i)]


def _gather_masks(masks, names, local_batch, device, group, size):
    """Modality -> ``(N,)`` bool over the global batch for each of ``names``, all True where this rank has no mask:
    one all-gather of the stacked masks (as bytes: gloo has no bool all-gather)."""
    if not names:
        return {}
    everywhere = torch.ones(local_batch, dtype=torch.bool, device=device)
    stacked = torch.stack([masks.get(name, everywhere) for name in names], dim=1).view(torch.uint8)
    gathered = _gather(stacked, group, size)
    return {name: gathered[:, i].to(torch.bool).contiguous() for i, name in enumerate(names)}


def _local_pair_loss(x, y, x_all, y_all, x_scale, y_scale, x_all_scale, y_all_scale, present, offset):
    """Rank's share of one pair: both directions' rows of the local samples, over ``2 n`` (global count).
    ``x, y (M, d)`` local with absent rows zeroed, ``x_all, y_all (N, d)`` gathered, scales float32, the local
    ones with the temperature folded in; ``present (N,)`` over the global batch or None."""
    rows = x.shape[0]
    local_present = None if present is None else present[offset:offset + rows]
    x_scale = x_scale.to(torch.float32).contiguous()
    y_scale = y_scale.to(torch.float32).contiguous()
    x_row_lse = call(_row_lse_op, x, y_all, x_scale, y_all_scale.contiguous(), local_present, present)
    y_row_lse = call(_row_lse_op, y, x_all, y_scale, x_all_scale.contiguous(), local_present, present)
    # The positives, against the gathered copies (the same values as the local ones): with a no-grad gather the
    # partner is a constant, as in the public code; with autograd its gradient flows back to its owner.
    x_partner = x_all[offset:offset + rows].float()
    y_partner = y_all[offset:offset + rows].float()
    x_positive = (x.float() * y_partner).sum(-1) * x_scale * y_all_scale[offset:offset + rows]
    y_positive = (y.float() * x_partner).sum(-1) * y_scale * x_all_scale[offset:offset + rows]
    terms = x_row_lse + y_row_lse - x_positive - y_positive
    if present is None:
        return terms.sum() / (2 * max(x_all.shape[0], 1))
    terms = torch.where(local_present, terms, 0.0)
    return terms.sum() / (2 * present.sum().clamp(min=1))


def _both(first, second):
    if first is None:
        return second
    if second is None:
        return first
    return first & second


def _triton_reasons(embeddings, pairs) -> list[str]:
    first = next(iter(embeddings.values()))
    reasons = triton_reasons(first.device, *(x.dtype for x in embeddings.values()))
    if first.dtype not in _KERNEL_DTYPES:
        reasons.append(f"the kernel computes in float16, bfloat16 or float32, got {first.dtype}")
    widest = max(embeddings[name].shape[1] for pair in pairs for name in pair)
    if widest > _MAX_DIM:
        reasons.append(f"embedding dim {widest} > {_MAX_DIM}")
    return reasons


def pair_weights(weights, count: int) -> list[float]:
    """The per-pair weights as floats: ``1 / count`` each for None, else one finite number per pair (checked
    here for the op and for :class:`pyblend.nn.MultiPairContrastive` when it is built)."""
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights: expected a list or tuple of floats, one per pair; got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"weights: expected one weight per pair ({count}); got {len(weights)}")
    for w in weights:
        if not is_real(w):
            raise TypeError(f"weights: expected finite floats; got {w!r}")
        if not is_finite(w):
            raise ValueError(f"weights: expected finite floats; got {w!r}")
    return [float(w) for w in weights]


def check_distinct(pair) -> None:
    """A pair of two different modalities. Paired with itself, each sample would be its own positive: the loss
    would only measure how unlike the other samples it is."""
    if pair[0] == pair[1]:
        raise ValueError(f"pairs: pair {tuple(pair)!r} pairs modality {pair[0]!r} with itself; expected two "
                         f"different modalities")


def _unpaired(embeddings, pairs) -> list[str]:
    paired = {name for pair in pairs for name in pair}
    return sorted(name for name in embeddings if name not in paired)


def _refuse_unpaired(unpaired, pairs):
    """A modality in no pair (a typo, a forgotten pair) would otherwise be dropped without a word."""
    if unpaired:
        raise ValueError(f"embeddings: modality {unpaired[0]!r} is in no pair (the pairs use "
                         f"{sorted({name for pair in pairs for name in pair})}); pass only paired modalities, or "
                         f"add a pair for it")


def check_unique_pairs(pairs) -> None:
    """Each pair once: the loss is symmetric, so ('a', 'b') twice, or with ('b', 'a'), counts that pair twice in
    the weighted sum (a weight says that openly)."""
    seen = {}
    for pair in pairs:
        key = frozenset(pair)
        if key in seen:
            raise ValueError(f"pairs: {tuple(pair)!r} repeats {seen[key]!r} (the loss is symmetric); list each pair "
                             f"once and give it a larger weight instead")
        seen[key] = tuple(pair)


def _validate(embeddings, pairs, weights, temperature, masks, normalize):
    if not isinstance(embeddings, Mapping) or not embeddings:
        raise TypeError(f"embeddings: expected a non-empty dict of modality name -> (B, d) tensor; "
                        f"got {type(embeddings).__name__ if not isinstance(embeddings, Mapping) else 'an empty dict'}")
    embeddings = {name: as_tensor(x, f"embeddings[{name!r}]") for name, x in embeddings.items()}
    first_name, first = next(iter(embeddings.items()))
    for name, x in embeddings.items():
        label = f"embeddings[{name!r}]"
        check_dtype(x, label, _FLOAT_DTYPES)
        # d = 0 gives every logit 0 and the loss log(B) whatever the samples: nothing to contrast.
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(f"{label}: expected shape (B, d) with d >= 1; got {describe(x)}")
        if x.dtype != first.dtype:
            raise TypeError(f"{label}: expected the dtype of embeddings[{first_name!r}] ({first.dtype}); "
                            f"got {describe(x)}")
        if x.shape[0] != first.shape[0]:
            raise ValueError(f"{label}: expected batch size B = {first.shape[0]} like embeddings[{first_name!r}]; "
                             f"got {describe(x)}")
        if x.device != first.device:
            raise ValueError(f"{label}: expected a tensor on {first.device} like embeddings[{first_name!r}]; "
                             f"got {describe(x)}")

    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"pairs: expected a non-empty list of (modality, modality) tuples; got {pairs!r}")
    pairs = list(pairs)
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"pairs: expected (modality, modality) tuples; got {pair!r}")
        for name in pair:
            if name not in embeddings:
                raise ValueError(f"pairs: modality {name!r} in pair {tuple(pair)!r} is not in embeddings "
                                 f"(which has {sorted(embeddings)})")
        a, b = pair
        check_distinct(pair)
        if embeddings[a].shape[1] != embeddings[b].shape[1]:
            raise ValueError(f"pairs: pair {tuple(pair)!r} needs one embedding dim; embeddings[{a!r}] has "
                             f"d = {embeddings[a].shape[1]} and embeddings[{b!r}] has d = {embeddings[b].shape[1]}")
    pairs = [tuple(pair) for pair in pairs]
    check_unique_pairs(pairs)

    weights = pair_weights(weights, len(pairs))

    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point() or temperature.dim() != 0:
            raise TypeError(f"temperature: expected a float or a 0-dim float tensor; got {describe(temperature)}")
        if temperature.device != first.device and temperature.device.type != "cpu":
            where = "the CPU" if first.device.type == "cpu" else f"{first.device} (or the CPU)"
            raise ValueError(f"temperature: expected a tensor on {where}, as the embeddings; "
                             f"got {describe(temperature)}")
        if temperature.device.type == "cpu" and not values_hidden(temperature):
            value = float(temperature.detach())
            if not (is_finite(value) and value > 0):
                raise ValueError(f"temperature: expected a finite value > 0; got {value!r}")
    elif not is_real(temperature) or not (is_finite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite float > 0 or a 0-dim tensor; got {temperature!r}")

    normalize = check_flag(normalize, "normalize")

    if masks is not None and not isinstance(masks, Mapping):
        raise TypeError(f"masks: expected None or a dict of modality name -> (B,) bool tensor; "
                        f"got {type(masks).__name__}")
    masks = dict(masks or {})
    for name, mask in list(masks.items()):
        if name not in embeddings:
            raise ValueError(f"masks: modality {name!r} is not in embeddings (which has {sorted(embeddings)})")
        masks[name] = check_sample_mask(mask, f"masks[{name!r}]", first.shape[0], first.device).contiguous()
    return embeddings, pairs, weights, masks, normalize


# --------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("pyblend::multi_infonce_lse", mutates_args=())
def _lse_op(x: Tensor, y: Tensor, x_scale: Tensor, y_scale: Tensor,
            present: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exps (float32 ``(B,)``, 0 at absent samples) of
    ``S = (x y^T) * x_scale[:, None] * y_scale[None, :]`` over present pairs."""
    from ..kernels import multi_infonce as kernel

    return kernel.multi_infonce_lse_forward(x, y, x_scale.contiguous(), y_scale.contiguous(),
                                            None if present is None else present.contiguous())


@_lse_op.register_fake
def _(x, y, x_scale, y_scale, present):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("pyblend::multi_infonce_lse_backward", mutates_args=())
def _backward_op(grad_row: Tensor, grad_col: Tensor, x: Tensor, y: Tensor, x_scale: Tensor, y_scale: Tensor,
                 present: Optional[Tensor], row_lse: Tensor, col_lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dx_scale, dy_scale), 0 at absent samples."""
    from ..kernels import multi_infonce as kernel

    return kernel.multi_infonce_lse_backward(grad_row, grad_col, x, y, x_scale.contiguous(), y_scale.contiguous(),
                                             None if present is None else present.contiguous(), row_lse.contiguous(),
                                             col_lse.contiguous())


@_backward_op.register_fake
def _(grad_row, grad_col, x, y, x_scale, y_scale, present, row_lse, col_lse):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(y.shape, dtype=y.dtype, device=y.device),
            x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32))


@torch.library.custom_op("pyblend::multi_infonce_row_lse", mutates_args=())
def _row_lse_op(x: Tensor, y: Tensor, x_scale: Tensor, y_scale: Tensor, row_present: Optional[Tensor],
                col_present: Optional[Tensor]) -> Tensor:
    """Row log-sum-exps (float32 ``(M,)``, 0 at absent rows) of ``S = (x y^T) * x_scale[:, None] *
    y_scale[None, :]`` over present pairs: ``x (M, d)`` a rank's local rows, ``y (N, d)`` the gathered columns;
    ``row_present (M,)`` and ``col_present (N,)`` both or neither."""
    from ..kernels import multi_infonce as kernel

    return kernel.multi_infonce_row_lse_forward(x, y, x_scale.contiguous(), y_scale.contiguous(),
                                                None if row_present is None else row_present.contiguous(),
                                                None if col_present is None else col_present.contiguous())


@_row_lse_op.register_fake
def _(x, y, x_scale, y_scale, row_present, col_present):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("pyblend::multi_infonce_row_lse_backward", mutates_args=())
def _row_backward_op(grad: Tensor, x: Tensor, y: Tensor, x_scale: Tensor, y_scale: Tensor,
                     row_present: Optional[Tensor], col_present: Optional[Tensor], row_lse: Tensor,
                     columns: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dx_scale, dy_scale), 0 at absent samples; dy and dy_scale are left uninitialised (not computed)
    when ``columns`` is False."""
    from ..kernels import multi_infonce as kernel

    return kernel.multi_infonce_row_lse_backward(grad, x, y, x_scale.contiguous(), y_scale.contiguous(),
                                                 None if row_present is None else row_present.contiguous(),
                                                 None if col_present is None else col_present.contiguous(),
                                                 row_lse.contiguous(), columns)


@_row_backward_op.register_fake
def _(grad, x, y, x_scale, y_scale, row_present, col_present, row_lse, columns):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(y.shape, dtype=y.dtype, device=y.device),
            x.new_empty(x.shape[0], dtype=torch.float32), y.new_empty(y.shape[0], dtype=torch.float32))


def _row_setup_context(ctx, inputs, output):
    x, y, x_scale, y_scale, row_present, col_present = inputs
    ctx.save_for_backward(x, y, x_scale, y_scale, row_present, col_present, output)


def _row_backward(ctx, grad):
    x, y, x_scale, y_scale, row_present, col_present, row_lse = ctx.saved_tensors
    columns = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[3])  # a no-grad gather needs no dy
    dx, dy, dx_scale, dy_scale = call(
        _row_backward_op, grad, x, y, x_scale, y_scale, row_present, col_present, row_lse, columns)
    if not columns:
        return dx, None, dx_scale.to(x_scale.dtype), None, None, None
    return dx, dy, dx_scale.to(x_scale.dtype), dy_scale.to(y_scale.dtype), None, None


_row_lse_op.register_autograd(_row_backward, setup_context=_row_setup_context)
refuse_double_backward(_row_backward_op, "multi_infonce")


def _setup_context(ctx, inputs, output):
    x, y, x_scale, y_scale, present = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(x, y, x_scale, y_scale, present, row_lse, col_lse)


def _backward(ctx, grad_row, grad_col):
    x, y, x_scale, y_scale, present, row_lse, col_lse = ctx.saved_tensors
    if grad_row is None:
        grad_row = torch.zeros_like(row_lse)
    if grad_col is None:
        grad_col = torch.zeros_like(col_lse)
    dx, dy, dx_scale, dy_scale = call(
        _backward_op, grad_row, grad_col, x, y, x_scale, y_scale, present, row_lse, col_lse)
    return dx, dy, dx_scale.to(x_scale.dtype), dy_scale.to(y_scale.dtype), None


_lse_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_backward_op, "multi_infonce")
