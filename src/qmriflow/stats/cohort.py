"""Cohort analysis: table assembly, population summary, protocol clusters, inter-group CV.

Seed 000 section 2.3.1 and appendix C:

* the cohort table is the concatenation of the per-session tissue TSVs (one row per session
  and tissue, with scanner model, protocol parameters, gadolinium flags, checkpoint hash);
* population mean ± SD of the session means per tissue and parameter;
* protocol clusters: Ward agglomerative clustering of the z-scored TR and TE of the T1w, T2w
  and FLAIR (k clusters, default 9). Sessions are put in a canonical order (by their
  parameters, then their labels) before clustering and the clusters are numbered 1..k by
  their sorted centroids, so the labels do not depend on the order the sessions were listed
  in. Asking for more clusters than there are distinct protocols is refused with a message
  saying so (or, with ``reduce_k=True``, k adapts to that number: recorded as a note, not a
  warning, since a small or uniform cohort is no fault);
* inter-group CV (:func:`qmriflow.stats.metrics.intergroup_cv`) per parameter and tissue,
  grouped by scanner model and by protocol cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from .metrics import intergroup_cv
from .tissue import ID_COLUMNS, MAPS

__all__ = [
    "CLUSTER_FEATURES",
    "ClusterResult",
    "cluster_protocols",
    "intergroup_cv_table",
    "load_cohort",
    "population_summary",
    "session_table",
]

#: TR and TE of the three contrasts (seed appendix C).
CLUSTER_FEATURES = ("t1w_tr_ms", "t1w_te_ms", "t2w_tr_ms", "t2w_te_ms", "flair_tr_ms",
                    "flair_te_ms")
ANALYSIS_TISSUES = ("WM", "GM")


def load_cohort(tsvs: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate per-session tissue TSVs into the cohort table (sorted by participant_id,
    session_id, tissue order WM, GM, CSF)."""
    if not tsvs:
        raise InputError("cohort: no per-session tissue tables given")
    frames = []
    for p in tsvs:
        p = Path(p)
        if not p.is_file():
            raise InputError("tissue table not found", path=p)
        try:
            frames.append(pd.read_csv(p, sep="\t", na_values=["n/a"],
                                      dtype=dict.fromkeys(ID_COLUMNS, str)))
        except Exception as exc:
            raise InputError(f"unreadable tissue table ({type(exc).__name__})", path=p) from None
    df = pd.concat(frames, ignore_index=True)
    need = {*ID_COLUMNS, "tissue", *(f"{m}_mean" for m in MAPS)}
    if missing := sorted(need - set(df.columns)):
        raise InputError(f"cohort: tissue tables lack columns {missing}")
    order = {"WM": 0, "GM": 1, "CSF": 2}
    df = df.assign(_t=df["tissue"].map(order).fillna(9))
    df = df.sort_values([*ID_COLUMNS, "_t"], kind="mergesort").drop(columns="_t")
    if df.duplicated([*ID_COLUMNS, "tissue"]).any():
        raise InputError("cohort: a session/tissue appears twice in the tissue tables")
    return df.reset_index(drop=True)


def session_table(cohort: pd.DataFrame) -> pd.DataFrame:
    """One row per session (the session-level columns of the cohort table)."""
    drop = [c for c in cohort.columns
            if c in ("tissue", "n_voxels") or any(c.startswith(f"{m}_") for m in MAPS)]
    return (cohort.drop(columns=drop).drop_duplicates(list(ID_COLUMNS))
            .reset_index(drop=True))


def population_summary(cohort: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD (ddof=1) of the session means, per tissue and parameter (T1/T2 in s)."""
    rows = []
    for tissue, g in cohort.groupby("tissue", sort=False):
        for m in MAPS:
            v = g[f"{m}_mean"].dropna().to_numpy(dtype=float)
            rows.append({"tissue": tissue, "parameter": m, "n_sessions": int(v.size),
                         "mean": float(v.mean()) if v.size else float("nan"),
                         "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                         "min": float(v.min()) if v.size else float("nan"),
                         "max": float(v.max()) if v.size else float("nan")})
    return pd.DataFrame(rows)


@dataclass
class ClusterResult:
    """Protocol clusters of a set of sessions (see :func:`cluster_protocols`)."""

    labels: np.ndarray  # 1..k, in the order of the input rows
    k_requested: int
    k: int
    n_distinct: int
    centroids: pd.DataFrame  # one row per cluster: cluster, n_sessions, raw feature means
    linkage: np.ndarray  # scipy linkage matrix over the canonically ordered sessions
    order: np.ndarray  # input row index of each canonically ordered session
    cut_height: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # information, e.g. k adapted

    @property
    def sorted_labels(self) -> np.ndarray:
        """Cluster number (1..k) of each session in the canonical order (the order of the
        linkage matrix's leaves 0..n-1)."""
        return self.labels[self.order]


def _distinct_rows(x: np.ndarray) -> int:
    return int(np.unique(np.round(x, 6), axis=0).shape[0])


def cluster_protocols(features: pd.DataFrame, k: int = 9, *,
                      ids: Sequence[str] | None = None, reduce_k: bool = False,
                      columns: Sequence[str] = CLUSTER_FEATURES) -> ClusterResult:
    """Ward clustering of z-scored protocol parameters into ``k`` clusters (seed appendix C).

    ``features``: one row per session with ``columns`` (missing values are replaced by the
    column mean, i.e. z = 0). ``ids``: labels used as the final tie-breaker of the canonical
    order (default: the rows' ``participant_id``/``session_id`` columns when present).
    z-scores use the population SD; a constant column contributes nothing.

    Raises :class:`InputError` when ``k`` exceeds the number of distinct protocols, unless
    ``reduce_k`` (then ``k`` adapts to that number, recorded in ``notes``).
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    if k < 1:
        raise InputError(f"number of protocol clusters must be >= 1, got {k}")
    missing = [c for c in columns if c not in features.columns]
    if missing:
        raise InputError(f"protocol clustering: missing columns {missing}")
    x = features[list(columns)].to_numpy(dtype=float)
    n = x.shape[0]
    if n == 0:
        raise InputError("protocol clustering: no sessions")
    warnings: list[str] = []
    notes: list[str] = []
    col_mean = np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=0) if n else None
    if np.isnan(x).any():
        warnings.append(f"{int(np.isnan(x).any(axis=1).sum())} session(s) lack some TR/TE "
                        "values; they were set to the cohort mean (z = 0)")
        x = np.where(np.isfinite(x), x, np.nan_to_num(col_mean))
    n_distinct = _distinct_rows(x)
    k_req = int(k)
    if k > n_distinct:
        msg = (f"{k} protocol clusters requested but the {n} session(s) have only "
               f"{n_distinct} distinct protocol(s) (TR/TE of T1w, T2w, FLAIR)")
        if not reduce_k:
            raise InputError(msg + f"; set the number of clusters to at most {n_distinct}")
        notes.append(f"k = {n_distinct}: one cluster per distinct protocol of the {n} "
                     f"session(s) (TR/TE of T1w, T2w, FLAIR; up to {k} requested)")
        k = n_distinct
    if ids is None:
        if set(ID_COLUMNS) <= set(features.columns):
            ids = [f"{a}/{b}" for a, b in zip(features[ID_COLUMNS[0]].astype(str),
                                              features[ID_COLUMNS[1]].astype(str),
                                              strict=True)]
        else:
            ids = [str(i) for i in range(n)]
    ids = [str(i) for i in ids]
    # canonical order: by the raw parameters, then by id -> independent of the input order
    keys = [np.asarray(ids)] + [np.round(x[:, j], 6) for j in range(x.shape[1] - 1, -1, -1)]
    order = np.lexsort(keys)
    xs = x[order]
    sd = xs.std(axis=0)
    z = np.where(sd > 0, (xs - xs.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)
    if n == 1:
        lab_sorted = np.ones(1, dtype=int)
        link = np.zeros((0, 4))
        cut = 0.0
    else:
        link = linkage(z, method="ward")
        lab_sorted = fcluster(link, t=k, criterion="maxclust")
        heights = np.sort(link[:, 2])
        cut = float((heights[-k] + heights[-k + 1]) / 2) if 1 < k < n else (
            float(heights[-1]) * 1.05 if k == 1 else 0.0)
    found = len(np.unique(lab_sorted))
    if found != k:
        warnings.append(f"Ward tree gave {found} cluster(s) for k = {k} (tied merge heights)")
        k = found
    # canonical relabelling: clusters numbered by their sorted raw centroids
    cents = {c: xs[lab_sorted == c].mean(axis=0) for c in np.unique(lab_sorted)}
    ranked = sorted(cents, key=lambda c: tuple(np.round(cents[c], 6)))
    remap = {old: new + 1 for new, old in enumerate(ranked)}
    labels = np.empty(n, dtype=int)
    labels[order] = [remap[c] for c in lab_sorted]
    cent_rows = []
    for old in ranked:
        sel = lab_sorted == old
        cent_rows.append({"cluster": remap[old], "n_sessions": int(sel.sum()),
                          **{c: float(v) for c, v in zip(columns, xs[sel].mean(axis=0),
                                                         strict=True)}})
    return ClusterResult(labels=labels, k_requested=k_req, k=k, n_distinct=n_distinct,
                         centroids=pd.DataFrame(cent_rows), linkage=link, order=order,
                         cut_height=cut, warnings=warnings, notes=notes)


def intergroup_cv_table(cohort: pd.DataFrame, by: str, *, tissues: Sequence[str] = (
        "WM", "GM"), ddof: int = 1, min_group_size: int = 1) -> pd.DataFrame:
    """Inter-group CV of each parameter's session means per tissue, grouped by column ``by``.

    Rows: grouping, tissue, parameter, n_groups, n_sessions, group means (JSON-able dict),
    cv and cv_percent (NaN with a note when fewer than two groups).
    """
    if by not in cohort.columns:
        raise InputError(f"inter-group CV: no column {by!r} in the cohort table")
    rows: list[dict[str, Any]] = []
    for tissue in tissues:
        g = cohort[cohort["tissue"] == tissue]
        for m in MAPS:
            sub = g[[by, f"{m}_mean"]].dropna()
            counts = sub[by].value_counts()
            keep = counts[counts >= min_group_size].index
            sub = sub[sub[by].isin(keep)]
            means = sub.groupby(by, sort=True)[f"{m}_mean"].mean()
            row: dict[str, Any] = {"grouping": by, "tissue": tissue, "parameter": m,
                                   "n_groups": int(means.size), "n_sessions": len(sub),
                                   "mean_of_group_means": float(means.mean())
                                   if means.size else float("nan")}
            try:
                cv = intergroup_cv(sub[f"{m}_mean"].to_numpy(), sub[by].astype(str).tolist(),
                                   ddof=ddof, min_group_size=min_group_size)
                row.update(cv=cv, cv_percent=100 * cv, note="")
            except InputError as exc:
                row.update(cv=float("nan"), cv_percent=float("nan"), note=exc.reason)
            rows.append(row)
    return pd.DataFrame(rows)
