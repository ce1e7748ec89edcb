"""Tissue classes of the digital head phantom and their relaxation parameters at 3 T.

Index = label in the phantom's ``dseg`` truth image; 1/2/3 follow the BIDS-derivatives
convention (1 GM, 2 WM, 3 CSF). 0 is air/background. Units: PD relative to pure water
(water = 1), T1 and T2 in seconds.

Two tables of reference values (``TISSUE_TABLES``); a subject's values are drawn around one of
them (:func:`subject_tissues`).

``"seed"`` (:data:`TISSUES`, the default): representative of the literature ranges that seed
000 compares against (Bojorquez et al. MRI 2017; Stanisz et al. MRM 2005; Wansapura et al. JMRI
1999; Gelman et al. 2001 for PD): WM T1 ≈ 0.83–1.1 s, T2 ≈ 65–75 ms, PD ≈ 0.65–0.72; GM T1 ≈
1.2–1.6 s, T2 ≈ 80–100 ms, PD ≈ 0.78–0.85; CSF ≈ free water at 37 °C (T1 ≈ 4.3 s, T2 ≈ 2 s,
PD = 1). Its WM, GM and CSF values *are* the estimator's calibration priors
(:data:`qmriflow.physics.WM_REFERENCE`, ``qmriflow.model.calibration.GM_REFERENCE`` /
``CSF_REFERENCE``: WM 0.70 / 0.85 s / 70 ms, GM 0.80 / 1.35 s / 90 ms, CSF 1.0 / 4.3 s / 2.0 s),
so phantom and method share a common anchor. Keep it for unit tests of the inversion, where
that shared anchor is wanted.

``"independent"`` (:data:`INDEPENDENT_TISSUES`): a generator table that does *not* share the
estimator's priors, for benchmarks of accuracy. WM and GM T1 and T2 from Stanisz et al., MRM
2005 (3 T, in vivo): WM T1 1084 ms, T2 69 ms; GM T1 1820 ms, T2 99 ms. PD (water content) WM
0.69, GM 0.82: within the range reported by in-vivo water-content mapping (e.g. Neeb et al.,
NeuroImage 2006). CSF T1 4.1 s, T2 1.8 s, PD 1: water at body temperature, within the range of
literature values for CSF at 3 T (T1 of about 3.5–4.5 s; T2 of 1–2 s, strongly dependent on
the measurement), not one paper's number. Lesions (WMH, tumour, oedema) keep the seed table's
ratios to WM (e.g. WMH T1 = 1.41 × WM T1), so lesion contrast is that of the seed table. The
extracerebral tissues (bone, marrow, fat, muscle, skin) are not estimator priors and keep the
seed table's values. This table must never be used as the estimator's prior: it exists so that
the truth differs from what the estimator assumes (WM T1 +28 %, GM T1 +35 %).
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

def _relative_to_wm(seed: Tissue, wm_seed: Tissue, wm: Tissue, label: int) -> Tissue:
    """``seed`` re-expressed with the seed table's ratios to WM applied to another WM."""
    return Tissue(label, seed.name, round(wm.pd * seed.pd / wm_seed.pd, 2),
                  round(wm.t1_s * seed.t1_s / wm_seed.t1_s, 2),
                  round(wm.t2_s * seed.t2_s / wm_seed.t2_s, 3), seed.brain)


_INDEPENDENT_WM = Tissue(2, "WM", 0.69, 1.084, 0.069, True)  # Stanisz 2005 T1/T2
INDEPENDENT_TISSUES: tuple[Tissue, ...] = (
    Tissue(1, "GM", 0.82, 1.820, 0.099, True),  # Stanisz 2005 T1/T2
    _INDEPENDENT_WM,
    Tissue(3, "CSF", 1.00, 4.10, 1.800, True),
    # lesions: seed ratios to WM -> WMH 0.77 / 1.53 s / 118 ms, tumour 0.84 / 2.04 s / 138 ms,
    # oedema 0.82 / 1.72 s / 113 ms
    *(_relative_to_wm(t, TISSUES[1], _INDEPENDENT_WM, t.label) for t in TISSUES[3:6]),
    *TISSUES[6:],
)
"""Generator table independent of the estimator's priors (module docstring: sources)."""

TISSUE_TABLES: dict[str, tuple[Tissue, ...]] = {"seed": TISSUES,
                                                "independent": INDEPENDENT_TISSUES}
"""Reference tables by name (``PhantomOptions.tissue_table``)."""

# Tissues whose T1 and T2 a subject-wide shift scales (brain tissue; not CSF = water, not the
# extracerebral tissues).
GLOBAL_SHIFT_TISSUES = ("GM", "WM", "WMH", "tumour", "oedema")

CSF_SPREAD = 0.05
"""Largest between-subject change of CSF T1/T2 drawn with ``spread`` (CSF is water at body
temperature; healthy subjects differ little: temperature, protein)."""

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
    table: str = "seed",
) -> SubjectTissues:
    """Draw this subject's tissue values: reference × (1 + N(0, variation)), clipped at 3σ,
    or, with ``spread`` > 0, reference × (1 + U(−spread, spread)) independently for every
    parameter of every tissue (PD is then capped at 1, pure water). CSF is water: its PD stays
    1 and its T1 and T2 vary by at most ±:data:`CSF_SPREAD` between subjects.

    ``table``: the reference table, a key of :data:`TISSUE_TABLES` (``"seed"`` or
    ``"independent"``). The random draws do not depend on it.
    ``overrides`` maps tissue name → {"pd"|"t1_s"|"t2_s": value} before variation is applied.
    """
    if table not in TISSUE_TABLES:
        raise ValueError(f"tissue table must be one of {sorted(TISSUE_TABLES)}, got {table!r}")
    n = N_TISSUES + 1
    pd = np.zeros(n)
    t1 = np.zeros(n)
    t2 = np.zeros(n)
    for t in TISSUE_TABLES[table]:
        o = (overrides or {}).get(t.name, {})
        base = (o.get("pd", t.pd), o.get("t1_s", t.t1_s), o.get("t2_s", t.t2_s))
        if spread > 0:
            f = 1.0 + rng.uniform(-spread, spread, 3)
            if t.name == "CSF":  # same draws, narrowed: water does not vary like tissue
                f = 1.0 + (f - 1.0) * (min(spread, CSF_SPREAD) / spread)
                f[0] = 1.0
        else:
            f = 1.0 + np.clip(rng.normal(0.0, variation, 3), -3 * variation, 3 * variation)
        pd[t.label], t1[t.label], t2[t.label] = (b * fi for b, fi in zip(base, f, strict=True))
    pd = np.minimum(pd, 1.0)  # PD is relative to pure water
    return SubjectTissues(pd=pd, t1_s=t1, t2_s=t2)


def table_tissues(table: str = "seed") -> SubjectTissues:
    """The reference values of a table (a key of :data:`TISSUE_TABLES`) as a subject's
    tissues, without any between-subject variation."""
    if table not in TISSUE_TABLES:
        raise ValueError(f"tissue table must be one of {sorted(TISSUE_TABLES)}, got {table!r}")
    n = N_TISSUES + 1
    pd, t1, t2 = np.zeros(n), np.zeros(n), np.zeros(n)
    for t in TISSUE_TABLES[table]:
        pd[t.label], t1[t.label], t2[t.label] = t.pd, t.t1_s, t.t2_s
    return SubjectTissues(pd=pd, t1_s=t1, t2_s=t2)


def shift_brain_relaxation(tissues: SubjectTissues, t1_factor: float,
                           t2_factor: float) -> SubjectTissues:
    """A subject-wide shift: T1 of every tissue in :data:`GLOBAL_SHIFT_TISSUES` × ``t1_factor``
    and their T2 × ``t2_factor`` (CSF, water, and extracerebral tissues unchanged; PD
    unchanged). Factors are dimensionless, > 0."""
    if not (t1_factor > 0 and t2_factor > 0):
        raise ValueError(f"shift factors must be positive, got {t1_factor!r}, {t2_factor!r}")
    idx = [BY_NAME[name].label for name in GLOBAL_SHIFT_TISSUES]
    t1 = tissues.t1_s.copy()
    t2 = tissues.t2_s.copy()
    t1[idx] *= t1_factor
    t2[idx] *= t2_factor
    return SubjectTissues(pd=tissues.pd.copy(), t1_s=t1, t2_s=t2)


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
