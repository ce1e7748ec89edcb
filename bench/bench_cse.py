"""Speed of the fat/water branch on a 232×256×32 synthetic 6-echo series (seed-004 protocol)
and on one 232×256 slice of it, idle and under load.

Stages, each in its own subprocess (so that each peak-memory figure is its own):

* ``fit``: the two-start Rician ML fit of every foreground voxel (voxels/s);
* ``dual``: the dual network end to end (mask, σ, training both networks, inference of both,
  likelihood choice), plus inference alone (voxels/s);
* the ratio of the two end-to-end times (fit / dual) is reported from one run.

``--slice-too`` adds the same stages on one slice (232×256×1), and ``--load`` runs the slice
stages again while two competing multi-threaded jobs (each a 2-thread torch matmul loop) share
the CPUs, reporting each path's slowdown. Every stage runs with ``--threads`` (default 2: the
rule's grant) and records ``uptime``'s load.

Usage: ``python bench/bench_cse.py [--device cpu|cuda] [--slices 32] [--slice-too] [--load]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = (232, 256, 32)
TE_MS = tuple(1.15 * k for k in range(1, 7))


def synthetic_series(shape: tuple[int, int, int] = SHAPE, seed: int = 0):
    """Body-like ellipse per slice: smooth PDFF (0–1) and R2* (10–400 1/s), SNR 60, air."""
    from scipy import ndimage

    from qmriflow.cse import MultiEchoSeries
    from qmriflow.physics import cse_magnitude

    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]),
                       indexing="ij")
    body = ((x / 0.85) ** 2 + (y / 0.75) ** 2 < 1)[..., None].repeat(shape[2], -1)
    smooth = lambda s: ndimage.gaussian_filter(rng.standard_normal(shape), s)  # noqa: E731
    a = smooth(8.0)
    pdff = np.clip(0.5 + a / a.std() * 0.35, 0, 1)
    b = smooth(6.0)
    r2 = np.clip(80 + b / b.std() * 80, 10, 400)
    s0 = np.where(body, 1.0, 0.0)
    sigma = 1.0 / 60
    nu = cse_magnitude(s0.astype(np.float32), pdff.astype(np.float32), r2.astype(np.float32),
                       TE_MS, 3.0)
    noise = rng.standard_normal((2, *nu.shape)).astype(np.float32) * sigma
    data = np.abs(nu + noise[0] + 1j * noise[1]).astype(np.float32)
    return MultiEchoSeries(data=data, te_ms=np.asarray(TE_MS), field_t=3.0, affine=np.eye(4),
                           sources=["synthetic"], prefix="bench"), sigma


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def stage(name: str, device: str, slices: int, threads: int = 2) -> dict:
    import torch

    from qmriflow.cse import CseOptions, FitOptions, TrainOptions, run_cse

    series, sigma_true = synthetic_series((SHAPE[0], SHAPE[1], slices))
    out: dict = {"stage": name, "device": device, "shape": list(series.data.shape),
                 "threads_granted": threads, "load_before": _load()}
    torch.set_num_threads(threads)  # as the CLI does with --threads
    t0 = time.perf_counter()
    if name == "fit":
        res = run_cse(series, CseOptions(method="fit", device=device, threads=threads,
                                         fit=FitOptions(device=device)))
    else:
        res = run_cse(series, CseOptions(method="dual", device=device, threads=threads,
                                         train=TrainOptions(device=device)))
        out["inference_s"] = res.seconds["inference"]
        out["training_s"] = res.seconds["training"]
        out["epochs"] = res.info["training"]["epochs"]
        out["inference_voxels_per_s"] = res.info["inference_voxels_per_s"]
    wall = time.perf_counter() - t0
    n = int(res.mask.sum())
    out.update({"voxels": n, "end_to_end_s": wall, "seconds": res.seconds,
                "sigma_est": res.sigma, "sigma_true": sigma_true,
                "peak_rss_mib": _peak_mib()})
    if name == "fit":
        out["fit_voxels_per_s"] = n / res.seconds["fit"]
        out["fit_mean_iterations"] = res.info["fit"]["mean_iterations"]
    out["threads_used"] = res.info.get("threads")
    out["readout"] = {k: v for k, v in res.info.get("readout", {}).items() if k != "estimate"}
    out["load_after"] = _load()
    truth_ok = res.mask.sum() > 0
    out["mask_ok"] = bool(truth_ok)
    return out


COMPETITOR = ("import torch, time\ntorch.set_num_threads(2)\na = torch.randn(1500, 1500)\n"
              "t = time.time()\nwhile time.time() - t < {secs}:\n    a = torch.tanh(a @ a / 40)\n")


def _run_stage(name: str, device: str, slices: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--stage", name, "--device", device,
                           "--slices", str(slices), "--threads", str(threads)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _slice_rows(tag: str, f: dict, d: dict) -> list[tuple[str, str]]:
    return [
        (f"{tag}: fit voxels/s", f"{f['fit_voxels_per_s']:,.0f} ({f['voxels']} voxels, "
                                 f"load {f['load_before']:.1f})"),
        (f"{tag}: dual train + infer s", f"{d['training_s'] + d['inference_s']:.1f} "
                                         f"({d['epochs']} epochs, load {d['load_before']:.1f})"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slices", type=int, default=SHAPE[2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["fit", "dual"])
    ap.add_argument("--slice-too", action="store_true", help="also one 232x256 slice")
    ap.add_argument("--load", action="store_true",
                    help="also the slice under two competing 2-thread jobs")
    ap.add_argument("--skip-volume", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.stage:
        print(json.dumps(stage(a.stage, a.device, a.slices, a.threads)))
        return 0
    results: dict = {"machine": {"cpus": len(__import__("os").sched_getaffinity(0)),
                                 "threads_granted": a.threads}}
    rows: list[tuple[str, str]] = []
    if not a.skip_volume:
        for name in ("fit", "dual"):
            results[name] = _run_stage(name, a.device, a.slices, a.threads)
        f, d = results["fit"], results["dual"]
        rows += [
            ("series", f"{SHAPE[0]}x{SHAPE[1]}x{a.slices}, 6 echoes, {f['voxels']} foreground "
                       "voxels"),
            ("device", a.device),
            ("two-start fit: voxels/s", f"{f['fit_voxels_per_s']:,.0f} "
                                        f"(mean {f['fit_mean_iterations']:.2f} LM its/start, "
                                        f"load {f['load_before']:.1f})"),
            ("two-start fit: end-to-end s", f"{f['end_to_end_s']:.1f}"),
            ("fit: peak RSS MiB", f"{f['peak_rss_mib']:.0f}"),
            ("dual: training s (both nets)", f"{d['training_s']:.1f} ({d['epochs']} epochs)"),
            ("dual: inference voxels/s", f"{d['inference_voxels_per_s']:,.0f}"),
            ("dual: end-to-end s", f"{d['end_to_end_s']:.1f} (load {d['load_before']:.1f})"),
            ("dual: peak RSS MiB", f"{d['peak_rss_mib']:.0f}"),
            ("ratio end-to-end fit/dual", f"{f['end_to_end_s'] / d['end_to_end_s']:.2f}"),
            ("conventional fmincon (published)", "~10 ms/voxel -> "
                                                 f"{f['voxels'] * 0.01 / 60:.0f} min for this "
                                                 "series"),
            ("sigma estimated / true", f"{d['sigma_est']:.5f} / {d['sigma_true']:.5f}"),
        ]
    if a.slice_too or a.load:
        sl = {n: _run_stage(n, a.device, 1, a.threads) for n in ("fit", "dual")}
        results["slice"] = sl
        rows += _slice_rows("slice 232x256 idle", sl["fit"], sl["dual"])
    if a.load:
        comp = [subprocess.Popen([sys.executable, "-c", COMPETITOR.format(secs=900)])
                for _ in range(2)]
        try:
            time.sleep(5)
            ld = {n: _run_stage(n, a.device, 1, a.threads) for n in ("fit", "dual")}
        finally:
            for c in comp:
                c.terminate()
                c.wait()
        results["slice_under_load"] = ld
        rows += _slice_rows("slice under 2 competing 2-thread jobs", ld["fit"], ld["dual"])
        slow = {"fit": sl["fit"]["fit_voxels_per_s"] / ld["fit"]["fit_voxels_per_s"],
                "dual": (ld["dual"]["training_s"] + ld["dual"]["inference_s"])
                / (sl["dual"]["training_s"] + sl["dual"]["inference_s"])}
        results["slowdown_under_load"] = slow
        rows.append(("slowdown under load (fit, dual)", f"{slow['fit']:.2f}x, "
                                                        f"{slow['dual']:.2f}x"))
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
