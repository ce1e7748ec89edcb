"""The derivatives are a BIDS-derivatives dataset that pybids reads with its default settings
(issue 24 finding 11): metadata included, one T1map/T2map/PDmap per session with its Units,
TSV columns named as in BIDS (``participant_id``, ``session_id``), QC pages named and placed as
fMRIPrep and the other NiPreps place them (``sub-X_ses-Y.html`` at the top of the dataset),
a ``.bidsignore`` for everything that is not BIDS, a README and a complete
``dataset_description.json``.

The folder is made by the real writers (skull strip, segmentation, inference, synthesis,
provenance, stats, the two-start fat/water fit, reports, cohort, dataset description) on two
tiny sessions (about 20 s), not by hand.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from qmriflow.cli import main

from .test_sidecars import build_session, tiny_checkpoint

SESSIONS = (("N01", "V01", 3), ("N01", "V02", 4), ("N02", "V01", 5))


def _add_cse(anat: Path, prefix: str, tmp: Path, seed: int) -> None:
    """A multi-echo GRE series through the real two-start fit (``qmriflow cse-fit``)."""
    from .test_cse import TE, _phantom_series, _write_4d

    data, _body, _fat = _phantom_series(shape=(32, 28, 2), sigma=0.01, seed=seed)
    f = tmp / f"{prefix}_MEGRE.nii.gz"
    _write_4d(f, data, [t / 1000 for t in TE])
    sub, ses = prefix.split("_")[:2]
    assert main(["cse-fit", str(f), "--out", str(anat), "--prefix", prefix, "--method", "fit",
                 "--mask-threshold", "0.2", "--subject", sub[4:], "--session", ses[4:],
                 "--threads", "1"]) == 0


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("bids")
    root = base / "results"
    ckpt = tiny_checkpoint(base / "elsewhere" / "model.pt")
    (base / "echoes").mkdir()
    for sub, ses, seed in SESSIONS:
        sdir = build_session(base, root, sub, ses, seed, ckpt)["sdir"]
        shutil.rmtree(sdir / "truth")  # the tiny session's ground truth: a test artefact
        label = f"sub-{sub}_ses-{ses}"
        assert main(["stats", str(sdir), "--subject", sub, "--session", ses]) == 0
        _add_cse(sdir / "anat", f"{label}_acq-7", base / "echoes", seed)
        assert main(["report", str(sdir), str(root / f"{label}.html"), "--subject", sub,
                     "--session", ses]) == 0
    assert main(["cohort", str(root / "group"), "--results-dir", str(root)]) == 0
    assert main(["report-cohort", str(root / "group"), str(root / "reports" / "cohort.html")
                 ]) == 0
    (base / "failures").mkdir()
    assert main(["failures", str(base / "failures"), str(root / "failures.tsv")]) == 0
    assert main(["dataset-description", str(root), "--container",
                 "ghcr.io/qmriflow/qmriflow:0.1.0"]) == 0
    return root


def test_pybids_indexes_metadata_and_finds_one_map_per_session(results):
    from bids import BIDSLayout

    layout = BIDSLayout(results, is_derivative=True)  # default settings: metadata indexed
    assert layout.get_subjects() == ["N01", "N02"]
    assert sorted(layout.get_sessions()) == ["V01", "V02"]
    units = {"T1map": "s", "T2map": "s", "PDmap": "arbitrary"}
    for suffix, unit in units.items():
        found = layout.get(suffix=suffix, desc=None, extension=".nii.gz")
        assert sorted((f.entities["subject"], f.entities["session"]) for f in found) == sorted(
            (s, v) for s, v, _ in SESSIONS), suffix
        for f in found:
            assert f.get_metadata()["Units"] == unit
            assert f.entities["space"] == "T2w"
        # the uncertainty maps (same suffix) are told apart by their desc entity
        sd = layout.get(suffix=suffix, desc="uncertainty", extension=".nii.gz")
        assert len(sd) == len(SESSIONS) and sd[0].get_metadata()["Units"] == unit
    pdff = layout.get(suffix="PDFFmap", desc="fit", extension=".nii.gz")
    assert len(pdff) == len(SESSIONS)
    assert {f.entities["acquisition"] for f in pdff} == {"7"}
    assert pdff[0].get_metadata()["Units"] == "fraction (0-1)"
    r2s = layout.get(suffix="R2starmap", desc="fit", extension=".nii.gz")
    assert [f.get_metadata()["Units"] for f in r2s] == ["1/s"] * len(SESSIONS)
    # the tissue tables are found by their entities; their data dictionary is their metadata
    tsv = layout.get(subject="N01", session="V01", desc="tissue", suffix="stats",
                     extension=".tsv")
    assert len(tsv) == 1 and tsv[0].get_metadata()["T1_mean"]["Units"] == "s"


def test_tables_use_bids_column_names(results):
    files = sorted(results.glob("sub-*/ses-*/anat/*_desc-tissue_*.tsv")) + sorted(
        (results / "group").glob("*.tsv"))
    assert len(files) >= 2 * len(SESSIONS) + 6
    for f in files:
        cols = pd.read_csv(f, sep="\t", nrows=0).columns
        assert "subject" not in cols and "session" not in cols, f.name
    stats = pd.read_csv(next(results.glob("sub-N01/ses-V01/anat/*_desc-tissue_stats.tsv")),
                        sep="\t")
    assert list(stats.columns[:3]) == ["participant_id", "session_id", "tissue"]
    assert set(stats.participant_id) == {"sub-N01"} and set(stats.session_id) == {"ses-V01"}
    side = json.loads(next(results.glob("sub-N01/ses-V01/anat/*_desc-tissue_stats.json"))
                      .read_text())
    assert "participant_id" in side and "subject" not in side and "session" not in side
    cohort = pd.read_csv(results / "group" / "cohort_tissue_stats.tsv", sep="\t")
    assert sorted(set(zip(cohort.participant_id, cohort.session_id, strict=True))) == sorted(
        (f"sub-{s}", f"ses-{v}") for s, v, _ in SESSIONS)
    cse = pd.read_csv(results / "group" / "cohort_cse_stats.tsv", sep="\t")
    assert len(cse) == len(SESSIONS) and set(cse.participant_id) == {"sub-N01", "sub-N02"}


def test_reports_placed_as_fmriprep_and_bidsignore_covers_what_is_not_bids(results):
    # one page per session at the top of the dataset, named after the session
    pages = sorted(p.name for p in results.glob("*.html"))
    assert pages == sorted(f"sub-{s}_ses-{v}.html" for s, v, _ in SESSIONS)
    assert not list(results.glob("reports/sub-*"))
    patterns = [ln.strip() for ln in (results / ".bidsignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def ignored(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, p.rstrip("/") + ("/*" if p.endswith("/") else ""))
                   or fnmatch.fnmatch(Path(rel).name, p) for p in patterns)

    bids_top = {"dataset_description.json", "README.md", ".bidsignore"}
    for entry in results.iterdir():
        rel = entry.name + ("/x" if entry.is_dir() else "")
        if entry.name in bids_top or (entry.is_dir() and entry.name.startswith("sub-")):
            continue
        assert ignored(rel), entry.name
    for f in results.glob("sub-*/ses-*/*.json"):  # session-level records, not BIDS files
        assert ignored(f.relative_to(results).as_posix()), f.name
    # the BIDS files themselves are not ignored
    for f in results.glob("sub-*/ses-*/anat/*_T1map.nii.gz"):
        assert not ignored(f.relative_to(results).as_posix()), f.name


def test_dataset_description_and_readme(results):
    dd = json.loads((results / "dataset_description.json").read_text())
    assert dd["DatasetType"] == "derivative" and dd["BIDSVersion"]
    assert dd["Authors"] and all(isinstance(a, str) and a for a in dd["Authors"])
    gen = dd["GeneratedBy"][0]
    assert gen["Name"] == "qmriflow" and gen["Version"] and gen["CodeURL"].startswith("https")
    assert gen["Description"] and gen["Container"] == {
        "Type": "docker", "Tag": "ghcr.io/qmriflow/qmriflow:0.1.0"}
    readme = (results / "README.md").read_text()
    for word in ("T1map", "PDFFmap", "participant_id", ".bidsignore", "sub-<S>_ses-<V>.html"):
        assert word in readme
