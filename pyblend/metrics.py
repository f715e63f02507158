"""Evaluation metrics of the MM-Lego tasks: Harrell's concordance index (survival) and ROC-AUC (classification).

Host-side numpy on 1-D arrays (or tensors, moved to the CPU): evaluation runs once per epoch on at most a few
thousand samples, so there is nothing to gain on a device. Both return a Python float and raise ValueError when
undefined (no comparable pair; a single class).
"""
from __future__ import annotations

import numpy as np

__all__ = ["concordance_index", "roc_auc"]


def _array(value, name: str) -> np.ndarray:
    """A 1-D numpy view of ``value`` (a list, an array, or a tensor of any dtype on any device but meta)."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        if value.device.type == "meta":
            raise ValueError(f"{name}: expected values; got a tensor on the meta device, which holds none")
        value = value.detach().cpu()
        # numpy has no bfloat16; float64 keeps every float dtype's values.
        value = (value.double() if value.is_floating_point() else value).numpy()
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (B,); got shape {array.shape}")
    return array


def _vector(value, name: str) -> np.ndarray:
    """Finite real numbers, as float64."""
    array = _array(value, name)
    if np.iscomplexobj(array) or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name}: expected real numbers; got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: expected finite values; got NaN or inf")
    return array


def _binary(value, name: str) -> np.ndarray:
    """Bools, or numbers that are all 0 or 1, as bool: anything else (2, -1, NaN, the string 'False') is refused,
    where a cast to bool would read it as True."""
    array = _array(value, name)
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array) and np.isin(array, (0, 1)).all():
        return array == 1
    raise ValueError(f"{name}: expected bool or 0/1 values; got dtype {array.dtype}"
                     + (f" holding {array[~np.isin(array, (0, 1))][:3].tolist()}"
                        if np.issubdtype(array.dtype, np.number) else ""))


def concordance_index(risk, time, event, *, tied_tol: float = 1e-8) -> float:
    """Harrell's C: the fraction of comparable pairs whose risks are ordered like their times.

    A pair (i, j) is comparable when sample i had the event and ``time_i < time_j``, or ``time_i == time_j`` and j
    is censored (j is known to outlive i); two events at the same time are not comparable (scikit-survival's
    ``concordance_index_censored``, which MCAT / MM-Lego use). A comparable pair scores 1 when ``risk_i > risk_j``
    (higher risk, earlier event), 0.5 when ``|risk_i - risk_j| <= tied_tol``, else 0.

    Args:
        risk: ``(B,)`` risk scores (e.g. :func:`pyblend.nn.lego.survival_risk`), higher = earlier event.
        time: ``(B,)`` event or censoring times.
        event: ``(B,)`` bool or 0/1, True = event observed (False = censored).
        tied_tol: risks this close count as tied (a finite float >= 0).

    O(B^2) memory and time (vectorised): fine for the few thousand samples of an evaluation set.
    """
    risk, time = _vector(risk, "risk"), _vector(time, "time")
    event = _binary(event, "event")
    if isinstance(tied_tol, bool) or not isinstance(tied_tol, (int, float, np.number)) or \
            not (np.isfinite(tied_tol) and tied_tol >= 0):
        raise ValueError(f"tied_tol: expected a finite float >= 0; got {tied_tol!r}")
    if not (len(risk) == len(time) == len(event)):
        raise ValueError(f"risk, time, event: expected equal lengths; got {len(risk)}, {len(time)}, {len(event)}")
    comparable = event[:, None] & ((time[:, None] < time[None, :]) |
                                   ((time[:, None] == time[None, :]) & ~event[None, :]))
    if not comparable.any():
        raise ValueError("event: no comparable pair (every sample censored, or no event before another time)")
    difference = risk[:, None] - risk[None, :]
    tied = np.abs(difference) <= tied_tol
    score = np.where(tied, 0.5, (difference > 0).astype(np.float64))
    return float(score[comparable].sum() / comparable.sum())


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0              # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic: the probability that a positive scores above a
    negative, ties counting 1/2 (average ranks). ``scores (B,)`` float, ``labels (B,)`` 0/1 or bool."""
    scores = _vector(scores, "scores")
    positive = _binary(labels, "labels")
    if len(scores) != len(positive):
        raise ValueError(f"scores, labels: expected equal lengths; got {len(scores)}, {len(positive)}")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels: ROC-AUC needs both classes; got {n_pos} positive and {n_neg} negative")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
