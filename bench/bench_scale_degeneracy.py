"""Scale degeneracy (issue 8): accuracy, seed spread, protocol invariance and within-WM
correlation of each scaling method, on phantoms whose tissue values vary per subject.

    python bench/bench_scale_degeneracy.py WORK [--subjects 10] [--tissue-range 0.2]
        [--spatial-variation 0.08] [--methods seed calibrated] [--seeds 0 1 2] [--epochs 40]

1. ``qmriflow phantom`` archive (``--size small``) in which every WM/GM/CSF/lesion parameter of
   every subject is drawn uniformly within ±``tissue-range`` of its reference (PD capped at 1)
   and the smooth within-tissue variation has SD ``spatial-variation``; lesions in 2 of 3
   subjects (WMH, tumour);
2. ideal preprocessing onto a 2 mm / 112² grid (as bench_model_accuracy.py: true transforms, no
   bias field, truth dseg); plus, for every session, a *protocol twin*: the same subject on the
   same grid, synthesised from the truth maps with another protocol cluster of the seed
   (different T2w TR, FLAIR TE, jitter), its own gains and noise — only inferred, never trained;
3. for each method and training seed: ``train`` (same pack), ``infer`` every session and twin
   (``seed+pin``: the seed-trained model with calibrated inference, i.e. the pinning alone);
4. metrics in eroded truth WM/GM: WM/GM mean T1/T2/PD vs truth (%), spread over seeds of every
   session's WM/GM means (max − min over seeds, % of their mean), session vs twin (WM/GM
   means %, voxel-wise Pearson r and Lin's CCC in WM+GM), and the voxel-wise correlation with
   the truth inside eroded WM (i.e. with the true smooth variation). Markdown tables on stdout,
   raw numbers in WORK/degeneracy.json, a plot of recovered vs true WM T1 in
   WORK/wm_t1_recovered_vs_true.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model_accuracy import ROLES, build_sessions, session_metrics

KEYS = ("T1map", "T2map", "PDmap")


def build_twin(sdir: Path, cluster_shift: int = 4, snr: float = 40.0, suffix: str = "P2") -> Path:
    """The session's subject on the same grid, acquired with another protocol cluster."""
    from qmriflow import physics
    from qmriflow.io import save_nifti, write_json
    from qmriflow.model.data import session_files
    from qmriflow.phantom.protocols import CLUSTERS, draw_session_protocols

    f = session_files(sdir)
    twin = sdir.parent / f"ses-{f.session}{suffix}"
    tf = session_files(twin)
    if tf.params.is_file():
        return twin
    tag = "" if suffix == "P2" else suffix  # independent noise for every twin
    rng = np.random.default_rng(zlib.crc32(f"{f.label}-twin{tag}".encode()))
    params = json.loads(f.params.read_text())
    orig = {r: physics.Protocol.from_dict(params[r]) for r in ROLES}
    # the original's cluster is not stored: shift by its T2w TR rank among the clusters
    k = int(np.argmin([abs(c[2] - orig["t2w"].tr_ms) for c in CLUSTERS]))
    _, series = draw_session_protocols(rng, cluster=(k + cluster_shift) % len(CLUSTERS))
    protos = {sp.role: sp.protocol for sp in series if sp.role in ROLES}
    (twin / "anat").mkdir(parents=True, exist_ok=True)
    (twin / "truth").mkdir(exist_ok=True)
    for src, dst in ((f.brain_mask, tf.brain_mask), (f.dseg, tf.dseg),
                     (f.wm_eroded, tf.wm_eroded), (f.gm_eroded, tf.gm_eroded)):
        shutil.copyfile(src, dst)
    truth = {}
    for key in KEYS:
        src = sdir / "truth" / f"{f.label}_{key}.nii.gz"
        shutil.copyfile(src, twin / "truth" / f"{tf.label}_{key}.nii.gz")
        img = nib.load(src)
        truth[key] = np.asarray(img.dataobj, np.float64)
        aff = img.affine
    brain = np.asarray(nib.load(f.brain_mask).dataobj) > 0
    new = {"session": tf.label}
    for role, name in ROLES.items():
        p = protos[role]
        clean = np.asarray(physics.signal(p, truth["PDmap"], truth["T1map"], truth["T2map"]))
        clean *= float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
        sig = float(clean[brain].mean() / snr)
        img = np.sqrt((clean + rng.normal(0, sig, clean.shape)) ** 2
                      + rng.normal(0, sig, clean.shape) ** 2)
        save_nifti(tf.images[name], img, aff)
        new[role] = {**params[role], **p.as_dict()}
    write_json(tf.params, new)
    return twin


def _ccc(a: np.ndarray, b: np.ndarray) -> float:
    ma, mb = a.mean(), b.mean()
    cov = ((a - ma) * (b - mb)).mean()
    return float(2 * cov / (a.var() + b.var() + (ma - mb) ** 2))


def twin_metrics(sdir: Path, twin: Path, maps_dir: Path) -> dict:
    from qmriflow.model.data import session_files
    from qmriflow.model.infer import map_paths

    f, tf = session_files(sdir), session_files(twin)
    a, b = map_paths(maps_dir, f.label), map_paths(maps_dir, tf.label)
    wm = nib.load(f.wm_eroded).get_fdata() > 0
    gm = nib.load(f.gm_eroded).get_fdata() > 0
    both = wm | gm
    out: dict = {}
    for key in KEYS:
        pa, pb = nib.load(a[key]).get_fdata(), nib.load(b[key]).get_fdata()
        out[f"{key}_r"] = float(np.corrcoef(pa[both], pb[both])[0, 1])
        out[f"{key}_ccc"] = _ccc(pa[both], pb[both])
        for t, m in (("WM", wm), ("GM", gm)):
            x, y = pa[m].mean(), pb[m].mean()
            out[f"{key}_{t}_diff"] = float(200 * abs(x - y) / (x + y))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--phantom-seed", type=int, default=808)
    ap.add_argument("--tissue-range", type=float, default=0.2)
    ap.add_argument("--spatial-variation", type=float, default=0.08)
    ap.add_argument("--methods", nargs="+", default=["seed", "calibrated", "seed+pin"],
                    help="seed, calibrated, or seed+pin (seed-trained, calibrated inference)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--slices", type=int, default=14)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--twins-from-truth", action="store_true",
                    help="compare two twins both synthesised from the truth maps (same cluster "
                         "re-drawn vs +4 clusters) instead of the session vs its twin: removes "
                         "the difference between signal- and parameter-space partial volume")
    ap.add_argument("--smoothing", default=None, metavar="R,SS,SR,SV",
                    help="calibrated inference with this map smoothing (radius, spatial SD, "
                         "guide SD, value SD; radius 0 = off) instead of the default; runs are "
                         "keyed method/seed/smooth-R-SS-SR-SV-GUIDE and reuse the trained model")
    ap.add_argument("--guide", default="images", choices=["images", "network"],
                    help="with --smoothing: what steers the edge-preserving weights")
    a = ap.parse_args()
    if a.smoothing:
        a.smoothing = f"{a.smoothing},{a.guide}"
    import torch

    from qmriflow.model.calibration import DEFAULT_SMOOTHING, Smoothing
    from qmriflow.model.data import pack_sessions
    from qmriflow.model.infer import infer_session
    from qmriflow.model.train import TrainConfig, train
    from qmriflow.phantom.generate import PhantomOptions, generate_archive

    torch.set_num_threads(a.threads)
    work = a.work
    archive = work / "archive"
    t0 = time.perf_counter()
    if not (archive / "manifest.json").is_file():
        generate_archive(archive, PhantomOptions(
            subjects=a.subjects, sessions=a.sessions, size="small", seed=a.phantom_seed,
            workers=a.threads, tissue_range=a.tissue_range,
            spatial_variation=a.spatial_variation))
    dirs = build_sessions(archive, work / "results", 2.0, 112, a.slices)
    twins = [build_twin(d) for d in dirs]
    if a.twins_from_truth:
        dirs = [build_twin(d, cluster_shift=0, suffix="P1") for d in dirs]
    print(f"phantom + sessions + twins: {time.perf_counter() - t0:.0f} s", flush=True)
    if not (work / "pack" / "index.json").is_file():
        pack_sessions(dirs, work / "pack")
    out_json = work / "degeneracy.json"
    report: dict = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": {}}
    report["args"] = {k: str(v) for k, v in vars(a).items()}
    for method in a.methods:
        for seed in a.seeds:
            key = f"{method}/{seed}" + (f"/smooth-{a.smoothing.replace(',', '-')}"
                                         if a.smoothing else "")
            # the smoothing the maps are made with (a given one is part of the key); a run on
            # record under the default is reused only if the default has not changed since
            used = a.smoothing or ",".join(str(v) for v in vars(DEFAULT_SMOOTHING).values())
            if key in report["runs"] and (
                    a.smoothing or report["runs"][key].get("smoothing_used") == used):
                continue
            # "seed+pin": the seed-trained model, its maps moved onto calibrated scales
            trained_as, _, pin = method.partition("+")
            mdir = work / f"model_{trained_as}_seed{seed}"
            t0 = time.perf_counter()
            summary = train(work / "pack", mdir, TrainConfig(
                width=a.width, epochs=a.epochs, seed=seed, device="cpu", threads=a.threads,
                scaling=trained_as), progress=False)
            t_train = time.perf_counter() - t0
            mp = mdir / (("maps_pin" if pin else "maps") + ("_tt" if a.twins_from_truth else "")
                         + (f"_smooth{a.smoothing.replace(',', '-')}" if a.smoothing else ""))
            extra = {}
            if a.smoothing:  # radius, spatial SD, guide SD, value SD, guide
                r_, ss_, sr_, sv_, g_ = a.smoothing.split(",")
                extra["smoothing"] = Smoothing(int(r_), float(ss_), float(sr_), float(sv_), g_)
            ses, tw = [], []
            for d, tdir in zip(dirs, twins, strict=True):
                for s in (d, tdir):
                    infer_session(s, mdir / "model.pt", mp, device="cpu", precision="fp32",
                                  threads=a.threads, synth=False,
                                  scaling="calibrated" if pin else None, **extra)
                ses.append(session_metrics(d, mp))
                tw.append(twin_metrics(d, tdir, mp))
            name = f"{method} smooth {a.smoothing}" if a.smoothing else method
            report["runs"][key] = {"method": name, "seed": seed, "train_s": t_train,
                                   "smoothing": a.smoothing, "smoothing_used": used,
                                   "best_val": summary["best_val_loss"], "sessions": ses,
                                   "twins": tw}
            out_json.write_text(json.dumps(report, indent=1))
            print(f"{key}: trained in {t_train:.0f} s", flush=True)
    # every variant of the asked methods that is on record (e.g. smoothing runs)
    names = list(dict.fromkeys(r["method"] for r in report["runs"].values()
                               if r["method"].split(" ")[0] in a.methods))
    print_tables(report, names)
    plot(report, names, work / "wm_t1_recovered_vs_true.png")
    return 0


def _rel(p: float, t: float) -> float:
    return 100.0 * (p - t) / t


def print_tables(report: dict, methods: list[str]) -> None:
    runs = report["runs"]
    print("\n| method | quantity | tissue | rel. error % mean ± SD | max abs % | sessions within "
          "limit* | seed spread max % | twin diff max % |\n|---|---|---|---|---|---|---|---|")
    summary = {}
    for m in methods:
        mr = [r for r in runs.values() if r["method"] == m]
        if not mr:
            continue
        for key in KEYS:
            lim = 10.0 if key == "PDmap" else 5.0
            for t in ("WM", "GM"):
                errs = np.array([[_rel(s[f"{key}_{t}_pred"], s[f"{key}_{t}_true"])
                                  for s in r["sessions"]] for r in mr])  # (seeds, sessions)
                vals = np.array([[s[f"{key}_{t}_pred"] for s in r["sessions"]] for r in mr])
                spread = 100 * (vals.max(0) - vals.min(0)) / vals.mean(0)
                twin = np.array([[w[f"{key}_{t}_diff"] for w in r["twins"]] for r in mr])
                within = np.mean(np.abs(errs) <= lim)
                print(f"| {m} | {key} | {t} | {errs.mean():+.1f} ± {errs.std():.1f} | "
                      f"{np.abs(errs).max():.1f} | {100 * within:.0f} % | "
                      f"{spread.max() if len(mr) > 1 else float('nan'):.1f} | "
                      f"{twin.max():.1f} |")
        rw = {k: np.array([[s[f"{k}_r_wm"] for s in r["sessions"]] for r in mr]) for k in KEYS}
        rt = {k: np.array([[s[f"{k}_r"] for s in r["sessions"]] for r in mr]) for k in KEYS}
        tr = {k: np.array([[w[f"{k}_r"] for w in r["twins"]] for r in mr]) for k in KEYS}
        tc = {k: np.array([[w[f"{k}_ccc"] for w in r["twins"]] for r in mr]) for k in KEYS}
        summary[m] = (rw, tr, tc, rt)
    print("\n* within 5 % (T1, T2) or 10 % (PD) of truth, over sessions × seeds.")
    print("\n| method | within-WM r vs truth T1 / T2 / PD (median, min) | twin voxel r "
          "T1 / T2 / PD (min) | twin CCC T1 / T2 / PD (min) | r vs truth in WM+GM T1 / T2 / PD "
          "(min) |\n|---|---|---|---|---|")
    for m, (rw, tr, tc, rt) in summary.items():
        print(f"| {m} | " + " / ".join(f"{np.median(rw[k]):.2f} ({rw[k].min():.2f})"
                                         for k in KEYS)
              + " | " + " / ".join(f"{tr[k].min():.3f}" for k in KEYS)
              + " | " + " / ".join(f"{tc[k].min():.3f}" for k in KEYS)
              + " | " + " / ".join(f"{rt[k].min():.3f}" for k in KEYS) + " |")
    sys.stdout.flush()


def plot(report: dict, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), dpi=110)
    for ax, tissue in zip(axes, ("WM", "GM"), strict=True):
        lo, hi = np.inf, -np.inf
        for m, mk in zip(methods, "os^v", strict=False):
            for r in (r for r in report["runs"].values() if r["method"] == m):
                x = [s[f"T1map_{tissue}_true"] for s in r["sessions"]]
                y = [s[f"T1map_{tissue}_pred"] for s in r["sessions"]]
                ax.scatter(x, y, marker=mk, s=18, alpha=0.6,
                           label=f"{m} (seed {r['seed']})")
                lo, hi = min(lo, *x, *y), max(hi, *x, *y)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [lo * 0.95, hi * 0.95], "k:", lw=0.6)
        ax.plot([lo, hi], [lo * 1.05, hi * 1.05], "k:", lw=0.6)
        ax.set_xlabel(f"true {tissue} T1 (s)")
        ax.set_ylabel(f"recovered {tissue} T1 (s)")
        ax.set_title(f"{tissue} T1 per session (dotted: ±5 %)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
