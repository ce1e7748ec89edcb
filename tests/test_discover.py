"""Archive discovery: classification, selection, corrupt/incomplete sessions, pseudonyms, BIDS."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from qmriflow.archive.convert import run_dcm2niix
from qmriflow.archive.discover import (
    SERIES_COLUMNS,
    SESSION_COLUMNS,
    bids_metadata,
    discover,
    file_ref,
    folder_ref,
    locate,
    pseudonym,
    read_series_tsv,
    read_sessions_tsv,
    series_files,
    write_tables,
)
from qmriflow.errors import ConfigError
from qmriflow.phantom.generate import CANARY, CANARY_BIRTH_DATE
from tests.conftest import SHARED_DATA

SALT = "discover-test-salt"
REAL = SHARED_DATA / "dicom"
needs_real = pytest.mark.skipif(not REAL.is_dir(),
                                reason=f"real DICOM test data not found at {REAL}")


@pytest.fixture(scope="module")
def tables(phantom_archive):
    return discover(phantom_archive / "dicom", SALT)


def _by_uid(series_rows):
    return {r["series_uid"]: r for r in series_rows}


# ---------------------------------------------------------------------------------------------
# the phantom archive
# ---------------------------------------------------------------------------------------------


def test_every_phantom_series_is_classified_as_the_manifest_says(tables, manifest):
    _sessions, series = tables
    assert len(series) == len(manifest["series"])
    by_uid = _by_uid(series)
    for m in manifest["series"]:
        r = by_uid[m["series_instance_uid"]]
        role = "t1w" if m["role"] == "t1w_gd" else m["role"]
        assert (r["role"], r["sequence"]) == (role, m["protocol"]["sequence"]), m["dicom_dir"]
        assert r["acquisition"] == m["MRAcquisitionType"]
        assert r["gadolinium"] is bool(m["ContrastBolusAgent"]), m["dicom_dir"]
        assert r["folder"] == folder_ref(m["dicom_dir"].removeprefix("dicom/"), SALT)
        assert r["n_files"] == m["n_files"]
        assert r["selected"] is (m["role"] != "t1w_gd")
        if m["role"] == "t1w_gd":
            assert r["reason"].startswith("T1w after gadolinium")
        assert re.fullmatch(r"\d{4}[0-9a-f]{6}", r["series_id"])
        assert list(r) == list(SERIES_COLUMNS)


def test_each_phantom_session_selects_its_series(tables, manifest):
    sessions, series = tables
    by_uid = _by_uid(series)
    assert len(sessions) == 4
    expected: dict[str, dict[str, list[str]]] = {}
    for m in manifest["series"]:
        r = by_uid[m["series_instance_uid"]]
        if m["role"] != "t1w_gd":
            expected.setdefault(r["session"], {}).setdefault(m["role"], []).append(
                r["series_id"])
    for s in sessions:
        assert list(s) == list(SESSION_COLUMNS)
        assert s["status"] == "ok"
        want = expected[s["session"]]
        for role in ("t1w", "t2w", "flair", "megre"):
            assert s[role] == ";".join(sorted(want[role])), (s, role)
    # two subjects, two sessions each, grouped by PatientID / StudyInstanceUID
    assert len({s["subject"] for s in sessions}) == 2
    studies = {m["study_instance_uid"] for m in manifest["series"]}
    assert {s["session"] for s in sessions} == {pseudonym(u, SALT) for u in studies}


def test_tables_round_trip_without_identifiers(tables, manifest, tmp_path):
    sessions, series = tables
    write_tables(sessions, series, tmp_path / "sessions.tsv", tmp_path / "series.tsv")
    assert read_sessions_tsv(tmp_path / "sessions.tsv") == sessions
    assert read_series_tsv(tmp_path / "series.tsv") == series
    text = (tmp_path / "sessions.tsv").read_text() + (tmp_path / "series.tsv").read_text()
    assert CANARY not in text and CANARY_BIRTH_DATE not in text
    for m in manifest["series"]:  # hash input of the session label
        assert m["study_instance_uid"] not in text
    assert all(len(line.split("\t")) == len(SERIES_COLUMNS)
               for line in (tmp_path / "series.tsv").read_text().splitlines())


# ---------------------------------------------------------------------------------------------
# real scanner data
# ---------------------------------------------------------------------------------------------

REAL_EXPECTED = {
    "ge_mprage_3d": ("t1w", "irgre", "3D"),
    "philips_mprage_3d": ("t1w", "irgre", "3D"),
    "siemens_xa30_tfl_3d": ("t1w", "irgre", "3D"),
    "siemens_t1_fl2d_HFS": ("t1w", "gre", "2D"),
    "siemens_t1_fl2d_HFDL": ("t1w", "gre", "2D"),
    "philips_dualecho_ffe": ("megre", "megre", "3D"),
}


@needs_real
def test_real_series_are_classified():
    sessions, series = discover(REAL, SALT)
    found = {}
    for r in series:
        files = series_files(REAL, r, SALT)
        assert len(files) == r["n_files"]
        folders = {f.parent.name for f in files}
        assert len(folders) == 1
        found[folders.pop()] = r
    assert set(found) == set(REAL_EXPECTED)
    for folder, (role, sequence, acq) in REAL_EXPECTED.items():
        r = found[folder]
        assert (r["role"], r["sequence"], r["acquisition"]) == (role, sequence, acq), folder
        assert r["selected"] and not r["gadolinium"]
    assert "2 echoes" in found["philips_dualecho_ffe"]["reason"]
    assert found["philips_dualecho_ffe"]["n_files"] == 212  # magnitude and phase, 2 echoes
    # the Philips MPRAGE and dual-echo FFE belong to one study
    ph = found["philips_mprage_3d"]
    assert (ph["subject"], ph["session"]) == (found["philips_dualecho_ffe"]["subject"],
                                            found["philips_dualecho_ffe"]["session"])
    sess = {(s["subject"], s["session"]): s for s in sessions}
    s = sess[(ph["subject"], ph["session"])]
    assert (s["t1w"], s["megre"]) == (ph["series_id"], found["philips_dualecho_ffe"]["series_id"])
    assert all(s["status"] == "incomplete: no T2w or FLAIR series" for s in sessions)


# ---------------------------------------------------------------------------------------------
# edge cases on small copies of the phantom
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini(phantom_archive, manifest, tmp_path_factory):
    """The phantom archive with 3 images per series (one per echo for the multi-echo GRE)."""
    dest = tmp_path_factory.mktemp("mini") / "archive"
    for m in manifest["series"]:
        files = sorted((phantom_archive / m["dicom_dir"]).glob("IM_*.dcm"))
        n_echo = len(m["protocol"].get("echo_times_ms") or [1])
        pick = files[:: len(files) // n_echo] if n_echo > 1 else files[:3]
        out = dest / m["dicom_dir"].removeprefix("dicom/")
        out.mkdir(parents=True)
        for f in pick:
            shutil.copy(f, out / f.name)
    return dest


@pytest.fixture
def archive(mini, tmp_path):
    dest = tmp_path / "archive"
    shutil.copytree(mini, dest)
    return dest


def _status(sessions, series, folder_prefix):
    """Status of the session whose series live under ``folder_prefix``."""
    ref = folder_ref(folder_prefix, SALT) + "/"  # a folder's ref prefixes those below it
    keys = {(r["subject"], r["session"]) for r in series if r["folder"].startswith(ref)}
    assert len(keys) == 1, folder_prefix
    return next(s["status"] for s in sessions if (s["subject"], s["session"]) in keys)


def test_unreadable_files_make_only_their_session_corrupt(archive, tmp_path):
    rng = np.random.default_rng(5)
    (archive / "S001/V01/03_T2W_TSE_C/IM_9998.dcm").write_bytes(rng.bytes(4000))
    good = sorted((archive / "S001/V02/04_3D_FLAIR_C").glob("IM_*.dcm"))[0].read_bytes()
    (archive / "S001/V02/04_3D_FLAIR_C/IM_9999.dcm").write_bytes(good[:900])  # header cut
    good = sorted((archive / "S002/V01/02_T1W_3D_FFE").glob("IM_*.dcm"))[0].read_bytes()
    (archive / "S002/V01/02_T1W_3D_FFE/IM_9999.dcm").write_bytes(good[: len(good) * 3 // 5])
    # not DICOM, but not a series file either: ignored
    (archive / "S002/V02/02_T1W_3D_FFE/.DS_Store").write_bytes(rng.bytes(100))
    (archive / "S002/V02/02_T1W_3D_FFE/README.txt").write_text("notes\n")
    sessions, series = discover(archive, SALT)
    # the file is named by a salted hash of its path (and the series whose folder holds it),
    # never by its name: `qmriflow locate` finds it
    expect = {
        "S001/V01": ("S001/V01/03_T2W_TSE_C/IM_9998.dcm", "in the folder of series 3\\d\\d: "),
        "S001/V02": ("S001/V02/04_3D_FLAIR_C/IM_9999.dcm", "in the folder of series 4\\d\\d: "),
        "S002/V01": ("S002/V01/02_T1W_3D_FFE/IM_9999.dcm",
                     "in the folder of series 2\\d\\d: truncated DICOM file"),
    }
    for prefix, (rel, rest) in expect.items():
        status = _status(sessions, series, prefix)
        assert re.match(f"corrupt: file {file_ref(rel, SALT)} {rest}", status), status
        assert "IM_" not in status and "S00" not in status and "FLAIR_C" not in status
        assert "\n" not in status and "\t" not in status
        assert locate(archive, status.split()[2], SALT) == [archive / rel]
    assert _status(sessions, series, "S002/V02") == "ok"
    # the corrupt sessions still list their series
    assert sum(r["folder"].startswith(folder_ref("S001/V01", SALT) + "/") for r in series) == 4
    write_tables(sessions, series, tmp_path / "s.tsv", tmp_path / "r.tsv")
    back = read_sessions_tsv(tmp_path / "s.tsv")
    assert sorted(s["status"][:8] for s in back) == ["corrupt:"] * 3 + ["ok"]


def test_foreign_files_in_a_series_folder_are_ignored_with_a_warning(archive, caplog):
    """Issue 24 finding 5: one stray non-DICOM file in a series folder made the whole session
    corrupt. A file without the DICM preamble and without a parsable data set (and not named
    *.dcm) is no series file; a DICOM file cut short still is, whatever its name."""
    rng = np.random.default_rng(11)
    t2 = archive / "S001/V01/03_T2W_TSE_C"
    (t2 / "Thumbs").write_bytes(rng.bytes(2500))  # a viewer's cache without its .db
    (t2 / "VERSION").write_text("PACS export 4.2\n")
    (t2 / "SCREENSHOT").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(3000))  # a JPEG
    (t2 / "LOCK").write_bytes(b"")
    good = sorted((archive / "S001/V02/04_3D_FLAIR_C").glob("IM_*.dcm"))[0].read_bytes()
    (archive / "S001/V02/04_3D_FLAIR_C/IM9999").write_bytes(good[:900])  # header cut
    caplog.set_level("WARNING", logger="qmriflow")
    sessions, series = discover(archive, SALT)
    assert _status(sessions, series, "S001/V01") == "ok"
    t2_row = next(r for r in series if r["folder"] == folder_ref("S001/V01/03_T2W_TSE_C", SALT))
    assert len(series_files(archive, t2_row, SALT)) == t2_row["n_files"]
    assert not any(str(f.name) in ("Thumbs", "VERSION", "SCREENSHOT", "LOCK")
                   for f in series_files(archive, t2_row, SALT))
    for name in ("Thumbs", "VERSION", "SCREENSHOT", "LOCK"):
        ref = file_ref(f"S001/V01/03_T2W_TSE_C/{name}", SALT)
        assert re.search(rf"ignored file {ref} in the folder of series 3\d\d: not DICOM",
                         caplog.text), caplog.text
    for word in ("Thumbs", "VERSION", "SCREENSHOT", "LOCK", "S001", "T2W"):
        assert word not in caplog.text
    status = _status(sessions, series, "S001/V02")
    ref = file_ref("S001/V02/04_3D_FLAIR_C/IM9999", SALT)
    assert status.startswith(f"corrupt: file {ref} in the folder of series 4"), status
    assert sum(s["status"] == "ok" for s in sessions) == 3


def test_session_without_flair_is_incomplete(archive):
    shutil.rmtree(archive / "S002/V02/04_3D_FLAIR")
    sessions, series = discover(archive, SALT)
    assert _status(sessions, series, "S002/V02") == "incomplete: no FLAIR series"
    row = next(s for s in sessions if s["status"] != "ok")
    assert row["flair"] == "" and row["t1w"] and row["t2w"]
    assert sum(s["status"] == "ok" for s in sessions) == 3


def test_two_series_in_one_folder_are_separated(archive):
    t1_dir, t2_dir = archive / "S001/V01/02_T1W_3D_FFE", archive / "S001/V01/03_T2W_TSE_C"
    moved = []
    for f in sorted(t1_dir.iterdir()):
        moved.append(t2_dir / f"T1_{f.name}")
        f.rename(moved[-1])
    t1_dir.rmdir()
    t2_files = sorted(p for p in t2_dir.iterdir() if p.name.startswith("IM_"))
    sessions, series = discover(archive, SALT)
    rows = [r for r in series if r["folder"] == folder_ref("S001/V01/03_T2W_TSE_C", SALT)]
    assert sorted(r["role"] for r in rows) == ["t1w", "t2w"]
    by_role = {r["role"]: r for r in rows}
    assert series_files(archive, by_role["t1w"], SALT) == sorted(moved)
    assert series_files(archive, by_role["t2w"], SALT) == t2_files
    with pytest.raises(ConfigError, match="salt"):
        series_files(archive, by_role["t1w"])
    assert _status(sessions, series, "S001/V01") == "ok"


def test_nesting_depth_does_not_matter(archive, tmp_path):
    flat = discover(archive, SALT)
    deep = tmp_path / "deep"
    for i, sess in enumerate(sorted(archive.glob("S*/V*"))):
        target = deep / ("a/b/c/d/e" if i % 2 else "x") / f"{sess.parent.name}{sess.name}"
        shutil.copytree(sess, target)
    nested = discover(deep, SALT)
    assert nested[0] == flat[0]
    strip = [{k: v for k, v in r.items() if k != "folder"} for r in flat[1]]
    assert [{k: v for k, v in r.items() if k != "folder"} for r in nested[1]] == strip


def test_pseudonyms_depend_on_the_salt_and_hide_identifiers(archive):
    a, _ = discover(archive, "salt-a")
    b, _ = discover(archive, "salt-b")
    assert len(a) == len(b) == 4
    assert not {s["subject"] for s in a} & {s["subject"] for s in b}
    assert not {s["session"] for s in a} & {s["session"] for s in b}
    ids = {f"{CANARY}{11:04d}{i:04d}" for i in (1, 2)}  # the phantom's PatientIDs
    assert {s["subject"] for s in a} == {pseudonym(i, "salt-a") for i in ids}
    for s in a:
        assert s["subject"] not in ids and re.fullmatch(r"[0-9a-f]{10}", s["subject"])
    with pytest.raises(ConfigError):
        discover(archive, "")


def test_identifiers_in_folder_names_are_not_written(archive, tmp_path):
    pid = f"{CANARY}{11:04d}0001"
    (archive / "S001").rename(archive / f"{pid}_{CANARY_BIRTH_DATE}")
    sessions, series = discover(archive, SALT)
    ref = folder_ref(f"{pid}_{CANARY_BIRTH_DATE}", SALT)
    mine = [r for r in series if r["folder"].startswith(ref + "/")]
    assert len(mine) == 8  # both sessions of subject 1
    for r in mine:
        assert CANARY not in r["folder"] and CANARY_BIRTH_DATE not in r["folder"]
        files = series_files(archive, r, SALT)
        assert len(files) == r["n_files"] and all(pid in str(f) for f in files)
    write_tables(sessions, series, tmp_path / "s.tsv", tmp_path / "r.tsv")
    for f in ("s.tsv", "r.tsv"):
        text = (tmp_path / f).read_text()
        assert CANARY not in text and CANARY_BIRTH_DATE not in text


def test_names_in_archive_paths_never_reach_tables_or_logs(archive, tmp_path, caplog):
    """Issue 24: exports name folders and files after the patient, spelt as no header value
    is (MUELLER for Müller); discovery must not copy a single name into its tables or log."""
    from .phi import phi_hits, phi_hits_in_text

    (archive / "S001/V01/02_T1W_3D_FFE").rename(archive / "S001/V01/MÜLLER_T1W")
    (archive / "S001/V01").rename(archive / "S001/Muller Jurgen 1961-04-23")
    (archive / "S001").rename(archive / "MUELLER_JUERGEN_MRN778899")
    t2 = archive / "MUELLER_JUERGEN_MRN778899/Muller Jurgen 1961-04-23/03_T2W_TSE_C"
    for k, f in enumerate(sorted(t2.glob("IM_*.dcm"))):
        f.rename(t2 / f"DOE_JANE_MRN123456_{k}.dcm")
    rng = np.random.default_rng(7)
    (t2 / "JUERGEN_MUELLER_19610423.dcm").write_bytes(rng.bytes(3000))  # corrupt
    (archive / "DOE_JANE_MRN123456_export.dcm").write_bytes(rng.bytes(3000))  # stray, root
    caplog.set_level("DEBUG", logger="qmriflow")
    sessions, series = discover(archive, SALT)
    write_tables(sessions, series, tmp_path / "s.tsv", tmp_path / "r.tsv")
    hits, n = phi_hits([tmp_path], skip=[archive])
    assert n == 2 and not hits, hits
    assert not phi_hits_in_text(caplog.text), caplog.text
    # ... yet the operator finds every file: series by their hashed folders, the corrupt file
    # and the stray one by the references in the status and in the log
    assert all(len(series_files(archive, r, SALT)) == r["n_files"] for r in series)
    status = next(s["status"] for s in sessions if s["status"] != "ok")
    assert re.fullmatch(r"corrupt: file #[0-9a-f]{12} in the folder of series \d+: .+", status)
    assert locate(archive, status.split()[2], SALT) == [t2 / "JUERGEN_MUELLER_19610423.dcm"]
    stray = re.search(r"file (#[0-9a-f]{12})", caplog.text)
    assert stray and locate(archive, stray[1], SALT) == [archive / "DOE_JANE_MRN123456_export.dcm"]
    # a stray file beside the only study (its ancestor) becomes the study's status: by reference
    only = tmp_path / "only"
    shutil.copytree(archive / "S002/V01", only / "DOE_JANE_MRN123456" / "1975-01-02")
    (only / "DOE_JANE_MRN123456_export.dcm").write_bytes(rng.bytes(3000))
    sessions, series = discover(only, SALT)
    assert len(sessions) == 1 and sessions[0]["status"].startswith("corrupt: file #")
    write_tables(sessions, series, tmp_path / "s.tsv", tmp_path / "r.tsv")
    hits, _n = phi_hits([tmp_path], skip=[archive, only])
    assert not hits and not phi_hits_in_text(caplog.text), hits


# ---------------------------------------------------------------------------------------------
# BIDS input
# ---------------------------------------------------------------------------------------------


def _put(conv, dest: Path, name: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(conv.nifti, dest / f"{name}.nii.gz")
    shutil.copy(conv.sidecar, dest / f"{name}.json")


@pytest.fixture(scope="module")
def bids(mini, manifest, tmp_path_factory):
    """sub-01/ses-01: T1w, post-Gd T1w (ce-gd), T2w, FLAIR, 6-echo MEGRE (+ phase part);
    sub-02 (no session folder): T1w, T2w; sub-03/ses-a: T1w without sidecar."""
    work = tmp_path_factory.mktemp("bidsconv")
    root = tmp_path_factory.mktemp("bids") / "ds"
    rows = {m["role"]: m for m in manifest["series"] if m["dicom_dir"].startswith(
        "dicom/S002/V01/")}
    conv = {role: run_dcm2niix(mini / m["dicom_dir"].removeprefix("dicom/"), work / role)
            for role, m in rows.items()}
    anat = root / "sub-01/ses-01/anat"
    _put(conv["t1w"][0], anat, "sub-01_ses-01_T1w")
    _put(conv["t1w_gd"][0], anat, "sub-01_ses-01_ce-gd_T1w")
    _put(conv["t2w"][0], anat, "sub-01_ses-01_T2w")
    _put(conv["flair"][0], anat, "sub-01_ses-01_FLAIR")
    for e, c in enumerate(conv["megre"], start=1):
        _put(c, anat, f"sub-01_ses-01_echo-{e}_MEGRE")
    _put(conv["megre"][0], anat, "sub-01_ses-01_echo-1_part-phase_MEGRE")
    _put(conv["t1w"][0], root / "sub-02/anat", "sub-02_T1w")
    _put(conv["t2w"][0], root / "sub-02/anat", "sub-02_T2w")
    _put(conv["t1w"][0], root / "sub-03/ses-a/anat", "sub-03_ses-a_T1w")
    (root / "sub-03/ses-a/anat/sub-03_ses-a_T1w.json").unlink()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion":
                                                               "1.9.0"}))
    return root, rows


def test_bids_dataset(bids, tmp_path):
    root, manifest_rows = bids
    sessions, series = discover(root, SALT, input_format="bids")
    assert [(s["subject"], s["session"]) for s in sessions] == [("01", "01"), ("02", "01"),
                                                                ("03", "a")]
    s1, s2, s3 = sessions
    assert s1["status"] == "ok"
    assert s2["status"] == "incomplete: no FLAIR series"
    assert s3["status"] == "corrupt: sub-03/ses-a/anat/sub-03_ses-a_T1w.nii.gz: no JSON sidecar"
    rows = {Path(r["folder"]).name: r for r in series if r["subject"] == "01"}
    t1 = rows["sub-01_ses-01_T1w.nii.gz"]
    gd = rows["sub-01_ses-01_ce-gd_T1w.nii.gz"]
    me = rows["sub-01_ses-01_echo-1_MEGRE.nii.gz"]
    assert len(rows) == 5  # the phase part is not a series of its own
    assert (t1["role"], t1["sequence"], t1["acquisition"], t1["selected"]) == ("t1w", "gre",
                                                                               "3D", True)
    assert gd["gadolinium"] and not gd["selected"] and gd["reason"].startswith(
        "T1w after gadolinium")
    assert (me["role"], me["sequence"], me["n_files"], me["selected"]) == ("megre", "megre",
                                                                           6, True)
    assert rows["sub-01_ses-01_T2w.nii.gz"]["sequence"] == "tse"
    assert rows["sub-01_ses-01_T2w.nii.gz"]["gadolinium"] is bool(
        manifest_rows["t2w"]["ContrastBolusAgent"])
    assert rows["sub-01_ses-01_FLAIR.nii.gz"]["sequence"] == "flair"
    assert s1["t1w"] == t1["series_id"] and s1["megre"] == me["series_id"]
    assert all(r["series_uid"] == "" for r in series)
    assert t1["folder"] == "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"
    echoes = series_files(root, me)
    assert [p.name for p in echoes] == [f"sub-01_ses-01_echo-{e}_MEGRE.nii.gz"
                                        for e in range(1, 7)]
    assert series_files(root, t1) == [root / t1["folder"]]
    write_tables(sessions, series, tmp_path / "s.tsv", tmp_path / "r.tsv")
    assert read_series_tsv(tmp_path / "r.tsv") == series


def test_bids_sidecar_inheritance(bids):
    root, _ = bids
    nii = root / "sub-02/anat/sub-02_T2w.nii.gz"
    own = json.loads((root / "sub-02/anat/sub-02_T2w.json").read_text())
    (root / "T2w.json").write_text(json.dumps({"InheritedField": 1, "EchoTime": 9}))
    try:
        meta = bids_metadata(nii, root)
    finally:
        (root / "T2w.json").unlink()
    assert meta["InheritedField"] == 1 and meta["EchoTime"] == own["EchoTime"]


def test_unknown_input_format(tmp_path):
    with pytest.raises(ConfigError, match="input_format"):
        discover(tmp_path, SALT, input_format="nifti")
    assert not os.listdir(tmp_path)
