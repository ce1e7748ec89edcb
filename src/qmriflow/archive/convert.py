"""The one place the pipeline runs dcm2niix: DICOM series folder -> NIfTI + BIDS sidecar.

dcm2niix runs with BIDS sidecars (``-b y``), anonymised sidecars (``-ba y``, plus ``-c ""``
so the NIfTI ``aux_file`` does not carry ImageComments), gzip (``-z y``), no cropping
(``-x n``), and ``-g i`` so a user's ``~/.dcm2nii.ini`` cannot change its behaviour. It
writes into a fresh hidden folder inside ``out_dir``; results are moved into ``out_dir`` only
when dcm2niix exited 0 and produced at least one NIfTI, so a failed conversion leaves
nothing behind.

Sidecar times stay in seconds, as dcm2niix writes them; :func:`sidecar_times_ms` converts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError, ToolError
from ..io import sidecar_path, write_json

__all__ = [
    "ConvertedImage",
    "dcm2niix_version",
    "find_dcm2niix",
    "run_dcm2niix",
    "sidecar_times_ms",
]

logger = logging.getLogger(__name__)

#: dcm2niix ``-f`` tokens allowed in output names. Everything that can carry patient or
#: visit identity (%n name, %i patient ID, %g accession, %x study ID, %f folder name,
#: %b file basename, %t date/time, %c comments, %j/%k/%o UIDs) is refused.
ALLOWED_NAME_TOKENS = frozenset("sdpemvzuar")

# dcm2niix exit codes (nii_dicom_batch.h) that mean "the input is bad", not "the tool is".
_INPUT_EXIT_CODES = {
    2: "no valid DICOM images found",
    4: "corrupt DICOM file",
    5: "input folder invalid",
    8: "some images converted, some failed",
    10: "incomplete volumes",
}
# Exit 1 is dcm2niix's generic failure; these messages show the input is at fault.
_INPUT_FAULT = re.compile(
    r"not large enough|corrupt|truncat|Unable to find any DICOM|No valid DICOM", re.IGNORECASE
)
_BORING = re.compile(
    r"^(Chris Rorden's dcm2nii|Defaults ignored|Found \d+ DICOM|Conversion required|"
    r"Compression will be faster)",
    re.IGNORECASE,
)
_PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                 "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName")
_NIFTI_RE = re.compile(r"\.nii(\.gz)?$")


@dataclass
class ConvertedImage:
    """One NIfTI written by dcm2niix, its JSON sidecar and the sidecar's content."""

    nifti: Path
    sidecar: Path
    metadata: dict


def find_dcm2niix() -> str:
    """Path of the dcm2niix executable, or :class:`ToolError`.

    ``shutil.which`` first (also looking beside the running Python, for an unactivated
    venv). If that finds the ``dcm2niix`` wheel's Python launcher script, the wheel's own
    binary is used instead: same program, no extra Python process, and a timeout kill
    reaches the process that does the work.
    """
    candidates = [shutil.which("dcm2niix"),
                  shutil.which("dcm2niix", path=str(Path(sys.executable).parent))]
    package_bin = None
    with contextlib.suppress(ImportError, AttributeError):
        import dcm2niix  # the PyPI wheel

        package_bin = str(dcm2niix.bin_path)
    for cand in candidates:
        if not cand:
            continue
        if package_bin and os.access(package_bin, os.X_OK) and _is_python_launcher(cand):
            return package_bin
        return cand
    if package_bin and os.access(package_bin, os.X_OK):
        return package_bin
    raise ToolError("dcm2niix not found: install the 'dcm2niix' package or put it on PATH")


def _is_python_launcher(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]


@functools.lru_cache(maxsize=4)
def _version_of(exe: str) -> str:
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolError(f"cannot run dcm2niix ({exe}): {exc}") from None
    match = re.search(r"v\d+\.\d+\.\d+\S*", proc.stdout + proc.stderr)
    if not match:
        raise ToolError(f"cannot read dcm2niix version from {exe}")
    return match.group(0)


def dcm2niix_version() -> str:
    """Version string as dcm2niix reports it (``v1.0.20240202``; same as the sidecars'
    ``ConversionSoftwareVersion``)."""
    return _version_of(find_dcm2niix())


def sidecar_times_ms(meta: Mapping[str, Any]) -> dict[str, Any]:
    """RepetitionTime / EchoTime / InversionTime of a dcm2niix sidecar in ms (None if absent).

    A list-valued entry (some vendors) is converted element-wise.
    """

    def ms(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list | tuple):
            return [ms(v) for v in value]
        return round(float(value) * 1000.0, 9)

    return {key: ms(meta.get(key)) for key in ("RepetitionTime", "EchoTime", "InversionTime")}


def _check_filename(pattern: str) -> None:
    if not pattern or "/" in pattern or "\\" in pattern:
        raise ConfigError(f"dcm2niix filename pattern {pattern!r} must be a plain file name")
    tokens = re.findall(r"%(.?)", pattern)
    bad = sorted({t for t in tokens if t.lower() not in ALLOWED_NAME_TOKENS})
    if bad:
        raise ConfigError(
            f"dcm2niix filename pattern {pattern!r} uses %{', %'.join(bad)}; only "
            f"%{', %'.join(sorted(ALLOWED_NAME_TOKENS))} are allowed (no patient identifiers)"
        )


def _phi_strings(series_dir: Path, max_files: int = 5) -> list[str]:
    """Patient-identifying header values of the series, to scrub from messages and logs."""
    try:
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError
        from pydicom.multival import MultiValue
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return []
    found: set[str] = set()
    tried = 0
    for root, _dirs, files in os.walk(series_dir):
        for name in sorted(files):
            if tried >= max_files:
                break
            tried += 1
            try:
                ds = dcmread(Path(root) / name, stop_before_pixels=True,
                             specific_tags=list(_PHI_KEYWORDS))
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
                continue
            for kw in _PHI_KEYWORDS:
                value = ds.get(kw)
                if value is None:
                    continue
                values = list(value) if isinstance(value, MultiValue) else [value]
                for v in values:
                    text = str(v).strip()
                    if not text:
                        continue
                    found.add(text)
                    found.update(p.strip() for p in re.split(r"[\^=\s,]+", text))
            if found:
                break
        if tried >= max_files or found:
            break
    return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)


# Sidecar fields that can carry free text typed at the scanner console (some sites type the
# patient ID into StudyDescription): kept only when they contain no identifier.
def scrub_sidecar(meta: dict[str, Any], phi: list[str]) -> dict[str, Any]:
    """Remove every sidecar string value that contains a patient identifier of the series.

    dcm2niix's ``-ba y`` drops the patient fields themselves, but free-text fields
    (StudyDescription, ProcedureStepDescription, ImageComments, ...) may repeat them.
    """
    if not phi:
        return meta
    pats = [re.compile(re.escape(v), re.IGNORECASE) for v in phi]

    def dirty(v: Any) -> bool:
        if isinstance(v, str):
            return any(p.search(v) for p in pats)
        if isinstance(v, list):
            return any(dirty(x) for x in v)
        return False

    return {k: v for k, v in meta.items() if not dirty(v)}


def _scrub(text: str, phi: list[str]) -> str:
    for value in phi:
        text = re.sub(re.escape(value), "<redacted>", text, flags=re.IGNORECASE)
    return text


def _last_meaningful(stdout: str, stderr: str) -> str:
    """dcm2niix's most informative line: its last 'Error' line, else its last other line
    (stderr preferred), skipping the banner and progress chatter."""
    err = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not _BORING.match(ln)]
    out = [ln.strip() for ln in stdout.splitlines() if ln.strip() and not _BORING.match(ln)]
    for ln in reversed(err + out):
        if ln.lower().startswith("error"):
            return ln
    lines = err or out
    return lines[-1] if lines else "(no output)"


def _emit(log: Any, message: str) -> None:
    if log is None:
        logger.debug(message)
    elif isinstance(log, logging.Logger):
        log.info(message)
    elif isinstance(log, str | os.PathLike):
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(message + "\n")
    else:
        log(message)


def run_dcm2niix(
    series_dir: str | Path,
    out_dir: str | Path,
    *,
    filename: str = "%s_%d",
    compress: bool = True,
    anonymise: bool = True,
    timeout_s: float = 600,
    log: logging.Logger | Callable[[str], Any] | str | os.PathLike | None = None,
) -> list[ConvertedImage]:
    """Convert the DICOM series in ``series_dir`` to NIfTI + JSON sidecars in ``out_dir``.

    ``filename`` is dcm2niix's ``-f`` pattern (default series number + description; multi-
    echo series get ``_e1`` ... ``_eN`` appended by dcm2niix). Only tokens in
    :data:`ALLOWED_NAME_TOKENS` are accepted, so patient names/IDs never reach file names.
    ``log`` receives the command line and dcm2niix's output (PHI scrubbed): a
    :class:`logging.Logger`, a callable taking one string, or a path to append to; by
    default this module's logger.

    Returns one :class:`ConvertedImage` per NIfTI, sorted by file name (echo 2 before 10).
    Raises :class:`InputError` (bad/empty/corrupt series) or :class:`ToolError` (dcm2niix
    missing, crashed, timed out, produced nothing) with a one-line message naming the series
    folder and dcm2niix's last meaningful output line.
    """
    series_dir = Path(series_dir)
    out_dir = Path(out_dir)
    _check_filename(filename)
    if not series_dir.is_dir():
        raise InputError("DICOM series folder does not exist", path=series_dir)
    exe = find_dcm2niix()
    created_out_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".dcm2niix-", dir=out_dir))
    cmd = [
        exe, "-g", "i", "-b", "y", "-ba", "y" if anonymise else "n",
        "-z", "y" if compress else "n", "-x", "n", "-f", filename, "-o", str(work),
    ]
    if anonymise:
        cmd += ["-c", ""]  # empty comment: do not copy ImageComments into the NIfTI aux_file
    cmd.append(str(series_dir))
    try:
        _emit(log, "running: " + " ".join(repr(c) if c == "" else c for c in cmd))
        stdout, stderr, code = _run(cmd, timeout_s, series_dir)
        phi: list[str] | None = None

        def scrubbed(text: str) -> str:
            nonlocal phi
            if phi is None:
                phi = _phi_strings(series_dir)
            return _scrub(text, phi)

        output = (stdout.strip() + "\n" + stderr.strip()).strip()
        if output:
            _emit(log, scrubbed(output))
        niftis = sorted((p for p in work.iterdir() if _NIFTI_RE.search(p.name)),
                        key=lambda p: _natural_key(p.name))
        if code != 0:
            last = scrubbed(_last_meaningful(stdout, stderr))
            kind = _INPUT_EXIT_CODES.get(code)
            if kind is None and _INPUT_FAULT.search(stdout + "\n" + stderr):
                kind = "unreadable DICOM data"
            if kind is not None:
                raise InputError(f"dcm2niix: {kind} (exit {code}): {last}", path=series_dir)
            raise ToolError(f"dcm2niix failed (exit {code}): {last}", path=series_dir)
        if not niftis:
            last = scrubbed(_last_meaningful(stdout, stderr))
            raise InputError(f"dcm2niix produced no NIfTI: {last}", path=series_dir)
        for nii in niftis:
            if not sidecar_path(nii).is_file():
                raise ToolError(f"dcm2niix wrote {nii.name} without a JSON sidecar",
                                path=series_dir)
        results = []
        for produced in sorted(work.iterdir()):
            if produced.is_file():
                os.replace(produced, out_dir / produced.name)
        for nii in niftis:
            final = out_dir / nii.name
            side = sidecar_path(final)
            try:
                meta = json.loads(side.read_text())
            except (OSError, ValueError) as exc:
                raise ToolError(f"unreadable dcm2niix sidecar {side.name}: {exc}",
                                path=series_dir) from None
            if anonymise:
                if phi is None:
                    phi = _phi_strings(series_dir)
                meta = scrub_sidecar(meta, phi)
                write_json(side, meta)
            results.append(ConvertedImage(nifti=final, sidecar=side, metadata=meta))
        return results
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created_out_dir:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _run(cmd: list[str], timeout_s: float, series_dir: Path) -> tuple[str, str, int]:
    """Run dcm2niix in its own process group so a timeout kills everything it started."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise ToolError(f"cannot start dcm2niix: {exc}", path=series_dir) from None
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ToolError(f"dcm2niix timed out after {timeout_s:g} s", path=series_dir) from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    decode = functools.partial(bytes.decode, encoding="utf-8", errors="replace")
    return decode(out), decode(err), proc.returncode

