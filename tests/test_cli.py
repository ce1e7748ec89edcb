"""The `qmriflow` command line: synth reproduces the phantom, bad input fails in one line."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from qmriflow.cli import _COMMANDS, main

from .conftest import tool_env


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qmriflow.cli", *args], capture_output=True,
                          text=True, env=tool_env())


def test_help_lists_subcommands():
    out = _run("--help").stdout
    for name in ("phantom", "synth", "discover", "convert", "validate-config", "demo"):
        assert name in out and name in _COMMANDS


@pytest.mark.parametrize("role", ["t1w", "t2w", "flair"])
def test_synth_cli_reproduces_phantom_noisefree(phantom_archive, manifest, tmp_path, role):
    r = next(s for s in manifest["series"] if s["role"] == role)
    p = r["protocol"]
    t = {k: str(phantom_archive / r["truth"][k]) for k in ("T1map", "T2map", "PDmap")}
    out = tmp_path / f"{role}.nii.gz"
    args = ["synth", "--t1", t["T1map"], "--t2", t["T2map"], "--pd", t["PDmap"],
            "--sequence", p["sequence"], "--tr", repr(p["tr_ms"]), "--te", repr(p["te_ms"]),
            "--out", str(out)]
    if p["ti_ms"] is not None:
        args += ["--ti", repr(p["ti_ms"])]
    if p["fa_deg"] is not None:
        args += ["--fa", repr(p["fa_deg"])]
    assert main(args) == 0
    got = nib.load(str(out))
    want = nib.load(str(phantom_archive / r["truth"]["noisefree"]))
    np.testing.assert_array_equal(got.get_fdata(dtype=np.float32),
                                  want.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(got.affine, want.affine)
    assert (tmp_path / f"{role}.json").is_file()


def test_synth_explicit_te_correction_changes_tse(phantom_archive, manifest, tmp_path):
    r = next(s for s in manifest["series"] if s["role"] == "t2w")
    t = {k: str(phantom_archive / r["truth"][k]) for k in ("T1map", "T2map", "PDmap")}
    base = ["synth", "--t1", t["T1map"], "--t2", t["T2map"], "--pd", t["PDmap"],
            "--sequence", "tse", "--tr", "4000", "--te", "80"]
    assert main([*base, "--out", str(tmp_path / "a.nii.gz")]) == 0
    assert main([*base, "--te-correction", "1.0", "--out", str(tmp_path / "b.nii.gz")]) == 0
    a = nib.load(str(tmp_path / "a.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "b.nii.gz")).get_fdata()
    assert (a >= b).all() and (a > b).any()  # shorter effective TE -> more signal


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--sequence", "flair", "--tr", "4800", "--te", "300"], "inversion time"),
        (["--sequence", "gre", "--tr", "5", "--te", "2", "--fa", "400"], "flip angle"),
        (["--sequence", "tse", "--tr", "-1", "--te", "80"], "TR must be"),
    ],
)
def test_synth_bad_parameters_fail_in_one_line(phantom_archive, manifest, tmp_path, extra,
                                               needle):
    r = next(s for s in manifest["series"] if s["role"] == "t2w")
    t = {k: str(phantom_archive / r["truth"][k]) for k in ("T1map", "T2map", "PDmap")}
    out = tmp_path / "x.nii.gz"
    res = _run("synth", "--t1", t["T1map"], "--t2", t["T2map"], "--pd", t["PDmap"], *extra,
               "--out", str(out))
    assert res.returncode == 1
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_synth_missing_and_corrupt_and_ms_maps(tmp_path):
    aff = np.eye(4)
    ok = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 2), 0.9, np.float32), aff), str(ok))
    ms = tmp_path / "ms.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 2), 900.0, np.float32), aff), str(ms))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    common = ["--sequence", "tse", "--tr", "4000", "--te", "80", "--out",
              str(tmp_path / "o.nii.gz")]
    for t1, needle in ((tmp_path / "missing.nii.gz", "not found"), (bad, "cannot read"),
                       (ms, "milliseconds")):
        res = _run("synth", "--t1", str(t1), "--t2", str(ok), "--pd", str(ok), *common)
        assert res.returncode == 1 and needle in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.nii.gz").exists()


def test_phantom_cli_small_single_session(tmp_path):
    res = _run("phantom", str(tmp_path / "p"), "--subjects", "1", "--sessions", "1",
               "--seed", "3", "--workers", "1")
    assert res.returncode == 0, res.stderr
    import json

    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert [r["role"] for r in m["series"]] == ["t1w", "t2w", "flair"]
    assert m["options"]["seed"] == 3


@pytest.mark.parametrize("args,needle", [(["--subjects", "0"], "at least one subject"),
                                         (["--snr", "-3"], "SNR must be positive")])
def test_phantom_cli_refuses_absurd_options(tmp_path, args, needle):
    res = _run("phantom", str(tmp_path / "p"), *args)
    assert res.returncode == 1 and needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["register", "--t1w", "a", "--t2w", "b", "--flair", "c", "--out-dir", "o",
     "--subject", "x", "--session", "y", "--threads", "-2"],
    ["n4", "--t1w", "a", "--t2w", "b", "--flair", "c", "--out-t1w", "d", "--out-t2w", "e",
     "--out-flair", "f", "--subject", "x", "--session", "y", "--threads", "0"],
    ["skullstrip", "a", "b", "--subject", "x", "--session", "y", "--threads", "-1"],
    ["segment", "a", "b", "--out-prefix", "p", "--subject", "x", "--session", "y",
     "--threads", "0"],
    ["nightly", "--configfile", "c.yaml", "--cores", "-2"],
    ["demo", "--cores", "0"],
    ["phantom", "p", "--workers", "0"],
    ["train", "pack", "out", "--threads", "0"],
    ["infer", "s", "--out-dir", "o", "--subject", "x", "--session", "y", "--threads", "-4"],
    ["search", "pack", "out", "--threads", "0"],
    ["repro", "out", "--threads", "-2"],
    ["cse-fit", "in", "--out", "o", "--threads", "-1"],
])
def test_thread_and_core_counts_below_one_are_refused(argv, capsys, tmp_path, monkeypatch):
    """Issue 24 finding 5: `--cores -2` ran and provenance recorded "threads": -2."""
    import qmriflow.phantom.generate
    import qmriflow.workflow.demo

    def ran(*args, **kwargs):
        raise AssertionError("the step ran with a count below 1")

    # (should the option be accepted, nothing is generated or run in the checkout)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qmriflow.workflow.demo, "run_demo", ran)
    monkeypatch.setattr(qmriflow.phantom.generate, "generate_archive", ran)
    err = _usage_error(argv, capsys)
    assert "must be at least" in err


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf", "five"])
def test_model_error_must_be_a_finite_non_negative_number(value, capsys):
    for cmd in (["infer", "s"], ["infer-nifti"]):
        for flag in ("--model-error", "--model-error-cluster"):
            err = _usage_error([*cmd, "--out-dir", "o", flag, value], capsys)
            assert flag in err and ("must be a finite number >= 0" in err
                                    or "not a number" in err)


def test_cse_fit_threads_zero_keeps_its_auto_meaning():
    from qmriflow.cli import build_parser

    a = build_parser().parse_args(["cse-fit", "in", "--out", "o", "--threads", "0"])
    assert a.threads == 0
    a = build_parser().parse_args(["register", "--t1w", "a", "--t2w", "b", "--flair", "c",
                                   "--out-dir", "o", "--subject", "x", "--session", "y",
                                   "--threads", "3"])
    assert a.threads == 3


def test_demo_says_where_its_reports_are(tmp_path):
    from qmriflow.workflow.demo import finish_message

    rep = tmp_path / "results" / "reports"
    rep.mkdir(parents=True)
    (rep / "cohort.html").write_text("<html></html>")
    # session pages at the top of the output, as fMRIPrep places them (issue 24 finding 11)
    (tmp_path / "results" / "sub-a_ses-b.html").write_text("<html></html>")
    msg = finish_message(tmp_path, 0)
    assert f"cohort report: {rep / 'cohort.html'}" in msg
    assert f"1 session report(s), e.g. {tmp_path / 'results' / 'sub-a_ses-b.html'}" in msg
    assert "failures.tsv" not in msg
    (rep / "cohort.html").unlink()
    assert f"failed sessions and their reasons: {tmp_path / 'results' / 'failures.tsv'}" in (
        finish_message(tmp_path, 1))
