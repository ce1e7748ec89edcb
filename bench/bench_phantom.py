"""Benchmark the phantom generator: wall time and peak memory per archive size.

Usage: python bench/bench_phantom.py [--full] [--workers N]
Prints a Markdown table; copy the numbers into bench/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def run_case(subjects: int, sessions: int, size: str, workers: int, cse: bool) -> tuple:
    out = tempfile.mkdtemp(prefix="qmriflow-bench-")
    cmd = [sys.executable, "-m", "qmriflow.cli", "phantom", out, "--subjects", str(subjects),
           "--sessions", str(sessions), "--size", size, "--workers", str(workers), "--seed", "1"]
    if cse:
        cmd.append("--cse")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    n_files = sum(len(f) for _, _, f in os.walk(os.path.join(out, "dicom")))
    shutil.rmtree(out)
    return wall, peak, n_files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true", help="also time one full-size session")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    cases = [(2, 2, "small", False), (2, 2, "small", True)]
    if a.full:
        cases.append((1, 1, "full", True))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print("| archive | workers | wall s | peak RSS MiB (largest process) | DICOM files |")
    print("|---|---|---|---|---|")
    for subjects, sessions, size, cse in cases:
        wall, peak, n = run_case(subjects, sessions, size, a.workers, cse)
        label = f"{subjects}x{sessions} {size}{' +cse' if cse else ''}"
        print(f"| {label} | {a.workers} | {wall:.1f} | {peak:.0f} | {n} |", flush=True)


if __name__ == "__main__":
    main()
