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


def _png(fig: Any, dpi: int = 90) -> bytes:
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
                piv = h.pivot_table(index=["subject", "session"], columns="bin_start",
                                    values="fraction")
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


def dendrogram_png(linkage: np.ndarray, cut_height: float, k: int) -> bytes:
    """Seed fig. C.1: Ward dendrogram (leaves = sessions or collapsed subtrees with counts)
    and the cut giving ``k`` clusters."""
    from scipy.cluster.hierarchy import dendrogram

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    if linkage.shape[0] >= 1 and float(linkage[:, 2].max()) > 0:
        n = linkage.shape[0] + 1
        dendrogram(linkage, ax=ax, truncate_mode="lastp" if n > 30 else None, p=30,
                   show_leaf_counts=True, color_threshold=cut_height, no_labels=n > 30)
        ax.axhline(cut_height, ls="--", color="k", lw=1)
    else:
        ax.text(0.5, 0.5, "all sessions share one protocol", ha="center",
                transform=ax.transAxes)
    ax.set_ylabel("Ward linkage distance")
    ax.set_title(f"Protocol clustering (z-scored TR/TE of T1w, T2w, FLAIR), k = {k}")
    return _png(fig)


def box_by_group(cohort: pd.DataFrame, by: str, title: str) -> bytes:
    """Seed figs 4/5: session means per group, for T1/T2/PD × WM/GM; legend gives n."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    groups = sorted(cohort[by].dropna().astype(str).unique())
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
                panel_size: float = 2.6) -> bytes:
    """A grid of image panels. Each panel: ``image`` (2D), optional ``title``, ``cmap``,
    ``vmin``/``vmax``, ``colorbar`` (label), ``contours`` (list of (2D bool mask, colour))."""
    plt = _plt()
    nrows = max(1, int(np.ceil(len(panels) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), panels, strict=False):
        img = np.asarray(p["image"], dtype=float)
        # radiological-looking display: rows = anterior at top
        im = ax.imshow(np.rot90(img), cmap=p.get("cmap", "gray"), vmin=p.get("vmin"),
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)
