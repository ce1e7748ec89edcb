"""Per-session tissue statistics of the T1/T2/PD maps (seed 000 section 2.3.1).

For one session folder ``<out>/sub-X/ses-Y`` this reads the maps (``..._space-T2w_{T1map,
T2map,PDmap}.nii.gz``, seconds / a.u.), the eroded WM and GM masks, the ``dseg`` (its CSF
label, 3, for reference), the brain mask, the protocol JSON and the map sidecar (checkpoint
hash), and writes one BIDS-derivatives TSV with **one row per tissue** (WM, GM, CSF)::

    sub-X_ses-Y_space-T2w_desc-tissue_stats.tsv   (+ .json sidecar describing the columns)

Columns: ``participant_id`` (``sub-X``) and ``session_id`` (``ses-Y``), named as in BIDS
``participants.tsv``/``sessions.tsv`` (a column named after an entity, ``subject``, would be
read by pybids as metadata contradicting the file name's entity), ``tissue``, ``n_voxels``,
``{T1,T2,PD}_{mean,sd,median}`` (T1/T2 in seconds, PD a.u.; SD with ddof=1), the scanner
model, the protocol parameters of the three contrasts, the gadolinium flags and the model
checkpoint's SHA-256. Each row is already a cohort-table row:
the cohort table is the concatenation of these files (:mod:`qmriflow.stats.cohort`).

Voxels counted: the tissue mask ∩ the brain mask ∩ finite map values in all three maps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import atomic_path, sidecar_path, write_json

__all__ = [
    "ID_COLUMNS",
    "MAPS",
    "ROLES",
    "STATS_COLUMNS",
    "TISSUES",
    "SessionFiles",
    "compute_session_stats",
    "session_files",
    "session_metadata",
    "tissue_histograms",
    "tissue_statistics",
    "write_tsv",
]

MAPS = ("T1", "T2", "PD")
#: identifier columns of every table (BIDS names; values with their ``sub-``/``ses-`` prefix)
ID_COLUMNS = ("participant_id", "session_id")
MAP_SUFFIX = {"T1": "T1map", "T2": "T2map", "PD": "PDmap"}
MAP_UNITS = {"T1": "s", "T2": "s", "PD": "arbitrary (water = 1)"}
TISSUES = ("WM", "GM", "CSF")
ROLES = ("t1w", "t2w", "flair")
PROTOCOL_KEYS = ("sequence", "tr_ms", "te_ms", "ti_ms", "fa_deg")
STATS = ("mean", "sd", "median")
STATS_COLUMNS = tuple(f"{m}_{s}" for m in MAPS for s in STATS)
#: fixed histogram bins (stored units) so that histograms of different sessions line up
HIST_RANGE = {"T1": (0.0, 4.0), "T2": (0.0, 0.3), "PD": (0.0, 1.5)}
HIST_BINS = 120
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class SessionFiles:
    """Paths of one session's derivatives (``<out>/sub-X/ses-Y``)."""

    subject: str
    session: str
    root: Path

    @property
    def label(self) -> str:
        return f"sub-{self.subject}_ses-{self.session}"

    @property
    def anat(self) -> Path:
        return self.root / "anat"

    def _anat(self, suffix: str) -> Path:
        return self.anat / f"{self.label}_space-T2w_{suffix}.nii.gz"

    def map(self, name: str) -> Path:
        """``T1``/``T2``/``PD`` map path."""
        return self._anat(MAP_SUFFIX[name])

    def image(self, contrast: str) -> Path:
        return self._anat(f"desc-preproc_{contrast}")

    def synth(self, contrast: str) -> Path:
        return self._anat(f"desc-synth_{contrast}")

    def synthdiff(self, contrast: str) -> Path:
        return self._anat(f"desc-synthdiff_{contrast}")

    @property
    def brain_mask(self) -> Path:
        return self._anat("desc-brain_mask")

    @property
    def dseg(self) -> Path:
        return self._anat("dseg")

    def eroded(self, tissue: str) -> Path:
        return self._anat(f"label-{tissue}_desc-eroded_mask")

    @property
    def params(self) -> Path:
        return self.root / f"{self.label}_desc-protocol_params.json"

    @property
    def provenance(self) -> Path:
        return self.root / f"{self.label}_desc-provenance.json"

    @property
    def stats_tsv(self) -> Path:
        return self.anat / f"{self.label}_space-T2w_desc-tissue_stats.tsv"

    @property
    def hist_tsv(self) -> Path:
        return self.anat / f"{self.label}_space-T2w_desc-tissue_hist.tsv"


def session_files(session_dir: str | Path, subject: str | None = None,
                  session: str | None = None) -> SessionFiles:
    """:class:`SessionFiles` of ``<out>/sub-X/ses-Y`` (labels taken from the folder names
    unless given)."""
    root = Path(session_dir)
    sub = subject or root.parent.name.removeprefix("sub-")
    ses = session or root.name.removeprefix("ses-")
    if not (root.parent.name.startswith("sub-") or subject) or not (
            root.name.startswith("ses-") or session):
        raise InputError("not a session folder (expected .../sub-X/ses-Y)", path=root)
    for what, v in (("subject", sub), ("session", ses)):
        if not _LABEL_RE.match(v):
            raise InputError(f"bad {what} label {v!r} (alphanumeric only)", path=root)
    return SessionFiles(sub, ses, root)


def _load(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if not path.is_file():
        raise InputError(f"{what}: file not found", path=path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{what}: unreadable NIfTI ({type(exc).__name__})", path=path) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{what}: expected a 3D volume, got shape {data.shape}", path=path)
    return data, np.asarray(img.affine, dtype=np.float64)


def _usable_voxels(maps: Mapping[str, np.ndarray], valid: np.ndarray | None) -> np.ndarray:
    """Voxels where every map is finite (and ``valid`` is set, if given)."""
    finite = np.ones(np.shape(next(iter(maps.values()))), dtype=bool)
    for a in maps.values():
        finite &= np.isfinite(a)
    if valid is not None:
        finite &= np.asarray(valid, dtype=bool)
    return finite


def tissue_statistics(maps: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
                      valid: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Mean, SD (ddof=1), median and voxel count of every map inside every mask.

    ``maps``: ``{"T1": arr, ...}``; ``masks``: ``{"WM": bool arr, ...}``, all the same shape.
    ``valid`` (optional) further restricts every mask (e.g. the brain mask). Voxels where any
    map is non-finite are left out. An empty tissue gives ``n_voxels = 0`` and NaN values.
    """
    shapes = {np.shape(a) for a in [*maps.values(), *masks.values()]}
    if len(shapes) != 1:
        raise InputError(f"maps and masks differ in shape: {sorted(shapes)}")
    finite = _usable_voxels(maps, valid)
    rows = []
    for tissue, mask in masks.items():
        sel = np.asarray(mask, dtype=bool) & finite
        n = int(sel.sum())
        row: dict[str, Any] = {"tissue": tissue, "n_voxels": n}
        for name, arr in maps.items():
            v = np.asarray(arr, dtype=np.float64)[sel]
            row[f"{name}_mean"] = float(v.mean()) if n else float("nan")
            row[f"{name}_sd"] = float(v.std(ddof=1)) if n > 1 else float("nan")
            row[f"{name}_median"] = float(np.median(v)) if n else float("nan")
        rows.append(row)
    return rows


def tissue_histograms(maps: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
                      valid: np.ndarray | None = None) -> pd.DataFrame:
    """Fixed-bin value histograms (fraction of the tissue's voxels per bin; values beyond the
    range fall in the end bins) per tissue and map: long table with columns tissue,
    parameter, bin_start, bin_end, fraction."""
    finite = _usable_voxels(maps, valid)
    rows = []
    for tissue, mask in masks.items():
        sel = np.asarray(mask, dtype=bool) & finite
        n = int(sel.sum())
        for name, arr in maps.items():
            lo, hi = HIST_RANGE.get(name, (0.0, 1.0))
            edges = np.linspace(lo, hi, HIST_BINS + 1)
            v = np.clip(np.asarray(arr, dtype=np.float64)[sel], lo, hi)
            counts = np.histogram(v, bins=edges)[0]
            frac = counts / n if n else np.full(HIST_BINS, np.nan)
            rows += [{"tissue": tissue, "parameter": name, "bin_start": float(edges[i]),
                      "bin_end": float(edges[i + 1]), "fraction": float(frac[i])}
                     for i in range(HIST_BINS)]
    return pd.DataFrame(rows)


def _truthy(v: Any) -> bool | None:
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() in ("1", "true", "yes", "y")


def session_metadata(params: Mapping[str, Any] | None,
                     map_sidecar: Mapping[str, Any] | None) -> dict[str, Any]:
    """Cohort-table columns of one session: scanner, protocol per contrast, Gd, checkpoint."""
    params = params or {}
    meta: dict[str, Any] = {}
    entries = {r: params.get(r) or {} for r in ROLES}
    model = next((str(e["manufacturer_model"]) for r in ("t2w", "t1w", "flair")
                  if (e := entries[r]).get("manufacturer_model")), "unknown")
    meta["scanner_model"] = model
    meta["manufacturer"] = next((str(e["manufacturer"]) for e in entries.values()
                                 if e.get("manufacturer")), "")
    meta["field_strength_t"] = next((float(e["field_strength_t"]) for e in entries.values()
                                     if e.get("field_strength_t") is not None), float("nan"))
    for r in ROLES:
        e = entries[r]
        for k in PROTOCOL_KEYS:
            v = e.get(k)
            if k == "sequence":
                meta[f"{r}_{k}"] = str(v) if v else ""
            else:
                meta[f"{r}_{k}"] = float(v) if v is not None else float("nan")
    gd = {r: _truthy(entries[r].get("gadolinium")) for r in ROLES}
    for r in ROLES:
        meta[f"{r}_gadolinium"] = "" if gd[r] is None else bool(gd[r])
    meta["gadolinium"] = any(bool(v) for v in gd.values())
    side = map_sidecar or {}
    meta["checkpoint_sha256"] = str(side.get("ModelCheckpointSHA256") or "")
    return meta


def compute_session_stats(files: SessionFiles) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stats, histograms) of one session: one stats row per tissue (WM, GM, CSF), see the
    module docstring; histograms as :func:`tissue_histograms` with subject/session."""
    maps: dict[str, np.ndarray] = {}
    affine = None
    for m in MAPS:
        maps[m], aff = _load(files.map(m), f"{m} map")
        if affine is None:
            affine = aff
        elif maps[m].shape != maps["T1"].shape or not np.allclose(aff, affine, atol=1e-3):
            raise InputError(f"{m} map is not on the T1 map's grid", path=files.map(m),
                             session=files.label)
    shape = maps["T1"].shape
    masks: dict[str, np.ndarray] = {}
    for t in ("WM", "GM"):
        m, _ = _load(files.eroded(t), f"eroded {t} mask")
        masks[t] = m > 0.5
    dseg, _ = _load(files.dseg, "dseg")
    masks["CSF"] = np.rint(dseg) == 3
    brain = None
    if files.brain_mask.is_file():
        b, _ = _load(files.brain_mask, "brain mask")
        brain = b > 0.5
    for name, m in [*masks.items(), ("brain mask", brain)]:
        if m is not None and m.shape != shape:
            raise InputError(f"{name} shape {m.shape} differs from the maps' {shape}",
                             session=files.label)
    rows = tissue_statistics(maps, masks, brain)
    hist = tissue_histograms(maps, masks, brain)
    hist.insert(0, "session_id", f"ses-{files.session}")
    hist.insert(0, "participant_id", f"sub-{files.subject}")
    params = json.loads(files.params.read_text()) if files.params.is_file() else None
    side_p = sidecar_path(files.map("T1"))
    side = json.loads(side_p.read_text()) if side_p.is_file() else None
    meta = session_metadata(params, side)
    df = pd.DataFrame([{"participant_id": f"sub-{files.subject}",
                        "session_id": f"ses-{files.session}", **r, **meta} for r in rows])
    return df, hist


COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "participant_id": {"Description": "subject pseudonym, with its sub- prefix (as in BIDS "
                                      "participants.tsv)"},
    "session_id": {"Description": "session pseudonym, with its ses- prefix (as in BIDS "
                                  "sessions.tsv)"},
    "tissue": {"Description": "WM and GM: eroded masks; CSF: dseg label 3 (reference only: "
                              "not eroded, partial-volume dominated, lower than deep CSF)",
               "Levels": {"WM": "white matter (eroded)", "GM": "grey matter (eroded)",
                          "CSF": "cerebrospinal fluid (dseg label 3, not eroded)"}},
    "n_voxels": {"Description": "voxels in tissue mask ∩ brain mask with finite maps"},
    **{f"{m}_{s}": {"Description": f"{s} of the {m} map in the tissue"
                    + (" (SD: ddof=1)" if s == "sd" else ""), "Units": MAP_UNITS[m]}
       for m in MAPS for s in STATS},
    "scanner_model": {"Description": "ManufacturerModelName of the T2w (else T1w/FLAIR)"},
    "checkpoint_sha256": {"Description": "SHA-256 of the model checkpoint that made the maps"},
    "gadolinium": {"Description": "any of the three contrasts acquired after contrast agent"},
    "fraction": {"Description": "fraction of the tissue's voxels in [bin_start, bin_end); "
                                "values outside the range are counted in the end bins"},
    "bin_start": {"Description": "bin start (T1/T2 in s, PD a.u.)"},
    "bin_end": {"Description": "bin end (T1/T2 in s, PD a.u.)"},
    "parameter": {"Description": "map: T1 (s), T2 (s) or PD (a.u.)"},
    "protocol_cluster": {"Description": "protocol cluster 1..k (Ward clustering of the "
                                        "z-scored TR/TE of T1w, T2w, FLAIR)"},
    "manufacturer": {"Description": "Manufacturer of the series"},
    "field_strength_t": {"Description": "MagneticFieldStrength", "Units": "T"},
    **{f"{r}_{k}": {"Description": f"{k.split('_')[0].upper()} of the {r} series",
                    "Units": "ms"} for r in ROLES for k in ("tr_ms", "te_ms", "ti_ms")},
    **{f"{r}_fa_deg": {"Description": f"flip angle of the {r} series", "Units": "degree"}
       for r in ROLES},
    **{f"{r}_sequence": {"Description": f"sequence type of the {r} series"} for r in ROLES},
    **{f"{r}_gadolinium": {"Description": f"{r} acquired after contrast agent (empty: unknown)"}
       for r in ROLES},
}


def write_tsv(df: pd.DataFrame, path: str | Path, *, sidecar: bool = True,
              extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``df`` as a BIDS TSV (tab-separated, ``n/a`` for missing), atomically, with a
    JSON sidecar describing the known columns."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    if sidecar:
        desc = {c: COLUMN_DESCRIPTIONS[c] for c in df.columns if c in COLUMN_DESCRIPTIONS}
        write_json(path.with_suffix(".json"), {**desc, **(extra or {})})
    return path
