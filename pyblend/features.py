"""The integer feature vocabularies of :mod:`pyblend.chem` (OGB-style), without RDKit: models that embed the
features (e.g. :mod:`pyblend.models`) import them from here and work where RDKit is not installed.

Column ``c`` of ``MolGraph.atom_features`` is ``ATOM_FEATURE_NAMES[c]``, an index below ``ATOM_FEATURE_DIMS[c]``
(the last index is "other"); the same for bonds.
"""

import numpy as np

__all__ = ["ATOM_FEATURE_DIMS", "ATOM_FEATURE_NAMES", "BOND_FEATURE_DIMS", "BOND_FEATURE_NAMES", "require_array",
           "require_vocabulary"]

ATOM_FEATURE_NAMES = (
    "atomic_number",          # Z - 1 for Z in 1..118; 118 = other (e.g. the dummy atom "*")
    "chirality",              # CHI_UNSPECIFIED, CHI_TETRAHEDRAL_CW, CHI_TETRAHEDRAL_CCW, CHI_OTHER; 4 = other
    "degree",                 # total degree (heavy neighbours + all hydrogens), 0..10; 11 = other
    "formal_charge",          # -5..5 -> 0..10; 11 = other
    "total_hydrogens",        # hydrogens on the atom, implicit or explicit, 0..8; 9 = other
    "radical_electrons",      # 0..4; 5 = other
    "hybridization",          # SP, SP2, SP3, SP3D, SP3D2; 5 = other (unspecified, S, SP2D, ...)
    "is_aromatic",            # 0/1
    "is_in_ring",             # 0/1
)
ATOM_FEATURE_DIMS = (119, 5, 12, 12, 10, 6, 6, 2, 2)

BOND_FEATURE_NAMES = (
    "bond_type",              # SINGLE, DOUBLE, TRIPLE, AROMATIC; 4 = other (dative, zero-order, ...)
    "stereo",                 # STEREONONE, STEREOZ, STEREOE, STEREOCIS, STEREOTRANS, STEREOANY; other -> 5 too
    "is_conjugated",          # 0/1
)
BOND_FEATURE_DIMS = (5, 6, 2)


def require_array(label: str, value, dtype, shape: tuple) -> np.ndarray:
    """Check that a MolGraph field (``label`` names it in the message) is an ndarray of ``dtype`` whose shape
    matches ``shape`` (None = any size); here, beside the vocabularies, for MolGraph and for ``collate``, which
    checks the fields again without RDKit."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{label} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype != dtype or value.ndim != len(shape) or any(
            size is not None and size != actual for size, actual in zip(shape, value.shape)):
        expected = "(" + ", ".join("?" if size is None else str(size) for size in shape) + ")"
        raise ValueError(f"{label} must be {np.dtype(dtype)} of shape {expected}, "
                         f"got {value.dtype} of shape {value.shape}")
    return value


# As uint64 a negative index becomes huge, so one comparison checks both ends of a range: MolGraph checks every
# graph featurize makes (~90 us at 17 atoms), where each numpy call costs about a microsecond.
_VOCABULARIES = {"atom_features": (np.array(ATOM_FEATURE_DIMS, dtype=np.uint64), ATOM_FEATURE_NAMES),
                 "bond_features": (np.array(BOND_FEATURE_DIMS, dtype=np.uint64), BOND_FEATURE_NAMES)}


def require_vocabulary(features: np.ndarray, field: str, label) -> None:
    """Check every column ``j`` of int64 ``features (..., rows, F)`` (``field``: "atom_features" or
    "bond_features") holds indices in ``[0, dims[j])``; ``label(leading)`` names the array holding the first bad
    value, ``leading`` being its index before the row (``()`` for one graph's field)."""
    dims, names = _VOCABULARIES[field]
    outside = features.view(np.uint64) >= dims
    if outside.any():
        *leading, row, column = (int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"{label(tuple(leading))} column {column} ({names[column]}) must hold vocabulary indices "
                         f"in [0, {int(dims[column])}), got {features[(*leading, row, column)]} in row {row}; "
                         f"featurize maps a value outside the vocabulary to its last (\"other\") index "
                         f"{int(dims[column]) - 1}")
