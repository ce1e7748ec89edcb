"""Tissue classes of the digital head phantom and their relaxation parameters at 3 T.

Index = label in the phantom's ``dseg`` truth image; 1/2/3 follow the BIDS-derivatives
convention (1 GM, 2 WM, 3 CSF). 0 is air/background.

Reference values (3 T, adult brain) are representative of the literature ranges that seed 000
compares against (Bojorquez et al. MRI 2017; Stanisz et al. MRM 2005; Wansapura et al. JMRI
1999; Gelman et al. 2001 for PD): WM T1 ≈ 0.83–1.1 s, T2 ≈ 65–75 ms, PD ≈ 0.65–0.72; GM T1 ≈
1.2–1.6 s, T2 ≈ 80–100 ms, PD ≈ 0.78–0.85; CSF ≈ free water at 37 °C (T1 ≈ 4.3 s, T2 ≈ 2 s,
PD = 1). WM uses the seed's reference tissue (PD 0.70, T1 0.85 s, T2 70 ms) by default so that
phantom and method share a common anchor; pass other values to test robustness to that choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tissue:
    label: int
    name: str
    pd: float
    t1_s: float
    t2_s: float
    brain: bool  # inside the brain mask (intracranial parenchyma + CSF + lesions)


TISSUES: tuple[Tissue, ...] = (
    Tissue(1, "GM", 0.80, 1.35, 0.090, True),
    Tissue(2, "WM", 0.70, 0.85, 0.070, True),
    Tissue(3, "CSF", 1.00, 4.30, 2.000, True),
    Tissue(4, "WMH", 0.78, 1.20, 0.120, True),
    Tissue(5, "tumour", 0.85, 1.60, 0.140, True),
    Tissue(6, "oedema", 0.83, 1.35, 0.115, True),
    Tissue(7, "bone", 0.08, 0.40, 0.004, False),
    Tissue(8, "marrow", 0.55, 0.45, 0.080, False),
    Tissue(9, "fat", 0.90, 0.38, 0.130, False),
    Tissue(10, "muscle", 0.75, 1.42, 0.032, False),
    Tissue(11, "skin", 0.70, 1.00, 0.050, False),
)
N_TISSUES = len(TISSUES)
BY_NAME = {t.name: t for t in TISSUES}
BRAIN_LABELS = tuple(t.label for t in TISSUES if t.brain)
# T1 of tumour after gadolinium (enhancing rim), for the post-contrast T1w series.
TUMOUR_T1_POST_GD_S = 0.55


def label_table() -> list[dict[str, object]]:
    """Rows of the ``dseg.tsv`` look-up table (BIDS: index, name)."""
    return [{"index": 0, "name": "background"}] + [
        {"index": t.label, "name": t.name} for t in TISSUES
    ]


@dataclass(frozen=True)
class SubjectTissues:
    """Per-subject tissue parameters (index 0 unused; index = label)."""

    pd: np.ndarray
    t1_s: np.ndarray
    t2_s: np.ndarray

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            t.name: {
                "PD": float(self.pd[t.label]),
                "T1_s": float(self.t1_s[t.label]),
                "T2_s": float(self.t2_s[t.label]),
            }
            for t in TISSUES
        }


def subject_tissues(
    rng: np.random.Generator,
    variation: float = 0.03,
    overrides: dict[str, dict[str, float]] | None = None,
    spread: float = 0.0,
) -> SubjectTissues:
    """Draw this subject's tissue values: reference × (1 + N(0, variation)), clipped at 3σ,
    or, with ``spread`` > 0, reference × (1 + U(−spread, spread)) independently for every
    parameter of every tissue (PD is then capped at 1, pure water).

    ``overrides`` maps tissue name → {"pd"|"t1_s"|"t2_s": value} before variation is applied.
    """
    n = N_TISSUES + 1
    pd = np.zeros(n)
    t1 = np.zeros(n)
    t2 = np.zeros(n)
    for t in TISSUES:
        o = (overrides or {}).get(t.name, {})
        base = (o.get("pd", t.pd), o.get("t1_s", t.t1_s), o.get("t2_s", t.t2_s))
        if spread > 0:
            f = 1.0 + rng.uniform(-spread, spread, 3)
        else:
            f = 1.0 + np.clip(rng.normal(0.0, variation, 3), -3 * variation, 3 * variation)
        pd[t.label], t1[t.label], t2[t.label] = (b * fi for b, fi in zip(base, f, strict=True))
    pd = np.minimum(pd, 1.0)  # PD is relative to pure water
    return SubjectTissues(pd=pd, t1_s=t1, t2_s=t2)


def mix_parameters(
    fractions: np.ndarray,
    tissues: SubjectTissues,
    variation: np.ndarray | None = None,
    t1_override: dict[int, np.ndarray | float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel PD, T1, T2 from tissue volume fractions (partial volume, fast exchange).

    ``fractions``: shape (N_TISSUES, ...) for labels 1..N (air is the remainder).
    PD = Σ f_i PD_i; relaxation *rates* are averaged with proton weights:
    R1 = Σ f_i PD_i R1_i / PD (same for R2). ``variation``: optional (3, ...) multiplicative
    smooth fields for (PD, T1, T2). Voxels without protons get PD = T1 = T2 = 0.
    """
    f = fractions.astype(np.float64, copy=False)
    pdw = np.tensordot(tissues.pd[1:], f, axes=(0, 0))
    r1 = np.tensordot(tissues.pd[1:] / tissues.t1_s[1:], f, axes=(0, 0))
    if t1_override:
        for lab, t1v in t1_override.items():
            r1 += tissues.pd[lab] * f[lab - 1] * (1.0 / np.asarray(t1v) - 1.0 / tissues.t1_s[lab])
    r2 = np.tensordot(tissues.pd[1:] / tissues.t2_s[1:], f, axes=(0, 0))
    has = pdw > 1e-4
    safe = np.where(has, pdw, 1.0)
    t1 = np.where(has, safe / np.where(has, r1, 1.0), 0.0)
    t2 = np.where(has, safe / np.where(has, r2, 1.0), 0.0)
    pd = np.where(has, pdw, 0.0)
    if variation is not None:
        pd = pd * variation[0]
        t1 = t1 * variation[1]
        t2 = t2 * variation[2]
    return pd, t1, t2
