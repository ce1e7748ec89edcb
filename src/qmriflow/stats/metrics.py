"""Agreement and variability metrics (seed 000 sections 2.3.1-2.3.2, appendix E).

One function per metric, each on plain arrays, each refusing input it cannot give a meaningful
answer for (fewer than two values, non-finite values, a zero mean) with :class:`InputError`.

* :func:`pearson_r` - Pearson product-moment correlation.
* :func:`lin_ccc` - Lin's concordance correlation coefficient
  ``2·s_xy / (s_x² + s_y² + (mean_x − mean_y)²)`` with population (1/n) moments, as Lin (1989).
* :func:`coefficient_of_variation` - ``SD / mean`` of a set of values.
* :func:`intergroup_cv` - seed 000's inter-group CV: the SD of the group means (each group mean
  is the average of that group's per-session means) over the mean of the group means.
* :func:`relative_difference` - mean voxel-wise relative difference between two paired arrays.
* :func:`bland_altman` - bias and 95 % limits of agreement (for the plots).
* :func:`slope_r` - least-squares slope of y on x, with Pearson r (e.g. estimated vs true
  per-subject means: 1 = every true difference recovered, 0 = none).
* :func:`group_centred` - values less the mean of their group (within-group variation).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from ..errors import InputError

__all__ = [
    "bland_altman",
    "coefficient_of_variation",
    "group_centred",
    "group_means",
    "intergroup_cv",
    "lin_ccc",
    "pearson_r",
    "relative_difference",
    "slope_r",
]


def _pair(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
          what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(f"{what}: arrays differ in size ({a.size} vs {b.size})")
    if a.size < 2:
        raise InputError(f"{what}: need at least 2 paired values, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError(f"{what}: non-finite values")
    return a, b


def pearson_r(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of paired values; NaN when either array is constant."""
    a, b = _pair(x, y, "Pearson r")
    da, db = a - a.mean(), b - b.mean()
    den = float(np.sqrt(np.dot(da, da) * np.dot(db, db)))
    if den == 0.0:
        return float("nan")
    return float(np.clip(np.dot(da, db) / den, -1.0, 1.0))


def lin_ccc(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Lin's concordance correlation coefficient (population moments, Lin 1989).

    1 only for perfect agreement (``y == x``); ``r`` times a bias-correction factor otherwise:
    a scaled or shifted copy keeps ``r = 1`` but gets ``CCC < 1``. NaN when both arrays are
    constant and equal-meaned (0/0).
    """
    a, b = _pair(x, y, "CCC")
    ma, mb = a.mean(), b.mean()
    va, vb = a.var(), b.var()
    sab = float(np.mean((a - ma) * (b - mb)))
    den = va + vb + (ma - mb) ** 2
    if den == 0.0:
        return float("nan")
    return float(2.0 * sab / den)


def slope_r(x: Sequence[float] | np.ndarray,
            y: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Ordinary least-squares slope of ``y`` on ``x`` (``y ≈ a + slope·x``) and Pearson r.

    The slope says how much of a true difference in ``x`` shows up in ``y`` (1: all of it, 0:
    none), r how tightly. Slope NaN when ``x`` is constant (nothing to regress on); r NaN when
    either is constant (a constant ``y`` has slope 0 and r NaN).
    """
    a, b = _pair(x, y, "slope")
    if np.all(a == a[0]):
        return float("nan"), float("nan")
    if np.all(b == b[0]):  # exactly: its mean may differ from the value by rounding
        return 0.0, float("nan")
    da, db = a - a.mean(), b - b.mean()
    return float(np.dot(da, db) / np.dot(da, da)), pearson_r(a, b)


def group_centred(values: Iterable[float], groups: Iterable[Hashable]) -> np.ndarray:
    """``values`` less the mean of their group (see :func:`group_means`), in input order: what
    is left is the variation within groups (e.g. within a protocol cluster)."""
    vals = np.asarray([float(v) for v in values], dtype=np.float64)
    labs = list(groups)
    if len(labs) != vals.size:
        raise InputError(f"group-centred values: {vals.size} values but {len(labs)} group labels")
    means = group_means(vals, labs)
    return vals - np.array([means[g] for g in labs], dtype=np.float64)


def coefficient_of_variation(values: Sequence[float] | np.ndarray, *, ddof: int = 1) -> float:
    """``SD(values, ddof) / mean(values)``; sample SD (``ddof=1``) by default."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < ddof + 1 or v.size < 2:
        raise InputError(f"CV: need at least {max(2, ddof + 1)} values, got {v.size}")
    if not np.isfinite(v).all():
        raise InputError("CV: non-finite values")
    m = float(v.mean())
    if m == 0.0:
        raise InputError("CV: mean is zero")
    return float(v.std(ddof=ddof) / m)


def group_means(values: Iterable[float], groups: Iterable[Hashable]) -> dict[Hashable, float]:
    """Mean of ``values`` per group label (insertion order of first appearance)."""
    sums: dict[Hashable, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        sums.setdefault(g, []).append(float(v))
    return {g: float(np.mean(v)) for g, v in sums.items()}


def intergroup_cv(values: Iterable[float] | Mapping[Hashable, float],
                  groups: Iterable[Hashable] | None = None, *, ddof: int = 1,
                  min_group_size: int = 1) -> float:
    """Inter-group coefficient of variation (seed 000 section 2.3.1).

    ``values`` are per-session means and ``groups`` their group labels (scanner model or
    protocol cluster); or ``values`` is already a ``{group: group mean}`` mapping and
    ``groups`` is None. Groups with fewer than ``min_group_size`` sessions are left out.
    Returns ``SD(group means, ddof) / mean(group means)``; needs at least two groups.
    """
    if groups is None:
        if not isinstance(values, Mapping):
            raise InputError("inter-group CV: pass group labels or a {group: mean} mapping")
        means = np.array(list(values.values()), dtype=np.float64)
    else:
        vals = [float(v) for v in values]  # type: ignore[union-attr]
        labs = list(groups)
        if len(vals) != len(labs):
            raise InputError(f"inter-group CV: {len(vals)} values but {len(labs)} group labels")
        counts: dict[Hashable, int] = {}
        for g in labs:
            counts[g] = counts.get(g, 0) + 1
        gm = group_means(vals, labs)
        means = np.array([m for g, m in gm.items() if counts[g] >= min_group_size])
    if means.size < 2:
        raise InputError(f"inter-group CV: need at least 2 groups, got {means.size}")
    return coefficient_of_variation(means, ddof=ddof)


def relative_difference(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *,
                        reference: Literal["mean", "first"] = "mean",
                        absolute: bool = True) -> float:
    """Mean voxel-wise relative difference of paired values.

    ``reference="mean"`` (default, symmetric): ``mean(|y − x| / ((x + y) / 2))``;
    ``reference="first"``: ``mean(|y − x| / x)``. ``absolute=False`` keeps the sign of
    ``y − x`` (a bias rather than a disagreement). Pairs whose reference is not > 0 are
    skipped (maps are 0 outside the brain); at least one pair must remain.
    """
    if reference not in ("mean", "first"):
        raise InputError(f"relative difference: reference must be 'mean' or 'first', "
                         f"got {reference!r}")
    a, b = _pair(x, y, "relative difference")
    ref = (a + b) / 2.0 if reference == "mean" else a
    ok = ref > 0
    if not ok.any():
        raise InputError("relative difference: no pair with a positive reference value")
    d = (b[ok] - a[ok]) / ref[ok]
    return float(np.mean(np.abs(d) if absolute else d))


def bland_altman(x: Sequence[float] | np.ndarray,
                 y: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Bland-Altman summary of ``y − x``: bias, SD of the differences (ddof=1), 95 % limits."""
    a, b = _pair(x, y, "Bland-Altman")
    d = b - a
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}
