"""The README's demo: a phantom archive, then the Snakemake workflow on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from ..phantom.generate import PhantomOptions, generate_archive


def repo_root() -> Path:
    """Folder holding the Snakefile (the source checkout this package was installed from)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "Snakefile").is_file() and (parent / "rules").is_dir():
            return parent
    raise FileNotFoundError("Snakefile not found: run the demo from a source checkout")


#: demo settings: a narrow network trained for a few epochs (the seed's width is 64 and 50
#: epochs; this is a smoke run of the whole chain, not a usable model) and the faster
#: deepbet skull strip, so the demo finishes in minutes on 2 CPU cores
DEMO_CONFIG = {
    "model": {"width": 16, "epochs": 3, "split": [0.67, 0.33, 0.0], "threads": 2},
    "skullstrip": {"backend": "deepbet"},
}


def run_demo(out: Path, *, cores: int = 2, subjects: int = 3, sessions: int = 1) -> int:
    out = Path(out).resolve()
    archive = out / "archive"
    if not (archive / "manifest.json").is_file():
        print(f"[demo] generating phantom archive in {archive}", flush=True)
        generate_archive(archive, PhantomOptions(subjects=subjects, sessions=sessions,
                                                 size="small", seed=0, cse=True))
    cfg = out / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "input_dir": str(archive / "dicom"),
        "output_dir": str(out / "results"),
        "work_dir": str(out / "work"),
        "pseudonym_salt": "qmriflow-demo-salt",
        **DEMO_CONFIG,
    }))
    root = repo_root()
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(root / "Snakefile"),
           "--directory", str(out), "--configfile", str(cfg), "--cores", str(cores),
           "--keep-going", "--rerun-incomplete", "--printshellcmds"]
    print("[demo] " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=tool_env())
    print(finish_message(out, rc), flush=True)
    return rc


def finish_message(out: Path, rc: int) -> str:
    """Where to look after the demo: the cohort report and the session reports (or, after a
    failure, the failure table)."""
    results = Path(out) / "results"
    cohort = results / "reports" / "cohort.html"
    sessions = sorted(results.glob("sub-*.html"))
    lines = [f"[demo] finished with exit status {rc}"]
    if cohort.is_file():
        lines.append(f"[demo] cohort report: {cohort}")
    if sessions:
        lines.append(f"[demo] {len(sessions)} session report(s), e.g. {sessions[0]}")
    lines.append(f"[demo] maps and sidecars: {results}/sub-*/ses-*/anat/")
    failures = results / "failures.tsv"
    if rc != 0 or not cohort.is_file():
        lines.append(f"[demo] failed sessions and their reasons: {failures}")
    return "\n".join(lines)


def tool_env() -> dict[str, str]:
    """Environment in which the rules' ``qmriflow`` is this interpreter's (venv not activated)."""
    import os

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
