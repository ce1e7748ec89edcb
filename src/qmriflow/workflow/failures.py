"""Per-session failure records and the per-run failures table.

Every per-session step that fails with a :class:`~qmriflow.errors.QmriflowError` leaves a
small JSON record ``<failures_dir>/<session>__<step>.json`` (the one-line, PHI-free reason);
a later success of the same step removes it. ``qmriflow failures`` collects the records into
``failures.tsv`` at the end of every run (Snakemake ``onsuccess``/``onerror``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path
from typing import Any

from ..io import atomic_path, write_json

COLUMNS = ("session", "step", "reason", "time")


def _record_path(failures_dir: Path, session: str, step: str) -> Path:
    return Path(failures_dir) / f"{session}__{step}.json"


def record_failure(failures_dir: str | Path, session: str, step: str, reason: str) -> Path:
    p = _record_path(Path(failures_dir), session, step)
    return write_json(p, {"session": session, "step": step, "reason": " ".join(reason.split()),
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def clear_failure(failures_dir: str | Path, session: str, step: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(Path(failures_dir), session, step).unlink()


def collect(failures_dir: str | Path) -> list[dict[str, Any]]:
    d = Path(failures_dir)
    rows = []
    if d.is_dir():
        for p in sorted(d.glob("*__*.json")):
            with contextlib.suppress(OSError, ValueError):
                rows.append(json.loads(p.read_text()))
    return sorted(rows, key=lambda r: (r.get("session", ""), r.get("time", "")))


def write_failures_tsv(failures_dir: str | Path, out_tsv: str | Path) -> int:
    rows = collect(failures_dir)
    with atomic_path(out_tsv) as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return len(rows)
