"""Matplotlib (Agg) figures of the statistics and QC steps; each returns PNG bytes.

T1/T2 are shown in ms, PD in a.u. Nothing here reads files: callers pass arrays/tables.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "DISPLAY",
    "box_by_group",
    "dendrogram_leaf_labels",
    "dendrogram_png",
    "distributions_png",
    "montage_png",
    "repro_png",
]

#: parameter -> (display scale from stored units, display unit, colour-map range)
DISPLAY: dict[str, tuple[float, str, tuple[float, float]]] = {
    "T1": (1000.0, "ms", (0.0, 3000.0)),
    "T2": (1000.0, "ms", (0.0, 200.0)),
    "PD": (1.0, "a.u.", (0.0, 1.2)),
}
TISSUE_COLOURS = {"WM": "tab:blue", "GM": "tab:orange", "CSF": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


#: resolution of every figure: the pages show them at the full width of the window
DPI = 120


def _png(fig: Any, dpi: int = DPI) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def distributions_png(cohort: pd.DataFrame, hist: pd.DataFrame | None = None) -> bytes:
    """Seed fig. 3: (top, if ``hist``) mean ± SD over sessions of the per-session value
    histograms in WM and GM; (bottom) box plots of the session means per tissue."""
    plt = _plt()
    rows = 2 if hist is not None and len(hist) else 1
    fig, axes = plt.subplots(rows, 3, figsize=(12, 3.6 * rows), squeeze=False)
    for j, m in enumerate(("T1", "T2", "PD")):
        scale, unit, _ = DISPLAY[m]
        if rows == 2:
            ax = axes[0, j]
            for t in ("WM", "GM"):
                h = hist[(hist["parameter"] == m) & (hist["tissue"] == t)]
                if h.empty:
                    continue
                piv = h.pivot_table(index=["participant_id", "session_id"],
                                    columns="bin_start", values="fraction")
                x = (np.asarray(piv.columns, float) + np.diff(np.asarray(piv.columns, float)
                                                              ).mean() / 2) * scale
                mu, sd = piv.mean().to_numpy(), piv.std(ddof=0).to_numpy()
                ax.plot(x, mu, color=TISSUE_COLOURS[t], label=f"{t} (n={len(piv)})")
                ax.fill_between(x, mu - sd, mu + sd, color=TISSUE_COLOURS[t], alpha=0.3)
            ax.set_xlabel(f"{m} [{unit}]")
            ax.set_ylabel("fraction of voxels")
            ax.legend(fontsize=8)
        ax = axes[rows - 1, j]
        data, labels = [], []
        for t in ("WM", "GM"):
            v = cohort.loc[cohort["tissue"] == t, f"{m}_mean"].dropna().to_numpy() * scale
            data.append(v)
            labels.append(f"{t}\n(n={v.size})")
        ax.boxplot(data, tick_labels=labels)
        ax.set_ylabel(f"session mean {m} [{unit}]")
    fig.suptitle("Tissue values across sessions")
    fig.tight_layout()
    return _png(fig)


def _members(linkage: np.ndarray, node: int) -> list[int]:
    """Leaves (0..n-1) below ``node`` of a scipy linkage matrix."""
    n = linkage.shape[0] + 1
    stack, out = [node], []
    while stack:
        i = stack.pop()
        if i < n:
            out.append(i)
        else:
            stack += [int(linkage[i - n, 0]), int(linkage[i - n, 1])]
    return out


def dendrogram_leaf_labels(linkage: np.ndarray, leaf_clusters: Sequence[int],
                           max_leaves: int = 30) -> list[str]:
    """The leaf labels :func:`dendrogram_png` draws, left to right: the protocol cluster
    (1..k, as in the tables) of each session, or of each collapsed subtree with its number
    of sessions, ``"2 (n=14)"``, when there are more than ``max_leaves`` sessions."""
    from scipy.cluster.hierarchy import dendrogram

    n = linkage.shape[0] + 1
    d = dendrogram(linkage, no_plot=True, truncate_mode="lastp" if n > max_leaves else None,
                   p=max_leaves)
    return [_leaf_label(linkage, leaf_clusters, int(i)) for i in d["leaves"]]


def _leaf_label(linkage: np.ndarray, leaf_clusters: Sequence[int], node: int) -> str:
    members = _members(linkage, node)
    clusters = sorted({int(leaf_clusters[i]) for i in members})
    text = "/".join(str(c) for c in clusters)
    return text if len(members) == 1 else f"{text} (n={len(members)})"


def dendrogram_png(linkage: np.ndarray, cut_height: float, k: int,
                   leaf_clusters: Sequence[int] | None = None) -> bytes:
    """Seed fig. C.1: Ward dendrogram and the cut giving ``k`` clusters. Leaves are sessions
    (or, beyond 30, collapsed subtrees) labelled by their protocol cluster number 1..k
    (``leaf_clusters``: cluster of each linkage leaf 0..n-1), the numbers of the tables."""
    from scipy.cluster.hierarchy import dendrogram

    plt = _plt()
    fig, ax = plt.subplots(figsize=(12, 4.5))
    if linkage.shape[0] >= 1 and float(linkage[:, 2].max()) > 0:
        n = linkage.shape[0] + 1
        if leaf_clusters is None:
            leaf_clusters = np.ones(n, dtype=int)
        dendrogram(linkage, ax=ax, truncate_mode="lastp" if n > 30 else None, p=30,
                   color_threshold=cut_height,
                   leaf_label_func=lambda i: _leaf_label(linkage, leaf_clusters, int(i)),
                   leaf_rotation=90 if n > 12 else 0)
        ax.axhline(cut_height, ls="--", color="k", lw=1)
        ax.set_xlabel("protocol cluster of each session (leaf); n = sessions in a collapsed "
                      "leaf")
    else:
        ax.text(0.5, 0.5, "all sessions share one protocol (cluster 1)", ha="center",
                transform=ax.transAxes)
        ax.set_xticks([])
    ax.set_ylabel("Ward linkage distance")
    ax.set_title(f"Protocol clustering (z-scored TR/TE of T1w, T2w, FLAIR), k = {k}")
    return _png(fig)


def _group_order(values: pd.Series) -> list[str]:
    """Group names sorted numerically when they are all integers (clusters 1..k), else as
    text."""
    names = values.dropna().astype(str).unique()
    if all(s.lstrip("-").isdigit() for s in names):
        return sorted(names, key=int)
    return sorted(names)


def box_by_group(cohort: pd.DataFrame, by: str, title: str) -> bytes:
    """Seed figs 4/5: session means per group, for T1/T2/PD × WM/GM; legend gives n."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    groups = _group_order(cohort[by])
    for i, t in enumerate(("WM", "GM")):
        g = cohort[cohort["tissue"] == t]
        for j, m in enumerate(("T1", "T2", "PD")):
            scale, unit, _ = DISPLAY[m]
            ax = axes[i, j]
            data = [g.loc[g[by].astype(str) == grp, f"{m}_mean"].dropna().to_numpy() * scale
                    for grp in groups]
            ax.boxplot(data, tick_labels=[str(x) for x in groups])
            ax.set_title(f"{t} {m}", fontsize=10)
            ax.set_ylabel(f"[{unit}]")
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    counts = cohort[cohort["tissue"] == "WM"][by].astype(str).value_counts()
    fig.legend(handles=[plt.Line2D([], [], ls="none")] * len(groups),
               labels=[f"{grp}: n={int(counts.get(grp, 0))}" for grp in groups],
               loc="center right", fontsize=8, title=by)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.85, 0.96))
    return _png(fig)


def repro_png(values: Mapping[str, tuple[np.ndarray, np.ndarray]],
              rows: Sequence[Mapping[str, Any]], title: str, max_points: int = 20000,
              seed: int = 0) -> bytes:
    """Seed figs 6C/7C: voxel scatter (first vs later) with the identity line, and
    Bland-Altman plots, per parameter; r, CCC and mean relative difference in the titles."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 8), squeeze=False)
    rng = np.random.default_rng(seed)
    by = {r["parameter"]: r for r in rows}
    for j, m in enumerate(("T1", "T2", "PD")):
        if m not in values:
            continue
        scale, unit, _ = DISPLAY[m]
        a, b = values[m][0] * scale, values[m][1] * scale
        idx = rng.choice(a.size, size=min(max_points, a.size), replace=False)
        r = by.get(m, {})
        ax = axes[0, j]
        ax.scatter(a[idx], b[idx], s=1, alpha=0.2, rasterized=True)
        hi = float(np.percentile(np.concatenate([a, b]), 99.5))
        ax.plot([0, hi], [0, hi], "k--", lw=1)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel(f"first session {m} [{unit}]")
        ax.set_ylabel(f"later session {m} [{unit}]")
        ax.set_title(f"{m}: r={r.get('pearson_r', float('nan')):.3f} "
                     f"CCC={r.get('ccc', float('nan')):.3f} "
                     f"rel.diff={100 * r.get('mean_rel_diff', float('nan')):.1f}%", fontsize=9)
        ax = axes[1, j]
        mean, diff = (a + b) / 2, b - a
        ax.scatter(mean[idx], diff[idx], s=1, alpha=0.2, rasterized=True)
        bias, sd = float(diff.mean()), float(diff.std(ddof=1))
        for y, ls in ((bias, "-"), (bias - 1.96 * sd, "--"), (bias + 1.96 * sd, "--")):
            ax.axhline(y, color="r", ls=ls, lw=1)
        ax.set_xlabel(f"mean {m} [{unit}]")
        ax.set_ylabel(f"later − first [{unit}]")
        ax.set_title(f"Bland-Altman: bias {bias:.3g}, LoA ±{1.96 * sd:.3g}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def montage_png(panels: Sequence[Mapping[str, Any]], ncols: int, title: str = "",
                panel_size: float = 3.2) -> bytes:
    """A grid of image panels. Each panel: ``image`` (2D), optional ``title``, ``cmap`` (a
    name or a colour list for labels 0, 1, ...), ``vmin``/``vmax``, ``colorbar`` (label),
    ``ticks`` (``{value: text}`` on the colour bar, for label images), ``contours`` (list of
    (2D bool mask, colour))."""
    from matplotlib.colors import ListedColormap

    plt = _plt()
    nrows = max(1, int(np.ceil(len(panels) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), panels, strict=False):
        img = np.asarray(p["image"], dtype=float)
        # radiological-looking display: rows = anterior at top
        cmap = p.get("cmap", "gray")
        if isinstance(cmap, list | tuple):
            cmap = ListedColormap(list(cmap))
        im = ax.imshow(np.rot90(img), cmap=cmap, vmin=p.get("vmin"),
                       vmax=p.get("vmax"), interpolation="nearest")
        for mask, colour in p.get("contours", ()):
            if np.any(mask):
                ax.contour(np.rot90(np.asarray(mask, float)), levels=[0.5], colors=[colour],
                           linewidths=0.6)
        ax.set_title(p.get("title", ""), fontsize=9)
        if p.get("colorbar"):
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.set_label(p["colorbar"], fontsize=8)
            cb.ax.tick_params(labelsize=7)
            if p.get("ticks"):
                cb.set_ticks(list(p["ticks"]))
                cb.set_ticklabels([str(v) for v in p["ticks"].values()])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)
