"""How well can a protocol cluster's scales be identified? A Monte-Carlo of the tissue-level
problem of issue 22, with the per-series gain jitter the acceptance list prescribes.

    python bench/bench_cluster_floor.py [--clusters 40] [--seed 1] [--json OUT]

The yardstick's acceptance settings (``--gain-model protocol --gain-jitter 0.03
--tissue-range 0.2 --global-shift 0.1``) give each series the gain
``cluster ratio × session factor × jitter`` with jitter log-normal (log-SD 0.03, independent
per series). The cluster fit (:func:`qmriflow.model.cluster_scales.fit_cluster`) learns the
ratios and one factor per session; the jitter of the FLAIR relative to the T2w is a direction
no tissue physics fixes inside a session (FLAIR nulls CSF), so it reaches the maps. This script
measures how far, in the best case: no network, no partial volume, no bias field, no
segmentation error, no model mismatch — the exact pure-tissue WM/GM/CSF signals of the
estimator's own equations (:func:`qmriflow.physics.signal`, 1 % noise on each median), tissues
drawn as the yardstick's phantom draws them (table ``independent``, every parameter within
±20 %, a brain-wide T1/T2 factor within ±10 % per subject), protocols of one phantom cluster
per fit. The errors here are therefore a floor for the maps' WM/GM session means.

Rows: gain jitter 0 / 0.01 / 0.02 / 0.03 (the acceptance's), 6 and 10 sessions per cluster
(the yardstick's ``--quick`` 6 × 1 and its full 10 subjects), the cluster's level set by the
cohort prior (errors judged after removing each cluster's median offset, as the acceptance
allows) or by a calibration session with exact reference values (its own errors left out).
Baselines on the same draws: ``per-session`` (:func:`~qmriflow.model.calibration.calibrate_scales`,
the scales of each session alone) and ``prior`` (the estimator's prior for every session).
Columns: within-cluster slope (r) of estimated on true session means, pooled over clusters;
the share of clusters whose six slopes all lie in [0.8, 1.2] with r ≥ 0.9; RMS error; the
share of sessions with WM/GM T1 and T2 within 5 % and PD within 10 %.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calibration_floor import ROLE_TO_CONTRAST, mode_normalise, session_protocols

FIGURES = [(t, p) for p in ("t1_s", "t2_s", "pd") for t in ("WM", "GM")]
NAMES = {"t1_s": "T1", "t2_s": "T2", "pd": "PD"}
CRIT = {"t1_s": 5.0, "t2_s": 5.0, "pd": 10.0}


def draw_subjects(rng: np.random.Generator, n: int, spread: float, shift: float
                  ) -> list[dict[str, dict[str, float]]]:
    """True WM/GM/CSF values of ``n`` subjects, as the yardstick's phantom draws them."""
    from qmriflow.phantom.tissues import BY_NAME, subject_tissues

    out = []
    for _ in range(n):
        st = subject_tissues(rng, spread=spread, table="independent")
        g1, g2 = rng.uniform(1.0 - shift, 1.0 + shift, 2)
        tis = {}
        for t in ("WM", "GM", "CSF"):
            i = BY_NAME[t].label
            f1, f2 = (g1, g2) if t != "CSF" else (1.0, 1.0)
            tis[t] = {"pd": float(st.pd[i]), "t1_s": float(st.t1_s[i]) * f1,
                      "t2_s": float(st.t2_s[i]) * f2}
        out.append(tis)
    return out


def flair_echo_train(p: Any) -> Any:
    """The FLAIR protocol as the estimator models a long 3D FLAIR train by default: EPG with
    the ASSUMED variable-angle schedule (``archive.params.estimator_echo_train``) for a
    151-echo train in every session (the phantom draws 150-189 echoes per session; truth and
    estimator share this one train here)."""
    from qmriflow import physics
    from qmriflow.archive.params import estimator_echo_train

    entry = {"sequence": "flair", "role": "flair", "echo_train_length": 151,
             "te_ms": p.te_ms, "tr_ms": p.tr_ms, "ti_ms": p.ti_ms, "acquisition": "3D",
             "fa_deg": p.fa_deg}
    train, source = estimator_echo_train(entry, {})
    if train is None:
        raise RuntimeError(f"no echo train for {p}: {source}")
    return physics.Protocol.from_dict({**p.as_dict(), "echo_train": train})


def draw_cluster(rng: np.random.Generator, subjects: list[dict[str, dict[str, float]]],
                 jitter: float, flair_model: str = "te-factor") -> list[dict[str, Any]]:
    """One protocol cluster with a session of each subject: its protocols (one of the
    phantom's clusters), gain ratios (log-SD 0.5), per-session factors (log-SD 0.3) and
    per-series jitter, and the nine noisy, mode-normalised tissue medians of each session."""
    from qmriflow import physics
    from qmriflow.phantom.protocols import CLUSTERS

    k = int(rng.integers(len(CLUSTERS)))
    ratio = {c: float(np.exp(rng.normal(0.0, 0.5))) for c in ROLE_TO_CONTRAST.values()}
    out = []
    for tis in subjects:
        prot = session_protocols(rng, cluster=k)
        if flair_model == "echo-train":
            prot["FLAIR"] = flair_echo_train(prot["FLAIR"])
        session = float(np.exp(rng.normal(0.0, 0.3)))
        gains = {c: ratio[c] * session * float(np.exp(rng.normal(0.0, jitter))) for c in prot}
        med = {t: {c: gains[c] * float(physics.signal(prot[c], v["pd"], v["t1_s"], v["t2_s"]))
                   * (1.0 + rng.normal(0.0, 0.01)) for c in prot} for t, v in tis.items()}
        log_modes = mode_normalise(med)
        out.append({"protocols": prot, "true": tis, "medians": med, "log_modes": log_modes})
    return out


def estimate(cluster: list[dict[str, Any]], method: str) -> list[dict[str, dict[str, float]]]:
    """Estimated WM/GM values per session: ``cluster`` (cohort prior), ``cluster+reference``
    (the first session a calibration session with its exact values), ``per-session``,
    ``prior``."""
    from qmriflow.model import calibration as cal
    from qmriflow.model.cluster_scales import SessionObservation, fit_cluster

    if method == "prior":
        pri = cal.Priors()
        return [{t: dict(pri.centres[t]) for t in ("WM", "GM")} for _ in cluster]
    if method == "per-session":
        return [cal.calibrate_scales(s["protocols"], s["medians"]).tissues for s in cluster]
    obs = [SessionObservation(
        label=f"s{i}", protocols=s["protocols"], medians=s["medians"],
        log_modes=s["log_modes"],
        reference=s["true"] if (method == "cluster+reference" and i == 0) else None)
        for i, s in enumerate(cluster)]
    fit = fit_cluster(obs)
    return [fit.sessions[f"s{i}"].tissues for i in range(len(cluster))]


def evaluate(clusters: list[list[dict[str, Any]]], ests: list[list[dict[str, Any]]],
             method: str) -> dict[str, Any]:
    """Slopes, RMS errors and the criterion's share for one method over all clusters."""
    skip_first = method == "cluster+reference"
    remove_offset = method in ("cluster", "per-session")
    from qmriflow.stats.metrics import slope_r

    errs = []  # (session, figure) errors, %
    keys = [f"{t} {NAMES[p]}" for t, p in FIGURES]
    centred: list[tuple[np.ndarray, np.ndarray]] = []  # per cluster: true, estimated (log)
    all_ok = []
    for cl, est in zip(clusters, ests, strict=True):
        sel = list(range(1 if skip_first else 0, len(cl)))
        tru = np.array([[math.log(cl[i]["true"][t][p]) for t, p in FIGURES] for i in sel])
        eem = np.array([[math.log(est[i][t][p]) for t, p in FIGURES] for i in sel])
        e = eem - tru
        if remove_offset:
            e = e - np.median(e, axis=0)
        errs.append(100.0 * (np.exp(e) - 1.0))
        sr = [slope_r(tru[:, j], eem[:, j]) for j in range(len(keys))]
        all_ok.append(all(0.8 <= s <= 1.2 and r >= 0.9 for s, r in sr))  # NaN fails
        centred.append((tru - tru.mean(0), eem - eem.mean(0)))
    err = np.concatenate(errs)
    lim = np.array([CRIT[p] for _, p in FIGURES])
    x = np.concatenate([c[0] for c in centred])
    y = np.concatenate([c[1] for c in centred])
    out: dict[str, Any] = {
        "rms_pct": dict(zip(keys, np.sqrt((err ** 2).mean(0)).tolist(), strict=True)),
        "share_sessions_ok": float((np.abs(err) < lim).all(1).mean()),
        "share_clusters_slopes_ok": float(np.mean(all_ok)),
        # within-cluster slope pooled over clusters: each cluster's means removed
        "pooled_slope_r": {k: slope_r(x[:, j], y[:, j]) for j, k in enumerate(keys)}}
    return out


def twins(ests: list[list[dict[str, Any]]], method: str) -> dict[str, float]:
    """Protocol twins: the same subject in the two clusters of a pair (clusters 2i, 2i+1).
    |Δ| of the six WM/GM means, % of their mean, as the maps give them (no offsets removed;
    the calibration sessions of ``cluster+reference`` left out)."""
    d = []
    for a, b in zip(ests[0::2], ests[1::2], strict=True):
        for i in range(1 if method == "cluster+reference" else 0, len(a)):
            d.append([200.0 * abs(a[i][t][p] - b[i][t][p]) / (a[i][t][p] + b[i][t][p])
                      for t, p in FIGURES])
    arr = np.asarray(d)
    return {"twin_mean_pct": float(arr.mean()), "twin_max_pct": float(arr.max()),
            "twin_share_ok": float((arr < 2.0).all(1).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clusters", type=int, default=40,
                    help="clusters per row (pairs scanning the same subjects)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jitters", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.03])
    ap.add_argument("--sizes", type=int, nargs="+", default=[6, 10],
                    help="sessions per cluster")
    ap.add_argument("--flair-model", choices=("te-factor", "echo-train"), default="te-factor",
                    help="the FLAIR signal model of both the truth and the estimator: the "
                         "phantom protocols' TE factor, or the default estimator's EPG train "
                         "with the assumed 3D schedule")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    a = ap.parse_args(argv)
    methods = ("cluster", "cluster+reference", "per-session", "prior")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    keys = [f"{t} {NAMES[p]}" for t, p in FIGURES]
    print("| jitter | sessions | method | " + " | ".join(f"{k} slope (r)" for k in keys)
          + " | clusters with all six slopes in [0.8, 1.2], r ≥ 0.9 | "
          + " | ".join(f"{k} RMS %" for k in keys) + " | sessions meeting 5 %/10 % "
          "| twins: mean / max abs diff % | twin pairs all within 2 % |")
    print("|---|---|---|" + "---|" * (2 * len(keys) + 4))
    for n in a.sizes:
        for jit in a.jitters:
            rng = np.random.default_rng([a.seed, n, round(jit * 1e4)])
            clusters = []  # pairs of clusters scanning the same subjects: protocol twins
            for _ in range(a.clusters // 2):
                subjects = draw_subjects(rng, n, 0.2, 0.1)
                clusters += [draw_cluster(rng, subjects, jit, a.flair_model)
                             for _ in range(2)]
            for m in methods:
                ests = [estimate(cl, m) for cl in clusters]
                r = evaluate(clusters, ests, m)
                r.update(twins(ests, m))
                rows.append({"jitter": jit, "sessions": n, "method": m, **r})
                sl = " | ".join(f"{s:.2f} ({rr:.2f})" for s, rr in
                                (r["pooled_slope_r"][k] for k in keys))
                rm = " | ".join(f"{r['rms_pct'][k]:.1f}" for k in keys)
                print(f"| {jit:g} | {n} | {m} | {sl} | "
                      f"{100 * r['share_clusters_slopes_ok']:.0f} % | {rm} | "
                      f"{100 * r['share_sessions_ok']:.0f} % | {r['twin_mean_pct']:.1f} / "
                      f"{r['twin_max_pct']:.1f} | {100 * r['twin_share_ok']:.0f} % |", flush=True)
    secs = time.perf_counter() - t0
    print(f"\n{a.clusters} clusters per row, seed {a.seed}, {secs:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"clusters": a.clusters, "seed": a.seed, "seconds": secs,
                                      "flair_model": a.flair_model, "rows": rows}, indent=1))
    return 0 if all(math.isfinite(v) for r in rows for v in r["rms_pct"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
