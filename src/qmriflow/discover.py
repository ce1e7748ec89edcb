"""Walk a DICOM archive, group series into sessions by StudyInstanceUID, pseudonymise.

This is the entry point of the workflow: its sessions table (TSV) drives every later rule.
Subject and session labels are keyed hashes (HMAC-SHA256 with a secret salt) of PatientID and
StudyInstanceUID: stable for an archive, never the identifiers themselves. Series
classification by header (T1w/T2w/FLAIR/multi-echo GRE) is added by the preprocessing step.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import atomic_path

HEADER_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
               "SeriesDescription", "Modality")
SESSION_COLUMNS = ("subject", "session", "n_series", "series_dirs")


def pseudonym(value: str, salt: str, n: int = 10) -> str:
    """Alphanumeric keyed hash of ``value`` (lower-case hex, ``n`` characters)."""
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:n]


def _read_header(path: Path) -> Any | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return None


def discover_dicom(input_dir: str | Path, salt: str) -> list[dict[str, Any]]:
    """One row per session: pseudonymous subject/session and its series folders (relative)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError("input archive folder does not exist", path=root)
    sessions: dict[tuple[str, str], dict[str, Any]] = {}
    series_dirs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            if name.startswith("."):
                continue
            ds = _read_header(Path(dirpath) / name)
            if ds is None or not getattr(ds, "StudyInstanceUID", None):
                continue
            pid = str(getattr(ds, "PatientID", "") or "unknown")
            key = (pseudonym(pid, salt), pseudonym(str(ds.StudyInstanceUID), salt))
            sessions.setdefault(key, {"subject": key[0], "session": key[1]})
            series_dirs[key].add(str(Path(dirpath).relative_to(root)))
    rows = []
    for key in sorted(sessions):
        dirs = sorted(series_dirs[key])
        rows.append({**sessions[key], "n_series": len(dirs), "series_dirs": ";".join(dirs)})
    return rows


def write_sessions_tsv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SESSION_COLUMNS, delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def read_sessions_tsv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))
