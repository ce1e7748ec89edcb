"""Provenance: what ran, with which backend, version and parameters — per step and session.

Where paths go: the per-step files (:func:`write_step`, under the work folder's
``provenance/``) are operator logs, not shared derivatives, and keep the paths as the step
received them (absolute paths of the machine that ran it). The session's merged provenance
(``qmriflow provenance``, ``sub-X/ses-Y/<label>_desc-provenance.json`` in the derivatives)
and every NIfTI sidecar are shared: their file references are relative to the dataset
(``bids::sub-X/...``) or, for files outside it, the file name alone
(:func:`qmriflow.io.dataset_ref`).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .io import write_json

BIDS_VERSION = "1.10.0"


def package_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not installed"
    return out


def step_record(step: str, info: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "step": step,
        "qmriflow_version": __version__,
        "python": platform.python_version(),
        **dict(info),
    }


def write_step(path: str | Path, step: str, info: Mapping[str, Any]) -> Path:
    return write_json(path, step_record(step, info))


def merge_steps(paths: list[Path], session: str) -> dict[str, Any]:
    steps = {}
    for p in paths:
        rec = json.loads(Path(p).read_text())
        steps[rec.get("step", Path(p).stem)] = rec
    return {"session": session, "GeneratedBy": generated_by(), "steps": steps}


def generated_by(container: str | None = None) -> list[dict[str, Any]]:
    entry: dict[str, Any] = {
        "Name": "qmriflow",
        "Version": __version__,
        "CodeURL": "https://github.com/qmriflow/qmriflow",
    }
    if container:
        entry["Container"] = {"Type": "docker", "Tag": container}
    return [entry]


def write_dataset_description(out_dir: str | Path, container: str | None = None) -> Path:
    """BIDS-derivatives ``dataset_description.json`` of the output dataset."""
    return write_json(Path(out_dir) / "dataset_description.json", {
        "Name": "qmriflow derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by(container),
        "HowToAcknowledge": "Cite qmriflow and the methods it implements (see README).",
    })
