"""Size of each scanner effect of the phantom's forward model (``mismatch on``), per tissue.

    python bench/bench_forward_model.py [--out results.json] [--tissue-table independent]

For each series (3D T1w GRE, 2D T2w TSE, 3D FLAIR) of each of the phantom's protocol
clusters, pure WM, GM and CSF compartments with the phantom generator's tissue values are
"acquired" by :func:`qmriflow.phantom.scanner.noisefree_signal` with one effect switched on at
a time, and with all of them, and compared with the estimator's own equation
(:func:`qmriflow.physics.signal`, seed TE factors included): the relative change of each
tissue's signal, and — because every series has a free receiver gain, so only ratios can
matter to an estimator — the change of the WM/GM and WM/CSF signal ratios. B1 effects are
shown at a transmit scale of 0.85 and 1.15 (the edges of the phantom's field; 1.0 at the
field's centre). Partial volume is shown on a 50/50 WM/CSF voxel against the equation of its
proton-weighted parameters. MT uses the subject scale 1 (the phantom draws 0.85-1.15).
Prints Markdown; numbers are the median over clusters (range in brackets).

Second table: what each effect does to the estimator's per-voxel inversion. Pure WM of the
generator's table is acquired with the effect on; the estimator's equations
(``physics.signal``) are inverted (three contrasts, three unknowns) with the per-contrast
scales calibrated exactly at the unperturbed tissue — so every error comes from the physics
the estimator does not share. Then one of PD, T1, T2 is changed by ±15 % at a time: a
faithful inversion gives slope 1 on the changed parameter and 0 on the others ("leak": the
relative change of another parameter per relative change of the one changed).
Median over clusters (range), B1 = 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

EFFECTS = ("echo_train", "mt", "b1", "t2star", "partial_volume")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tissue-table", default="independent")
    a = ap.parse_args()
    from qmriflow import physics
    from qmriflow.phantom.protocols import CLUSTERS, draw_session_protocols
    from qmriflow.phantom.scanner import (
        ALL_EFFECTS,
        NO_EFFECTS,
        ScannerEffects,
        draw_series_physics,
        noisefree_signal,
    )
    from qmriflow.phantom.tissues import BY_NAME, N_TISSUES, mix_parameters, table_tissues

    tissues = table_tissues(a.tissue_table)
    names = ["WM", "GM", "CSF"]
    f = np.zeros((N_TISSUES, 4))
    for i, n in enumerate(names):
        f[BY_NAME[n].label - 1, i] = 1.0
    f[BY_NAME["WM"].label - 1, 3] = f[BY_NAME["CSF"].label - 1, 3] = 0.5
    var = np.ones((3, 4))
    pd, t1, t2 = mix_parameters(f, tissues, var)

    def only(name: str) -> ScannerEffects:
        return ScannerEffects(**{k: k == name for k in EFFECTS})

    rows: dict[str, dict[str, list[float]]] = {}

    def put(key: str, col: str, v: float) -> None:
        rows.setdefault(key, {}).setdefault(col, []).append(v)

    for k in range(len(CLUSTERS)):
        _, series = draw_session_protocols(np.random.default_rng([k, 1]), cluster=k)
        crng = np.random.default_rng([k, 2])
        for sp in series:
            phys = draw_series_physics(sp, crng)
            ref = np.asarray(physics.signal(sp.protocol, pd, t1, t2))
            variants = {e: (only(e), 1.0) for e in EFFECTS if e != "b1"}
            variants["b1 0.85"] = (only("b1") if sp.role.startswith("t1w") else
                                   ScannerEffects(**{**NO_EFFECTS.as_dict(), "b1": True,
                                                     "echo_train": True}), 0.85)
            variants["b1 1.15"] = (variants["b1 0.85"][0], 1.15)
            variants["all"] = (ALL_EFFECTS, 1.0)
            for name, (eff, b1) in variants.items():
                s = noisefree_signal(sp, phys, f, var, tissues, np.full(4, b1), effects=eff)
                base = ref
                if name.startswith("b1") and not sp.role.startswith("t1w"):
                    # B1 acts through the echo train: compare with the train at b1 = 1
                    base = noisefree_signal(sp, phys, f, var, tissues, np.ones(4),
                                            effects=eff)
                key = f"{sp.role}|{name}"
                for i, n in enumerate(names):
                    put(key, n, 100.0 * (s[i] / base[i] - 1.0))
                put(key, "WM/GM", 100.0 * ((s[0] / s[1]) / (base[0] / base[1]) - 1.0))
                put(key, "WM/CSF", 100.0 * ((s[0] / s[2]) / (base[0] / base[2]) - 1.0))
                put(key, "PV voxel", 100.0 * (s[3] / base[3] - 1.0))
    cols = [*names, "WM/GM", "WM/CSF", "PV voxel"]
    print("| series | effect | " + " | ".join(f"{c} %" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    out = {}
    for key, d in rows.items():
        role, name = key.split("|")
        cells = []
        for c in cols:
            v = np.asarray(d[c])
            cells.append(f"{np.median(v):+.1f} [{v.min():+.1f}, {v.max():+.1f}]")
        out[key] = {c: {"median": float(np.median(d[c])), "min": float(np.min(d[c])),
                        "max": float(np.max(d[c]))} for c in cols}
        print(f"| {role} | {name} | " + " | ".join(cells) + " |")
    inversion = inversion_table(tissues)
    if a.out:
        a.out.write_text(json.dumps({"tissue_table": a.tissue_table, "rows": out,
                                     "inversion": inversion}, indent=1))
    return 0


def inversion_table(tissues: object) -> dict[str, dict[str, dict[str, float]]]:
    """Slopes of the estimator's inversion per effect (module docstring), printed."""

    from qmriflow import physics
    from qmriflow.phantom.protocols import CLUSTERS, draw_session_protocols
    from qmriflow.phantom.scanner import ALL_EFFECTS, ScannerEffects, draw_series_physics
    from qmriflow.phantom.scanner import noisefree_signal as acquire
    from qmriflow.phantom.tissues import BY_NAME, N_TISSUES, SubjectTissues

    lab = BY_NAME["WM"].label
    f = np.zeros((N_TISSUES, 1))
    f[lab - 1, 0] = 1.0
    ref = np.array([tissues.pd[lab], tissues.t1_s[lab], tissues.t2_s[lab]])  # type: ignore[attr-defined]
    variants = {e: ScannerEffects(**{k: k == e for k in EFFECTS}) for e in
                ("echo_train", "mt", "t2star", "partial_volume")}
    variants["all but B1"] = ScannerEffects(b1=False)
    variants["all"] = ALL_EFFECTS
    res: dict[str, dict[str, list[float]]] = {}
    for k in range(len(CLUSTERS)):
        _, series = draw_session_protocols(np.random.default_rng([k, 1]), cluster=k)
        series = [sp for sp in series if sp.role in ("t1w", "t2w", "flair")]
        crng = np.random.default_rng([k, 2])
        phys = [draw_series_physics(sp, crng) for sp in series]

        def sig(vals: np.ndarray, eff: ScannerEffects, series=series, phys=phys) -> np.ndarray:
            t = SubjectTissues(tissues.pd.copy(), tissues.t1_s.copy(),  # type: ignore[attr-defined]
                               tissues.t2_s.copy())  # type: ignore[attr-defined]
            t.pd[lab], t.t1_s[lab], t.t2_s[lab] = vals
            return np.array([acquire(sp, ph, f, np.ones((3, 1)), t, np.ones(1), effects=eff)[0]
                             for sp, ph in zip(series, phys, strict=True)])

        for est_name, protos in estimator_protocols(series, phys).items():
            def model(x: np.ndarray, protos=protos) -> np.ndarray:
                return np.array([float(physics.signal(p, *np.exp(x))) for p in protos])

            inversions(res, est_name, variants, sig, model, ref)
    heads = [f"{p}: slope / relative leak to "

             + ", ".join(q for q in ("PD", "T1", "T2") if q != p) for p in ("PD", "T1", "T2")]
    print("\n| estimator model | effect | " + " | ".join(heads) + " |")
    print("|---|---|---|---|---|")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, d in res.items():
        cells = []
        for p in ("PD", "T1", "T2"):
            parts = []
            for q in ("PD", "T1", "T2"):
                v = np.asarray(d[f"{p}->{q}"])
                parts.append(f"{np.median(v):+.2f}")
            cells.append(f"{parts[('PD', 'T1', 'T2').index(p)]} / "
                         + ", ".join(parts[j] for j, q in enumerate(("PD", "T1", "T2"))
                                     if q != p))
        out[name] = {key: {"median": float(np.median(v)), "min": float(np.min(v)),
                           "max": float(np.max(v))} for key, v in d.items()}
        est_name, eff_name = name.split("|")
        print(f"| {est_name} | {eff_name} | " + " | ".join(cells) + " |")
    return out


def estimator_protocols(series: list, phys: list) -> dict[str, list]:
    """The estimator's protocols for a cluster's T1w/T2w/FLAIR: the seed's TE factors, the
    workflow's echo-train model (qmriflow.archive.params.estimator_echo_train) with the T2w angle
    from the exam card (= the cluster's true angle, as a site would enter it) or guessed at
    150°, and an oracle with the phantom's own trains (ideal slice, b1 = 1: not available
    to any estimator; an upper bound)."""
    from dataclasses import replace

    from qmriflow.archive.params import EchoTrainSettings, estimator_echo_train
    from qmriflow.epg import EchoTrain
    from qmriflow.phantom.generate import _series_header

    def entry(sp: Any) -> dict:
        p = sp.protocol
        return {"role": sp.role, "sequence": p.sequence, "tr_ms": p.tr_ms, "te_ms": p.te_ms,
                "ti_ms": p.ti_ms, "fa_deg": p.fa_deg, "acquisition": sp.acquisition,
                "echo_train_length": sp.echo_train_length,
                "te_correction_factor": p.te_factor}

    def with_trains(settings: Any) -> list:
        out = []
        for sp in series:
            train, _src = estimator_echo_train(entry(sp), _series_header(sp, 1), settings)
            out.append(replace(sp.protocol, echo_train=None if train is None
                               else EchoTrain.from_dict(train)))
        return out

    t2_angle = next(ph.train.refocusing_deg[0] for sp, ph in zip(series, phys, strict=True)
                    if sp.role == "t2w")
    return {
        "seed TE factors": [sp.protocol for sp in series],
        "EPG, T2w angle from exam card": with_trains(
            EchoTrainSettings(t2w_refocusing_deg=t2_angle)),
        "EPG, T2w angle guessed 150°": with_trains(EchoTrainSettings(t2w_refocusing_deg=150.0)),
        "EPG, T2w TE factor": with_trains(EchoTrainSettings()),
        "oracle: phantom's trains": [sp.protocol if ph.train is None else
                                     replace(sp.protocol, echo_train=ph.train)
                                     for sp, ph in zip(series, phys, strict=True)],
    }


def inversions(res: dict, est_name: str, variants: dict, sig: Any, model: Any,
               ref: np.ndarray) -> None:
    """Slopes and leaks of one estimator model under each effect variant, into ``res``."""
    from scipy import optimize

    for name, eff in variants.items():
        scales = sig(ref, eff) / model(np.log(ref))
        for i, pname in enumerate(("PD", "T1", "T2")):
            est = []
            for fac in (0.85, 1.15):
                v = ref.copy()
                v[i] *= fac
                target = np.log(sig(v, eff) / scales)
                x = optimize.least_squares(lambda x, t=target: np.log(model(x)) - t,
                                           np.log(ref)).x
                est.append(np.exp(x))
            for j, qname in enumerate(("PD", "T1", "T2")):
                slope = (est[1][j] - est[0][j]) / (0.3 * ref[i]) * ref[i] / ref[j]
                res.setdefault(f"{est_name}|{name}", {}).setdefault(
                    f"{pname}->{qname}", []).append(slope)


if __name__ == "__main__":
    sys.exit(main())
