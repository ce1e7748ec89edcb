"""The Snakemake workflow: config validation, lint, and a real run on the phantom archive."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qmriflow.config import load_config, validate_config
from qmriflow.errors import ConfigError

from .conftest import REPO, assert_no_identifiers, tool_env


def _snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile",
                           str(REPO / "Snakefile"), *args], cwd=cwd, capture_output=True,
                          text=True, env=tool_env())


def test_default_config_is_valid():
    cfg = load_config(REPO / "workflow_config.yaml")
    assert cfg["physics"]["te_correction"] == {"tse": 0.90, "flair": 0.42, "flair_short": 0.89,
                                               "flair_short_te_ms": 200.0}


def test_map_smoothing_defaults_agree():
    """The shipped config, the schema's default and the code's default are one setting."""
    from qmriflow.model.calibration import DEFAULT_SMOOTHING

    shipped = load_config(REPO / "workflow_config.yaml")["model"]["map_smoothing"]
    schema = validate_config({"input_dir": "x"})["model"]["map_smoothing"]
    assert shipped == schema == dataclasses.asdict(DEFAULT_SMOOTHING)
    with pytest.raises(ConfigError, match=r"model\.map_smoothing"):
        validate_config({"input_dir": "x", "model": {"map_smoothing": {"radius": -1}}})


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"physics": {"te_correction": {"tse": "high"}}}, "physics.te_correction.tse"),
        ({"physics": {"te_corection": {}}}, "physics.te_corection"),
        ({"dcm2niix": {"timeout_s": 1}}, "dcm2niix.timeout_s"),
        ({"require_3t": "yes"}, "require_3t"),
    ],
)
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({"input_dir": "x", **bad})


def test_snakemake_rejects_wrong_key_at_parse_time(tmp_path):
    cfg = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    cfg["physics"]["scale_bonud"] = 0.3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = _snakemake("-n", "--configfile", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    # one line naming the key, as `qmriflow validate-config` (issue 24: no ValidationError and
    # schema dump from Snakemake)
    assert "qmriflow: config key physics.scale_bonud: unknown key" in out
    assert "ValidationError" not in out and "properties" not in out.replace(
        "Additional properties", "")
    assert len([ln for ln in out.splitlines() if ln.strip()]) <= 3, out


def test_snakemake_lint_is_clean(tmp_path):
    (tmp_path / "archive").mkdir()
    res = _snakemake("--lint", "--config", f"input_dir={tmp_path / 'archive'}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr
    assert "your workflow is in a good condition" in res.stdout + res.stderr


def test_ruff_check_is_clean():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_workflow_discovers_and_converts_every_session(phantom_archive, manifest, tmp_path):
    cfg = {"input_dir": str(phantom_archive / "dicom"), "output_dir": str(tmp_path / "res"),
           "work_dir": str(tmp_path / "work"), "pseudonym_salt": "test-salt-123",
           # the site's T2w refocusing angle reaches the parameter step
           "physics": {"echo_train": {"t2w_refocusing_deg": 140}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = _snakemake("all_params", "--cores", "2", "--configfile", str(tmp_path / "c.yaml"),
                     cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sessions = sorted((tmp_path / "work" / "nifti").glob("sub-*/ses-*"))
    assert len(sessions) == 4
    # selected series only: T1w, T2w, FLAIR and the 6 echoes of the CSE series (the post-Gd
    # T1w of the tumour subject is excluded)
    for s in sessions:
        names = sorted(p.name for p in s.glob("*.nii.gz"))
        label = f"{s.parent.name}_{s.name}"
        assert [n for n in names if "MEGRE" not in n] == [
            f"{label}_FLAIR.nii.gz", f"{label}_T1w.nii.gz", f"{label}_T2w.nii.gz"]
        assert len([n for n in names if "MEGRE" in n]) == 6
        conv = json.loads((s / "conversion.json").read_text())
        assert conv["tool"] == "dcm2niix" and conv["anonymised"] is True
        params = json.loads((tmp_path / "res" / s.parent.name / s.name /
                             f"{label}_desc-protocol_params.json").read_text())
        assert params["flair"]["ti_ms"] == 1650 and params["t2w"]["te_correction_factor"] == 0.9
        # echo trains: the T2w's from the config, the 3D FLAIR's assumed (and said so)
        t2w, flair = params["t2w"], params["flair"]
        assert t2w["signal_model"] == "epg" and set(t2w["echo_train"]["refocusing_deg"]) == {140}
        assert "physics.echo_train.t2w_refocusing_deg" in t2w["echo_train_source"]
        assert flair["signal_model"] == "epg" and "ASSUMED" in flair["echo_train_source"]
    assert (tmp_path / "res" / "failures.tsv").read_text().strip().count("\n") == 0
    # the model steps as planned: the pack holds the network-free targets and training
    # distils towards them (model.distill, default 1.0 with calibrated scaling)
    plan = _snakemake("train", "-n", "-p", "--cores", "2", "--configfile",
                      str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    pack_cmd = next(ln for ln in plan.stdout.splitlines() if "qmriflow pack " in ln)
    train_cmd = next(ln for ln in plan.stdout.splitlines() if "qmriflow train " in ln)
    assert " --targets " in pack_cmd
    assert "--scaling calibrated --distill 1.0 " in train_cmd
    # inference takes both signal-model errors of the uncertainty maps from the config
    plan = _snakemake("all", "-n", "-p", "--cores", "2", "--configfile",
                      str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    infer_cmds = [ln for ln in plan.stdout.splitlines() if "qmriflow infer " in ln]
    assert len(infer_cmds) == 4
    assert all("--model-error 0.12 --model-error-cluster 0.12" in c for c in infer_cmds)
    # no identifier anywhere: names, logs, sidecars, tables, NIfTI headers
    assert assert_no_identifiers(tmp_path) > 50
    # pseudonyms are stable for a salt and change with it
    tsv = (tmp_path / "work" / "sessions.tsv").read_text()
    from qmriflow.archive.discover import discover

    again, _ = discover(phantom_archive / "dicom", "test-salt-123")
    assert all(r["subject"] in tsv and r["session"] in tsv for r in again)
    other, _ = discover(phantom_archive / "dicom", "another-salt-456")
    assert not any(r["subject"] in tsv for r in other)


def test_container_images_default_to_the_package_version():
    from qmriflow import __version__
    from qmriflow.config import validate_config

    cfg = validate_config({"input_dir": "x"})
    assert cfg["containers"] == {
        g: f"docker://ghcr.io/qmriflow/qmriflow-{g}:{__version__}" for g in ("cpu", "cuda", "fsl")
    }
    cfg = validate_config({"input_dir": "x", "containers": {"cpu": "/images/q.sif"}})
    assert cfg["containers"]["cpu"] == "/images/q.sif"
    assert cfg["containers"]["cuda"].endswith(f"qmriflow-cuda:{__version__}")


@pytest.mark.parametrize("cores", ["-2", "0"])
def test_snakemake_refuses_cores_below_one(tmp_path, cores):
    """Issue 24 finding 5: `--cores -2` reached every rule as `threads: -2`."""
    (tmp_path / "archive").mkdir()
    res = _snakemake("-n", f"--cores={cores}", "--config", f"input_dir={tmp_path / 'archive'}",
                     cwd=tmp_path)
    assert res.returncode != 0
    assert f"--cores must be at least 1, got {cores}" in res.stdout + res.stderr
