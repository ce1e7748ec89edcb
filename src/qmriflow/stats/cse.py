"""Fat/water (CSE) results in the reports: find a session's PDFF series and summarise them.

The CSE step (:mod:`qmriflow.cse.pipeline`) writes, per multi-echo GRE series and method ``m``::

    <prefix>_desc-<m>_PDFFmap.nii.gz     fraction 0-1
    <prefix>_desc-<m>_R2starmap.nii.gz   1/s
    <prefix>_desc-<m>_choice.nii.gz      0 background, 1 water-dominant, 2 fat-dominant
    <prefix>_desc-<m>_mask.nii.gz        the fitted foreground
    <prefix>_desc-<m>_ambiguous.nii.gz   (when written) voxels whose likelihood cannot tell
                                         water from fat

with ``<prefix> = sub-X_ses-Y_acq-<series id>``. :func:`series_summary` gives the median and
inter-quartile range of PDFF and R2* inside the fit mask, the fat-dominant fraction and the
ambiguous fraction of one series; :func:`cse_table` one row per series (the cohort's
``group/cohort_cse_stats.tsv``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError

__all__ = ["CSE_COLUMNS", "CseSeries", "cse_series", "cse_table", "find_cse_series",
           "series_summary"]

_PDFF_RE = re.compile(r"^(?P<prefix>sub-(?P<sub>[A-Za-z0-9]+)_ses-(?P<ses>[A-Za-z0-9]+)"
                      r"(?:_acq-(?P<acq>[A-Za-z0-9]+))?)_desc-(?P<method>[A-Za-z0-9]+)"
                      r"_PDFFmap\.nii\.gz$")

#: columns of the CSE table and their sidecar descriptions (stored units)
CSE_COLUMNS: dict[str, dict[str, str]] = {
    "participant_id": {"Description": "subject pseudonym, with its sub- prefix"},
    "session_id": {"Description": "session pseudonym, with its ses- prefix"},
    "acq": {"Description": "series id (acq- entity of the multi-echo GRE series)"},
    "method": {"Description": "CSE method (desc- entity): dual, single or fit"},
    "n_voxels": {"Description": "voxels in the fit mask (desc-<method>_mask)"},
    "PDFF_median": {"Description": "median PDFF in the fit mask", "Units": "fraction (0-1)"},
    "PDFF_q25": {"Description": "25th percentile of PDFF in the fit mask",
                 "Units": "fraction (0-1)"},
    "PDFF_q75": {"Description": "75th percentile of PDFF in the fit mask",
                 "Units": "fraction (0-1)"},
    "R2star_median": {"Description": "median R2* in the fit mask", "Units": "1/s"},
    "R2star_q25": {"Description": "25th percentile of R2* in the fit mask", "Units": "1/s"},
    "R2star_q75": {"Description": "75th percentile of R2* in the fit mask", "Units": "1/s"},
    "fat_dominant_fraction": {"Description": "fraction of the fit mask where the fat-dominant "
                                             "candidate won (choice = 2)",
                              "Units": "fraction (0-1)"},
    "ambiguous_fraction": {"Description": "fraction of the fit mask flagged ambiguous (the "
                                          "likelihood cannot tell water from fat); n/a when "
                                          "the series has no ambiguity mask",
                           "Units": "fraction (0-1)"},
}


@dataclass(frozen=True)
class CseSeries:
    """The files of one CSE result (one series, one method)."""

    subject: str
    session: str
    acq: str
    method: str
    pdff: Path

    def _sib(self, suffix: str) -> Path:
        return self.pdff.with_name(self.pdff.name.replace("_PDFFmap.nii.gz", suffix))

    @property
    def r2star(self) -> Path:
        return self._sib("_R2starmap.nii.gz")

    @property
    def choice(self) -> Path:
        return self._sib("_choice.nii.gz")

    @property
    def mask(self) -> Path:
        return self._sib("_mask.nii.gz")

    @property
    def ambiguous(self) -> Path:
        return self._sib("_ambiguous.nii.gz")

    @property
    def title(self) -> str:
        return f"acq-{self.acq} ({self.method})" if self.acq else f"({self.method})"


def cse_series(pdff: str | Path) -> CseSeries:
    """:class:`CseSeries` of a ``..._desc-<m>_PDFFmap.nii.gz`` path."""
    p = Path(pdff)
    m = _PDFF_RE.match(p.name)
    if m is None or m["method"].endswith("percent"):
        raise InputError("not a CSE PDFF map (expected sub-X_ses-Y[_acq-Z]_desc-<method>_"
                         "PDFFmap.nii.gz)", path=p)
    return CseSeries(m["sub"], m["ses"], m["acq"] or "", m["method"], p)


def find_cse_series(anat: str | Path, label: str) -> list[CseSeries]:
    """Every CSE result of session ``label`` (``sub-X_ses-Y``) in its ``anat`` folder."""
    out = []
    for p in sorted(Path(anat).glob(f"{label}_*_PDFFmap.nii.gz")):
        m = _PDFF_RE.match(p.name)
        if m is not None and not m["method"].endswith("percent"):
            out.append(cse_series(p))
    return out


def _load(path: Path) -> np.ndarray | None:
    import nibabel as nib

    if not path.is_file():
        return None
    try:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"unreadable NIfTI ({type(exc).__name__})", path=path) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def series_summary(s: CseSeries) -> dict[str, Any]:
    """One row of :data:`CSE_COLUMNS` for series ``s`` (stored units: PDFF 0-1, R2* 1/s)."""
    pdff = _load(s.pdff)
    if pdff is None:
        raise InputError("PDFF map not found", path=s.pdff)
    r2s = _load(s.r2star)
    mask = _load(s.mask)
    sel = (mask > 0.5) if mask is not None and mask.shape == pdff.shape else pdff != 0
    sel &= np.isfinite(pdff)
    row: dict[str, Any] = {"participant_id": f"sub-{s.subject}", "session_id": f"ses-{s.session}",
                           "acq": s.acq, "method": s.method, "n_voxels": int(sel.sum())}
    for name, arr in (("PDFF", pdff), ("R2star", r2s)):
        ok = arr is not None and arr.shape == pdff.shape
        v = arr[sel & np.isfinite(arr)] if ok else np.zeros(0)
        q = np.percentile(v, [25, 50, 75]) if v.size else [np.nan] * 3
        row.update({f"{name}_median": float(q[1]), f"{name}_q25": float(q[0]),
                    f"{name}_q75": float(q[2])})
    choice = _load(s.choice)
    n = max(int(sel.sum()), 1)
    row["fat_dominant_fraction"] = (float((np.rint(choice[sel]) == 2).sum() / n)
                                    if choice is not None and choice.shape == pdff.shape
                                    else float("nan"))
    amb = _load(s.ambiguous)
    row["ambiguous_fraction"] = (float((amb[sel] > 0.5).sum() / n)
                                 if amb is not None and amb.shape == pdff.shape else float("nan"))
    return row


def cse_table(pdff_maps: Sequence[str | Path]) -> pd.DataFrame:
    """One :func:`series_summary` row per PDFF map, sorted by participant, session, series."""
    rows = [series_summary(cse_series(p)) for p in pdff_maps]
    df = pd.DataFrame(rows, columns=list(CSE_COLUMNS))
    return df.sort_values(["participant_id", "session_id", "acq", "method"],
                          kind="mergesort").reset_index(drop=True)
