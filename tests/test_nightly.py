"""Nightly incremental runs (`qmriflow nightly`) over a growing phantom archive.

Fast unit tests (quiet period, completion marker, lock) and one end-to-end sequence:

* night 1: 2 sessions in the archive -> both processed;
* 3 sessions added (one with a truncated DICOM file) and, just before night 2, a 4th study
  still "being written" -> night 2 processes exactly the 2 good new ones, reports the corrupt
  one with its reason, defers the fresh one and recomputes nothing of night 1;
* night 3 (picks up the deferred study) is killed with SIGKILL mid-way, after a second
  instance started meanwhile was turned away by the lock; night 4 resumes and finishes: the
  resumed session's outputs equal those of the identical study processed uninterrupted on
  night 2 (same pixel data and geometry, new UIDs), bit for bit;
* the corrupt session is retried up to nightly.max_attempts (2 here) and then left out.

The model is a fixed, untrained width-4 network (nightly runs need a fixed checkpoint) and
preprocessing runs at 2 mm on a 112 x 112 grid: map and preprocessing accuracy are not what is
tested here (test_pipeline checks those at the default resolution). The fat/water series is
left out of the archive (the CSE rules are per series and covered by test_workflow_cse).
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from qmriflow.archive.discover import discover_dicom_tables, file_ref, pseudonym
from qmriflow.errors import ConfigError
from qmriflow.workflow.nightly import EXIT_LOCKED, run_nightly, write_done_marker

from .conftest import REPO, rewrite_study, tool_env

SALT = "nightly-test-salt"
QUIET_S = 20.0


def _copy_session(src: Path, dst: Path) -> Path:
    """Copy a phantom session's T1w/T2w/FLAIR series folders (not the fat/water series)."""
    dst.mkdir(parents=True)
    for d in sorted(src.iterdir()):
        if any(k in d.name for k in ("T1W", "T2W", "FLAIR")):
            shutil.copytree(d, dst / d.name)
    return dst


def _label(folder: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True)
    return (f"sub-{pseudonym(str(ds.PatientID), SALT)}_"
            f"ses-{pseudonym(str(ds.StudyInstanceUID), SALT)}")


# ---------------------------------------------------------------------------------------------
# unit tests
# ---------------------------------------------------------------------------------------------


def test_quiet_period_defers_recent_studies(phantom_archive: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    _copy_session(phantom_archive / "dicom" / "S001" / "V01", archive / "A")
    _copy_session(phantom_archive / "dicom" / "S002" / "V01", archive / "B")
    now = time.time()
    # files were written just now: deferred with a 1-hour quiet period ...
    rows, series = discover_dicom_tables(archive, SALT, quiet_period_s=3600.0, now=now)
    assert len(rows) == 2 and series == []
    assert all(r["status"].startswith("deferred: files changed") for r in rows)
    # ... and complete two hours later, or with no quiet period
    later, series_later = discover_dicom_tables(archive, SALT, quiet_period_s=3600.0,
                                                now=now + 7200)
    plain, series_plain = discover_dicom_tables(archive, SALT)
    assert [r["status"] for r in plain] == ["ok", "ok"] and len(series_plain) >= 6
    assert [r["status"] for r in later] == ["ok", "ok"] and series_later == series_plain
    # only the study with a recent file is deferred (mtime and ctime both count: an old
    # mtime kept by `cp -p` does not hide a fresh copy)
    old = now - 7200
    for f in (archive / "A").rglob("*"):
        os.utime(f, (old, old))
    rows, _ = discover_dicom_tables(archive, SALT, quiet_period_s=600.0, now=now + 1200)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    rows, _ = discover_dicom_tables(archive, SALT, quiet_period_s=600.0, now=now + 60)
    assert all(r["status"].startswith("deferred") for r in rows)


def test_done_marker_lists_outputs_with_hashes(tmp_path: Path) -> None:
    root = tmp_path / "results"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.txt").write_bytes(b"abc")
    (root / "y.bin").write_bytes(b"")
    out = write_done_marker(tmp_path / "done" / "sub-1_ses-1.json",
                            [root / "y.bin", root / "a" / "x.txt"], root, "sub-1_ses-1")
    m = json.loads(out.read_text())
    assert m["session"] == "sub-1_ses-1"
    assert m["outputs"] == [
        {"path": "a/x.txt", "bytes": 3,
         "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"path": "y.bin", "bytes": 0,
         "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
    ]
    with pytest.raises(FileNotFoundError):
        write_done_marker(tmp_path / "done" / "b.json", [root / "missing"], root, "b")


def test_missing_checkpoint_stops_before_any_work(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"input_dir": str(tmp_path / "archive"),
                                   "output_dir": "results", "work_dir": "work",
                                   "pseudonym_salt": SALT,
                                   "model": {"checkpoint": "absent/model.pt"}}))
    with pytest.raises(ConfigError, match="checkpoint not found") as exc:
        run_nightly(cfg, directory=tmp_path, cores=1)
    assert "absent/model.pt" in str(exc.value)
    assert not (tmp_path / "work" / "nightly" / "state.json").exists()
    assert not (tmp_path / "results").exists()


def test_second_instance_is_turned_away(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"input_dir": str(tmp_path / "archive"),
                                   "output_dir": "results", "work_dir": "work",
                                   "pseudonym_salt": SALT,
                                   "model": {"checkpoint": "model.pt"}}))
    lock = tmp_path / "work" / "nightly" / "nightly.lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.write(json.dumps({"pid": 4242, "started": "2026-01-01T02:00:00"}) + "\n")
        fh.flush()
        rc = run_nightly(cfg, directory=tmp_path, cores=1)
    assert rc == EXIT_LOCKED
    out = capsys.readouterr().out
    assert "another nightly run is in progress" in out and "pid 4242" in out
    assert not (tmp_path / "work" / "nightly" / "state.json").exists()
    assert not (tmp_path / ".snakemake").exists()


def test_nightly_needs_a_fixed_model(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"input_dir": str(tmp_path), "pseudonym_salt": SALT}))
    with pytest.raises(ConfigError, match="fixed model"):
        run_nightly(cfg, directory=tmp_path)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def _nightly_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "qmriflow", "nightly", "--configfile", str(cfg),
            "--cores", "2"]


def _night(root: Path, cfg: Path) -> tuple[int, str, list[dict[str, str]]]:
    """One nightly run; (exit status, output, the night's report rows)."""
    reports = root / "results" / "reports" / "nightly"
    before = set(reports.glob("*.tsv")) if reports.is_dir() else set()
    time.sleep(1.1)  # report file names have 1-s resolution
    res = subprocess.run(_nightly_cmd(cfg), cwd=root, env=tool_env(), capture_output=True,
                         text=True, timeout=1200)
    new = sorted(set(reports.glob("*.tsv")) - before) if reports.is_dir() else []
    rows: list[dict[str, str]] = []
    if new:
        with new[-1].open() as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    return res.returncode, res.stdout + res.stderr, rows


def _config(root: Path, quiet_min: float) -> Path:
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "input_dir": str(root / "archive"), "output_dir": "results", "work_dir": "work",
        "pseudonym_salt": SALT,
        "model": {"checkpoint": str(root / "model.pt"), "threads": 1},
        # small, fast preprocessing (as in test_slurm): 2 mm in-plane on a 112 x 112 grid
        "preprocessing": {"inplane_mm": 2.0, "matrix": 112},
        "skullstrip": {"backend": "deepbet"},
        "stats": {"repro": False},
        "nightly": {"quiet_period_min": quiet_min, "max_attempts": 2},
    }))
    return cfg


def _by_status(rows: list[dict[str, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["status"], set()).add(r["session"])
    return out


def _jobs(log: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job Snakemake started, from its printed output."""
    jobs, rule = [], None
    for line in log.splitlines():
        s = line.strip()
        if s.startswith(("rule ", "localrule ", "checkpoint ", "localcheckpoint ")):
            rule = s.split()[1].rstrip(":")
            jobs.append((rule, ""))
        elif s.startswith("wildcards:") and jobs:
            jobs[-1] = (jobs[-1][0], s.split(":", 1)[1].strip())
    return jobs


def _mtimes(root: Path, label: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob(f"{label}*") if p.is_file()}


@pytest.fixture(scope="module")
def nights(phantom_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    from qmriflow.model.checkpoint import FORMAT, save_checkpoint
    from qmriflow.model.network import SharedAttnUNet

    root = tmp_path_factory.mktemp("nightly")
    src = phantom_archive / "dicom"
    archive = root / "archive"
    torch.manual_seed(0)
    save_checkpoint(root / "model.pt", {"format": FORMAT, "width": 4,
                                        "state_dict": SharedAttnUNet(4).state_dict()})
    res: dict = {"root": root}

    # night 1: two sessions
    first = [_copy_session(src / "S001" / "V01", archive / "S001" / "V01"),
             _copy_session(src / "S002" / "V01", archive / "S002" / "V01")]
    res["first"] = [_label(d) for d in first]
    cfg = _config(root, 0.0)
    res["n1"] = _night(root, cfg)
    res["cohort1"] = (root / "results" / "group" / "cohort_tissue_stats.tsv").read_text()
    res["mtimes1"] = {s: _mtimes(root / "results", s) for s in res["first"]}

    # three more: two good, one with a truncated T2w file
    good = [_copy_session(src / "S001" / "V02", archive / "S001" / "V02"),
            _copy_session(src / "S002" / "V02", archive / "S002" / "V02")]
    bad = _copy_session(src / "S001" / "V02", archive / "S001" / "X01")
    rewrite_study(bad, "nightly-corrupt")
    victim = sorted(next(bad.glob("*T2W*")).glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:2000])
    res["good"] = [_label(d) for d in good]
    res["bad"] = _label(bad)
    # failures name the file by a salted hash of its path, never by its name
    res["victim"] = file_ref(victim.relative_to(archive).as_posix(), SALT)
    time.sleep(QUIET_S + 2)
    # ... and a study still arriving when night 2 starts: same images as S002/V02, new UIDs
    late = _copy_session(src / "S002" / "V02", archive / "S002" / "V03")
    rewrite_study(late, "nightly-late")
    res["late"] = _label(late)
    res["late_twin"] = _label(good[1])
    cfg = _config(root, QUIET_S / 60.0)
    res["n2"] = _night(root, cfg)
    res["mtimes2"] = {s: _mtimes(root / "results", s) for s in res["first"]}
    res["cohort2"] = (root / "results" / "group" / "cohort_tissue_stats.tsv").read_text()

    # night 3: picks up the late study; a second instance is turned away; SIGKILL mid-way
    time.sleep(1.1)
    proc = subprocess.Popen(_nightly_cmd(cfg), cwd=root, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    register_done = root / "work" / "provenance" / f"{res['late']}_register.json"
    t0 = time.time()
    while not register_done.exists() and time.time() - t0 < 600 and proc.poll() is None:
        time.sleep(0.5)
    second = subprocess.run(_nightly_cmd(cfg), cwd=root, env=tool_env(), capture_output=True,
                            text=True, timeout=120)
    res["second"] = (second.returncode, second.stdout + second.stderr)
    res["killed_while_running"] = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    res["late_done_before_restart"] = (root / "work" / "done" / f"{res['late']}.json").exists()

    # night 4: resumes; night 5: nothing left but the corrupt session, now given up
    res["n4"] = _night(root, cfg)
    res["n5"] = _night(root, cfg)
    return res


@pytest.mark.slow
def test_night_1_processes_the_first_two_sessions(nights: dict) -> None:
    rc, log, rows = nights["n1"]
    assert rc == 0, log[-3000:]
    assert _by_status(rows) == {"new": set(nights["first"])}
    cohort = list(csv.DictReader(nights["cohort1"].splitlines(), delimiter="\t"))
    assert {f"{r['participant_id']}_{r['session_id']}" for r in cohort} == set(nights["first"])


@pytest.mark.slow
def test_night_2_processes_exactly_the_new_good_sessions(nights: dict) -> None:
    rc, log, rows = nights["n2"]
    assert rc == 0, log[-3000:]
    st = _by_status(rows)
    assert st["new"] == set(nights["good"])
    assert st["done"] == set(nights["first"])
    assert st["failed"] == {nights["bad"]}
    assert st["deferred"] == {nights["late"]}
    bad = next(r for r in rows if r["session"] == nights["bad"])
    assert bad["attempts"] == "1"
    assert nights["victim"] in bad["reason"] and "truncated" in bad["reason"]
    assert "\n" not in bad["reason"]
    # the failure is in the printed summary, one line naming the session and the file's ref
    line = next(x for x in log.splitlines() if x.startswith(f"qmriflow nightly: {nights['bad']}"))
    assert nights["victim"] in line
    # nothing of night 1 was recomputed: no job for those sessions, their files untouched
    first_ids = {s.split("_")[1][4:] for s in nights["first"]}
    per_session = [(rule, wc) for rule, wc in _jobs(log) if "session=" in wc]
    assert per_session, "no per-session job ran"
    assert not [j for j in per_session if any(f"session={i}" in j[1] for i in first_ids)]
    new_ids = {s.split("_")[1][4:] for s in [*nights["good"], nights["bad"]]}
    assert {wc.split("session=")[1] for _r, wc in per_session} == new_ids
    assert nights["mtimes2"] == nights["mtimes1"]
    # the cohort table grew by the two new sessions
    cohort = list(csv.DictReader(nights["cohort2"].splitlines(), delimiter="\t"))
    assert {f"{r['participant_id']}_{r['session_id']}" for r in cohort} == {
        *nights["first"], *nights["good"]}


@pytest.mark.slow
def test_second_instance_exits_and_killed_run_resumes_identically(nights: dict) -> None:
    rc2, out2 = nights["second"]
    assert nights["killed_while_running"], "night 3 finished before it could be killed"
    assert rc2 == EXIT_LOCKED, out2[-2000:]
    assert "another nightly run is in progress" in out2
    assert not nights["late_done_before_restart"]
    rc, log, rows = nights["n4"]
    assert rc == 0, log[-3000:]
    st = _by_status(rows)
    assert st["new"] == {nights["late"]}
    assert st["done"] == {*nights["first"], *nights["good"]}
    # the resumed session equals its twin processed without interruption on night 2
    res = nights["root"] / "results"
    late, twin = nights["late"], nights["late_twin"]
    late_files = sorted(p for p in res.rglob(f"{late}_*.nii.gz"))
    assert len(late_files) >= 10
    for f in late_files:
        g = next(res.rglob(f.name.replace(late, twin)))
        a = np.asanyarray(nib.load(f).dataobj)
        b = np.asanyarray(nib.load(g).dataobj)
        assert a.dtype == b.dtype and np.array_equal(a, b), f.name
    stats = next(res.rglob(f"{late}_*tissue_stats.tsv")).read_text().splitlines()
    twin_stats = next(res.rglob(f"{twin}_*tissue_stats.tsv")).read_text().splitlines()
    # identical values: only the subject/session columns (and the input hash) differ
    assert [x.split("\t")[2:13] for x in stats] == [x.split("\t")[2:13] for x in twin_stats]


@pytest.mark.slow
def test_failing_session_is_retried_then_given_up(nights: dict) -> None:
    bad = nights["bad"]
    _rc, _log4, rows4 = nights["n4"]
    r4 = next(r for r in rows4 if r["session"] == bad)
    assert r4["status"] == "failed" and r4["attempts"] == "2"
    assert "not retried again" in r4["reason"]
    rc5, log5, rows5 = nights["n5"]
    assert rc5 == 0, log5[-3000:]
    r5 = next(r for r in rows5 if r["session"] == bad)
    assert r5["status"] == "given up" and r5["attempts"] == "2"
    assert not [j for j in _jobs(log5) if "session=" in j[1]]
    assert _by_status(rows5)["done"] == {*nights["first"], *nights["good"], nights["late"]}


def test_nightly_profile_keeps_the_lock_and_mtime_triggers() -> None:
    prof = yaml.safe_load((REPO / "profiles" / "nightly" / "config.yaml").read_text())
    assert prof["rerun-triggers"] == ["mtime"]
    assert prof["keep-going"] is True and prof["rerun-incomplete"] is True
    assert prof.get("nolock", False) is False


@pytest.mark.parametrize("cores", [0, -2])
def test_nightly_refuses_core_counts_below_one(tmp_path: Path, cores: int) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"input_dir": str(tmp_path / "archive"),
                                   "output_dir": "results", "work_dir": "work",
                                   "pseudonym_salt": SALT,
                                   "model": {"checkpoint": "model.pt"}}))
    with pytest.raises(ConfigError, match="cores must be"):
        run_nightly(cfg, directory=tmp_path, cores=cores)
    assert not (tmp_path / "work").exists()
