"""Modality blending (MoleBlend eq. 8-9): each atom pair takes its relation from SPD, edge or 3D.

Two steps. :func:`sample_blend` draws, per atom pair, which relation channels it uses, as a bit mask (bit 0 =
SPD, bit 1 = edge, bit 2 = 3D). :func:`blend_relations` turns the chosen channels into the inputs of
:func:`pyblend.ops.relation_attention`: the dense biases are zeroed where not chosen and summed, and a table-based
SPD bias stays a table: the pairs that did not choose SPD point at an extra all-zero row, so the blend of the
SPD channel happens inside the attention kernel through the relation index and no ``(B, H, N, N)`` SPD tensor is
made.

Sampling is random-number generation and a comparison per pair, and blending one ``torch.where`` per dense
channel: memory-bound elementwise work that torch runs at bandwidth, so there is no kernel here. The pair
choices are int8/uint8 ``(B, N, N)`` (packed ``(P,)``), a quarter of one float bias channel.

The dense sum is not folded into the attention kernel on purpose: an encoder blends once per forward and every
one of its L layers reads the result (as :class:`pyblend.models.MoleBlend` does). Folded in, each layer would read
the edge and 3D channels and the choices instead of one summed bias: about twice the bias bytes, L times, to save
one elementwise pass.

Packed layout: the choices are computed per real pair only. A ``mode="pair"`` draw still generates the padded
``(B, N, N)`` uniforms (one float per padded pair, no head dimension) and reads the real pairs out of them, so
that a packed batch gets exactly the padded batch's draw from the same generator; every other tensor is ``(P,)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._values import values_hidden
from ..layout import pair_index, seqlens
from ._checks import (
    FLOAT_DTYPES,
    INTEGER_DTYPES,
    as_tensor,
    check_dtype,
    check_flag,
    check_generator,
    check_shape,
    describe,
    host_sizes,
    id_range,
    is_finite,
    is_int,
    is_real,
    one_or,
)

__all__ = ["CHANNELS", "blend_relations", "every_channel", "sample_blend"]

CHANNELS = ("spd", "edge", "geometry")
SPD, EDGE, GEOMETRY = 1, 2, 4  # bits of a pair's choice
_MODES = ("pair", "batch", "molecule")
# mode="molecule" draws one channel subset per molecule (Transformer-M's 2D / 3D / 2D+3D modes).
_MOLECULE_SUBSETS = (SPD | EDGE, GEOMETRY, SPD | EDGE | GEOMETRY)


def sample_blend(mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                 probs=(0.2, 0.2, 0.6), mode: str = "pair", symmetric: bool = False,
                 has_geometry: Tensor | None = None, generator: torch.Generator | None = None,
                 pairs: int | None = None) -> Tensor:
    """Draw the relation channels of every atom pair.

    Args:
        mask: ``(B, N)`` bool, True = real atom (padded layout). Give this or ``cu_seqlens``.
        cu_seqlens: ``(B + 1,)`` int32 (packed layout), with ``max_seqlen`` (int, at least the largest molecule;
            both checked on the host, or trusted under torch.compile).
        probs: three non-negative numbers with a positive sum (normalised here). ``mode="pair"`` and ``"batch"``:
            the probabilities of (SPD, edge, 3D), 0.2 / 0.2 / 0.6 by default (the paper's). ``mode="molecule"``:
            the probabilities of the subsets (2D = SPD + edge, 3D, 2D + 3D); Transformer-M's ``--mode-prob``
            lists (2D + 3D, 2D, 3D), so its ``a,b,c`` is ``probs=(b, c, a)`` here.
        mode: "pair": an independent draw per pair of every molecule (the paper's eq. 8); "batch": one
            ``(N, N)`` draw shared by every molecule of the batch (the public code's behaviour; molecule i uses
            its top-left ``N_i x N_i`` block); "molecule": one subset per molecule, used by all its pairs.
        symmetric: pair (j, i) uses pair (i, j)'s draw (the public code does not symmetrise; False).
        has_geometry: ``(B,)`` bool, False for a molecule without a conformer: its pairs never get the 3D channel
            (the draw is renormalised over the channels or subsets left). None = every molecule has one. On the
            layout's device, or on the CPU (then copied over).
        generator: a ``torch.Generator`` on the choice's device, for reproducible draws.
        pairs: packed layout, ``P = sum N_i^2`` when known (e.g. a per-pair input's length): saves reading
            ``cu_seqlens`` on the host, and is needed for meta and fake tensors, which have no values.

    Returns:
        uint8 ``(B, N, N)`` (padded) or ``(P,)`` (packed, pairs of molecule i row-major after those of the
        molecules before it): bit 0 SPD, bit 1 edge, bit 2 3D; 0 on padded pairs.
    """
    check_blend_mode(mode)
    symmetric = check_flag(symmetric, "symmetric")
    weights = check_blend_probs(probs)
    check_generator(generator)
    mask, cu_seqlens, has_geometry = _layout(mask, cu_seqlens, max_seqlen, has_geometry, pairs)
    (batch, atoms), device = mask.shape, mask.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator: expected a generator on {device.type} (where the choices are drawn); "
                         f"got one on {generator.device.type}")

    # Per molecule: the three outcomes and their probabilities, 3D outcomes removed where there is no conformer.
    if mode == "molecule":
        outcomes = torch.tensor(_MOLECULE_SUBSETS, dtype=torch.uint8, device=device)
    else:
        outcomes = torch.tensor((SPD, EDGE, GEOMETRY), dtype=torch.uint8, device=device)
    allowed = (outcomes & GEOMETRY == 0) | has_geometry[:, None]                       # (B, 3)
    per_molecule = torch.where(allowed, weights.to(device), 0.0)
    empty = per_molecule.sum(1) == 0
    # Not under torch.compile, where reading the flags would break the graph (as the ops' id checks).
    if not values_hidden(has_geometry) and bool(empty.any()):
        first = int(empty.nonzero()[0])
        raise ValueError(f"has_geometry: molecule {first} has no conformer, and probs {tuple(weights.tolist())} "
                         f"give its 2D outcomes probability 0 in mode {mode!r}")
    cumulative = (per_molecule / per_molecule.sum(1, keepdim=True)).cumsum(1)            # (B, 3)
    # A draw at or past bound k picks an outcome after k. Where every later outcome has probability 0, the
    # bound is +inf: renormalised in float32 it can come out as 1 - 2^-24, which torch.rand returns, and a
    # molecule without a conformer would get the 3D channel.
    later = per_molecule.flip(1).cumsum(1).flip(1)[:, 1:]                                # (B, 2)
    bounds = torch.where(later > 0, cumulative[:, :-1], float("inf"))

    # generator=None is left out: torch.compile traces that overload with concrete sizes only (a crash at the
    # second batch shape).
    rand_options = dict(device=device) if generator is None else dict(generator=generator, device=device)
    if mode == "molecule":
        draw = torch.rand(batch, 1, 1, **rand_options)
    elif mode == "batch":
        draw = torch.rand(1, atoms, atoms, **rand_options).expand(batch, atoms, atoms)
    else:
        draw = torch.rand(batch, atoms, atoms, **rand_options)
    if symmetric and mode != "molecule":
        draw = torch.triu(draw) + torch.triu(draw, diagonal=1).transpose(1, 2)
    # The outcome whose cumulative interval holds the draw.
    if cu_seqlens is not None:
        molecule, i, j = pair_index(cu_seqlens, pairs)
        # Indexing the expanded view reads the real pairs' draws without materialising a padded tensor.
        index = (draw.expand(batch, atoms, atoms)[molecule, i, j, None] >= bounds[molecule]).sum(-1)
        return outcomes[index]
    index = (draw[..., None] >= bounds[:, None, None]).sum(-1)
    return _on_real_pairs(outcomes[index].expand(batch, atoms, atoms), mask)


def _on_real_pairs(choice: Tensor, mask: Tensor) -> Tensor:
    pairs = mask[:, :, None] & mask[:, None, :]
    return torch.where(pairs, choice, torch.zeros((), dtype=torch.uint8, device=mask.device))


def _layout(mask, cu_seqlens, max_seqlen, has_geometry, pairs) -> tuple[Tensor, Tensor | None, Tensor]:
    """Validated ``(atom mask (B, N), cu_seqlens or None, has_geometry (B,))``; a packed batch gets its padded
    ``(B, N)`` mask (for the batch size and width)."""
    mask = as_tensor(mask, "mask", optional=True)
    cu_seqlens = as_tensor(cu_seqlens, "cu_seqlens", optional=True)
    if (mask is None) == (cu_seqlens is None):
        raise ValueError("mask, cu_seqlens: give exactly one (padded layout: mask (B, N); packed: cu_seqlens)")
    if mask is not None:
        check_dtype(mask, "mask", (torch.bool,))
        check_shape(mask, "mask", (None, None), "(B, N)")
        if pairs is not None:
            raise ValueError(f"pairs: the packed layout's P (with cu_seqlens); the padded layout (mask) takes "
                             f"none, got {pairs!r}")
        if max_seqlen is not None and max_seqlen != mask.shape[1]:
            raise ValueError(f"max_seqlen: the padded layout's width is mask.shape[1] = {mask.shape[1]}; got "
                             f"{max_seqlen!r} (pass None, or cu_seqlens for the packed layout)")
    else:
        eager = not values_hidden(cu_seqlens)  # host reads would break a graph: trusted under compile
        lengths = seqlens(cu_seqlens)
        if not is_int(max_seqlen) or max_seqlen < 0:
            raise ValueError(f"max_seqlen: expected an int >= 0 with cu_seqlens; got {max_seqlen!r}")
        max_seqlen = int(max_seqlen)
        if eager:
            _, longest, described = host_sizes(cu_seqlens)  # the one device-to-host read
            if longest > max_seqlen:
                raise ValueError(f"max_seqlen: {max_seqlen} is below the largest molecule in cu_seqlens "
                                 f"({longest} atoms)")
            if pairs is not None and described != pairs:
                raise ValueError(f"pairs: cu_seqlens describes P = sum N_i^2 = {described} pairs; got {pairs}")
        mask = torch.arange(max_seqlen, device=cu_seqlens.device) < lengths[:, None]
    batch = mask.shape[0]
    if has_geometry is None:
        return mask, cu_seqlens, torch.ones(batch, dtype=torch.bool, device=mask.device)
    has_geometry = as_tensor(has_geometry, "has_geometry")
    check_dtype(has_geometry, "has_geometry", (torch.bool,))
    check_shape(has_geometry, "has_geometry", (batch,), "(B,)")
    if has_geometry.device != mask.device and has_geometry.device.type != "cpu":
        where = "the mask" if cu_seqlens is None else "cu_seqlens"
        raise ValueError(f"has_geometry: expected a tensor on {mask.device} (as {where}) or on the CPU; got "
                         f"{describe(has_geometry)}")
    return mask, cu_seqlens, has_geometry.to(mask.device)


def every_channel(mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                  has_geometry: Tensor | None = None, pairs: int | None = None) -> Tensor:
    """The no-blending choice (inference): every real pair uses SPD, edge and 3D, or SPD and edge where its
    molecule has no conformer. Arguments and result as :func:`sample_blend`."""
    mask, cu_seqlens, has_geometry = _layout(mask, cu_seqlens, max_seqlen, has_geometry, pairs)
    channels = torch.where(has_geometry, SPD | EDGE | GEOMETRY, SPD | EDGE).to(torch.uint8)
    if cu_seqlens is not None:
        return torch.repeat_interleave(channels, seqlens(cu_seqlens) ** 2, output_size=pairs)
    return _on_real_pairs(channels[:, None, None].expand(-1, *mask.shape[1:], mask.shape[1]), mask)


def blend_relations(choice: Tensor, *, spd_index: Tensor | None = None, spd_table: Tensor | None = None,
                    spd_bias: Tensor | None = None, edge_bias: Tensor | None = None,
                    geometry_bias: Tensor | None = None) -> dict[str, Tensor | None]:
    """Combine the chosen relation channels into :func:`pyblend.ops.relation_attention` inputs.

    Args:
        choice: uint8 ``(B, N, N)`` or ``(P,)`` from :func:`sample_blend`.
        spd_index, spd_table: the SPD channel as a table, integer ids ``choice.shape`` and a float ``(R, H)``
            table (the attention kernel gathers it). Ids must lie in ``[0, R)`` where the SPD bit is set
            (checked with one device-to-host copy, outside torch.compile). Or ``spd_bias``, the SPD channel as a
            dense bias.
        spd_bias, edge_bias, geometry_bias: dense biases ``(B|1, H, N, N)`` (padded) or ``(H, P)`` (packed),
            each optional; a channel given neither way contributes nothing.

    Returns:
        ``{"bias": Tensor | None, "rel_index": Tensor | None, "rel_table": Tensor | None}`` for
        ``relation_attention(q, k, v, **blended, ...)``: ``bias`` is the sum of the dense channels each zeroed
        where its bit is off (``torch.where``, so a NaN or inf in an unchosen entry does not leak); for the table
        form, ``rel_table`` is ``spd_table`` with an extra zero row ``R`` and ``rel_index`` points the pairs
        without the SPD bit at it. Gradients flow to every bias and to ``spd_table``.
    """
    choice = as_tensor(choice, "choice")
    check_dtype(choice, "choice", INTEGER_DTYPES)
    packed = choice.dim() == 1
    if not packed and (choice.dim() != 3 or choice.shape[1] != choice.shape[2]):
        raise ValueError(f"choice: expected (B, N, N) or (P,); got {describe(choice)}")
    if not values_hidden(choice):  # reading the bits would break the graph
        bounds = id_range(choice)
        if bounds is not None and (bounds[0] < 0 or bounds[1] > SPD | EDGE | GEOMETRY):
            # -1 (int8) would turn every channel on, 8 none.
            raise ValueError(f"choice: expected channel bits in [0, {SPD | EDGE | GEOMETRY}] (bit 0 SPD, 1 edge, "
                             f"2 3D); got values from {bounds[0]} to {bounds[1]}")
    if spd_bias is not None and (spd_index is not None or spd_table is not None):
        raise ValueError("spd_bias: give the SPD channel either dense (spd_bias) or as a table "
                         "(spd_index, spd_table), not both")
    if (spd_index is None) != (spd_table is None):
        raise ValueError(f"{'spd_table' if spd_table is None else 'spd_index'}: spd_index and spd_table come "
                         "together")

    def chosen(bit: int) -> Tensor:
        on = (choice & bit) != 0
        return on if packed else on[:, None]  # broadcast over heads: (B, 1, N, N) / (P,) against (H, P)

    bias = heads = None  # heads: (H, the argument that set it)
    for name, value, bit in (("spd_bias", spd_bias, SPD), ("edge_bias", edge_bias, EDGE),
                             ("geometry_bias", geometry_bias, GEOMETRY)):
        if value is None:
            continue
        value = as_tensor(value, name)
        check_dtype(value, name, FLOAT_DTYPES)
        want = (None, choice.shape[0]) if packed else (None, None, *choice.shape[1:])
        if value.dim() != len(want) or any(w is not None and s != w for s, w in zip(value.shape, want)) or \
                (not packed and not one_or(value.shape[0], choice.shape[0])):
            layout = "(H, P)" if packed else "(B|1, H, N, N)"
            raise ValueError(f"{name}: expected {layout} matching choice {describe(choice)}; got {describe(value)}")
        if value.device != choice.device:
            raise ValueError(f"{name}: expected a tensor on {choice.device} like choice; got {value.device}")
        heads = _same_heads(heads, value.shape[0 if packed else 1], name)
        part = torch.where(chosen(bit), value, torch.zeros((), dtype=value.dtype, device=value.device))
        bias = part if bias is None else bias + part

    rel_index = rel_table = None
    if spd_table is not None:
        spd_index, spd_table = as_tensor(spd_index, "spd_index"), as_tensor(spd_table, "spd_table")
        if spd_index.shape != choice.shape:
            raise ValueError(f"spd_index: expected the shape of choice {tuple(choice.shape)}; got "
                             f"{describe(spd_index)}")
        if spd_table.dim() != 2:
            raise ValueError(f"spd_table: expected (R, H); got {describe(spd_table)}")
        rows = spd_table.shape[0]
        check_dtype(spd_index, "spd_index", INTEGER_DTYPES)
        check_dtype(spd_table, "spd_table", FLOAT_DTYPES)
        for name, value in (("spd_index", spd_index), ("spd_table", spd_table)):
            if value.device != choice.device:
                raise ValueError(f"{name}: expected a tensor on {choice.device} like choice; got {value.device}")
        _same_heads(heads, spd_table.shape[1], "spd_table")
        if not values_hidden(spd_index):  # reading the ids would break the graph
            _check_spd_ids(spd_index, choice, rows)
        index_dtype = torch.int16 if rows + 1 <= torch.iinfo(torch.int16).max else torch.int32
        rel_index = torch.where((choice & SPD) != 0, spd_index.to(index_dtype),
                                torch.full((), rows, dtype=index_dtype, device=choice.device))
        rel_table = torch.cat([spd_table, spd_table.new_zeros(1, spd_table.shape[1])])
    return {"bias": bias, "rel_index": rel_index, "rel_table": rel_table}


def _same_heads(heads: tuple[int, str] | None, count: int, name: str) -> tuple[int, str]:
    """Every channel has the same H (no channel is broadcast over heads: the sum would take the largest H)."""
    if heads is not None and count != heads[0]:
        raise ValueError(f"{name}: expected H = {heads[0]} heads, as {heads[1]} has; got {count}")
    return (count, name) if heads is None else heads


def _check_spd_ids(spd_index: Tensor, choice: Tensor, rows: int) -> None:
    """Ids must be rows of the table where the SPD channel is chosen (elsewhere they are never read): checked
    before they are narrowed to int16/int32, where a wrapped id would pass as another row."""
    read = (choice & SPD) != 0
    if rows == 0:  # no valid id to stand in at unread pairs: an empty table serves only where SPD is never chosen
        if bool(read.any()):
            raise ValueError("spd_table: has no rows, but the SPD channel is chosen at some pairs (choice)")
        return
    bounds = id_range(spd_index, read)
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= rows):
        raise ValueError(f"spd_index: expected ids in [0, {rows}) (rows of spd_table) where the SPD channel is "
                         f"chosen; got ids from {bounds[0]} to {bounds[1]}")


def check_blend_mode(mode, name: str = "mode") -> None:
    if mode not in _MODES:
        raise ValueError(f"{name}: expected one of {_MODES}; got {mode!r}")


def check_blend_probs(probs, name: str = "probs") -> Tensor:
    """The (SPD, edge, 3D) probabilities normalised to sum 1, float32 ``(3,)``; ``name`` is the argument's, for
    messages. A string ("123" read as 1, 2, 3) and bools are refused."""
    # Checked on Python floats: bool() of a tensor would break a torch.compile graph at every call.
    if isinstance(probs, Tensor):
        values = probs.detach().flatten().tolist()
    elif isinstance(probs, (str, bytes)) or not isinstance(probs, (tuple, list)) or not all(map(is_real, probs)):
        raise TypeError(f"{name}: expected three numbers (a tuple, list or tensor); got {probs!r}")
    else:
        values = [float(p) for p in probs]
    if len(values) != 3 or not all(is_finite(p) and p >= 0 for p in values) or sum(values) <= 0:
        raise ValueError(f"{name}: expected three finite non-negative numbers with a positive sum; got {probs!r}")
    return torch.tensor([p / sum(values) for p in values], dtype=torch.float32)
