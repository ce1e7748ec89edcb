"""``qmriflow infer-nifti``: the data users of the published code already have.

Plain registered NIfTIs of any subset of T1w/T2w/FLAIR, a brain mask, either a ``_dseg``
(1 GM, 2 WM, 3 CSF) or separate WM/GM/CSF masks, and the protocol as

* the published CSV (columns ``ID``, ``<C>_seq_type``, ``<C>_TE``, ``<C>_TR``, ``<C>_TI``,
  ``<C>_FA`` for C in T1w/T2w/FLAIR, TR/TE/TI in ms, FA in degrees, an empty TI = none;
  sequence labels GRE/TFE, SE, TSE, IR/FLAIR, MPRAGE; ``<C>_rescale`` is ignored), one row
  per subject (chosen by ``ID`` when there are several);
* a JSON: qmriflow's ``desc-protocol_params.json`` (``t1w``/``t2w``/``flair`` entries with
  ``sequence``, ``tr_ms`` ...), or the CSV's fields per contrast (``{"FLAIR": {"seq_type":
  "IR", "TR": 4800, "TE": 298, "TI": 1650, "FA": 90}}``);
* command-line values (``--t1w-tr`` …), which override the file's.

:func:`stage_session` checks all of it (one-line :class:`~qmriflow.errors.InputError` naming
the file and the reason, before anything is written), writes the protocol as a
``desc-protocol_params.json`` and the tissue masks as a ``_dseg`` into a work folder and
returns the :class:`~qmriflow.model.data.SessionFiles` that
:func:`qmriflow.model.infer.infer_session` runs on — the workflow's ``infer``, the same code.
The protocol follows the published CSV's semantics: the T2w's TE is corrected by 0.90 and the
FLAIR's by 0.42 (0.89 below 200 ms) whatever the sequence label, the T1w's not at all.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import physics
from ..errors import InputError
from ..io import save_nifti, write_json
from .data import ROLE, SessionFiles
from .normalise import CONTRASTS

__all__ = ["SEQUENCE_LABELS", "contrast_of_name", "label_from_names", "protocol_entries",
           "read_protocol_file", "stage_session"]

SEQUENCE_LABELS = {"GRE": "gre", "TFE": "gre", "FFE": "gre", "SPGR": "gre", "FLASH": "gre",
                   "SE": "se", "TSE": "tse", "FSE": "tse", "IR": "flair", "FLAIR": "flair",
                   "MPRAGE": "irgre", "IRGRE": "irgre", "IR-GRE": "irgre"}
"""The published CSV's sequence labels (and common synonyms) → qmriflow's sequence."""
DEFAULT_LABELS = {"T1w": "GRE", "T2w": "TSE", "FLAIR": "IR"}
"""Sequence label of a contrast whose ``<C>_seq_type`` is missing (the published defaults)."""
FIELDS = ("seq_type", "TR", "TE", "TI", "FA")

_NAME = re.compile(r"(?i)(?:^|[_.-])(T1w|T2w|FLAIR)\.nii(?:\.gz)?$")


def contrast_of_name(path: str | Path) -> str | None:
    """``…_T1w.nii.gz`` → ``T1w`` (also T2w, FLAIR; case-insensitive); None otherwise."""
    m = _NAME.search(Path(path).name)
    if not m:
        return None
    return next(c for c in CONTRASTS if c.lower() == m.group(1).lower())


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return re.sub(r"(?i)[_.-]?(T1w|T2w|FLAIR)$", "", name)


def label_from_names(images: Mapping[str, Path], subject: str | None = None,
                     session: str | None = None) -> tuple[str, str, str]:
    """Subject and session labels for a set of image files: the ones given; else the BIDS
    entities ``sub-<label>``/``ses-<label>`` of the file names or their folders; else the
    subject is the files' common stem without its contrast suffix, letters and digits only
    (``example_001_T1w.nii.gz`` → ``example001``), and the session ``01``. Returns
    (subject, session, how)."""
    how = "given"
    paths = list(images.values())
    texts = [p.name for p in paths] + [a.name for p in paths for a in Path(p).parents]
    if subject is None:
        subs = [m.group(1) for t in texts for m in [re.search(r"(?:^|_)sub-([A-Za-z0-9]+)", t)]
                if m]
        if subs:
            subject, how = subs[0], "from the BIDS entities of the file names"
        else:
            stems = {_stem(Path(p)) for p in paths}
            stem = stems.pop() if len(stems) == 1 else None
            clean = re.sub(r"[^A-Za-z0-9]", "", stem or "")
            if not clean:
                raise InputError("cannot take a subject label from the image file names "
                                 f"({', '.join(Path(p).name for p in paths)}): give --subject")
            subject, how = clean, "from the common stem of the file names"
    if session is None:
        sess = [m.group(1) for t in texts for m in [re.search(r"(?:^|_)ses-([A-Za-z0-9]+)", t)]
                if m]
        session = sess[0] if sess else "01"
    for what, v in (("subject", subject), ("session", session)):
        if not re.fullmatch(r"[A-Za-z0-9]+", v):
            raise InputError(f"{what} label {v!r} must be letters and digits only")
    return subject, session, how


# ---------------------------------------------------------------------------------------------
# protocol
# ---------------------------------------------------------------------------------------------


def _number(value: Any, what: str, path: Path | None) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what}: not a number ({value!r})", path=path) from None
    if not np.isfinite(v):
        return None
    return v


def _read_csv(path: Path, row_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The published CSV's row of this subject → contrast → fields (``seq_type`` …)."""
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if any((v or "").strip() for v in r.values())]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"unreadable protocol CSV ({exc})", path=path) from None
    if not rows:
        raise InputError("the protocol CSV has no data row", path=path)
    if len(rows) > 1:
        hits = [r for r in rows if (r.get("ID") or "").strip() in row_ids]
        if len(hits) != 1:
            raise InputError(f"the protocol CSV has {len(rows)} rows and "
                             f"{'none' if not hits else len(hits)} with ID in "
                             f"{sorted(set(row_ids))}: give --protocol-id", path=path)
        rows = hits
    row = rows[0]
    out: dict[str, dict[str, Any]] = {}
    for c in CONTRASTS:
        entry = {f: row[f"{c}_{f}"] for f in FIELDS if f"{c}_{f}" in row}
        if entry:
            out[c] = entry
    return out


def read_protocol_file(path: str | Path, row_ids: Sequence[str] = ()
                       ) -> dict[str, dict[str, Any]]:
    """A protocol file (published CSV or JSON, see the module docstring) → contrast → fields
    (``seq_type``, ``TR``, ``TE``, ``TI``, ``FA``; or qmriflow's ``sequence``, ``tr_ms`` …)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("protocol file not found", path=p)
    if p.suffix.lower() == ".csv":
        return _read_csv(p, row_ids)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable protocol JSON ({exc})", path=p) from None
    if not isinstance(doc, dict):
        raise InputError("the protocol JSON must be an object with T1w/T2w/FLAIR entries",
                         path=p)
    out = {}
    for c in CONTRASTS:
        entry = next((v for k, v in doc.items() if k.lower() in (c.lower(), ROLE[c])), None)
        if entry is not None:
            if not isinstance(entry, dict):
                raise InputError(f"{c}: the protocol entry must be an object", path=p)
            out[c] = dict(entry)
    return out


def _te_factor(contrast: str, te_ms: float) -> float | None:
    """The published TE correction of a contrast's role (T2w 0.90; FLAIR 0.42, 0.89 below
    200 ms; T1w none → None: the sequence's own)."""
    if contrast == "T2w":
        return 0.90
    if contrast == "FLAIR":
        return 0.89 if te_ms < 200.0 else 0.42
    return None


def protocol_entries(contrasts: Sequence[str], fields: Mapping[str, Mapping[str, Any]],
                     source: Path | None = None) -> dict[str, dict[str, Any]]:
    """Check and convert the protocol fields of ``contrasts`` into entries of a
    ``desc-protocol_params.json`` (role → :meth:`physics.Protocol.as_dict` fields). A missing
    value names the published CSV column it would come from."""
    out: dict[str, dict[str, Any]] = {}
    for c in contrasts:
        f = dict(fields.get(c) or {})
        if "sequence" in f or "tr_ms" in f:  # qmriflow's own entry
            try:
                proto = physics.Protocol.from_dict(f)
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{c}: invalid protocol entry ({exc})", path=source) from None
            out[ROLE[c]] = {**{k: v for k, v in f.items() if k != "role"}, "role": ROLE[c],
                            **proto.as_dict()}
            continue
        label = str(f.get("seq_type") or DEFAULT_LABELS[c]).strip().upper()
        seq = SEQUENCE_LABELS.get(label)
        if seq is None:
            raise InputError(f"{c}_seq_type: unknown sequence label {label!r} (expected one "
                             f"of {', '.join(SEQUENCE_LABELS)})", path=source)
        vals = {k: _number(f.get(k), f"{c}_{k}", source) for k in ("TR", "TE", "TI", "FA")}
        need = ["TR", "TE"] + (["TI"] if seq in ("flair", "irgre") else []) + (
            ["FA"] if seq in ("gre", "irgre") else [])
        missing = [f"{c}_{k}" for k in need if vals[k] is None]
        if missing:
            raise InputError(f"no {', '.join(missing)} for the {c} ({label}): the protocol "
                             "needs " + ", ".join(f"{c}_{k}" for k in need), path=source)
        te_factor = _te_factor(c, vals["TE"])  # type: ignore[arg-type]
        try:
            proto = physics.Protocol(seq, vals["TR"], vals["TE"], ti_ms=vals["TI"],  # type: ignore[arg-type]
                                     fa_deg=vals["FA"], te_correction=te_factor)
            ref = physics.wm_reference_signal(proto)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{c}: invalid protocol ({exc})", path=source) from None
        if not (np.isfinite(ref) and ref > 0):
            raise InputError(f"{c}: the protocol gives no white-matter signal ({proto})",
                             path=source)
        out[ROLE[c]] = {"role": ROLE[c], **proto.as_dict(), "sequence_label": label}
    return out


# ---------------------------------------------------------------------------------------------
# masks and the staged session
# ---------------------------------------------------------------------------------------------


def _header(path: Path, what: str) -> tuple[tuple[int, ...], np.ndarray]:
    import nibabel as nib

    if not Path(path).is_file():
        raise InputError(f"{what} not found", path=path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{what} is not a readable NIfTI ({type(exc).__name__})",
                         path=path) from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, np.asarray(img.affine, np.float64)


def _check_grid(ref: tuple[tuple[int, ...], np.ndarray], path: Path, what: str,
                ref_name: str) -> None:
    shape, aff = _header(path, what)
    if shape != ref[0]:
        raise InputError(f"{what} shape {shape} differs from the {ref_name} {ref[0]}",
                         path=path)
    if not np.allclose(aff, ref[1], atol=1e-3):
        raise InputError(f"{what} is not on the grid of the {ref_name} (different affine)",
                         path=path)


def _dseg_from_masks(masks: Mapping[str, Path], ref: tuple[tuple[int, ...], np.ndarray],
                     ref_name: str) -> np.ndarray:
    """1 GM, 2 WM, 3 CSF from binary masks (non-zero = in; where they overlap the later of
    CSF, GM, WM wins)."""
    import nibabel as nib

    for t, p in masks.items():
        _check_grid(ref, p, f"{t} mask", ref_name)
    seg = np.zeros(ref[0], np.uint8)
    for t, label in (("CSF", 3), ("GM", 1), ("WM", 2)):
        data = np.asarray(nib.load(str(masks[t])).dataobj)
        seg[np.reshape(data, ref[0]) != 0] = label
    return seg


def stage_session(images: Mapping[str, str | Path], brain_mask: str | Path,
                  work_dir: str | Path, *, subject: str, session: str,
                  protocol: Mapping[str, Mapping[str, Any]],
                  protocol_source: Path | None = None, dseg: str | Path | None = None,
                  tissue_masks: Mapping[str, str | Path] | None = None) -> SessionFiles:
    """Check the inputs and write the protocol JSON (and the dseg built from WM/GM/CSF masks)
    into ``work_dir``; returns the session's files. Raises a one-line InputError on a missing
    or unreadable file, a grid that differs from the first image's, missing protocol values, or
    both a dseg and tissue masks."""
    if not images:
        raise InputError("no input image: give at least one of --t1w, --t2w, --flair")
    contrasts = tuple(c for c in CONTRASTS if c in images)
    first = contrasts[0]
    paths = {c: Path(images[c]) for c in contrasts}
    ref = _header(paths[first], first)
    if len(ref[0]) != 3:
        raise InputError(f"{first} must be 3D, got shape {ref[0]}", path=paths[first])
    for c in contrasts[1:]:
        _check_grid(ref, paths[c], c, first)
    _check_grid(ref, Path(brain_mask), "brain mask", first)
    if dseg is not None and tissue_masks:
        raise InputError("give either --dseg or --wm/--gm/--csf, not both")
    if tissue_masks:
        missing = [t for t in ("WM", "GM", "CSF") if t not in tissue_masks]
        if missing:
            raise InputError(f"tissue masks need WM, GM and CSF; missing {', '.join(missing)}")
    elif dseg is not None:
        _check_grid(ref, Path(dseg), "dseg", first)
    entries = protocol_entries(contrasts, protocol, protocol_source)
    label = f"sub-{subject}_ses-{session}"
    work = Path(work_dir)
    params = work / f"{label}_desc-protocol_params.json"
    dseg_path = Path(dseg) if dseg is not None else work / f"{label}_space-T2w_dseg.nii.gz"
    if tissue_masks:
        seg = _dseg_from_masks({t: Path(p) for t, p in tissue_masks.items()}, ref, first)
        save_nifti(dseg_path, seg, ref[1], {
            "Description": "tissue labels from the WM/GM/CSF masks given to infer-nifti",
            "Labels": {"1": "GM", "2": "WM", "3": "CSF"},
            "Sources": [Path(tissue_masks[t]) for t in ("WM", "GM", "CSF")]}, dtype=np.uint8)
    write_json(params, {"session": label, **entries,
                        "source": "infer-nifti: " + (protocol_source.name if protocol_source
                                                    else "command-line values")})
    pre = work / f"{label}_space-T2w"
    return SessionFiles(
        label=label, subject=subject, session=session,
        images={c: paths.get(c, work / f"absent_{c}.nii.gz") for c in CONTRASTS},
        brain_mask=Path(brain_mask), params=params, dseg=dseg_path,
        wm_eroded=Path(f"{pre}_label-WM_desc-eroded_mask.nii.gz"),
        gm_eroded=Path(f"{pre}_label-GM_desc-eroded_mask.nii.gz"))
