"""From an archive (DICOM or BIDS) to two tables: pseudonymous sessions and their series.

This is the entry point of the workflow: its tables drive every later rule.

DICOM input (:func:`discover_dicom_tables`): the input folder is walked at any depth (hidden
files and folders are skipped, and so are obviously non-DICOM files such as ``*.txt``,
``*.json``, ``*.xml``, ``*.pdf``, images); only headers are read (pydicom, pixel data
skipped). Files are grouped into series by SeriesInstanceUID and series into sessions by
(PatientID, StudyInstanceUID). Each series is classified from its header
(:mod:`qmriflow.archive.classify`) and one series per role T1w/T2w/FLAIR is selected per
session, plus every multi-echo GRE series.

Session status (one line, ``sessions.tsv``):

* ``ok``;
* ``incomplete: no FLAIR series`` (or ``no T1w, T2w or FLAIR series``, ...);
* ``corrupt: file #<ref> in the folder of series <N>: <reason>`` when a file in one of the
  session's folders is damaged DICOM (truncated header or pixel data, or a ``*.dcm`` file
  that does not parse); ``<ref>`` is :func:`file_ref` of its path (``qmriflow locate`` finds
  it). A file that is not DICOM at all (no ``DICM`` preamble, no parsable data set, and not
  named ``*.dcm``/``*.ima``: a viewer's thumbnail, a lock file) is no series file: it is
  ignored with a warning in the log, by reference (``ignored file #<ref> in the folder of
  series <N>: not DICOM ...``).
  The workflow's first per-session job turns that status into a one-line error for that
  session only;
* ``deferred: files changed <N> s ago (quiet period <Q> s)`` when a quiet period is given and
  one of the session's files was written (modified or created, ``max(mtime, ctime)``) less
  than that long ago: the study is probably still arriving from the scanner or PACS. A
  deferred session has no series rows and gets no jobs; a later run picks it up.

Pseudonyms: subject = HMAC-SHA256(salt, PatientID) and session = HMAC-SHA256(salt,
StudyInstanceUID), first 10 hex digits (:func:`pseudonym`); a study without PatientID gets a
subject of its own (keyed on its StudyInstanceUID). PatientName/PatientID/PatientBirthDate and
the StudyInstanceUID are never written, and neither is any file or folder name of the archive
(exports name folders and files after the patient, often transliterated: ``MUELLER_J``,
``DOE_JANE_MRN123456_export.dcm``, which no header value matches). The ``folder`` column holds
a salted hash of each level of the series folder's path (:func:`folder_ref`;
:func:`series_files` resolves it with the salt, then keeps only the files of that series); a
file is named by a salted hash of its path, ``file #<12 hex>`` (:func:`file_ref`), in the
series' folder when it has one; ``qmriflow locate`` turns either back into the path, on the
operator's terminal. A series description holding a header identifier is redacted.
The ``series_uid`` column holds the SeriesInstanceUID (needed to separate several series
stored in one folder): keep ``series.tsv`` inside the work folder.

BIDS input (:func:`discover_bids`): see its docstring; subject/session labels are kept.

Long because discovery is one pass over the archive that applies the privacy rules (pseudonyms,
salted file and folder references, quiet-period deferral) to everything it reads; the parts
share that state.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import hmac
import json
import logging
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..io import atomic_path
from .classify import (
    REQUIRED_ROLES,
    SeriesHeader,
    classify_series,
    header_from_sidecar,
    select_session,
    summarise_headers,
)

__all__ = [
    "SERIES_COLUMNS",
    "SESSION_COLUMNS",
    "discover",
    "discover_bids",
    "discover_dicom",
    "discover_dicom_tables",
    "file_ref",
    "folder_ref",
    "is_deferred",
    "locate",
    "pseudonym",
    "read_series_tsv",
    "read_sessions_tsv",
    "series_files",
    "write_tables",
]

logger = logging.getLogger(__name__)

SESSION_COLUMNS = ("subject", "session", "status", "t1w", "t2w", "flair", "megre")
SERIES_COLUMNS = ("subject", "session", "series_id", "folder", "series_uid", "series_number",
                  "description", "n_files", "role", "sequence", "acquisition", "gadolinium",
                  "selected", "reason")

#: Header elements read from every file (pixel data is skipped, only its extent is checked).
HEADER_TAGS = (
    "SOPClassUID", "Modality", "PatientID", "PatientName", "PatientBirthDate",
    "OtherPatientIDs", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription", "ProtocolName", "SequenceName", "ScanningSequence", "SequenceVariant",
    "ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "InversionTime",
    "FlipAngle", "EchoTrainLength", "EchoNumbers", "ImageType", "ContrastBolusAgent",
    "ImageOrientationPatient", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
    "NumberOfFrames", "SeriesTime", "AcquisitionTime", "TemporalPositionIdentifier",
    "NumberOfTemporalPositions", "EchoPulseSequence", "InversionRecovery",
)
_PHI_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "OtherPatientIDs")
_GE_IMAGE_KIND = 0x0043102F  # GE private: 0 magnitude, 1 phase, 2 real, 3 imaginary
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, Float..., DoubleFloat...
_UNDEFINED = 0xFFFFFFFF
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
#: Files never taken for DICOM (so a README next to a series does not corrupt it).
NON_DICOM_SUFFIXES = frozenset({
    ".txt", ".md", ".rst", ".json", ".xml", ".csv", ".tsv", ".html", ".htm", ".pdf", ".log",
    ".ini", ".yaml", ".yml", ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".nii", ".bval",
    ".bvec", ".mat", ".py", ".sh", ".bat", ".exe", ".db",
})


def pseudonym(value: str, salt: str, n: int = 10) -> str:
    """Alphanumeric keyed hash of ``value`` (lower-case hex, ``n`` characters)."""
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:n]


_REF_HEX = 10
_FOLDER_REF = re.compile(rf"^[0-9a-f]{{{_REF_HEX}}}(/[0-9a-f]{{{_REF_HEX}}})*$")
_FILE_REF = re.compile(r"#?([0-9a-f]{12})")


def _folder_level(rel_prefix: str, salt: str) -> str:
    return pseudonym("folder\0" + rel_prefix, salt, _REF_HEX)


def folder_ref(rel: str, salt: str) -> str:
    """Non-identifying reference of an archive folder (``rel``: POSIX path relative to the
    archive root, ``.`` for the root): the salted hash of every level of the path, joined by
    ``/``, so that :func:`series_files` finds it again one folder listing per level."""
    if rel in ("", "."):
        return "."
    parts = rel.split("/")
    return "/".join(_folder_level("/".join(parts[: i + 1]), salt) for i in range(len(parts)))


def file_ref(rel: str, salt: str) -> str:
    """Non-identifying reference of an archive file: ``#`` and 12 hex digits of the salted
    hash of its path relative to the archive root (``qmriflow locate`` finds the file)."""
    return "#" + pseudonym("file\0" + rel, salt, 12)


def _resolve_folder_ref(root: Path, ref: str, salt: str) -> list[Path]:
    """Folders below ``root`` whose :func:`folder_ref` is ``ref`` (hidden folders skipped,
    symlinked folders followed), one folder listing per level."""
    if ref == ".":
        return [root]
    current = [(root, "")]
    for want in ref.split("/"):
        nxt = []
        for folder, rel in current:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                sub = f"{rel}/{e.name}" if rel else e.name
                if _folder_level(sub, salt) == want and e.is_dir():
                    nxt.append((Path(e.path), sub))
        current = nxt
    return [p for p, _rel in current]


def locate(input_dir: str | Path, ref: str, salt: str) -> list[Path]:
    """Paths below ``input_dir`` that a reference written by discovery stands for: a file
    (``#<12 hex>``, :func:`file_ref`) or a folder (:func:`folder_ref`, the ``folder`` column
    of ``series.tsv``). For the operator's terminal only: the result names archive files."""
    root = Path(input_dir)
    ref = ref.strip()
    if _FOLDER_REF.match(ref) and not ref.startswith("#"):
        found = _resolve_folder_ref(root, ref, salt)
        if found:
            return found
    m = _FILE_REF.fullmatch(ref)
    if not m:
        return []
    want = "#" + m.group(1)
    # the files discovery reads (and so can report), walked the same way (no symlink loops)
    return [p for p in _walk(root) if file_ref(_rel(p, root), salt) == want]


# ---------------------------------------------------------------------------------------------
# reading one file
# ---------------------------------------------------------------------------------------------


@dataclass
class _Bad:
    reason: str


@dataclass
class _Foreign:
    """A file that is not DICOM at all (ignored with a warning, see :func:`_not_dicom`)."""

    reason: str


#: Names that claim DICOM content: such a file that does not parse is a damaged DICOM file.
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})


def _not_dicom(path: Path) -> _Bad | _Foreign:
    """What a file without the ``DICM`` preamble and without a parsable raw data set is.

    Named as DICOM (:data:`DICOM_SUFFIXES`): a damaged DICOM file, which makes its session
    corrupt. Otherwise a foreign file that an export or a viewer left in the folder
    (``Thumbs.db``-like files, ``VERSION``, a screenshot without extension, a lock file): not
    part of any series, so it is ignored with a warning. A DICOM file that has the preamble but
    is cut short or unreadable is never foreign (:func:`_read_header`)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _Bad("not a DICOM file")
    return _Foreign("not DICOM (no DICM preamble, no parsable data set)")


def _plain(value: Any) -> Any:
    """pydicom value -> str / float / int / list of those."""
    from pydicom.multival import MultiValue

    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value
    if isinstance(value, int | float | str):
        # DSfloat/IS subclass float/int; str(PersonName) etc. below
        if isinstance(value, float):
            return float(value)
        if isinstance(value, int):
            return int(value)
        return str(value)
    return str(value)


def _ge_kind(raw: Any) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bytes):
        if len(raw) >= 2:
            return int.from_bytes(raw[:2], "little", signed=True)
        return None
    try:
        return int(raw[0] if isinstance(raw, list) else raw)
    except (TypeError, ValueError):
        return None


def _read_header(path: Path) -> dict[str, Any] | _Bad | _Foreign | None:
    """Header of one file as plain values; :class:`_Bad` if unreadable DICOM (truncated
    header or pixel data, or a DICOM-named file that does not parse); :class:`_Foreign` if not
    DICOM at all (:func:`_not_dicom`); None to skip (a DICOMDIR or another DICOM file that
    belongs to no series)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    tags: list[Any] = [*HEADER_TAGS, _GE_IMAGE_KIND, *_PIXEL_TAGS]
    forced = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                ds = pydicom.dcmread(path, defer_size=1024, specific_tags=tags)
            except InvalidDicomError:
                # No 'DICM' preamble: accept a raw data set only if it parses to real UIDs.
                forced = True
                ds = pydicom.dcmread(path, defer_size=1024, specific_tags=tags, force=True)
        except InvalidDicomError:
            return _not_dicom(path)
        except OSError as exc:
            return _Bad(f"cannot read file ({type(exc).__name__})")
        except Exception as exc:
            return (_not_dicom(path) if forced
                    else _Bad(f"unreadable DICOM header ({type(exc).__name__})"))
        try:
            values = {kw: _plain(ds.get(kw)) for kw in HEADER_TAGS}
            ge = ds.get_item(_GE_IMAGE_KIND, keep_deferred=True)
            values["GEImageKind"] = _ge_kind(getattr(ge, "value", None))
            pixel = next((ds.get_item(t, keep_deferred=True) for t in _PIXEL_TAGS
                          if t in ds), None)
            sop_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
        except Exception as exc:
            return (_not_dicom(path) if forced
                    else _Bad(f"unreadable DICOM header ({type(exc).__name__})"))
    study, series = values.get("StudyInstanceUID"), values.get("SeriesInstanceUID")
    if forced and not (isinstance(series, str) and _UID_RE.match(series)
                       and isinstance(study, str) and _UID_RE.match(study)):
        return _not_dicom(path)
    if sop_class == _MEDIA_DIRECTORY:
        return None
    if not study or not series:
        return _Bad("DICOM header incomplete (no Study/SeriesInstanceUID): truncated file?")
    if values.get("Rows") and values.get("Columns"):
        if pixel is None:
            return _Bad("truncated DICOM file: no pixel data")
        length = int(getattr(pixel, "length", 0) or 0)
        tell = getattr(pixel, "value_tell", None)
        if length != _UNDEFINED and tell is not None:
            size = path.stat().st_size
            if tell + length > size:
                return _Bad(f"truncated DICOM file: pixel data has {max(size - tell, 0)} of "
                            f"{length} bytes")
            frames = int(values.get("NumberOfFrames") or 1)
            expected = (int(values["Rows"]) * int(values["Columns"]) * frames
                        * int(values.get("SamplesPerPixel") or 1)
                        * int(values.get("BitsAllocated") or 16) // 8)
            if length < expected and values.get("BitsAllocated") not in (1, None):
                return _Bad(f"pixel data holds {length} bytes; Rows x Columns needs {expected}")
    return values


# ---------------------------------------------------------------------------------------------
# identifiers
# ---------------------------------------------------------------------------------------------


def _phi_strings(headers: Iterable[Mapping[str, Any]]) -> set[str]:
    """Identifying values (and their name components) that must not be written."""
    out: set[str] = set()
    for h in headers:
        for kw in (*_PHI_TAGS, "StudyInstanceUID"):
            v = h.get(kw)
            for item in v if isinstance(v, list) else [v]:
                text = str(item or "").strip()
                if not text:
                    continue
                out.add(text)
                out.update(p for p in re.split(r"[\^=\s,]+", text) if p)
    return {s for s in out if len(s) >= 3}


def _scrub_text(text: str, phi: Iterable[str]) -> str:
    for p in sorted(phi, key=len, reverse=True):
        text = re.sub(re.escape(p), "<redacted>", text, flags=re.IGNORECASE)
    return text


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").replace("\t", " ").split())


def _seconds(value: Any) -> float | None:
    """DICOM TM (HHMMSS.frac) -> seconds since midnight."""
    text = str(value or "").strip().replace(":", "")
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?$", text)
    if not m:
        return None
    h, mi, s, frac = m.groups()
    return int(h) * 3600 + int(mi or 0) * 60 + int(s or 0) + float(frac or 0)


# ---------------------------------------------------------------------------------------------
# DICOM discovery
# ---------------------------------------------------------------------------------------------


@dataclass
class _Series:
    uid: str
    files: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (rel path, header)


def _walk(root: Path) -> Iterable[Path]:
    """Non-hidden files below ``root`` (symlinked folders followed once: no loops)."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if Path(name).suffix.lower() in NON_DICOM_SUFFIXES or not path.is_file():
                continue
            yield path


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel or "."


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else "."


def _ancestors(folder: str) -> list[str]:
    out = [folder]
    while folder != ".":
        folder = _parent(folder)
        out.append(folder)
    return out


def _series_id(number: int, uid: str, salt: str, taken: set[str]) -> str:
    for n in (6, 10, 16, 64):
        sid = f"{max(number, 0):04d}{pseudonym(uid, salt, n)}"
        if sid not in taken:
            taken.add(sid)
            return sid
    raise InputError("two series share a SeriesInstanceUID")  # pragma: no cover


def _changed(path: Path) -> float:
    """When the file was last written: ``max(mtime, ctime)`` (a copy that preserves the
    modification time, e.g. ``cp -p`` or ``rsync -a``, still sets the change time)."""
    st = path.stat()
    return max(st.st_mtime, st.st_ctime)


def discover_dicom_tables(
    input_dir: str | Path, salt: str, quiet_period_s: float = 0.0, now: float | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sessions and series tables of a DICOM archive (see the module docstring).

    ``quiet_period_s`` > 0 defers every session with a file written less than that many
    seconds before ``now`` (default: the current time).
    """
    import time

    root = Path(input_dir)
    if not root.is_dir():
        raise InputError("input archive folder does not exist", path=root)
    now = time.time() if now is None else now
    sessions: dict[tuple[str, str], dict[str, _Series]] = defaultdict(dict)
    newest: dict[tuple[str, str], float] = defaultdict(float)
    bad: list[tuple[str, str, float]] = []
    foreign: list[tuple[str, str]] = []
    for path in _walk(root):
        rel = _rel(path, root)
        h = _read_header(path)
        if h is None:
            continue
        if isinstance(h, _Foreign):
            foreign.append((rel, h.reason))
            continue
        changed = _changed(path) if quiet_period_s > 0 else 0.0
        if isinstance(h, _Bad):
            bad.append((rel, h.reason, changed))
            continue
        study = str(h["StudyInstanceUID"])
        pid = str(h.get("PatientID") or "").strip()
        key = (pid if pid else f"study:{study}", study)
        series = sessions[key].setdefault(str(h["SeriesInstanceUID"]),
                                          _Series(str(h["SeriesInstanceUID"])))
        series.files.append((rel, h))
        newest[key] = max(newest[key], changed)
    labels = {key: (pseudonym(key[0], salt), pseudonym(key[1], salt)) for key in sessions}

    # folders -> sessions with series files there (directly / anywhere below)
    direct: dict[str, set] = defaultdict(set)
    below: dict[str, set] = defaultdict(set)
    for key, by_uid in sessions.items():
        for s in by_uid.values():
            for rel, _h in s.files:
                folder = _parent(rel)
                direct[folder].add(key)
                for a in _ancestors(folder):
                    below[a].add(key)
    corrupt: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for rel, reason, changed in bad:
        folder = _parent(rel)
        owners = direct.get(folder)
        if not owners:
            for a in _ancestors(folder):
                if below.get(a):
                    owners = below[a] if len(below[a]) == 1 else set()
                    break
        if owners:
            for key in owners:
                corrupt[key].append((rel, reason))
                newest[key] = max(newest[key], changed)
        else:
            logger.warning("unreadable file outside any one session's folders: file %s (%s)",
                           file_ref(rel, salt), reason)

    session_rows: list[dict[str, Any]] = []
    series_rows: list[dict[str, Any]] = []
    numbers_in: dict[tuple[tuple[str, str], str], set[int]] = defaultdict(set)
    for key in sorted(sessions, key=lambda k: labels[k]):
        subject, session = labels[key]
        age = now - newest[key]
        if quiet_period_s > 0 and age < quiet_period_s:
            session_rows.append({
                "subject": subject, "session": session,
                "status": f"deferred: files changed {max(age, 0):.0f} s ago "
                          f"(quiet period {quiet_period_s:.0f} s)",
            })
            continue
        by_uid = sessions[key]
        phi = _phi_strings(h for s in by_uid.values() for _r, h in s.files[:1])
        taken: set[str] = set()
        rows = []
        for uid, s in by_uid.items():
            headers = [h for _r, h in s.files]
            summary = summarise_headers(headers)
            c = classify_series(summary)
            ref = headers[0]
            number = _int_or_zero(ref.get("SeriesNumber"))
            folders = sorted({_parent(r) for r, _h in s.files})
            for f in folders:
                numbers_in[key, f].add(number)
            rows.append({
                "subject": subject, "session": session,
                "series_id": _series_id(number, uid, salt, taken),
                "folder": ";".join(folder_ref(f, salt) for f in folders),
                "series_uid": uid, "series_number": number,
                "description": _scrub_text(_one_line(summary.description), phi),
                "n_files": len(s.files), "role": c.role, "sequence": c.sequence,
                "acquisition": c.acquisition, "gadolinium": c.gadolinium,
                "selected": False, "reason": _scrub_text(c.reason, phi),
                # for selection only (not written)
                "n_images": summary.n_magnitude,
                "time_s": _series_time(headers),
                "gadolinium_reason": c.gadolinium_reason,
            })
        row, selected = _finish_session(subject, session, rows)
        if corrupt.get(key):
            files = sorted(corrupt[key])
            rel, reason = files[0]
            more = f" (and {len(files) - 1} more unreadable file(s))" if len(files) > 1 else ""
            near = sorted(numbers_in.get((key, _parent(rel)), ()))
            where = (f" in the folder of series {', '.join(map(str, near))}" if near else "")
            row["status"] = f"corrupt: file {file_ref(rel, salt)}{where}: {reason}{more}"
        session_rows.append(row)
        series_rows.extend(selected)
    for rel, reason in foreign:
        near = sorted({n for (_key, f), ns in numbers_in.items() if f == _parent(rel)
                       for n in ns})
        where = f" in the folder of series {', '.join(map(str, near))}" if near else ""
        logger.warning("ignored file %s%s: %s", file_ref(rel, salt), where, reason)
    return session_rows, series_rows


def _series_time(headers: Sequence[Mapping[str, Any]]) -> float | None:
    """SeriesTime (seconds since midnight), else the earliest AcquisitionTime."""
    t = _seconds(headers[0].get("SeriesTime")) if headers else None
    if t is not None:
        return t
    times = [x for x in (_seconds(h.get("AcquisitionTime")) for h in headers) if x is not None]
    return min(times) if times else None


def _int_or_zero(value: Any) -> int:
    try:
        f = float(value[0] if isinstance(value, list) else value)
    except (TypeError, ValueError, IndexError):
        return 0
    return int(f) if math.isfinite(f) else 0


def _finish_session(
    subject: str, session: str, rows: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    sel = select_session(rows)
    out = []
    for r in sorted(sel.rows, key=lambda r: (r["series_number"], r["series_id"])):
        if r["role"] == "ignored":
            r["reason"] = f"ignored: {r['reason']}"
        r["reason"] = _one_line(r["reason"])
        out.append({k: r[k] for k in SERIES_COLUMNS})
    row = {"subject": subject, "session": session, "status": _one_line(sel.status)}
    for role in (*REQUIRED_ROLES, "megre"):
        row[role] = ";".join(sel.chosen.get(role, []))
    return row, out


# ---------------------------------------------------------------------------------------------
# BIDS discovery
# ---------------------------------------------------------------------------------------------

_BIDS_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_BIDS_ANAT = re.compile(
    r"^(?P<stem>sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_(?P<suffix>T1w|T2w|FLAIR|MEGRE)"
    r"\.nii(\.gz)?$"
)
_BIDS_ROLE = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair", "MEGRE": "megre"}
BIDS_NO_SESSION = "01"
"""Session label used for a BIDS subject without ``ses-`` folders."""


def _entities(stem: str) -> dict[str, str]:
    return dict(part.split("-", 1) for part in stem.split("_"))


def bids_metadata(nifti: str | Path, root: str | Path) -> dict[str, Any]:
    """Sidecar metadata of a BIDS NIfTI, with the inheritance principle: JSON files of the same
    suffix whose entities are a subset of the image's, from the dataset root down to the
    image's folder (deeper files override)."""
    nifti, root = Path(nifti), Path(root)
    m = _BIDS_ANAT.match(nifti.name)
    if not m:
        raise InputError("not a BIDS anatomical image name", path=nifti)
    ents = _entities(m.group("stem"))
    suffix = m.group("suffix")
    merged: dict[str, Any] = {}
    parts = nifti.parent.relative_to(root).parts
    for i in range(len(parts) + 1):
        folder = root.joinpath(*parts[:i])
        for js in sorted(folder.glob(f"*{suffix}.json"), key=lambda p: len(p.name)):
            stem = js.name[: -len(f"_{suffix}.json")] if js.name != f"{suffix}.json" else ""
            try:
                jents = _entities(stem) if stem else {}
            except ValueError:
                continue
            if all(ents.get(k) == v for k, v in jents.items()):
                try:
                    merged.update(json.loads(js.read_text()))
                except (OSError, ValueError) as exc:
                    raise InputError(f"unreadable JSON sidecar ({type(exc).__name__})",
                                     path=js.relative_to(root)) from None
    return merged


def discover_bids(root: str | Path, salt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sessions and series tables of a BIDS dataset.

    Reads ``sub-<label>/[ses-<label>/]anat/*_{T1w,T2w,FLAIR}.nii[.gz]`` and
    ``*_echo-<n>[_part-mag]_MEGRE.nii[.gz]`` with their JSON sidecars (inheritance principle
    applied, :func:`bids_metadata`). Subject and session labels are **kept as they are** (a
    BIDS dataset is already de-identified; they are not hashed); a subject without session
    folders gets session ``01``. Role comes from the suffix; sequence family, acquisition and
    gadolinium (sidecar ContrastBolusAgent/ContrastBolusIngredient, ``ce-`` entity,
    description) from the sidecar, as for DICOM. ``folder`` is the image path relative to
    ``root`` (echo 1 for MEGRE), ``series_uid`` is empty, ``n_files`` counts NIfTI files,
    ``series_number`` is the sidecar's SeriesNumber (0 if absent). An unreadable or missing
    sidecar, or a MEGRE series with echoes missing, makes the session ``corrupt: ...``.
    ``salt`` keys the series ids.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("BIDS dataset folder does not exist", path=root)
    found: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sub_label = sub.name[4:]
        if not _BIDS_LABEL.match(sub_label):
            logger.warning("skipping %s: not a BIDS subject label", sub.name)
            continue
        ses_dirs = sorted(p for p in sub.glob("ses-*") if p.is_dir())
        places = [(s.name[4:], s / "anat") for s in ses_dirs] or [(BIDS_NO_SESSION,
                                                                   sub / "anat")]
        for ses_label, anat in places:
            if not _BIDS_LABEL.match(ses_label) or not anat.is_dir():
                continue
            for f in sorted(anat.iterdir()):
                if not f.name.startswith(".") and _BIDS_ANAT.match(f.name):
                    found[(sub_label, ses_label)].append(f)
    session_rows, series_rows = [], []
    for (subject, session), files in sorted(found.items()):
        rows, problems = _bids_series(root, subject, session, files, salt)
        row, out = _finish_session(subject, session, rows)
        if problems:
            rel, reason = sorted(problems)[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            row["status"] = f"corrupt: {rel}: {reason}{more}"
        session_rows.append(row)
        series_rows.extend(out)
    return session_rows, series_rows


def _bids_series(
    root: Path, subject: str, session: str, files: list[Path], salt: str
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    groups: dict[tuple[str, str], list[tuple[int, Path]]] = defaultdict(list)
    for f in files:
        m = _BIDS_ANAT.match(f.name)
        assert m is not None
        ents = _entities(m.group("stem"))
        suffix = m.group("suffix")
        if suffix == "MEGRE":
            if ents.get("part", "mag") != "mag":
                continue  # phase/real/imag parts are not used
            echo = ents.pop("echo", None)
            ents.pop("part", None)
            if echo is None or not echo.isdigit():
                continue
            key = ("_".join(f"{k}-{v}" for k, v in ents.items()), suffix)
            groups[key].append((int(echo), f))
        else:
            groups[(m.group("stem"), suffix)].append((1, f))
    rows: list[dict[str, Any]] = []
    problems: list[tuple[str, str]] = []
    taken: set[str] = set()
    for (stem, suffix), members in sorted(groups.items()):
        members.sort()
        first = members[0][1]
        rel = first.relative_to(root).as_posix()
        metas = []
        try:
            for _e, f in members:
                metas.append(bids_metadata(f, root))
        except InputError as exc:
            problems.append((exc.path or rel, exc.reason))
            continue
        meta = metas[0]
        if not meta:
            problems.append((rel, "no JSON sidecar"))
            continue
        echoes = [e for e, _f in members]
        if suffix == "MEGRE" and echoes != list(range(1, len(echoes) + 1)):
            problems.append((rel, f"MEGRE echoes {echoes} are not 1..{len(echoes)}"))
            continue
        tes = [float(m["EchoTime"]) * 1000.0 for m in metas
               if isinstance(m.get("EchoTime"), int | float)]
        n_img = _bids_n_images(first)
        h = header_from_sidecar(meta, echo_times_ms=tes if suffix == "MEGRE" else None,
                                n_images=n_img)
        ents = _entities(stem)
        if "ce" in ents and not h.contrast_agent:
            h = _with_agent(h, f"ce-{ents['ce']}")
        c = classify_series(h)
        role = _BIDS_ROLE[suffix]
        sequence = c.sequence if c.role == role else _default_sequence(role, h)
        why = c.reason if c.role == role else f"BIDS suffix {suffix}; header says: {c.reason}"
        number = _int_or_zero(meta.get("SeriesNumber"))
        rows.append({
            "subject": subject, "session": session,
            "series_id": _series_id(number, rel, salt, taken),
            "folder": rel, "series_uid": "", "series_number": number,
            "description": _one_line(meta.get("SeriesDescription") or stem),
            "n_files": len(members), "role": role, "sequence": sequence,
            "acquisition": h.acquisition, "gadolinium": c.gadolinium, "selected": False,
            "reason": why, "n_images": n_img,
            "time_s": _seconds(str(meta.get("AcquisitionTime") or "").replace(":", "")),
            "gadolinium_reason": c.gadolinium_reason,
        })
    return rows, problems


def _with_agent(h: SeriesHeader, agent: str) -> SeriesHeader:
    from dataclasses import replace

    return replace(h, contrast_agent=agent)


def _default_sequence(role: str, h: SeriesHeader) -> str:
    if role == "t1w":
        if (h.ti_ms or 0) > 0 or "IR" in h.scanning_sequence or "MP" in h.sequence_variant:
            return "irgre"
        return "se" if "SE" in h.scanning_sequence else "gre"
    return {"t2w": "tse", "flair": "flair", "megre": "megre"}[role]


def _bids_n_images(nifti: Path) -> int:
    """Number of 2-D images (slices × volumes) in a NIfTI, from its header only."""
    try:
        import nibabel as nib

        shape = nib.load(str(nifti)).shape
    except Exception:
        return 0
    n = 1
    for d in shape[2:]:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def discover(
    input_dir: str | Path, salt: str, input_format: str = "dicom", quiet_period_s: float = 0.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(sessions rows, series rows) of a DICOM archive or a BIDS dataset.

    ``quiet_period_s`` (DICOM only): defer sessions with files written more recently.

    Session rows: :data:`SESSION_COLUMNS`; series rows: :data:`SERIES_COLUMNS` (typed:
    ``series_number``/``n_files`` int, ``gadolinium``/``selected`` bool).
    """
    if not salt:
        raise ConfigError("pseudonym salt must not be empty")
    if input_format == "dicom":
        return discover_dicom_tables(input_dir, salt, quiet_period_s=quiet_period_s)
    if input_format == "bids":
        return discover_bids(input_dir, salt)
    raise ConfigError(f"input_format must be 'dicom' or 'bids', got {input_format!r}")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return _one_line(value)


def _write_tsv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in columns])


def write_tables(
    sessions: Sequence[Mapping[str, Any]],
    series: Sequence[Mapping[str, Any]],
    sessions_tsv: str | Path,
    series_tsv: str | Path,
) -> tuple[Path, Path]:
    """Write both tables (tab-separated, header row, booleans ``true``/``false``), atomically."""
    _write_tsv(series, SERIES_COLUMNS, Path(series_tsv))
    _write_tsv(sessions, SESSION_COLUMNS, Path(sessions_tsv))
    return Path(sessions_tsv), Path(series_tsv)


def is_deferred(session_row: Mapping[str, Any]) -> bool:
    """True for a session that discovery deferred (files still changing)."""
    return str(session_row.get("status", "")).startswith("deferred")


def read_sessions_tsv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def read_series_tsv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``series.tsv``, typed as :func:`discover` returns them."""
    rows = read_sessions_tsv(path)
    for r in rows:
        for k in ("series_number", "n_files"):
            if k in r:
                r[k] = _int_or_zero(r[k])
        for k in ("gadolinium", "selected"):
            if k in r:
                r[k] = str(r[k]).strip().lower() == "true"
    return rows


def _series_folders(root: Path, folder_field: str, salt: str | None) -> list[Path]:
    out: list[Path] = []
    for folder in filter(None, (f.strip() for f in str(folder_field).split(";"))):
        literal = root / folder
        if folder == ".":
            out.append(root)
        elif _FOLDER_REF.match(folder):
            if salt is None:
                raise ConfigError("the series table names folders by salted hashes: the "
                                  "pseudonym salt is needed to find them")
            out.extend(_resolve_folder_ref(root, folder, salt))
        elif literal.is_dir():  # tables written before folders were hashed
            out.append(literal)
        elif "*" in folder:
            out.extend(Path(p) for p in sorted(glob.glob(str(glob.escape(str(root)) + "/"
                                                              + folder)))
                       if Path(p).is_dir())
    return out


def series_files(input_dir: str | Path, series_row: Mapping[str, Any],
                 salt: str | None = None) -> list[Path]:
    """Exactly the files of one series: those in its folder(s) whose SeriesInstanceUID is the
    row's (so several series sharing a folder are separated), sorted by name. ``salt``: the
    pseudonym salt of the discovery, which hashed the folders (:func:`folder_ref`). For a BIDS row
    (no ``series_uid``) the series' NIfTI files: the magnitude echoes of a MEGRE series in
    echo order (``part-phase`` files left out)."""
    root = Path(input_dir)
    uid = str(series_row.get("series_uid") or "")
    if not uid:
        nifti = root / str(series_row["folder"])
        m = re.search(r"_echo-\d+", nifti.name)
        if m and nifti.name.endswith(("_MEGRE.nii", "_MEGRE.nii.gz")):
            pat = glob.escape(nifti.name[: m.start()]) + "_echo-*" + glob.escape(
                nifti.name[m.end():])
            echoes = [p for p in nifti.parent.glob(pat)
                      if ("_part-" not in p.name or "_part-mag" in p.name)
                      and re.search(r"_echo-(\d+)_", p.name)]
            return sorted(echoes, key=lambda p: int(re.search(r"_echo-(\d+)_", p.name)[1]))
        return [nifti] if nifti.is_file() else []
    import pydicom

    out = []
    for folder in _series_folders(root, str(series_row.get("folder", "")), salt):
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            if p.suffix.lower() in NON_DICOM_SUFFIXES:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = pydicom.dcmread(p, stop_before_pixels=True,
                                         specific_tags=["SeriesInstanceUID"])
                except Exception:
                    continue
            if str(ds.get("SeriesInstanceUID", "")) == uid:
                out.append(p)
    return sorted(set(out))


# ---------------------------------------------------------------------------------------------
# earlier interface
# ---------------------------------------------------------------------------------------------


def discover_dicom(input_dir: str | Path, salt: str) -> list[dict[str, Any]]:
    """Session rows of a DICOM archive (:func:`discover` without the series table)."""
    return discover_dicom_tables(input_dir, salt)[0]
