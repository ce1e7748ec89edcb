"""Skull stripping and tissue segmentation on one phantom session: wall time, peak RSS, Dice.

Builds the session's inputs as tests/test_skullstrip.py does (T1w/T2w/FLAIR converted with
dcm2niix, resampled onto the T2w's slices at 1 x 1 mm in-plane, truth bias field divided out
in place of N4), then runs every backend / variant in its own child process (so that peak RSS
is that call's alone) and prints a Markdown table.

Usage: python bench/bench_skullstrip_segment.py [--archive DIR] [--subject S001]
       [--session V01] [--threads 2] [--device cpu] [--variants]
Without ``--archive`` a small phantom (2 subjects x 2 sessions, seed 11) is generated first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(spec: dict) -> dict:
    import nibabel as nib
    import numpy as np

    from qmriflow.preproc.segment import OUTPUT_KEYS, segment
    from qmriflow.preproc.skullstrip import skull_strip

    work = Path(spec["work"])
    t = time.perf_counter()
    if spec["step"] == "skull_strip":
        out = work / f"mask_{spec['name']}.nii.gz"
        prov = skull_strip(spec["t1w"], out, backend=spec["backend"], device=spec["device"],
                           threads=spec["threads"], resample_mm=spec["resample_mm"])
        wall = time.perf_counter() - t
        m = np.asarray(nib.load(str(out)).dataobj) > 0
        truth = np.asarray(nib.load(spec["truth_mask"]).dataobj) > 0
        score = f"brain {2 * (m & truth).sum() / (m.sum() + truth.sum()):.4f}"
    else:
        outs = {k: work / f"{spec['name']}_{k}.nii.gz" for k in OUTPUT_KEYS}
        prov = segment(spec["t1w"], spec["truth_mask"], outs, extra=spec["extra"],
                       backend=spec["backend"], threads=spec["threads"],
                       partial_volume=spec["partial_volume"])
        wall = time.perf_counter() - t
        d = np.asarray(nib.load(str(outs["dseg"])).dataobj)
        truth = np.asarray(nib.load(spec["truth_dseg"]).dataobj)
        valid = ~np.isin(truth, (4, 5, 6))
        parts = []
        for name, lab in (("WM", 2), ("GM", 1), ("CSF", 3)):
            a, b = (d == lab) & valid, (truth == lab) & valid
            parts.append(f"{name} {2 * (a & b).sum() / (a.sum() + b.sum()):.4f}")
        score = ", ".join(parts)
    import resource

    return {"wall_s": wall, "score": score, "timing": prov["timing_s"],
            "device": prov["device"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_child(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        last = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return {"error": last, "process_s": wall}
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["process_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--archive", type=Path)
    ap.add_argument("--subject", default="S001")
    ap.add_argument("--session", default="V01")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", action="store_true",
                    help="also the non-default resampling / channel variants")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "src"))
    from qmriflow.phantom.generate import PhantomOptions, generate_archive, load_manifest
    from tests.test_skullstrip import build_session

    tmp = Path(tempfile.mkdtemp(prefix="qmriflow-bench-ss-"))
    archive = a.archive
    if archive is None:
        archive = tmp / "phantom"
        print(f"generating phantom in {archive} ...", file=sys.stderr)
        generate_archive(archive, PhantomOptions(subjects=2, sessions=2, size="small", seed=11,
                                                 workers=2))
    s = build_session(archive, load_manifest(archive), a.subject, a.session, tmp / "inputs")
    from qmriflow.io import save_nifti

    truth_dseg = save_nifti(tmp / "truth_dseg.nii.gz", s["truth_dseg"], s["affine"],
                            dtype="uint8")
    base = {"work": str(tmp), "t1w": str(s["t1w"]), "truth_mask": str(s["truth_mask_file"]),
            "truth_dseg": str(truth_dseg), "threads": a.threads, "device": a.device}
    cases = [
        ("hd-bet, 1.5 mm (default)", {"step": "skull_strip", "backend": "hd-bet",
                                      "resample_mm": 1.5}),
        ("deepbet, 1 mm (default)", {"step": "skull_strip", "backend": "deepbet",
                                     "resample_mm": 1.0}),
        ("atropos + PV, T1w+T2w+FLAIR", {"step": "segment", "backend": "atropos",
                                         "partial_volume": True,
                                         "extra": {"T2w": str(s["t2w"]),
                                                   "FLAIR": str(s["flair"])}}),
        ("atropos + PV, T1w only", {"step": "segment", "backend": "atropos",
                                    "partial_volume": True, "extra": None}),
    ]
    if a.variants:
        cases += [
            ("hd-bet, 1 mm", {"step": "skull_strip", "backend": "hd-bet", "resample_mm": 1.0}),
            ("hd-bet, input grid", {"step": "skull_strip", "backend": "hd-bet",
                                    "resample_mm": None}),
            ("deepbet, 1.5 mm", {"step": "skull_strip", "backend": "deepbet",
                                 "resample_mm": 1.5}),
            ("deepbet, input grid", {"step": "skull_strip", "backend": "deepbet",
                                     "resample_mm": None}),
            ("atropos + PV, T1w+FLAIR", {"step": "segment", "backend": "atropos",
                                         "partial_volume": True,
                                         "extra": {"FLAIR": str(s["flair"])}}),
            ("atropos hard labels, T1w", {"step": "segment", "backend": "atropos",
                                          "partial_volume": False, "extra": None}),
        ]
    if os.environ.get("FSLDIR"):
        cases.append(("fast, T1w", {"step": "segment", "backend": "fast",
                                    "partial_volume": False, "extra": None}))
    print(f"\n{a.subject}_{a.session}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, threads={a.threads}, device={a.device}\n")
    print("| case | call wall (s) | process wall (s) | peak RSS (MiB) | Dice |")
    print("|---|---:|---:|---:|---|")
    for i, (name, spec) in enumerate(cases):
        r = _run_child({**base, **spec, "name": f"case{i}"})
        if "error" in r:
            print(f"| {name} | - | {r['process_s']:.1f} | - | error: {r['error']} |")
            continue
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-"
        print(f"| {name} | {r['wall_s']:.1f} | {r['process_s']:.1f} | {rss} | {r['score']} |",
              flush=True)


if __name__ == "__main__":
    main()
