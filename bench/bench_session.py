"""Per-step wall time and peak memory of the preprocessing workflow on full-size sessions.

Generates a full-size phantom archive (default 1 subject × 1 session), runs the Snakemake
workflow's preprocessing (target ``all_preproc``) with ``--cores 2`` and reads the
``benchmark:`` files every rule writes
(``<work>/benchmarks/<rule>/<session>.tsv``: seconds and max RSS).

Usage: python bench/bench_session.py [--sessions N] [--cores 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = ("convert", "params", "register", "n4", "skullstrip", "segment")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--size", default="full", choices=["small", "full"])
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="qmriflow-bench-session-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if not (root / "archive" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "qmriflow", "phantom", str(root / "archive"),
                        "--subjects", "1", "--sessions", str(a.sessions), "--size", a.size,
                        "--seed", "5"], check=True, env=env)
    cfg = {"input_dir": str(root / "archive" / "dicom"), "output_dir": str(root / "results"),
           "work_dir": str(root / "work"), "pseudonym_salt": "bench-salt-0001"}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                    "--configfile", str(root / "config.yaml"), "--cores", str(a.cores),
                    "all_preproc", "--forceall", "--quiet", "progress"],
                   check=True, cwd=root, env=env)
    total = time.perf_counter() - t
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, --cores {a.cores}, "
          f"{a.size} phantom, {a.sessions} session(s)")
    print("| step | wall s (mean per session) | peak RSS MiB (max) |")
    print("|---|---|---|")
    per_session = 0.0
    for step in STEPS:
        rows = []
        for f in sorted((root / "work" / "benchmarks" / step).glob("*.tsv")):
            with f.open() as fh:
                rows += list(csv.DictReader(fh, delimiter="\t"))
        if not rows:
            print(f"| {step} | n/a | n/a |")
            continue
        s = sum(float(r["s"]) for r in rows) / len(rows)
        rss = max(float(r["max_rss"]) for r in rows if r["max_rss"] not in ("NA", ""))
        per_session += s
        print(f"| {step} | {s:.1f} | {rss:.0f} |")
    print(f"| **sum of steps per session** | **{per_session:.1f}** | |")
    print(f"| whole workflow run (wall, incl. discovery and scheduling) | {total:.1f} | |")


if __name__ == "__main__":
    main()
