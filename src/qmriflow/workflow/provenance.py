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

from .. import __version__
from ..io import atomic_path, write_json

BIDS_VERSION = "1.10.0"
CODE_URL = "https://github.com/qmriflow/qmriflow"


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
    """BIDS ``GeneratedBy``: name, version, description, code URL and (if given) the
    container image the steps ran in."""
    entry: dict[str, Any] = {
        "Name": "qmriflow",
        "Version": __version__,
        "Description": "Routine brain MRI (DICOM archive) to quantitative maps: T1/T2/PD from "
                       "T1w/T2w/FLAIR (self-supervised physics-guided network) and fat/water "
                       "PDFF/R2*/S0 from multi-echo GRE magnitude; tissue statistics, cohort "
                       "tables and QC reports.",
        "CodeURL": CODE_URL,
    }
    if container:
        entry["Container"] = {"Type": "docker", "Tag": container}
    return [entry]


def authors() -> list[str]:
    """``Authors`` of the derivatives: the package's authors (its metadata)."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        meta = metadata("qmriflow")
    except PackageNotFoundError:
        return ["qmriflow developers"]
    names = [n.strip() for n in (meta.get("Author") or "").split(",") if n.strip()]
    email = meta.get("Author-email") or ""
    names += [n.split("<")[0].strip().strip('"') for n in email.split(",") if n.strip()]
    return names or ["qmriflow developers"]


#: ``.bidsignore`` of the derivatives: what is not BIDS (reports, cohort tables, model,
#: logs, run records and the per-session JSON records outside a datatype folder)
BIDSIGNORE = """\
# qmriflow outputs that are not BIDS files (bids-validator and pybids skip these)
*.html
reports/
group/
model/
logs/
failures.tsv
sub-*/ses-*/*_desc-protocol_params.json
sub-*/ses-*/*_desc-provenance.json
sub-*/ses-*/anat/*_cse.json
"""

DERIVATIVES_README = """\
# qmriflow derivatives

Made by qmriflow {version} ({url}) from a hospital's archive of routine brain MRI (DICOM).
A BIDS-derivatives dataset: pybids reads it as it is,
`bids.BIDSLayout(this_folder, is_derivative=True)`, e.g.
`layout.get(suffix="T1map", desc=None, extension=".nii.gz")` gives one T1 map per session
with its `Units` in the metadata.

## Labels

`sub-<S>` and `ses-<V>` are keyed hashes of the patient ID and the study UID: no patient name,
ID, birth date or archive file or folder name is in any path, sidecar, table or report.

## Per session: `sub-<S>/ses-<V>/`

- `anat/sub-<S>_ses-<V>_space-T2w_{{T1map,T2map,PDmap}}.nii.gz`: T1 and T2 in s, PD in
  arbitrary units (water = 1); `_desc-uncertainty_` their SD; each with a JSON sidecar
  (`Units`, `Description`, `Sources`, model checkpoint SHA-256).
- `anat/..._space-T2w_desc-preproc_{{T1w,T2w,FLAIR}}.nii.gz`, `_desc-brain_mask`, `_dseg`
  (1 GM, 2 WM, 3 CSF), `_label-<T>_probseg`, `_label-{{WM,GM}}_desc-eroded_mask`,
  `_desc-synth_` / `_desc-synthdiff_` (re-synthesised inputs and their difference, %).
- `anat/sub-<S>_ses-<V>_acq-<id>_desc-<method>_{{PDFFmap,R2starmap,S0map}}.nii.gz`: fat/water
  of each multi-echo GRE series (PDFF 0-1, R2* 1/s), `_choice` (1 water-, 2 fat-dominant),
  `_mask`, `_nll` and, where written, `_ambiguous`.
- `anat/..._space-T2w_desc-tissue_stats.tsv` (+ `.json` data dictionary): T1/T2/PD mean, SD,
  median per tissue (eroded WM, GM; CSF from the dseg, partial-volume dominated); columns
  `participant_id`, `session_id` as in BIDS.
- `sub-<S>_ses-<V>_desc-protocol_params.json`, `sub-<S>_ses-<V>_desc-provenance.json`:
  the validated protocol and what ran (not BIDS files; in `.bidsignore`).

## Reports and cohort (not BIDS; in `.bidsignore`)

- `sub-<S>_ses-<V>.html`: one self-contained QC page per session, at the top of this
  folder as fMRIPrep and the other NiPreps place their reports.
- `reports/cohort.html`: the cohort page; `group/`: cohort tables (TSV with JSON data
  dictionaries), protocol clusters, inter-group CV, PDFF/R2* per series, reproducibility.
- `failures.tsv`: sessions that failed, with a one-line reason each.
"""


def write_dataset_description(out_dir: str | Path, container: str | None = None) -> Path:
    """The BIDS-derivatives dataset files of the output folder: ``dataset_description.json``
    (Name, BIDSVersion, DatasetType, Authors, GeneratedBy, HowToAcknowledge), a ``README.md``
    describing the derivatives, and a ``.bidsignore`` naming what is not BIDS (reports,
    cohort tables, model, logs, failures table, per-session records)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in ((".bidsignore", BIDSIGNORE),
                       ("README.md", DERIVATIVES_README.format(version=__version__,
                                                               url=CODE_URL))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return write_json(out / "dataset_description.json", {
        "Name": "qmriflow derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "Authors": authors(),
        "GeneratedBy": generated_by(container),
        "HowToAcknowledge": "Cite qmriflow and the methods it implements (see README).",
    })
