"""The workflow on a real SLURM cluster: profiles/slurm-test through the Snakemake SLURM
executor plugin on a throwaway single-node cluster (scripts/slurm_cluster.py: Debian's
slurmctld, slurmd and munged as root on localhost, no cgroups, no slurmdbd).

One phantom session is preprocessed twice (target `all_preproc`: discovery, conversion,
parameters, registration, N4, skull strip, segmentation, provenance), once through
`--profile profiles/slurm-test` and once locally with `--cores 2` (same archive and
configuration, separate output and work folders, run at the same time). Checked: every
non-local rule became an `sbatch` job whose SLURM job id is in the Snakemake log, whose
SLURM log was kept and which SLURM lists as COMPLETED; and the outputs of both runs are
identical: NIfTI data arrays and affines exactly (preprocessing is deterministic:
single-threaded registration with a fixed seed, equal thread counts in both runs), JSON
sidecars and TSV tables equal once the run folder is replaced by a placeholder and timing
fields are dropped, other files byte for byte (same path substitution).

Skipped, with the reason, where the cluster cannot be had: slurm-wlm/munge missing and not
installable (`apt-get install slurm-wlm munge` is tried when running as root, as in CI), or
not root (slurmd must run as root to start jobs).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from .conftest import REPO, load_script, tool_env, tool_missing

pytestmark = pytest.mark.slow

SALT = "slurm-test-salt"
#: small, fast preprocessing: 2 mm in-plane on a 112 x 112 grid, deepbet skull strip
CONFIG = {
    "preprocessing": {"inplane_mm": 2.0, "matrix": 112},
    "skullstrip": {"backend": "deepbet"},
}
#: rules of `all_preproc` that run as SLURM jobs (dataset_description is a localrule)
SLURM_RULES = {"discover", "convert", "params", "register", "n4", "skullstrip", "segment",
               "provenance"}
#: the plugin's message after each sbatch (snakemake_executor_plugin_slurm 2.x, run_job)
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) "
                       r"\(log: (\S+)\)\.")
#: JSON keys that hold run times (differ between any two runs)
VOLATILE_KEY = re.compile(r"^(timing_s|seconds|\w+_seconds|timestamp|duration\w*|elapsed\w*|"
                          r"host|hostname)$")
#: TSV columns of the same kind (failures.tsv: time)
VOLATILE_COLUMN = re.compile(r"^(time|timestamp|host|hostname|duration\w*)$")
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def slurm(request, tmp_path_factory):
    """A running single-node SLURM cluster; stopped (daemons ended by PID) in a finalizer,
    also when the test fails."""
    sc = load_script(REPO / "scripts" / "slurm_cluster.py", "qmriflow_slurm_cluster")
    reason = sc.ensure_installed()
    if reason:
        tool_missing(f"no SLURM test cluster: {reason}")
    if os.geteuid() != 0:
        tool_missing("no SLURM test cluster: slurmd must run as root to start jobs")
    root = tmp_path_factory.mktemp("slurm")
    if len(str(root / "munge" / "munge.socket")) > 100:  # sockaddr_un holds 108 bytes
        root = Path(tempfile.mkdtemp(prefix="qslurm-"))
    cluster = sc.LocalSlurm(root, cpus=2)
    request.addfinalizer(cluster.stop)
    try:
        cluster.start(timeout=120)
    except RuntimeError as exc:
        pytest.fail(f"SLURM test cluster did not start: {exc}")
    return cluster


def _snakemake(root: Path, extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"input_dir": str(root.parent / "archive" / "dicom"),
           "output_dir": str(root / "results"), "work_dir": str(root / "work"),
           "pseudonym_salt": SALT, **CONFIG}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    log = open(root / "snakemake.log", "w")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
             "--configfile", str(root / "config.yaml"), "--directory", str(root),
             *extra, "all_preproc"],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # Snakemake cancels its SLURM jobs (scancel) on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """The same phantom session through SLURM and locally, concurrently."""
    from qmriflow.phantom.generate import PhantomOptions, generate_archive

    base = tmp_path_factory.mktemp("slurm_runs")
    generate_archive(base / "archive", PhantomOptions(subjects=1, sessions=1, size="small",
                                                      seed=5))
    t0 = time.monotonic()
    slurm_proc = _snakemake(base / "slurm", ["--profile", str(REPO / "profiles" / "slurm-test")],
                            slurm.environ(tool_env()))
    local_proc = _snakemake(base / "local", ["--cores", "2"], tool_env())
    rc_local = _wait(local_proc, RUN_TIMEOUT_S)
    rc_slurm = _wait(slurm_proc, max(60.0, RUN_TIMEOUT_S - (time.monotonic() - t0)))
    return {"slurm": base / "slurm", "local": base / "local", "rc_slurm": rc_slurm,
            "rc_local": rc_local}


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def test_workflow_runs_as_slurm_jobs(runs, slurm):
    root = runs["slurm"]
    log = (root / "snakemake.log").read_text(errors="replace")
    assert runs["rc_slurm"] == 0, (f"SLURM run failed (rc {runs['rc_slurm']}):\n"
                                   f"{log[-6000:]}\n--- cluster logs ---\n{slurm.logs()}")
    submitted = SUBMITTED.findall(log)
    by_rule: dict[str, list[str]] = {}
    for _sm_id, slurm_id, logfile in submitted:
        rule = next(p for p in Path(logfile).parts if p.startswith("rule_"))[len("rule_"):]
        by_rule.setdefault(rule, []).append(slurm_id)
        # the SLURM log of every job is kept (slurm-keep-successful-logs) and shows the
        # job's own Snakemake running the rule on the node
        path = Path(logfile)
        assert path.is_file(), f"SLURM log of job {slurm_id} missing: {path}"
        assert re.search(rf"(checkpoint|rule) {rule}:", path.read_text(errors="replace")), \
            _tail(path)
    assert set(by_rule) == SLURM_RULES, (sorted(by_rule), log[-4000:])
    assert "localrule dataset_description:" in log

    # SLURM itself knows the jobs, finished successfully (squeue keeps them MinJobAge s)
    ids = [i for v in by_rule.values() for i in v]
    assert len(set(ids)) == len(ids)
    res = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T|%j",
                          "--jobs", ",".join(ids)], capture_output=True, text=True,
                         env=slurm.env, timeout=30)
    states = dict(line.split("|")[:2] for line in res.stdout.split())
    assert set(states) == set(ids), (res.stdout, res.stderr)
    assert set(states.values()) == {"COMPLETED"}, states
    print(f"SLURM jobs: {by_rule}")


def _norm_json(obj, root: str):
    if isinstance(obj, dict):
        return {k: _norm_json(v, root) for k, v in obj.items() if not VOLATILE_KEY.match(k)}
    if isinstance(obj, list):
        return [_norm_json(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<RUN>")
    return obj


def _norm_tsv(text: str, root: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text.replace(root, "<RUN>")), delimiter="\t"))
    return [{k: v for k, v in r.items() if not VOLATILE_COLUMN.match(k or "")} for r in rows]


def _compared_files(root: Path) -> list[Path]:
    """Outputs and intermediate files of a run, less logs and benchmarks (timings)."""
    files = []
    for sub in ("results", "work"):
        for p in (root / sub).rglob("*"):
            rel = p.relative_to(root)
            if p.is_file() and not {"logs", "benchmarks"} & set(rel.parts[:2]):
                files.append(rel)
    return sorted(files)


def test_slurm_outputs_equal_local_run(runs):
    a, b = runs["slurm"], runs["local"]
    assert runs["rc_local"] == 0, _tail(b / "snakemake.log")
    assert runs["rc_slurm"] == 0, _tail(a / "snakemake.log")
    files = _compared_files(a)
    assert files == _compared_files(b)
    n_nifti = 0
    for rel in files:
        pa, pb = a / rel, b / rel
        if rel.name.endswith((".nii.gz", ".nii")):
            ia, ib = nib.load(pa), nib.load(pb)
            assert ia.shape == ib.shape and np.array_equal(ia.affine, ib.affine), rel
            da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
            assert da.dtype == db.dtype, rel
            assert np.array_equal(da, db), (
                f"{rel}: max |diff| {np.abs(da.astype(float) - db).max()}")
            n_nifti += 1
        elif rel.suffix == ".json":
            assert (_norm_json(json.loads(pa.read_text()), str(a))
                    == _norm_json(json.loads(pb.read_text()), str(b))), rel
        elif rel.suffix == ".tsv":
            assert _norm_tsv(pa.read_text(), str(a)) == _norm_tsv(pb.read_text(), str(b)), rel
        else:
            assert (pa.read_bytes().replace(str(a).encode(), b"<RUN>")
                    == pb.read_bytes().replace(str(b).encode(), b"<RUN>")), rel
    # all_preproc's outputs are there: 3 registered + N4 images, mask, dseg, probability
    # maps, eroded masks, plus the converted inputs and registered intermediates
    assert n_nifti >= 14, files
    assert any(r.name.endswith("_dseg.nii.gz") for r in files)
