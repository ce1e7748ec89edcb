"""Size of each scanner effect of the phantom's forward model (``mismatch on``), per tissue.

    python bench/bench_forward_model.py [--out results.json] [--clusters 9]

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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    if a.out:
        a.out.write_text(json.dumps({"tissue_table": a.tissue_table, "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
