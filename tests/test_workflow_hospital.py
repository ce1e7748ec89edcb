"""Issue 24 ("hospital-ready"): one short workflow run (discovery, conversion, parameters) on
an archive as a hospital export delivers it, checked three ways:

* paths: the archive, work and output folders hold spaces and non-ASCII characters;
* privacy: folders and files are named after the patients, transliterated as no header value
  is (``MUELLER_JUERGEN_MRN778899`` for ``Müller^Jürgen``), a stray export lies at the archive
  root and one session is corrupt; no name, MRN or birth date may reach any output, log,
  failure record or the ``.snakemake`` folder, yet the operator can find the bad file;
* permissions: under umask 027 every file is 0640 and every folder 0750 (colleagues in the
  group can read the results).
"""

from __future__ import annotations

import csv
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qmriflow.archive.discover import pseudonym

from .conftest import REPO, tool_env
from .phi import phi_hits, phi_hits_in_text

SALT = "hospital-test-salt"
PATIENTS = {
    "S001": ("Müller^Jürgen", "MRN778899", "19610423", "MUELLER_JUERGEN_MRN778899",
             "Muller Jurgen 1961-04-23", "MULLER_J"),
    "S002": ("Doe^Jane", "MRN123456", "19750102", "DOE_JANE_MRN123456",
             "Jane Doe 1975-01-02", "DOE_JANE"),
}


def _copy_as_patient(src: Path, dst: Path, name: str, pid: str, birth: str,
                     file_prefix: str) -> tuple[str, str]:
    """Copy a phantom session's T1w/T2w/FLAIR series, as the patient, with identifying file
    names; return (PatientID, StudyInstanceUID)."""
    import pydicom

    study = ""
    for d in sorted(src.iterdir()):
        if not any(k in d.name for k in ("T1W", "T2W", "FLAIR")):
            continue
        out = dst / f"{file_prefix}_{d.name}"
        out.mkdir(parents=True)
        for k, f in enumerate(sorted(d.glob("*.dcm"))):
            ds = pydicom.dcmread(f)
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
            ds.save_as(out / f"{file_prefix}_{birth}_IM_{k:04d}.dcm", enforce_file_format=True)
            study = str(ds.StudyInstanceUID)
    return pid, study


@pytest.fixture(scope="module")
def hospital_run(phantom_archive, tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital")
    archive = root / "PACS Export" / "Übergabe Radiologie (Ärzte)"
    labels = {}
    for subj, (name, pid, birth, top, study_dir, prefix) in PATIENTS.items():
        key = _copy_as_patient(phantom_archive / "dicom" / subj / "V01",
                               archive / top / study_dir, name, pid, birth, prefix)
        labels[subj] = f"sub-{pseudonym(key[0], SALT)}_ses-{pseudonym(key[1], SALT)}"
    # Doe's study is corrupt: one T2w file cut short
    t2 = next((archive / "DOE_JANE_MRN123456").rglob("*T2W*"))
    victim = sorted(t2.glob("*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:2000])
    # a stray export at the archive root (not DICOM, belongs to no study)
    rng = np.random.default_rng(3)
    (archive / "DOE_JANE_MRN123456_export.dcm").write_bytes(rng.bytes(5000))

    run_dir = root / "Auswertung 2024 – Qualität"
    run_dir.mkdir()
    cfg = {"input_dir": str(archive),
           "work_dir": str(root / "work dir" / "Zwischenstände é"),
           "output_dir": str(root / "Ergebnisse für Kollegen" / "qMRI maps"),
           "pseudonym_salt": SALT}
    (run_dir / "config file.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--configfile", str(run_dir / "config file.yaml"), "--cores", "2", "--keep-going",
         "all_params"],
        cwd=run_dir, capture_output=True, text=True, env=tool_env(),
        preexec_fn=lambda: os.umask(0o027),
    )
    return {"root": root, "archive": archive, "work": Path(cfg["work_dir"]),
            "out": Path(cfg["output_dir"]), "run_dir": run_dir, "labels": labels,
            "victim": victim, "result": res}


def _failures(run) -> list[dict]:
    with (run["out"] / "failures.tsv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_paths_with_spaces_and_non_ascii_are_processed(hospital_run):
    run = hospital_run
    res = run["result"]
    log = res.stdout + res.stderr
    assert "unrecognized arguments" not in log, log[-3000:]
    good, bad = run["labels"]["S001"], run["labels"]["S002"]
    sub, ses = good.split("_")
    # the good session went through discovery, conversion and the parameter check
    nifti = run["work"] / "nifti" / sub / ses
    assert sorted(p.name for p in nifti.glob("*.nii.gz")) == [
        f"{good}_FLAIR.nii.gz", f"{good}_T1w.nii.gz", f"{good}_T2w.nii.gz"]
    assert (run["out"] / sub / ses / f"{good}_desc-protocol_params.json").is_file()
    # ... and the corrupt one failed alone, in conversion, for its own reason
    assert set(re.findall(r"Error in rule (\w+)", log)) == {"convert"}, log[-3000:]
    rows = _failures(run)
    assert [(r["session"], r["step"]) for r in rows] == [(bad, "convert")]


def test_no_patient_name_reaches_any_output_log_or_snakemake_folder(hospital_run, capsys):
    run = hospital_run
    res = run["result"]
    assert (run["run_dir"] / ".snakemake").is_dir()
    hits, n = phi_hits([run["root"]], skip=[run["archive"]])
    assert n > 30 and not hits, hits[:20]
    assert not phi_hits_in_text(res.stdout + res.stderr)
    # the failure names the session, a reference of the bad file, and the reason, on one line
    (row,) = _failures(run)
    bad = run["labels"]["S002"]
    m = re.fullmatch(rf"session {bad}: corrupt: file (#[0-9a-f]{{12}}) in the folder of series "
                     rf"\d+: truncated DICOM file.*", row["reason"])
    assert m, row["reason"]
    # the stray export is reported by reference in the discovery log
    discover_log = (run["work"] / "logs" / "discover.log").read_text()
    stray = re.search(r"unreadable file outside any one session's folders: file (#[0-9a-f]{12})",
                      discover_log)
    assert stray, discover_log
    # `qmriflow locate` turns the references back into the files, on the operator's terminal
    from qmriflow.cli import main

    capsys.readouterr()
    assert main(["locate", str(run["archive"]), m[1], stray[1], "--salt", SALT]) == 0
    out = capsys.readouterr().out
    assert f"{m[1]}\t{run['victim']}" in out
    assert f"{stray[1]}\t{run['archive'] / 'DOE_JANE_MRN123456_export.dcm'}" in out


def test_outputs_follow_the_umask(hospital_run):
    """Run under umask 027: files 0640, folders 0750, in the results and the work folder."""
    run = hospital_run
    wrong = []
    n_files = 0
    for top in (run["out"], run["work"]):
        for p in [top, *top.rglob("*")]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            if p.is_symlink():
                continue
            want = 0o750 if p.is_dir() else 0o640
            n_files += p.is_file()
            if mode != want:
                wrong.append(f"{oct(mode)} {p.relative_to(run['root'])}")
    assert n_files > 20 and not wrong, wrong
    # the shared parent folders a run creates as well
    assert stat.S_IMODE((run["root"] / "Ergebnisse für Kollegen").stat().st_mode) == 0o750


def test_tables_keep_no_archive_name(hospital_run):
    """series.tsv names folders by salted hashes that resolve back to the series' files."""
    from qmriflow.archive.discover import read_series_tsv, series_files

    run = hospital_run
    rows = read_series_tsv(run["work"] / "series.tsv")
    assert rows and all(re.fullmatch(r"[0-9a-f]{10}(/[0-9a-f]{10})+", r["folder"]) for r in rows)
    for r in rows:
        files = series_files(run["archive"], r, SALT)
        assert len(files) >= r["n_files"] > 0  # (+ the cut file, whose header names the series)
