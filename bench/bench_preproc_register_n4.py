"""Benchmark registration to the T2w + resampling (register_session) and N4 + slice selection
(n4_session) on one phantom session: wall time and peak RSS per step.

Usage: python bench/bench_preproc_register_n4.py [--size full|small] [--threads N]
       [--shrink S] [--keep DIR]

Generates ``PhantomOptions(subjects=1, sessions=1, size=...)``, converts the T1w/T2w/FLAIR
with dcm2niix, then runs each step in its own Python process (so peak RSS is that step's)
and prints a Markdown table plus the registration error against the phantom's truth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_CODE = r"""
import json, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
if args["step"] == "register":
    from qmriflow.preproc.register import register_session
    info = register_session(Path(args["t2w"]), Path(args["t1w"]), Path(args["flair"]),
                            {k: Path(v) for k, v in args["outputs"].items()},
                            Path(args["work"]), threads=args["threads"])
else:
    from qmriflow.preproc.n4 import n4_session
    info = n4_session({k: Path(v) for k, v in args["inputs"].items()},
                      {k: Path(v) for k, v in args["outputs"].items()},
                      shrink=args["shrink"], threads=args["threads"])
wall = time.perf_counter() - t0
# VmHWM: this process's own peak (ru_maxrss would include the parent's at fork time)
rss = next(int(ln.split()[1]) for ln in open("/proc/self/status")
           if ln.startswith("VmHWM:")) / 1024
print("RESULT " + json.dumps({"wall": wall, "rss_mib": rss, "timing": info["timing_s"],
                              "info": info}, default=str))
"""


def run_step(args: dict, threads: int) -> dict:
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STEP_CODE, json.dumps(args)], env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"step {args['step']} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["process_wall"] = wall
    return res


def main() -> None:
    import numpy as np

    from qmriflow.archive.convert import run_dcm2niix
    from qmriflow.phantom.generate import PhantomOptions, generate_archive
    from qmriflow.preproc.register import read_rigid_ras

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="full", choices=["full", "small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shrink", type=int, default=2, help="N4 shrink factor")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="qmriflow-bench-reg-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
              f"cores, python {platform.python_version()}; size {a.size}, threads "
              f"{a.threads}, N4 shrink {a.shrink}", flush=True)
        t = time.perf_counter()
        arch = root / "phantom"
        if not (arch / "manifest.json").is_file():
            generate_archive(arch, PhantomOptions(subjects=1, sessions=1, size=a.size, seed=3,
                                                  workers=1))
        t_gen = time.perf_counter() - t
        manifest = json.loads((arch / "manifest.json").read_text())
        rows = {r["role"]: r for r in manifest["series"] if r["role"] in ("t1w", "t2w",
                                                                          "flair")}
        t = time.perf_counter()
        nifti = {}
        for role, row in rows.items():
            out = root / "nifti" / role
            if out.exists():
                shutil.rmtree(out)
            nifti[role] = run_dcm2niix(arch / row["dicom_dir"], out)[0].nifti
        t_conv = time.perf_counter() - t
        reg = root / "reg"
        outputs = {"T1w": reg / "T1w.nii.gz", "T2w": reg / "T2w.nii.gz",
                   "FLAIR": reg / "FLAIR.nii.gz", "T1w_xfm": reg / "T1w.mat",
                   "FLAIR_xfm": reg / "FLAIR.mat"}
        r1 = run_step({"step": "register", "t2w": str(nifti["t2w"]), "t1w": str(nifti["t1w"]),
                       "flair": str(nifti["flair"]),
                       "outputs": {k: str(v) for k, v in outputs.items()},
                       "work": str(reg / ".work"), "threads": a.threads}, a.threads)
        n4_out = {k: root / "n4" / f"{k}.nii.gz" for k in ("T1w", "T2w", "FLAIR")}
        r2 = run_step({"step": "n4", "inputs": {k: str(outputs[k]) for k in n4_out},
                       "outputs": {k: str(v) for k, v in n4_out.items()},
                       "shrink": a.shrink, "threads": a.threads}, a.threads)
        print()
        print("| step | wall s | peak RSS MiB | detail |")
        print("|---|---|---|---|")
        print(f"| phantom (1×1 {a.size}) | {t_gen:.1f} | – | generator, 1 worker |")
        print(f"| dcm2niix ×3 | {t_conv:.1f} | – | T1w, T2w, FLAIR |")
        tr = r1["timing"]
        print(f"| register_session | {r1['wall']:.1f} | {r1['rss_mib']:.0f} | grid+T2w "
              f"{tr['grid_and_T2w']:.1f}, reg T1w {tr['register_T1w']:.1f}, reg FLAIR "
              f"{tr['register_FLAIR']:.1f}, resample {tr['resample_T1w']:.1f}+"
              f"{tr['resample_FLAIR']:.1f} (process {r1['process_wall']:.1f}) |")
        tn = r2["timing"]
        print(f"| n4_session | {r2['wall']:.1f} | {r2['rss_mib']:.0f} | masks "
              f"{tn['masks']:.1f}, N4 T1w {tn['n4_T1w']:.1f}, T2w {tn['n4_T2w']:.1f}, FLAIR "
              f"{tn['n4_FLAIR']:.1f} (process {r2['process_wall']:.1f}) |")
        # accuracy against the phantom truth
        import nibabel as nib

        bm = nib.load(arch / rows["t2w"]["truth"]["brainmask"])
        ijk = np.array(np.nonzero(bm.get_fdata() > 0), float)
        pts = bm.affine[:3, :3] @ ijk + bm.affine[:3, 3:4]
        print()
        for role, name in (("t1w", "T1w"), ("flair", "FLAIR")):
            est = read_rigid_ras(outputs[f"{name}_xfm"])
            tru = np.linalg.inv(np.asarray(rows[role]["world_to_t2w_world"]))
            d = np.linalg.norm((est - tru)[:3, :3] @ pts + (est - tru)[:3, 3:4], axis=0)
            print(f"{name}: registration error over the brain mean {d.mean():.3f} mm, max "
                  f"{d.max():.3f} mm")
        sel = r2["info"]["slice_selection"]
        print(f"slices kept [{sel['start']}, {sel['stop']}) of {sel['n_slices_in']}; grid "
              f"{r1['info']['grid']['shape']}")
    finally:
        if a.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
