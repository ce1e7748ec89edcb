"""Self-contained HTML QC reports: one page per session and one cohort page.

Every image is an inline base64 PNG; there is no script, stylesheet, font or image fetched
from anywhere, so a page opens offline. Pages carry only pseudonymised labels, acquisition
parameters and numbers: file paths are shortened to their file names and no DICOM header
text other than the scanner model reaches them.

Session page: warnings, input contrasts (brain mask outlined), masks (eroded WM/GM, CSF
outlined on the T2w), T1/T2/PD maps with colour bars, re-synthesised images and difference
maps when present, fat/water results of every multi-echo GRE series (PDFF, R2*, the
water/fat choice and, when written, the ambiguity mask, with colour bars, and their median /
IQR), tissue values, protocol, checkpoint hash and provenance summary.
Cohort page: population summary, inter-group CV tables, protocol clusters (numbered 1..k in
every table and figure) and their centroids, PDFF/R2* per series, reproducibility table, and
every cohort and reproducibility figure.

Layout: the page uses the window's full width and every figure scales to it. Every table
states its units in its column headers; T1/T2 are shown in ms (stored in s), PD in a.u., PDFF
in %, R2* in 1/s. The CSF row is marked: its mask is dseg label 3 (not eroded) and its
values are partial-volume dominated.

Long because the session and the cohort pages share their HTML building blocks.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..io import atomic_path, sidecar_path
from .cse import CseSeries, find_cse_series, series_summary
from .figures import DISPLAY, montage_png
from .tissue import MAPS, SessionFiles

__all__ = ["PLAUSIBLE_3T", "cohort_report", "render_page", "session_report", "session_warnings"]

#: Loose 3 T ranges (T1/T2 in s) outside which a tissue mean is flagged (not an error).
PLAUSIBLE_3T: dict[tuple[str, str], tuple[float, float]] = {
    ("WM", "T1"): (0.55, 1.3), ("GM", "T1"): (0.9, 2.0),
    ("WM", "T2"): (0.04, 0.10), ("GM", "T2"): (0.05, 0.13),
    ("WM", "PD"): (0.4, 0.9), ("GM", "PD"): (0.5, 1.0),
}
MIN_TISSUE_VOXELS = 500

#: CSF caveat shown under every table with a CSF row
CSF_NOTE = ("CSF†: dseg label 3, not eroded. At this resolution most CSF voxels are partial "
            "volumes with the neighbouring tissue, so its T1/T2 are usually well below those "
            "of pure CSF (deep CSF T1 about 4.3 s at 3 T); use it as a reference, not as a "
            "CSF measurement.")

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,Arial,sans-serif;margin:0;padding:1em 2vw;color:#222;
max-width:none;width:100%;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
.tbl{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}
.warn{background:#fff4ce;border-left:4px solid #e0a800;padding:.4em .8em}
.ok{background:#e8f5e9;border-left:4px solid #43a047;padding:.4em .8em}
.note{color:#555;font-size:.9em}
img{width:100%;max-width:100%;height:auto;display:block;margin:.4em 0}
code{font-size:.85em}
@media (max-width:700px){body{padding:.5em}table{font-size:.8em}}
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    return '<div class="tbl">' + df.to_html(
        index=False, escape=True, na_rep="n/a", border=0,
        float_format=lambda v: float_format.format(0.0 if abs(v) < 1e-9 else v)) + "</div>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _tissue_name(t: Any) -> str:
    return "CSF†" if str(t) == "CSF" else str(t)


def render_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A complete HTML document; ``sections`` are (heading, inner HTML) pairs."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{inner}" for h, inner in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>qmriflow {html.escape(__version__)}</p>"
            f"{body}</body></html>\n")


def _write(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _shorten(obj: Any) -> Any:
    """Replace path-like strings by their file names (no folder names on the page)."""
    if isinstance(obj, Mapping):
        return {k: _shorten(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_shorten(v) for v in obj]
    if isinstance(obj, str) and "/" in obj:
        return Path(obj).name
    return obj


def _load(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    import nibabel as nib

    if not path.is_file():
        return None
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return (data, img.affine) if data.ndim == 3 else None


def _slices(mask: np.ndarray | None, shape: tuple[int, ...], n: int = 3) -> list[int]:
    """``n`` axial (axis 2) slice indices spread over the brain (or the volume)."""
    if mask is not None and mask.any():
        area = mask.sum(axis=(0, 1))
        idx = np.nonzero(area > 0.3 * area.max())[0]
        lo, hi = int(idx.min()), int(idx.max())
    else:
        lo, hi = 0, shape[2] - 1
    return sorted({int(np.rint(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]})


def _robust_max(a: np.ndarray, mask: np.ndarray | None) -> float:
    v = a[mask] if mask is not None and mask.any() else a[a > 0]
    return float(np.percentile(v, 99.5)) if v.size else 1.0


def session_warnings(files: SessionFiles, stats: pd.DataFrame | None,
                     params: Mapping[str, Any] | None) -> list[str]:
    """Things a reader should look at: missing outputs, implausible or thin tissue values,
    post-contrast inputs, a missing checkpoint hash, large re-synthesis differences."""
    out: list[str] = []
    for m in MAPS:
        if not files.map(m).is_file():
            out.append(f"{m} map not found (inference not run or failed)")
    for name, p in (("brain mask", files.brain_mask), ("dseg", files.dseg)):
        if not p.is_file():
            out.append(f"{name} not found")
    if stats is not None:
        for r in stats.itertuples():
            t = str(r.tissue)
            if t in ("WM", "GM") and int(r.n_voxels) < MIN_TISSUE_VOXELS:
                out.append(f"{t}: only {int(r.n_voxels)} voxels in the eroded mask")
            for m in MAPS:
                lim = PLAUSIBLE_3T.get((t, m))
                v = getattr(r, f"{m}_mean")
                if lim and np.isfinite(v) and not lim[0] <= v <= lim[1]:
                    s, u, _ = DISPLAY[m]
                    out.append(f"{t} mean {m} {v * s:.4g} {u} outside the usual 3 T range "
                               f"{lim[0] * s:g}-{lim[1] * s:g} {u}")
        sha = stats["checkpoint_sha256"].dropna().astype(str) if (
            "checkpoint_sha256" in stats) else pd.Series(dtype=str)
        if not any(sha.str.len() > 0):
            out.append("model checkpoint hash unknown (map sidecar missing or old)")
    if params:
        gd = [r for r in ("t1w", "t2w", "flair") if (params.get(r) or {}).get("gadolinium")]
        if gd:
            out.append(f"post-contrast input(s): {', '.join(gd)} (gadolinium shortens T1; "
                       "the model was trained mostly on such T2w/FLAIR but not T1w)")
    for c in ("T1w", "T2w", "FLAIR"):
        d = _load(files.synthdiff(c))
        if d is not None:
            v = np.abs(d[0][d[0] != 0])
            if v.size and float(np.median(v)) > 15.0:
                out.append(f"{c}: median |re-synthesis difference| {np.median(v):.1f} % (> 15 %)")
    return out


def _tissue_table(stats: pd.DataFrame) -> str:
    rows = []
    for r in stats.itertuples():
        row: dict[str, Any] = {"tissue": _tissue_name(r.tissue), "voxels": int(r.n_voxels)}
        for m in MAPS:
            s, u, _ = DISPLAY[m]
            row[f"{m} mean [{u}]"] = getattr(r, f"{m}_mean") * s
            row[f"{m} SD [{u}]"] = getattr(r, f"{m}_sd") * s
            row[f"{m} median [{u}]"] = getattr(r, f"{m}_median") * s
        rows.append(row)
    csf = any(str(t) == "CSF" for t in stats["tissue"])
    return _table(pd.DataFrame(rows)) + (_note(CSF_NOTE) if csf else "")


def _protocol_table(params: Mapping[str, Any]) -> str:
    rows = []
    for r in ("t1w", "t2w", "flair"):
        e = params.get(r) or {}
        rows.append({"contrast": r, "sequence": e.get("sequence"), "TR [ms]": e.get("tr_ms"),
                     "TE [ms]": e.get("te_ms"), "TI [ms]": e.get("ti_ms"),
                     "FA [deg]": e.get("fa_deg"), "TE factor": e.get("te_correction_factor"),
                     "field [T]": e.get("field_strength_t"),
                     "scanner": e.get("manufacturer_model"),
                     "gadolinium": e.get("gadolinium")})
    return _table(pd.DataFrame([{k: np.nan if v is None else v for k, v in r.items()}
                                for r in rows]))


def _provenance_table(records: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for rec in records:
        steps = rec.get("steps") if isinstance(rec.get("steps"), Mapping) else {
            rec.get("step", "?"): rec}
        for name, st in steps.items():
            if not isinstance(st, Mapping):
                continue
            versions = {k: v for k, v in st.items() if "version" in k and isinstance(v, str)}
            timing = st.get("timing_s")
            secs = timing.get("total") if isinstance(timing, Mapping) else st.get("seconds")
            rows.append({"step": name, "tool": st.get("tool") or st.get("backend") or "",
                         "versions": ", ".join(f"{k}={v}" for k, v in versions.items()),
                         "time [s]": secs})
    if not rows:
        return "<p>No provenance records found.</p>"
    return _table(pd.DataFrame(_shorten(rows)))


#: display of the CSE maps: water/fat choice and ambiguity as label images
_CHOICE_COLOURS = ["black", "#2c7bb6", "#fdae61"]
_CHOICE_TICKS = {0: "background", 1: "water-dominant", 2: "fat-dominant"}
_AMBIGUOUS_COLOURS = ["black", "#d7191c"]
_AMBIGUOUS_TICKS = {0: "decided", 1: "ambiguous"}
CSE_NOTE = ("PDFF: proton density fat fraction; R2*: transverse relaxation rate; choice: which "
            "candidate (water- or fat-dominant) explained the echoes better (a fat/water swap "
            "shows as an island of the other colour); ambiguous: voxels where the likelihood "
            "cannot tell water from fat (shown when the CSE step wrote the mask). Median and "
            "inter-quartile range inside the fit mask.")


def _range(lo: float, hi: float) -> str:
    return f"{lo:.3g}–{hi:.3g}" if np.isfinite(lo) and np.isfinite(hi) else "n/a"


def _cse_summary_table(rows: Sequence[Mapping[str, Any]], ids: bool = False) -> str:
    """PDFF/R2* per series with units in the headers (PDFF stored 0-1, shown in %)."""
    out = []
    for r in rows:
        row: dict[str, Any] = {}
        if ids:
            row.update({"participant_id": r["participant_id"], "session_id": r["session_id"]})
        row.update({
            "series": f"acq-{r['acq']}" if r.get("acq") else "", "method": r["method"],
            "voxels": int(r["n_voxels"]),
            "PDFF median [%]": 100 * r["PDFF_median"],
            "PDFF IQR [%]": _range(100 * r["PDFF_q25"], 100 * r["PDFF_q75"]),
            "R2* median [1/s]": r["R2star_median"],
            "R2* IQR [1/s]": _range(r["R2star_q25"], r["R2star_q75"]),
            "fat-dominant [%]": 100 * r["fat_dominant_fraction"],
            "ambiguous [%]": 100 * r["ambiguous_fraction"],
        })
        out.append(row)
    return _table(pd.DataFrame(out))


def _cse_sections(series: Sequence[CseSeries], n_slices: int) -> list[tuple[str, str]]:
    """One section per CSE series: PDFF, R2*, choice (and ambiguity) panels with colour bars
    over up to ``n_slices`` slices of the fit mask, and its median/IQR table."""
    if not series:
        return [("Fat/water (multi-echo GRE)",
                 "<p>No multi-echo GRE series in this session.</p>")]
    sections = []
    for s in series:
        pdff = _load(s.pdff)
        if pdff is None:
            continue
        r2s, choice, amb, mask = (_load(p) for p in (s.r2star, s.choice, s.ambiguous, s.mask))
        fit = mask[0] > 0.5 if mask is not None and mask[0].shape == pdff[0].shape else None
        nz = pdff[0].shape[2]
        ks = list(range(nz)) if nz <= n_slices else _slices(fit, pdff[0].shape, n_slices)
        r2_hi = max(100.0, float(np.ceil(_robust_max(r2s[0], fit) / 50.0) * 50.0)) if (
            r2s is not None) else 100.0
        panels = []
        for k in ks:
            panels.append({"image": pdff[0][:, :, k] * 100.0, "title": f"PDFF slice {k}",
                           "cmap": "magma", "vmin": 0.0, "vmax": 100.0,
                           "colorbar": "PDFF [%]"})
            if r2s is not None:
                panels.append({"image": r2s[0][:, :, k], "title": f"R2* slice {k}",
                               "cmap": "viridis", "vmin": 0.0, "vmax": r2_hi,
                               "colorbar": "R2* [1/s]"})
            if choice is not None:
                panels.append({"image": np.rint(choice[0][:, :, k]), "title":
                               f"water/fat choice slice {k}", "cmap": _CHOICE_COLOURS,
                               "vmin": -0.5, "vmax": 2.5, "colorbar": "winning candidate",
                               "ticks": _CHOICE_TICKS})
            if amb is not None:
                panels.append({"image": (amb[0][:, :, k] > 0.5).astype(float), "title":
                               f"ambiguous slice {k}", "cmap": _AMBIGUOUS_COLOURS,
                               "vmin": -0.5, "vmax": 1.5, "colorbar": "water vs fat",
                               "ticks": _AMBIGUOUS_TICKS})
        ncols = 2 + (choice is not None) + (amb is not None) - (r2s is None)
        body = _img(montage_png(panels, ncols=ncols), f"fat/water {s.title}")
        body += _cse_summary_table([series_summary(s)]) + _note(CSE_NOTE)
        sections.append((f"Fat/water (multi-echo GRE) {s.title}", body))
    return sections


def session_report(files: SessionFiles, out_html: str | Path, *,
                   provenance: Sequence[str | Path] = (), n_slices: int = 3) -> list[str]:
    """Write the session's QC page; returns the warnings shown on it."""
    out_html = Path(out_html)
    stats = (pd.read_csv(files.stats_tsv, sep="\t", na_values=["n/a"])
             if files.stats_tsv.is_file() else None)
    params = json.loads(files.params.read_text()) if files.params.is_file() else None
    warnings = session_warnings(files, stats, params)
    brain = _load(files.brain_mask)
    bmask = brain[0] > 0.5 if brain else None
    images = {c: _load(files.image(c)) for c in ("T1w", "T2w", "FLAIR")}
    maps = {m: _load(files.map(m)) for m in MAPS}
    ref = next((v for v in [*images.values(), *maps.values()] if v is not None), None)
    sections: list[tuple[str, str]] = []
    if warnings:
        sections.append(("Warnings", "<div class=\"warn\"><ul>" + "".join(
            f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>"))
    else:
        sections.append(("Warnings", "<div class=\"ok\">No warnings.</div>"))
    if ref is None:
        sections.append(("Images", "<p>No images found for this session.</p>"))
    else:
        shape = ref[0].shape
        ks = _slices(bmask, shape, n_slices)
        brain_c = [(bmask, "yellow")] if bmask is not None else []
        # inputs
        panels = []
        for k in ks:
            for c, v in images.items():
                if v is None:
                    continue
                panels.append({"image": v[0][:, :, k], "title": f"{c} slice {k}",
                               "vmin": 0, "vmax": _robust_max(v[0], bmask),
                               "contours": [(m[:, :, k], col) for m, col in brain_c]})
        if panels:
            sections.append(("Input contrasts (preprocessed; brain mask in yellow)",
                             _img(montage_png(panels, ncols=3), "input contrasts")))
        # masks
        eroded = {t: _load(files.eroded(t)) for t in ("WM", "GM")}
        dseg = _load(files.dseg)
        t2 = images.get("T2w")
        if t2 is not None:
            panels = []
            for k in ks:
                cont = [(e[0][:, :, k] > 0.5, col) for e, col in
                        ((eroded["WM"], "deepskyblue"), (eroded["GM"], "orangered")) if e]
                if dseg is not None:
                    cont.append((np.rint(dseg[0][:, :, k]) == 3, "lime"))
                panels.append({"image": t2[0][:, :, k], "title": f"slice {k}", "vmin": 0,
                               "vmax": _robust_max(t2[0], bmask), "contours": cont})
            sections.append(("Masks (eroded WM blue, eroded GM red, CSF green, on the T2w)",
                             _img(montage_png(panels, ncols=len(ks)), "masks")))
        # maps
        panels = []
        for k in ks:
            for m in ("T1", "T2", "PD"):
                v = maps[m]
                if v is None:
                    continue
                s, u, (lo, hi) = DISPLAY[m]
                panels.append({"image": v[0][:, :, k] * s, "title": f"{m} slice {k}",
                               "cmap": "magma" if m != "PD" else "viridis", "vmin": lo,
                               "vmax": hi, "colorbar": f"{m} [{u}]"})
        if panels:
            sections.append(("Quantitative maps", _img(montage_png(panels, ncols=3),
                                                       "quantitative maps")))
        else:
            sections.append(("Quantitative maps", "<p>No maps found.</p>"))
        # re-synthesis
        panels = []
        k = ks[len(ks) // 2]
        for c in ("T1w", "T2w", "FLAIR"):
            real, syn, diff = images.get(c), _load(files.synth(c)), _load(files.synthdiff(c))
            if syn is None:
                continue
            vmax = _robust_max(real[0] if real else syn[0], bmask)
            if real is not None:
                panels.append({"image": real[0][:, :, k], "title": f"{c} input", "vmin": 0,
                               "vmax": vmax})
            panels.append({"image": syn[0][:, :, k], "title": f"{c} re-synthesised",
                           "vmin": 0, "vmax": vmax})
            if diff is not None:
                panels.append({"image": diff[0][:, :, k], "title": f"{c} difference",
                               "cmap": "RdBu_r", "vmin": -20, "vmax": 20,
                               "colorbar": "(synth − input)/input [%]"})
        if panels:
            sections.append((f"Re-synthesised images and differences (slice {k})",
                             _img(montage_png(panels, ncols=3), "re-synthesis")))
    sections += _cse_sections(find_cse_series(files.anat, files.label), n_slices)
    if stats is not None:
        sections.append(("Tissue values (eroded WM/GM; CSF from dseg)", _tissue_table(stats)))
        sha = str(stats["checkpoint_sha256"].fillna("").iloc[0]) if (
            "checkpoint_sha256" in stats) else ""
    else:
        sections.append(("Tissue values", "<p>No tissue statistics found.</p>"))
        side = sidecar_path(files.map("T1"))
        sha = json.loads(side.read_text()).get("ModelCheckpointSHA256", "") if (
            side.is_file()) else ""
    if params:
        sections.append(("Protocol", _protocol_table(params)))
    recs = []
    for p in [files.provenance, *map(Path, provenance)]:
        if Path(p).is_file():
            recs.append(json.loads(Path(p).read_text()))
    sections.append(("Provenance", f"<p>Model checkpoint SHA-256: <code>"
                     f"{html.escape(sha or 'unknown')}</code></p>" + _provenance_table(recs)))
    _write(out_html, render_page(f"qmriflow QC: {files.label}", sections))
    return warnings


def _read_tsv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path, sep="\t", na_values=["n/a"]) if path.is_file() else None


def _by_parameter(df: pd.DataFrame, keys: Sequence[str],
                  values: Mapping[str, str]) -> pd.DataFrame:
    """Long table (one row per ``keys`` × parameter) -> one row per ``keys`` with a column
    per parameter and value, ``"T1 mean [ms]"``: stored units converted to the display units
    (:data:`DISPLAY`) named in the header. ``values``: column -> header word ("" keeps the
    value unscaled and without unit, e.g. a CV in %, written into the word)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in df.to_dict("records"):
        key = tuple(r[k] for k in keys)
        row = rows.setdefault(key, {k: r[k] for k in keys})
        m = str(r["parameter"])
        scale, unit, _ = DISPLAY.get(m, (1.0, "", (0, 1)))
        for col, word in values.items():
            if col not in r:
                continue
            if word.endswith("]"):  # unit already given, e.g. "CV [%]"
                row[f"{m} {word}"] = r[col]
            else:
                row[f"{m} {word} [{unit}]"] = r[col] * scale
    return pd.DataFrame(list(rows.values()))


def _population_table(summ: pd.DataFrame) -> str:
    s = summ.copy()
    s["tissue"] = s["tissue"].map(_tissue_name)
    n = s.groupby("tissue", sort=False)["n_sessions"].max().rename("sessions")
    wide = _by_parameter(s, ["tissue"], {"mean": "mean", "sd": "SD", "min": "min",
                                         "max": "max"})
    wide.insert(1, "sessions", wide["tissue"].map(n).astype(int))
    csf = any(str(t) == "CSF" for t in summ["tissue"])
    return _table(wide) + (_note(CSF_NOTE) if csf else "")


def _cv_table(cv: pd.DataFrame) -> str:
    c = cv.copy()
    notes = sorted({str(x) for x in c.get("note", pd.Series(dtype=str)).fillna("") if x})
    wide = _by_parameter(c, ["grouping", "tissue"],
                         {"cv_percent": "CV [%]", "mean_of_group_means": "mean of group means"})
    counts = c.groupby(["grouping", "tissue"], sort=False)[["n_groups", "n_sessions"]].max()
    for i, col in enumerate(("n_groups", "n_sessions")):
        wide.insert(2 + i, col.removeprefix("n_"), [
            int(counts.loc[(g, t), col]) for g, t in zip(wide["grouping"], wide["tissue"],
                                                         strict=True)])
    wide["tissue"] = wide["tissue"].map(_tissue_name)
    return _table(wide) + "".join(_note(f"n/a: {x}") for x in notes)


def _centroid_table(cent: pd.DataFrame) -> str:
    c = cent.rename(columns={"cluster": "protocol cluster", "n_sessions": "sessions"})
    ren = {}
    for col in c.columns:
        if col.endswith("_ms"):
            role, what = col.split("_")[:2]
            ren[col] = f"{dict(t1w='T1w', t2w='T2w', flair='FLAIR').get(role, role)} " \
                       f"{what.upper()} [ms]"
    return _table(c.rename(columns=ren))


def _repro_table(rt: pd.DataFrame) -> str:
    cols = {"participant_id": "participant_id", "first_session_id": "first_session_id",
            "later_session_id": "later_session_id", "interval_days": "interval [days]",
            "parameter": "parameter", "n_voxels": "voxels", "pearson_r": "Pearson r",
            "ccc": "CCC", "mean_rel_diff": "mean relative difference [%]"}
    t = rt[[c for c in cols if c in rt.columns]].copy()
    if "mean_rel_diff" in t:
        t["mean_rel_diff"] = 100 * t["mean_rel_diff"]
    return _table(t.rename(columns=cols))


def cohort_report(out_html: str | Path, cohort_dir: str | Path,
                  repro_dir: str | Path | None = None,
                  repro_figures_dir: str | Path | None = None) -> Path:
    """Write the cohort page from the outputs of ``qmriflow cohort`` (and ``repro``)."""
    cdir = Path(cohort_dir)
    sections: list[tuple[str, str]] = []
    meta_p = cdir / "cohort.json"
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    warns = list(meta.get("warnings", []))
    rmeta: dict[str, Any] = {}
    if repro_dir is not None and (Path(repro_dir) / "reproducibility.json").is_file():
        rmeta = json.loads((Path(repro_dir) / "reproducibility.json").read_text())
        warns += rmeta.get("warnings", [])
    k, k_req = meta.get("k", "n/a"), meta.get("k_requested", "n/a")
    n_dist = meta.get("n_distinct_protocols", "n/a")
    adapted = (f" (fewer than the {k_req} requested: the cohort has {n_dist} distinct "
               "protocols)" if isinstance(k, int) and isinstance(k_req, int) and k < k_req
               else "")
    sections.append(("Summary", f"<p>{int(meta.get('n_sessions', 0))} session(s) of "
                     f"{int(meta.get('n_subjects', 0))} subject(s); {k} protocol cluster(s), "
                     f"numbered 1..{k} in every table and figure{html.escape(adapted)}.</p>"
                     + ("<div class=\"warn\"><ul>" + "".join(
                         f"<li>{html.escape(str(w))}</li>" for w in warns) + "</ul></div>"
                        if warns else "<div class=\"ok\">No warnings.</div>")))
    summ = _read_tsv(cdir / "cohort_summary.tsv")
    if summ is not None:
        sections.append(("Population mean, SD and range of the session means",
                         _population_table(summ)))
    for name, title in (("cohort_distributions.png", "Value distributions"),):
        if (cdir / name).is_file():
            sections.append((title, _img((cdir / name).read_bytes(), title)))
    cv = _read_tsv(cdir / "intergroup_cv.tsv")
    if cv is not None:
        sections.append(("Inter-group coefficient of variation of the session means",
                         _cv_table(cv)))
    for name, title in (("box_scanner.png", "Session means by scanner model"),
                        ("box_cluster.png", "Session means by protocol cluster"),
                        ("protocol_dendrogram.png", "Protocol clustering dendrogram "
                                                    "(leaves: protocol cluster 1..k)")):
        if (cdir / name).is_file():
            sections.append((title, _img((cdir / name).read_bytes(), title)))
    cent = _read_tsv(cdir / "protocol_cluster_centroids.tsv")
    if cent is not None:
        sections.append(("Protocol cluster centroids", _centroid_table(cent)))
    cse = _read_tsv(cdir / "cohort_cse_stats.tsv")
    if cse is not None:
        sections.append(("Fat/water (multi-echo GRE): PDFF and R2* per series",
                         _cse_summary_table(cse.to_dict("records"), ids=True)
                         + _note(CSE_NOTE) if len(cse) else
                         "<p>No multi-echo GRE series in this cohort.</p>"))
    if repro_dir is not None:
        rdir = Path(repro_dir)
        rt = _read_tsv(rdir / "reproducibility.tsv")
        if rt is not None and len(rt):
            sections.append(("Within-subject reproducibility (WM + GM)", _repro_table(rt)))
            fdir = Path(repro_figures_dir) if repro_figures_dir is not None else rdir
            for png in sorted(fdir.glob("*.png")):
                sections.append((png.stem, _img(png.read_bytes(), png.stem)))
        else:
            sections.append(("Within-subject reproducibility",
                             "<p>No subject with two or more sessions.</p>"))
    out = Path(out_html)
    _write(out, render_page("qmriflow cohort report", sections))
    return out
