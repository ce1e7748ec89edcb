"""Accuracy of the self-supervised relaxometry model against phantom truth.

    python bench/bench_model_accuracy.py WORK [--subjects 10 --sessions 2] [--seeds 0 1 2]
        [--width 8] [--epochs 8] [--inplane-mm 2 --matrix 112] [--slices 14]

1. ``qmriflow phantom`` archive (``--size small``; every subject is scanned in ``--sessions``
   sessions, each with its own protocol drawn around one of the seed's 9 protocol clusters);
2. **ideal preprocessing** (stated honestly: not the real registration/N4/skull-strip/
   segmentation steps): each series' noise-free image × its global scale is resampled onto the
   T2w-based analysis grid through the *true* series→T2w transform (SciPy, linear), Rician noise
   at the series' SNR is added on the grid, no bias field (= perfect N4); brain mask, dseg and
   truth maps come from the T2w series' truth. So this measures the model and its objective,
   not the preprocessing. With ``--inplane-mm 2 --matrix 112`` the grid is coarser than the
   pipeline's 1 mm / 224 (4× less arithmetic, to train on 2 CPU cores);
3. ``pack`` all sessions, ``train`` a model per seed, ``infer`` every session;
4. metrics in eroded truth WM and GM (2 mm from CSF, lesion labels excluded): voxel-wise Pearson r
   of T1 and T2 (WM+GM), mean T1/T2/PD per session vs truth (relative error), the two-protocol
   same-subject difference of the WM/GM means, and the change of the WM/GM means when one
   contrast is dropped at inference. Printed as Markdown; raw numbers in WORK/accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ROLES = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR"}


def build_sessions(archive: Path, results: Path, inplane_mm: float, matrix: int,
                   max_slices: int | None) -> list[Path]:
    """Ideal-preprocessed sessions from the phantom truth (see the module docstring)."""
    from test_register import grid_to_series, resample_world

    from qmriflow.io import save_nifti, write_json
    from qmriflow.phantom.generate import load_manifest
    from qmriflow.preproc.register import target_grid
    from qmriflow.preproc.segment import erode_near_csf

    man = load_manifest(archive)
    by_ses: dict[tuple[str, str], dict[str, dict]] = {}
    for r in man["series"]:
        if r["role"] in ROLES:
            by_ses.setdefault((r["subject"], r["session"]), {})[r["role"]] = r
    dirs = []
    for (sub, ses), rows in sorted(by_ses.items()):
        label = f"sub-{sub}_ses-{ses}"
        d = results / f"sub-{sub}" / f"ses-{ses}"
        dirs.append(d)
        if (d / f"{label}_desc-protocol_params.json").is_file():
            continue
        t2 = rows["t2w"]
        seg_img = nib.load(archive / t2["truth"]["dseg"])
        head_t2 = np.asarray(seg_img.dataobj) > 0
        grid = target_grid(seg_img, inplane_mm, matrix, mask=head_t2)
        shape, aff = grid.shape, grid.affine
        # keep the central slices with most brain
        brain_full = resample_world(np.asarray(nib.load(archive / t2["truth"]["brainmask"]
                                                        ).dataobj), seg_img.affine, aff, shape,
                                    order=0) > 0.5
        area = brain_full.sum(axis=(0, 1))
        ks = np.nonzero(area > 0.3 * area.max())[0]
        if max_slices and ks.size > max_slices:
            mid = ks[ks.size // 2]
            ks = np.arange(mid - max_slices // 2, mid - max_slices // 2 + max_slices)
        k0, k1 = int(ks[0]), int(ks[-1]) + 1
        sub_aff = aff.copy()
        sub_aff[:3, 3] = aff[:3, :3] @ [0, 0, k0] + aff[:3, 3]
        sub_shape = (shape[0], shape[1], k1 - k0)
        rng = np.random.default_rng(zlib.crc32(label.encode()))
        anat = d / "anat"
        pre = anat / f"{label}_space-T2w"
        params = {"session": label}
        for role, name in ROLES.items():
            r = rows[role]
            nf = nib.load(archive / r["truth"]["noisefree"])
            img = r["global_scale"] * resample_world(np.asarray(nf.dataobj, np.float64),
                                                     nf.affine, sub_aff, sub_shape,
                                                     grid_to_series(r))
            sig = float(r["noise_sigma"])
            img = np.sqrt((img + rng.normal(0, sig, img.shape)) ** 2
                          + rng.normal(0, sig, img.shape) ** 2)
            save_nifti(f"{pre}_desc-preproc_{name}.nii.gz", img, sub_aff)
            params[role] = {"role": role, **r["protocol"], "field_strength_t": 3.0,
                            "manufacturer_model": r["scanner_model"]}
        truth = {}
        for key in ("T1map", "T2map", "PDmap"):
            im = nib.load(archive / t2["truth"][key])
            truth[key] = resample_world(np.asarray(im.dataobj, np.float64), im.affine, sub_aff,
                                        sub_shape)
            save_nifti(d / "truth" / f"{label}_{key}.nii.gz", truth[key], sub_aff)
        dseg = resample_world(np.asarray(seg_img.dataobj), seg_img.affine, sub_aff, sub_shape,
                              order=0).astype(np.uint8)
        bm = nib.load(archive / t2["truth"]["brainmask"])
        brain = resample_world(np.asarray(bm.dataobj), bm.affine, sub_aff, sub_shape,
                               order=0) > 0.5
        seg3 = np.where(np.isin(dseg, (1, 2, 3)), dseg, 0).astype(np.uint8)
        wm, gm = erode_near_csf(seg3, (inplane_mm, inplane_mm, float(
            np.linalg.norm(sub_aff[:3, 2]))), 2.0)
        save_nifti(f"{pre}_desc-brain_mask.nii.gz", brain, sub_aff, dtype=np.uint8)
        save_nifti(f"{pre}_dseg.nii.gz", seg3, sub_aff, dtype=np.uint8)
        save_nifti(f"{pre}_label-WM_desc-eroded_mask.nii.gz", wm, sub_aff, dtype=np.uint8)
        save_nifti(f"{pre}_label-GM_desc-eroded_mask.nii.gz", gm, sub_aff, dtype=np.uint8)
        write_json(d / f"{label}_desc-protocol_params.json", params)
    return dirs


def session_metrics(sdir: Path, maps_dir: Path) -> dict:
    from qmriflow.model.data import session_files
    from qmriflow.model.infer import map_paths

    f = session_files(sdir)
    paths = map_paths(maps_dir, f.label)
    wm = nib.load(f.wm_eroded).get_fdata() > 0
    gm = nib.load(f.gm_eroded).get_fdata() > 0
    out: dict = {"label": f.label, "subject": f.subject}
    for key in ("T1map", "T2map", "PDmap"):
        pred = nib.load(paths[key]).get_fdata()
        tru = nib.load(sdir / "truth" / f"{f.label}_{key}.nii.gz").get_fdata()
        both = wm | gm
        out[f"{key}_r"] = float(np.corrcoef(pred[both], tru[both])[0, 1])
        # inside WM alone: the correlation with the true smooth variation
        out[f"{key}_r_wm"] = float(np.corrcoef(pred[wm], tru[wm])[0, 1])
        for tname, m in (("WM", wm), ("GM", gm)):
            out[f"{key}_{tname}_pred"] = float(pred[m].mean())
            out[f"{key}_{tname}_true"] = float(tru[m].mean())
        if paths[f"sd_{key}"].is_file():  # uncertainty map (scaling: calibrated)
            out[f"{key}_WM_sd"] = float(nib.load(paths[f"sd_{key}"]).get_fdata()[wm].mean())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--phantom-seed", type=int, default=2024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--inplane-mm", type=float, default=2.0)
    ap.add_argument("--matrix", type=int, default=112)
    ap.add_argument("--slices", type=int, default=14, help="central slices kept per session")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drop-one", action="store_true", help="also infer without each contrast")
    a = ap.parse_args()
    import torch

    from qmriflow.model.data import pack_sessions
    from qmriflow.model.infer import infer_session
    from qmriflow.model.train import TrainConfig, train
    from qmriflow.phantom.generate import PhantomOptions, generate_archive

    torch.set_num_threads(a.threads)
    work = a.work
    archive = work / "archive"
    t0 = time.perf_counter()
    if not (archive / "manifest.json").is_file():
        generate_archive(archive, PhantomOptions(subjects=a.subjects, sessions=a.sessions,
                                                 size="small", seed=a.phantom_seed,
                                                 workers=a.threads))
    print(f"phantom: {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    dirs = build_sessions(archive, work / "results", a.inplane_mm, a.matrix, a.slices)
    print(f"sessions: {len(dirs)} in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (work / "pack" / "index.json").is_file():
        pack_sessions(dirs, work / "pack")
    report: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "runs": []}
    for seed in a.seeds:
        mdir = work / f"model_seed{seed}"
        t0 = time.perf_counter()
        summary = train(work / "pack", mdir, TrainConfig(
            width=a.width, epochs=a.epochs, batch_size=a.batch_size, seed=seed, device="cpu",
            threads=a.threads), progress=False)
        t_train = time.perf_counter() - t0
        split = json.loads((mdir / "split.json").read_text())["subjects"]
        runs = {"seed": seed, "train_s": t_train, "history": summary["history"],
                "sessions": [], "drop": {}}
        for sdir in dirs:
            mp = mdir / "maps" / "all"
            infer_session(sdir, mdir / "model.pt", mp, device="cpu", precision="fp32",
                          threads=a.threads, synth=False)
            m = session_metrics(sdir, mp)
            m["split"] = split[m["subject"]]
            runs["sessions"].append(m)
            if a.drop_one:
                for drop in ("T1w", "T2w", "FLAIR"):
                    keep = tuple(c for c in ("T1w", "T2w", "FLAIR") if c != drop)
                    mpd = mdir / "maps" / f"no{drop}"
                    infer_session(sdir, mdir / "model.pt", mpd, contrasts=keep, device="cpu",
                                  precision="fp32", threads=a.threads, synth=False)
                    runs["drop"].setdefault(drop, []).append(session_metrics(sdir, mpd))
        report["runs"].append(runs)
        (work / "accuracy.json").write_text(json.dumps(report, indent=1))
        print_run(runs)
    print_spread(report["runs"])
    return 0


def _rel(p: float, t: float) -> float:
    return 100.0 * (p - t) / t


def print_run(run: dict) -> None:
    ses = run["sessions"]
    best_val = min(h["val_loss"] for h in run["history"])
    print(f"\n### training seed {run['seed']} ({run['train_s']:.0f} s; last epoch train loss "
          f"{run['history'][-1]['train_loss']:.4f}, best val {best_val:.4f})")
    for key in ("T1map", "T2map", "PDmap"):
        rs = [s[f"{key}_r"] for s in ses]
        print(f"{key}: Pearson r in WM+GM: median {np.median(rs):.3f} (min {min(rs):.3f}, "
              f"max {max(rs):.3f}) over {len(rs)} sessions")
    print("\n| quantity | tissue | truth mean | predicted mean | rel. error % (mean ± SD over "
          "sessions) | max abs rel. error % |\n|---|---|---|---|---|---|")
    for key in ("T1map", "T2map", "PDmap"):
        for t in ("WM", "GM"):
            errs = [_rel(s[f"{key}_{t}_pred"], s[f"{key}_{t}_true"]) for s in ses]
            tru = np.mean([s[f"{key}_{t}_true"] for s in ses])
            pre = np.mean([s[f"{key}_{t}_pred"] for s in ses])
            print(f"| {key} | {t} | {tru:.4f} | {pre:.4f} | {np.mean(errs):+.1f} ± "
                  f"{np.std(errs):.1f} | {np.max(np.abs(errs)):.1f} |")
    # two protocols, same subject
    by_sub: dict[str, list[dict]] = {}
    for s in ses:
        by_sub.setdefault(s["subject"], []).append(s)
    print("\nSame subject, two protocols (sessions differ in protocol cluster/jitter): "
          "|difference| of the WM/GM means, % of their mean")
    for key in ("T1map", "T2map", "PDmap"):
        for t in ("WM", "GM"):
            d = []
            for lst in by_sub.values():
                if len(lst) >= 2:
                    a, b = lst[0][f"{key}_{t}_pred"], lst[1][f"{key}_{t}_pred"]
                    d.append(200.0 * abs(a - b) / (a + b))
            if d:
                print(f"  {key} {t}: mean {np.mean(d):.2f} %, max {np.max(d):.2f} % "
                      f"({len(d)} subjects)")
    if run["drop"]:
        print("\nDrop one contrast at inference: change of the WM/GM means vs all three, % "
              "(mean |change| over sessions / max)")
        for drop, lst in run["drop"].items():
            parts = []
            for key in ("T1map", "T2map", "PDmap"):
                for t in ("WM", "GM"):
                    ch = [abs(_rel(x[f"{key}_{t}_pred"], s[f"{key}_{t}_pred"]))
                          for x, s in zip(lst, ses, strict=True)]
                    parts.append(f"{key[:2]} {t} {np.mean(ch):.1f}/{np.max(ch):.1f}")
            print(f"  without {drop}: " + ", ".join(parts))
    sys.stdout.flush()


def print_spread(runs: list[dict]) -> None:
    if len(runs) < 2:
        return
    print("\nSpread over training seeds of the archive-mean WM/GM values (mean ± SD over seeds):")
    for key in ("T1map", "T2map", "PDmap"):
        for t in ("WM", "GM"):
            vals = [np.mean([s[f"{key}_{t}_pred"] for s in r["sessions"]]) for r in runs]
            tru = np.mean([s[f"{key}_{t}_true"] for s in runs[0]["sessions"]])
            print(f"  {key} {t}: {np.mean(vals):.4f} ± {np.std(vals):.4f} (truth {tru:.4f}; "
                  f"seeds {', '.join(f'{v:.4f}' for v in vals)})")


if __name__ == "__main__":
    sys.exit(main())
