"""Within-subject reproducibility (seed 000 section 2.3.2, table 4, appendix E).

For every subject with at least two sessions, each later session is registered rigidly to
the **first** session's preprocessed T2w (:func:`qmriflow.preproc.register.register_rigid`,
ANTsPy), its T1/T2/PD maps (and brain mask) are resampled once onto the first session's grid
(:func:`qmriflow.preproc.register.resample_to_grid`, linear), and voxel-wise Pearson r, Lin's
CCC and the mean relative difference are computed inside the brain parenchyma: the first
session's ``dseg`` WM + GM (labels 1, 2) ∩ its brain mask ∩ the resampled brain mask of the
later session (so voxels outside the later field of view never count).

"First" is the earliest session by the optional ``days`` table (``participant_id``,
``session_id``, ``day``: any day number, e.g. days since the subject's first visit; the
older column names ``subject``/``session`` are read too) and otherwise the alphabetically
first label (session labels are pseudonyms: give ``days`` when the order matters). With
``max_interval_days`` only pairs within that interval are analysed; it needs ``days``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .metrics import bland_altman, lin_ccc, pearson_r, relative_difference
from .tissue import MAPS, SessionFiles

__all__ = ["PairResult", "pair_reproducibility", "plan_pairs", "read_days"]


@dataclass
class PairResult:
    """Metrics of one (first, later) session pair, plus the voxel values for plotting."""

    subject: str
    first: str
    later: str
    rows: list[dict[str, Any]]
    registration: dict[str, Any]
    values: dict[str, tuple[np.ndarray, np.ndarray]]  # parameter -> (first, later) voxels


def read_days(path: str | Path | None) -> dict[tuple[str, str], float]:
    """``{(subject, session): day}`` (labels without prefix) from a TSV with columns
    participant_id, session_id, day (BIDS names; ``subject``, ``session`` accepted too)."""
    if path is None:
        return {}
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise InputError("days table not found", path=p)
    df = pd.read_csv(p, sep="\t", dtype=str)
    df = df.rename(columns={"subject": "participant_id", "session": "session_id"})
    need = {"participant_id", "session_id", "day"}
    if not need <= set(df.columns):
        raise InputError(f"days table needs columns {sorted(need)}", path=p)
    return {(str(r.participant_id).removeprefix("sub-"),
             str(r.session_id).removeprefix("ses-")): float(r.day) for r in df.itertuples()}


def plan_pairs(sessions: Sequence[SessionFiles], *,
               days: Mapping[tuple[str, str], float] | None = None,
               max_interval_days: float | None = None,
               ) -> tuple[list[tuple[SessionFiles, SessionFiles, float | None]], list[str]]:
    """(first, later, interval in days or None) pairs and warnings; see the module doc."""
    days = dict(days or {})
    warnings: list[str] = []
    by_subject: dict[str, list[SessionFiles]] = {}
    for s in sessions:
        by_subject.setdefault(s.subject, []).append(s)
    pairs = []
    for sub in sorted(by_subject):
        ses = by_subject[sub]
        if len(ses) < 2:
            continue
        known = all((sub, s.session) in days for s in ses)
        if known:
            ses = sorted(ses, key=lambda s: (days[(sub, s.session)], s.session))
        else:
            ses = sorted(ses, key=lambda s: s.session)
            if max_interval_days is not None:
                warnings.append(f"sub-{sub}: session days unknown; interval limit not applied")
        first = ses[0]
        for later in ses[1:]:
            dt = days[(sub, later.session)] - days[(sub, first.session)] if known else None
            if max_interval_days is not None and dt is not None and dt > max_interval_days:
                warnings.append(f"sub-{sub}: ses-{later.session} is {dt:g} days after "
                                f"ses-{first.session} (> {max_interval_days:g}); skipped")
                continue
            pairs.append((first, later, dt))
    return pairs, warnings


def _load(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    from ..preproc.register import load_volume

    img, data = load_volume(path, what)
    return data, np.asarray(img.affine, dtype=np.float64)


def pair_reproducibility(first: SessionFiles, later: SessionFiles, *,
                         work_dir: str | Path | None = None, threads: int = 1, seed: int = 1,
                         interval_days: float | None = None) -> PairResult:
    """Register ``later`` to ``first`` and compare their maps voxel-wise (module doc)."""
    import nibabel as nib

    from ..preproc.register import TargetGrid, register_rigid, resample_to_grid

    label = f"sub-{first.subject}"
    tmp = Path(tempfile.mkdtemp(prefix=".repro-", dir=work_dir))
    try:
        xfm = tmp / "later_to_first.mat"
        try:
            reg = register_rigid(first.image("T2w"), later.image("T2w"), xfm, threads=threads,
                                 seed=seed)
        except InputError as exc:
            raise exc.with_context(session=label) from None
        ref, aff = _load(first.map("T1"), "first session T1 map")
        grid = TargetGrid(shape=tuple(int(s) for s in ref.shape), affine=aff)
        fmaps = {"T1": ref}
        for m in ("T2", "PD"):
            fmaps[m], _ = _load(first.map(m), f"first session {m} map")
        lmaps = {m: resample_to_grid(later.map(m), grid, [xfm], "linear") for m in MAPS}
        dseg = np.rint(np.asarray(nib.load(str(first.dseg)).dataobj)).astype(np.int16)
        mask = (dseg == 1) | (dseg == 2)
        if first.brain_mask.is_file():
            mask &= np.asarray(nib.load(str(first.brain_mask)).dataobj) > 0.5
        if later.brain_mask.is_file():
            lb = resample_to_grid(later.brain_mask, grid, [xfm], "nearest")
            mask &= lb > 0.5
        for m in MAPS:
            if fmaps[m].shape != mask.shape:
                raise InputError(f"{m} map and dseg differ in shape", session=first.label)
            mask &= np.isfinite(fmaps[m]) & np.isfinite(lmaps[m])
        n = int(mask.sum())
        if n < 100:
            raise InputError(f"only {n} WM+GM voxels overlap after registration",
                             session=f"{later.label} -> {first.label}")
        rows = []
        values = {}
        for m in MAPS:
            a = fmaps[m][mask].astype(np.float64)
            b = lmaps[m][mask].astype(np.float64)
            values[m] = (a, b)
            ba = bland_altman(a, b)
            row: dict[str, Any] = {
                "participant_id": f"sub-{first.subject}",
                "first_session_id": f"ses-{first.session}",
                "later_session_id": f"ses-{later.session}", "interval_days": interval_days,
                "parameter": m, "n_voxels": n, "pearson_r": pearson_r(a, b),
                "ccc": lin_ccc(a, b), "mean_rel_diff": relative_difference(a, b),
                "mean_first": float(a.mean()), "mean_later": float(b.mean()),
                "ba_bias": ba["bias"], "ba_loa_low": ba["loa_low"],
                "ba_loa_high": ba["loa_high"],
            }
            for t, lab in (("GM", 1), ("WM", 2)):
                sel = (dseg == lab)[mask]
                row[f"{t}_mean_first"] = float(a[sel].mean()) if sel.any() else float("nan")
                row[f"{t}_mean_later"] = float(b[sel].mean()) if sel.any() else float("nan")
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keep = ("rotation_deg", "translation_mm", "head_mask_dice", "metric", "seconds",
            "moving_to_fixed_ras")
    return PairResult(first.subject, first.session, later.session, rows,
                      {k: reg[k] for k in keep if k in reg}, values)
