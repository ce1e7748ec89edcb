"""Small I/O helpers shared by every step: atomic writes, NIfTI + JSON sidecars."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; elsewhere
    set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_created(path: str | Path, directory: bool = False) -> None:
    """Give ``path`` the mode an ordinary ``open``/``mkdir`` would have given it under the
    current umask (0644/0755 under umask 022, 0640/0750 under 027). ``tempfile.mkstemp``
    and ``mkdtemp`` create 0600/0700 whatever the umask; their results that become outputs
    are passed through here, so colleagues (group, others) can read what the umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def make_temp_dir(prefix: str, dir: str | Path) -> Path:
    """``tempfile.mkdtemp`` in ``dir`` whose mode follows the umask (it becomes an output
    folder by rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    chmod_as_created(tmp, directory=True)
    return tmp


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.

    A step that fails half-way therefore never leaves a partial output where a complete one
    is expected. The temporary name keeps the suffixes of ``final`` (``.nii.gz``) so writers
    that infer the format from the name keep working. The file gets the mode the umask gives
    a new file (``mkstemp`` alone would leave it 0600), whether the writer writes into the
    temporary file or replaces it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=suffix or ".tmp",
                               dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        chmod_as_created(tmp_path)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def sidecar_path(nifti: str | Path) -> Path:
    """``x.nii.gz`` / ``x.nii`` -> ``x.json``."""
    p = Path(nifti)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


# ---------------------------------------------------------------------------------------------
# file references in shared derivatives
# ---------------------------------------------------------------------------------------------

BIDS_URI = "bids::"
"""Prefix of a file reference inside the derivatives dataset (a BIDS URI of the current
dataset: ``bids::sub-X/ses-Y/anat/sub-X_ses-Y_space-T2w_desc-brain_mask.nii.gz``)."""


def dataset_root_of(path: str | Path) -> Path | None:
    """The root of the BIDS (derivatives) dataset that holds ``path``: the parent of its
    nearest ancestor folder named ``sub-<label>``; else (a dataset-level file such as
    ``group/cohort.json`` or ``model/hyperparameters.json``) the nearest ancestor holding a
    ``dataset_description.json`` or a ``sub-<label>`` folder; None when there is none."""
    p = Path(os.path.abspath(path))
    for a in p.parents:
        if a.name.startswith("sub-") and len(a.name) > 4:
            return a.parent
    for a in p.parents:
        if (a / "dataset_description.json").is_file() or any(
                c.is_dir() for c in a.glob("sub-?*")):
            return a
    return None


def dataset_ref(path: str | Path, root: str | Path | None) -> str:
    """How a shared derivative (a sidecar, the session's provenance) names a file.

    Inside the dataset ``root``: a BIDS URI relative to the root, ``bids::sub-X/ses-Y/anat/
    <name>`` (the same on every machine that holds a copy of the dataset). Outside it (a model
    checkpoint elsewhere, the archive, the work folder): the file name alone, since the folder
    is the machine's and may identify people or sites; where a checksum matters the writer
    records it beside the name (``ModelCheckpointSHA256``). Never an absolute path."""
    p = Path(os.path.abspath(path))
    if root is not None:
        r = Path(os.path.abspath(root))
        if p == r or r in p.parents:
            return BIDS_URI + (p.relative_to(r).as_posix() if p != r else "")
    return p.name


def portable_paths(obj: Any, root: str | Path | None, *, existing: bool = False) -> Any:
    """``obj`` (JSON-like) with every file reference made :func:`dataset_ref`: each
    :class:`~pathlib.Path` value and each string that is an absolute path; with ``existing``
    also each string holding a ``/`` that names an existing file or folder relative to the
    current folder (paths as a workflow rule received them)."""
    if isinstance(obj, Mapping):
        return {k: portable_paths(v, root, existing=existing) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [portable_paths(v, root, existing=existing) for v in obj]
    if isinstance(obj, Path):
        return dataset_ref(obj, root)
    if isinstance(obj, str) and obj and "\n" not in obj and (
            os.path.isabs(obj) or (existing and "/" in obj and os.path.exists(obj))):
        return dataset_ref(obj, root)
    return obj


def save_nifti(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    sidecar: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
) -> Path:
    """Save an array as NIfTI (sform = qform = ``affine``, RAS mm) plus optional JSON sidecar.

    The sidecar is a shared derivative: its file references (``Path`` values, absolute path
    strings) are written relative to the dataset that holds ``path`` (:func:`portable_paths`,
    :func:`dataset_ref`), never as the absolute paths of the machine that ran the step."""
    import nibabel as nib

    arr = np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    if sidecar is not None:
        write_json(sidecar_path(path), portable_paths(sidecar, dataset_root_of(path)))
    return Path(path)
