"""``qmriflow run``: a run killed mid-way (wrapper and Snakemake SIGKILLed, a job left running,
Snakemake's lock left behind) is cleaned up by the next ``qmriflow run``, which then finishes.

Issue 24 finding 7: a killed plain ``snakemake`` leaves orphaned jobs running and needs a
manual ``--unlock``. The end-to-end test reproduces exactly that state (the job survives its
Snakemake, the lock stays) and checks that the next call stops the orphan, removes the lock
and completes the target, and that a second call during a run is turned away.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qmriflow.workflow.runner import EXIT_LOCKED, RUN_ID_VAR, run_processes, stop_processes

from .conftest import tool_env

SALT = "run-test-salt"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphan reparented to a non-reaping init stays a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_run_processes_are_found_by_run_id_and_stopped() -> None:
    env = {**os.environ, RUN_ID_VAR: "unit-test-run"}
    # a process that ignores SIGTERM is killed after the grace period
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); time.sleep(60)"], env=env)
    plain = subprocess.Popen(["sleep", "60"], env=env)
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, RUN_ID_VAR: "another-run"})
    try:
        time.sleep(0.5)
        assert run_processes("unit-test-run") == sorted([stubborn.pid, plain.pid])
        t0 = time.monotonic()
        assert stop_processes("unit-test-run", grace_s=2.0) == sorted([stubborn.pid, plain.pid])
        assert plain.wait(10) == -signal.SIGTERM
        assert stubborn.wait(10) == -signal.SIGKILL
        assert time.monotonic() - t0 >= 2.0
        assert other.poll() is None  # another run's process is left alone
        assert run_processes("unit-test-run") == []
    finally:
        for p in (stubborn, plain, other):
            p.kill()
            p.wait()


def _config(root: Path) -> Path:
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "input_dir": str(root / "archive"), "output_dir": "results", "work_dir": "work",
        "pseudonym_salt": SALT,
        # small, fast preprocessing (as in test_nightly): 2 mm in-plane, 112 x 112 grid
        "preprocessing": {"inplane_mm": 2.0, "matrix": 112},
        "skullstrip": {"backend": "deepbet"},
    }))
    return cfg


def _run_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "qmriflow", "run", "--configfile", str(cfg), "--cores", "2",
            "--", "all_preproc"]


@pytest.mark.slow
def test_killed_run_is_cleaned_up_and_finished_by_the_next(phantom_archive: Path,
                                                           tmp_path: Path) -> None:
    root = tmp_path / "run test"
    src = phantom_archive / "dicom" / "S001" / "V01"
    dst = root / "archive" / "S001" / "V01"
    dst.mkdir(parents=True)
    for d in sorted(src.iterdir()):
        if any(k in d.name for k in ("T1W", "T2W", "FLAIR")):
            shutil.copytree(d, dst / d.name)
    cfg = _config(root)
    state = root / "work" / "run" / "state.json"

    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(_run_cmd(cfg), cwd=root, env=tool_env(), start_new_session=True,
                             stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        # wait for the skull-stripping job of this run (one of the longer ones)
        job, run_id, t0 = None, None, time.time()
        while job is None and time.time() - t0 < 600 and first.poll() is None:
            time.sleep(0.3)
            if run_id is None and state.is_file():
                run_id = json.loads(state.read_text()).get("run_id")
            if run_id:
                job = next((p for p in run_processes(run_id)
                            if "qmriflow skullstrip" in _cmdline(p)), None)
        assert job is not None, f"no skullstrip job seen (exit {first.poll()})"
        # a second call while the run is going is turned away and changes nothing
        second = subprocess.run(_run_cmd(cfg), cwd=root, env=tool_env(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == EXIT_LOCKED, second.stdout + second.stderr
        assert "another qmriflow run is in progress" in second.stdout
        # kill the wrapper and Snakemake, not the job: the state a killed plain run leaves
        smk = [p for p in run_processes(run_id) if "-m snakemake" in _cmdline(p)]
        assert smk, "Snakemake process of the run not found"
        os.kill(first.pid, signal.SIGKILL)
        for p in smk:
            os.kill(p, signal.SIGKILL)
        first.wait(timeout=60)
        assert _alive(job), "the job ended with its Snakemake: nothing to clean up"
        assert any((root / ".snakemake" / "locks").iterdir()), "no stale lock was left"
        assert json.loads(state.read_text())["running"] is True
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log.close()

    res = subprocess.run(_run_cmd(cfg), cwd=root, env=tool_env(), capture_output=True,
                         text=True, timeout=1500)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    stopped = re.search(r"did not end cleanly: stopped (\d+) process\(es\) it left running, "
                        r"removing its stale lock", out)
    assert stopped and int(stopped.group(1)) >= 1, out[:2000]
    assert not _alive(job), "the orphaned job is still running"
    assert run_processes(run_id) == []
    new_state = json.loads(state.read_text())
    assert new_state["running"] is False and new_state["exit"] == 0
    assert new_state["run_id"] != run_id
    assert not any((root / ".snakemake" / "locks").iterdir())
    done = list((root / "results").rglob("*_space-T2w_desc-brain_mask.nii.gz"))
    assert len(done) == 1, sorted(p.name for p in (root / "results").rglob("*.nii.gz"))
