"""``pyblend.layout``'s public helpers: each refuses bad input by name (shapes, dtypes and sizes always; what only
``cu_seqlens``' values tell where they may be read), reads those values at most once per tensor and version,
reads nothing under torch.compile, for meta tensors or with value checks off, and still converts valid batches."""
import numpy as np
import pytest
import torch

import pyblend
from pyblend import layout, ops

from host_reads import recorded_host_reads

LENGTHS = [3, 1, 0, 5]
ATOMS, PAIRS = sum(LENGTHS), sum(n * n for n in LENGTHS)  # 9, 35


def i32(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def cu(*values) -> torch.Tensor:
    """A fresh tensor per call (the helpers remember the tensors they read): by default two molecules, 2 and 3
    atoms, T = 5, P = 13."""
    return i32(*(values or (0, 2, 5)))


def batch_cu_seqlens(dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(LENGTHS)], dtype=dtype)


# ---------------------------------------------------------------------------------------- findings, by name
@pytest.mark.parametrize("call, message", [
    # Negative indexing read the last rows: [2, 0, 5] instead of an error.
    (lambda: layout.unpad_atoms(torch.arange(6.0).view(2, 3, 1), i32(1, 3, 4)),
     r"cu_seqlens: expected cu_seqlens\[0\] == 0; got 1"),
    (lambda: layout.pad_atoms(torch.zeros(3, 1), i32(2, 5)), r"cu_seqlens: expected cu_seqlens\[0\] == 0; got 2"),
    (lambda: layout.pair_index(i32(0, 5, 2)),
     r"cu_seqlens: expected non-decreasing values; got cu_seqlens\[2\] = 2 < 5"),
    (lambda: layout.seqlens(i32(0, 5, 2)), r"non-decreasing values; got cu_seqlens\[2\] = 2 < 5"),
    (lambda: layout.pair_offsets(i32(0, 5, 2)), r"non-decreasing values"),
    (lambda: layout.atom_molecules(i32(0, 5, 2), 2), r"non-decreasing values"),
    (lambda: layout.mask_from_cu_seqlens(i32(0, 5, 2), 5), r"non-decreasing values"),
    (lambda: layout.prepend_token(i32(1, 2, 5), 4, 10), r"cu_seqlens\[0\] == 0; got 1"),
], ids=["unpad_atoms", "pad_atoms", "pair_index", "seqlens", "pair_offsets", "atom_molecules", "mask", "prepend"])
def test_cu_seqlens_values_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    # The 3-atom molecule was cut to 2.
    (lambda: layout.mask_from_cu_seqlens(cu(), 2), r"max_seqlen: expected at least the longest molecule \(3 atoms\); "
                                                   r"got 2"),
    (lambda: layout.padded_width(cu(), 2), r"max_seqlen: expected at least the longest molecule \(3 atoms\); got 2"),
    # Too narrow a padded input: an IndexError.
    (lambda: layout.unpad_atoms(torch.zeros(2, 2, 1), cu()), r"x.shape\[1\]: expected at least the longest molecule "
                                                              r"\(3 atoms\); got 2"),
    (lambda: layout.unpad_pairs(torch.zeros(2, 2, 2), cu(), 13), r"x.shape\[1\]: expected at least the longest"),
], ids=["mask_from_cu_seqlens", "padded_width", "unpad_atoms", "unpad_pairs"])
def test_widths_hold_the_longest_molecule(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call, error, message", [
    (lambda: layout.padded_width(cu(), -3), ValueError, r"max_seqlen: expected an int >= 0; got -3"),
    (lambda: layout.mask_from_cu_seqlens(cu(), -1), ValueError, r"max_seqlen: expected an int >= 0; got -1"),
    (lambda: layout.mask_from_cu_seqlens(cu(), None), TypeError, r"max_seqlen: expected an int >= 0; got None"),
    (lambda: layout.pad_atoms(torch.zeros(5, 1), cu(), 3.5), TypeError,
     r"max_seqlen: expected an int >= 0 or None; got 3.5"),
    (lambda: layout.pad_pairs(torch.zeros(13), cu(), True), TypeError, r"max_seqlen: expected an int >= 0 or None; "
                                                                       r"got True"),
    (lambda: layout.check_cu_seqlens(cu(), total="5"), TypeError, r"total: expected an int >= 0 or None; got '5'"),
    (lambda: layout.atom_molecules(cu(), 5.0), TypeError, r"atoms: expected an int >= 0 or None; got 5.0"),
    (lambda: layout.pair_index(cu(), -13), ValueError, r"pairs: expected an int >= 0; got -13"),
    (lambda: layout.unpad_pairs(torch.zeros(2, 3, 3), cu(), "13"), TypeError, r"pairs: expected an int"),
], ids=["padded_width", "mask", "mask None", "pad_atoms", "pad_pairs bool", "total", "atoms", "pairs", "unpad_pairs"])
def test_sizes_are_ints_of_at_least_zero(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_numpy_ints_are_sizes():
    width = layout.padded_width(cu(), np.int64(4))
    assert width == 4 and type(width) is int
    assert layout.mask_from_cu_seqlens(cu(), np.int32(3)).shape == (2, 3)


_CU_HELPERS = {
    "seqlens": lambda c: layout.seqlens(c),
    "pair_offsets": lambda c: layout.pair_offsets(c),
    "atom_molecules": lambda c: layout.atom_molecules(c),
    "pair_index": lambda c: layout.pair_index(c),
    "prepend_token": lambda c: layout.prepend_token(c),
    "mask_from_cu_seqlens": lambda c: layout.mask_from_cu_seqlens(c, 3),
    "padded_width": lambda c: layout.padded_width(c, 3),
    "pad_atoms": lambda c: layout.pad_atoms(torch.zeros(5, 1), c, 3),
    "pad_pairs": lambda c: layout.pad_pairs(torch.zeros(13), c, 3),
    "unpad_atoms": lambda c: layout.unpad_atoms(torch.zeros(2, 3, 1), c, 5),
    "unpad_pairs": lambda c: layout.unpad_pairs(torch.zeros(2, 3, 3), c, 13),
}


@pytest.mark.parametrize("helper", _CU_HELPERS)
@pytest.mark.parametrize("checks", [True, False])
def test_cu_seqlens_must_be_an_integer_vector(helper, checks):
    """A float cu_seqlens was taken (its lengths truncated to ints); dtype and shape are checked with value
    checks off too (they read nothing)."""
    call = _CU_HELPERS[helper]
    with pyblend.set_value_checks(checks):
        with pytest.raises(ValueError, match=r"cu_seqlens: expected an int32 or int64 tensor of shape \(B\+1,\); "
                                             r"got torch.float32 tensor of shape \(3,\)"):
            call(cu().float())
        with pytest.raises(ValueError, match=r"cu_seqlens: expected an int32 or int64 tensor of shape \(B\+1,\); "
                                             r"got torch.int32 tensor of shape \(1, 3\)"):
            call(cu()[None])
        with pytest.raises(TypeError, match=r"cu_seqlens: expected a torch.Tensor; got list"):
            call([0, 2, 5])
        call(cu().long())  # int64 is an index dtype too


@pytest.mark.parametrize("call, message", [
    # repeat_interleave's "RuntimeError: allocated size does not match required size".
    (lambda: layout.atom_molecules(cu(), 4), r"atoms: expected T = cu_seqlens\[-1\] = 5 \(from cu_seqlens\); got 4"),
    (lambda: layout.pair_index(cu(), 12), r"pairs: expected P = sum N_i\^2 = 13 \(from cu_seqlens\); got 12"),
    (lambda: layout.prepend_token(cu(), atoms=6), r"atoms: expected T = cu_seqlens\[-1\] = 5 \(from cu_seqlens\); "
                                                  r"got 6"),
    (lambda: layout.prepend_token(cu(), atoms=5, pairs=14), r"pairs: expected P = sum N_i\^2 = 13"),
    (lambda: layout.unpad_atoms(torch.zeros(2, 3, 1), cu(), 4), r"atoms: expected T = cu_seqlens\[-1\] = 5"),
    (lambda: layout.unpad_pairs(torch.zeros(2, 3, 3), cu(), 12), r"pairs: expected P = sum N_i\^2 = 13"),
], ids=["atom_molecules", "pair_index", "prepend atoms", "prepend pairs", "unpad_atoms", "unpad_pairs"])
def test_counts_match_cu_seqlens(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    # B = 3 rows for 2 molecules: the third row was dropped silently.
    (lambda: layout.unpad_atoms(torch.zeros(3, 3, 1), cu()),
     r"x: expected shape \(B, N, ...\) with B = 2 \(from cu_seqlens\); got torch.float32 tensor of shape \(3, 3, 1\)"),
    (lambda: layout.unpad_pairs(torch.zeros(2, 3, 4), cu()), r"x: expected shape \(B, N, N, ...\) with B = 2"),
    (lambda: layout.unpad_atoms(torch.zeros(2), cu()), r"x: expected shape \(B, N, ...\); got"),
    (lambda: layout.pad_atoms(torch.zeros(()), cu(), 3), r"x: expected shape \(T, ...\); got"),
    (lambda: layout.pad_atoms(torch.zeros(5, 1, device="meta"), cu(), 3), r"x: expected a tensor on cpu like "
                                                                          r"cu_seqlens; got .* on meta"),
    # Boolean indexing by a mask of another shape: torch's IndexError (or the first columns of a wider x).
    (lambda: layout.pack_atoms(torch.zeros(2, 4, 1), torch.ones(2, 3, dtype=torch.bool)),
     r"x: expected shape \(B, N, ...\) = \(2, 3, ...\) like mask \(2, 3\); got torch.float32 tensor of shape "
     r"\(2, 4, 1\)"),
    (lambda: layout.pack_pairs(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)),
     r"x: expected shape \(B, N, N, ...\) = \(2, 3, 3, ...\) like mask \(2, 3\)"),
    (lambda: layout.pack_pairs(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)),
     r"x: expected shape \(B, N, N, ...\)"),
    (lambda: layout.pad_atoms(torch.zeros(4, 1), cu()), r"x: cu_seqlens describes 5 atoms, but x has 4 rows"),
], ids=["unpad_atoms B", "unpad_pairs", "unpad_atoms rank", "pad_atoms rank", "pad_atoms device", "pack_atoms",
        "pack_pairs", "pack_pairs rank", "pad_atoms rows"])
def test_shapes_agree(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_check_cu_seqlens():
    layout.check_cu_seqlens(cu(), total=5)
    layout.check_cu_seqlens(cu(), total=np.int64(5))
    with pytest.raises(ValueError, match=r"cu_seqlens: describes 5 atoms but the input holds 4"):
        layout.check_cu_seqlens(cu(), total=4)
    with pytest.raises(ValueError, match=r"lengths: expected an int32 tensor of shape \(B\+1,\)"):
        layout.check_cu_seqlens(cu().long(), name="lengths")  # the ops' contract: int32
    with pytest.raises(ValueError, match=r"cu_seqlens: expected a tensor whose values can be read; got a meta"):
        layout.check_cu_seqlens(cu().to("meta"))


# ------------------------------------------------------------------------------------ when values are read
def test_value_checks_off_trust_the_values_and_read_nothing():
    """With checks off nothing is read: a cu_seqlens that cuts a molecule is trusted, the forms still checked."""
    bad = cu()
    with pyblend.set_value_checks(False), recorded_host_reads() as reads:
        assert layout.mask_from_cu_seqlens(bad, 2).tolist() == [[True, True], [True, True]]
        assert layout.atom_molecules(bad, 5).tolist() == [0, 0, 1, 1, 1]
        assert layout.prepend_token(bad, 5, 13)[0].tolist() == [0, 3, 7]
        assert layout.unpad_atoms(torch.zeros(2, 3, 1), bad, 5).shape == (5, 1)
        assert layout.padded_width(bad, 2) == 2
        with pytest.raises(ValueError, match="max_seqlen: expected an int >= 0"):
            layout.pad_atoms(torch.zeros(5), bad, -1)
    assert not [read for read in reads if "layout.py" in read], reads


def test_cu_seqlens_is_read_once_per_version():
    """An op checks cu_seqlens, then the helpers it calls check against the values it read: no second read.
    An in-place change bumps the tensor's version, and the next helper reads it again."""
    cu_seqlens = batch_cu_seqlens()
    atoms = torch.randn(ATOMS, 2)
    with recorded_host_reads() as reads:
        layout.check_cu_seqlens(cu_seqlens, total=ATOMS)
        padded = layout.pad_atoms(atoms, cu_seqlens, 5)
        assert torch.equal(layout.unpad_atoms(padded, cu_seqlens, ATOMS), atoms)
        layout.pad_pairs(torch.zeros(PAIRS), cu_seqlens)
        layout.mask_from_cu_seqlens(cu_seqlens, 5)
        layout.pair_index(cu_seqlens, PAIRS)
        layout.seqlens(cu_seqlens)
        token_cu_seqlens, _, _ = layout.prepend_token(cu_seqlens, ATOMS, PAIRS)
        layout.pad_atoms(torch.zeros(ATOMS + 4), token_cu_seqlens, 6)  # known from cu_seqlens'
        layout.check_cu_seqlens(cu_seqlens, total=ATOMS)
    assert len(reads) == 1, reads
    cu_seqlens[-1] = 8  # the last molecule, 5 atoms, now has 4
    with pytest.raises(ValueError, match=r"atoms: expected T = cu_seqlens\[-1\] = 8 \(from cu_seqlens\); got 9"):
        layout.atom_molecules(cu_seqlens, ATOMS)
    cu_seqlens[1] = 7
    with pytest.raises(ValueError, match=r"non-decreasing values; got cu_seqlens\[2\] = 4 < 7"):
        layout.seqlens(cu_seqlens)
    fresh = cu()
    values = layout.host_cu_seqlens(fresh)
    values[1] = 9  # the caller's own copy: nothing remembered changes
    assert values.dtype == np.int32 and layout.host_cu_seqlens(fresh).tolist() == [0, 2, 5]


def test_inference_tensors_are_read_by_every_check():
    """No version counter, so no way to tell an inference tensor unchanged: the explicit checks (which the ops
    call) read it every time; the other helpers trust the latest."""
    with torch.inference_mode():
        cu_seqlens = batch_cu_seqlens()
        with recorded_host_reads() as reads:
            layout.check_cu_seqlens(cu_seqlens)
            layout.pad_atoms(torch.zeros(ATOMS), cu_seqlens, 5)
            layout.check_cu_seqlens(cu_seqlens)
        assert len(reads) == 2, reads
        cu_seqlens[1] = 5
        with pytest.raises(ValueError, match="non-decreasing"):
            layout.check_cu_seqlens(cu_seqlens)
        with pytest.raises(ValueError, match="non-decreasing"):
            layout.mask_from_cu_seqlens(cu_seqlens, 5)  # not remembered: the last read failed


def test_an_op_reads_cu_seqlens_once():
    """The reference backend's packed attention pads, attends and unpads through these helpers after the op
    checked cu_seqlens: they read nothing more (before, each pad read cu_seqlens again)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, 8, generator=generator) for _ in range(3))
    bias = torch.randn(2, 13, generator=generator)
    with recorded_host_reads() as reads:
        ops.relation_attention(q, k, v, bias, cu_seqlens=cu(), max_seqlen=3, backend="reference",
                               return_logits=True)
    assert len([read for read in reads if "layout.py" in read]) <= 1, reads


def test_meta_tensors_are_never_read():
    """Meta tensors have no values: given their sizes, the helpers shape their outputs; without, they say which
    size is missing."""
    meta = batch_cu_seqlens().to("meta")
    for call, size in [(lambda: layout.padded_width(meta), "max_seqlen"),
                       (lambda: layout.pad_atoms(torch.zeros(ATOMS, device="meta"), meta), "max_seqlen"),
                       (lambda: layout.atom_molecules(meta), "atoms"), (lambda: layout.pair_index(meta), "pairs"),
                       (lambda: layout.unpad_atoms(torch.zeros(4, 5, device="meta"), meta), "atoms"),
                       (lambda: layout.prepend_token(meta, ATOMS), "pairs")]:
        with pytest.raises(ValueError, match=rf"{size}: expected an int where cu_seqlens is not read"):
            call()


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_padded_and_packed_round_trip(device, dtype):
    cu_seqlens = batch_cu_seqlens(dtype).to(device)
    generator = torch.Generator().manual_seed(0)
    atoms = torch.randn(ATOMS, 4, generator=generator).to(device)
    pairs = torch.randn(PAIRS, 2, generator=generator).to(device)
    width = layout.padded_width(cu_seqlens, 5)
    padded_atoms = layout.pad_atoms(atoms, cu_seqlens, width, value=float("nan"))
    padded_pairs = layout.pad_pairs(pairs, cu_seqlens, width, value=float("nan"))
    mask = layout.mask_from_cu_seqlens(cu_seqlens, width)
    assert padded_atoms.shape == (4, 5, 4) and padded_pairs.shape == (4, 5, 5, 2) and mask.shape == (4, 5)
    unpadded_atoms = layout.unpad_atoms(padded_atoms, cu_seqlens, ATOMS)
    unpadded_pairs = layout.unpad_pairs(padded_pairs, cu_seqlens, PAIRS)
    molecule, i, j = layout.pair_index(cu_seqlens, PAIRS)
    token_cu_seqlens, atom_slots, pair_slots = layout.prepend_token(cu_seqlens, ATOMS, PAIRS)
    assert unpadded_atoms.shape == atoms.shape and unpadded_pairs.shape == pairs.shape
    assert molecule.shape == i.shape == j.shape == (PAIRS,)
    assert token_cu_seqlens.shape == (5,) and atom_slots.shape == (ATOMS,) and pair_slots.shape == (PAIRS,)
    assert layout.atom_molecules(cu_seqlens, ATOMS).shape == (ATOMS,)
    if device == "meta":
        return
    assert torch.equal(unpadded_atoms, atoms) and torch.equal(unpadded_pairs, pairs)
    assert torch.equal(layout.pack_atoms(padded_atoms, mask), atoms)
    assert torch.equal(layout.pack_pairs(padded_pairs, mask), pairs)
    assert mask.sum(1).tolist() == LENGTHS and torch.equal(~torch.isnan(padded_atoms[..., 0]), mask)
    derived, longest = layout.cu_seqlens_from_mask(mask)
    assert derived.tolist() == cu_seqlens.tolist() and longest == 5
    # Sizes left out come from the values (read once).
    assert torch.equal(layout.unpad_atoms(layout.pad_atoms(atoms, cu_seqlens), cu_seqlens), atoms)
    assert torch.equal(layout.unpad_pairs(layout.pad_pairs(pairs, cu_seqlens), cu_seqlens), pairs)
    assert layout.atom_molecules(cu_seqlens).tolist() == [0, 0, 0, 1, 3, 3, 3, 3, 3]
    assert layout.seqlens(cu_seqlens).tolist() == LENGTHS and layout.pair_offsets(cu_seqlens)[-1] == PAIRS
    assert token_cu_seqlens.dtype == dtype and token_cu_seqlens.tolist() == [0, 4, 6, 7, 13]


def test_fullgraph_traces_the_helpers_given_their_sizes():
    """Under torch.compile(fullgraph=True) nothing is read (a read would break the graph): a cu_seqlens that
    cuts a molecule is trusted there, as with value checks off."""
    def convert(cu_seqlens, atoms):
        token_cu_seqlens, atom_slots, pair_slots = layout.prepend_token(cu_seqlens, atoms.shape[0], 13)
        return (layout.mask_from_cu_seqlens(cu_seqlens, 2), layout.atom_molecules(cu_seqlens, atoms.shape[0]),
                layout.pair_index(cu_seqlens, 13)[2], layout.seqlens(cu_seqlens), token_cu_seqlens, pair_slots,
                layout.unpad_atoms(layout.pad_atoms(atoms, cu_seqlens, 3), cu_seqlens, atoms.shape[0]))

    torch._dynamo.reset()
    compiled = torch.compile(convert, backend="eager", fullgraph=True)
    cu_seqlens, atoms = cu(), torch.randn(5, 2)
    with pyblend.set_value_checks(False):
        expected = convert(cu_seqlens, atoms)
    for got, want in zip(compiled(cu_seqlens, atoms), expected):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="max_seqlen: expected at least the longest molecule"):
        convert(cu_seqlens, atoms)  # eager, checks on


def test_inductor_compiles_the_pair_helpers():
    """Inductor's vectorised CPU code also computes the zero-filled lanes past a loop's end, and torch 2.13's
    remainder checks them for a zero divisor (pytorch/pytorch#191968): pair_index's ``local % width`` raised
    ZeroDivisionError, and with it prepend_token and MoleBlend on any packed batch. P = 35 leaves a partial vector
    at every width; the molecule of 0 atoms (no pairs) must not change a result either."""
    def helpers(cu_seqlens):
        return (*layout.pair_index(cu_seqlens, PAIRS), *layout.prepend_token(cu_seqlens, ATOMS, PAIRS))

    cu_seqlens = batch_cu_seqlens()
    expected = helpers(cu_seqlens)
    torch.compiler.reset()
    compiled = torch.compile(helpers, backend="inductor", fullgraph=True)
    for name, got, want in zip(("molecule", "i", "j", "token_cu_seqlens", "atom_slots", "pair_slots"),
                               compiled(cu_seqlens), expected):
        assert torch.equal(got, want), f"{name}: compiled {got.tolist()} != eager {want.tolist()}"
