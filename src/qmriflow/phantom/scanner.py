r"""What a real scanner does that the estimator's signal equations leave out (``mismatch on``).

The estimator (:mod:`qmriflow.physics`, seed 000) inverts one mono-exponential equation per
series for a single-compartment voxel. A phantom whose images come from those same equations
measures nothing but noise (an "inverse crime"). With the scanner model switched on, the
phantom's noise-free images come from this module instead; the truth maps stay the voxel's
proton-weighted parameters (:func:`~qmriflow.phantom.tissues.mix_parameters`), the values a
single-compartment estimator should approach. Every effect can be switched off on its own
(:class:`ScannerEffects`), which is how ``bench/bench_forward_model.py`` sizes each one.

Effects (each with its source):

* **Echo trains** (TSE and FLAIR): the k-space centre echo of a CPMG train simulated by the
  extended phase graph (:mod:`qmriflow.epg`; Hennig 1988, Weigel 2015), in the steady state
  of repeated trains (T1 recovery during and after the train), with
  - the 2D T2w TSE's constant refocusing angle (per protocol cluster, 120–180°: reduced for
    SAR at 3 T) and its **slice profile**: the excitation and refocusing angles fall off
    across the slice (profile p(u) = 1/(1 + (2u)^8), u in slice thicknesses; refocusing slice
    30 % wider, as vendors prescribe), so the slice edges contribute stimulated echoes;
  - the 3D FLAIR's variable refocusing angles (:func:`qmriflow.epg.variable_flip_schedule`,
    plateau 35–50° per cluster, echo spacing 3–4 ms) read at the echo whose time the header
    reports as TE, and an adiabatic inversion of efficiency 0.96 (B1-insensitive;
    hyperbolic-secant inversions reach 0.92–0.98 in vivo).
* **Magnetisation transfer**: the off-resonance (2D multi-slice: the other slices' pulses) and
  on-resonance (long 3D trains) saturation of the macromolecular pool lowers the free pool's
  steady state by δ = κ_series · f_tissue · s_subject (first order in the bound-pool fraction
  f; Henkelman et al. NMR Biomed 2001). f: WM 0.15, GM 0.065, CSF 0 (Sled & Pike MRM 2001;
  Gloor et al. MRM 2008 report WM 0.13–0.16, GM 0.05–0.07). κ = 1 for the 2D multi-slice
  T2w, which puts WM at −15 % and GM at −6.5 %: the 10–20 % WM losses of multi-slice TSE
  against single-slice (Dixon et al. Radiology 1990; Melki et al. MRM 1992). κ = 0.5 for the
  3D FLAIR and 0.1 for the 3D spoiled GRE are this model's assumptions (no single reference).
  s_subject (0.85–1.15, drawn per subject) is the between-subject spread of myelin/MT that no
  header records.
* **B1+ transmit field**: a smooth field of flip-angle scale 0.85–1.15 across the head (the
  centre-bright dielectric pattern of 3 T head coils, with a random tilt), per session; it
  scales the GRE flip angle and the TSE excitation and refocusing angles.
* **T2\***: the GRE echo decays with R2* = 1/T2 + R2′, R2′ per tissue (WM 4.4 1/s, GM 5.0 1/s:
  T2* ≈ 53 and 66 ms at 3 T, Peters et al. MRI 2007), where the estimator uses T2.
* **Partial volume**: a voxel is a sum of compartments (one per tissue, slow exchange): its
  signal is Σ f_t·S_t, not the signal of averaged parameters; and a 2D slice integrates the
  anatomy across its thickness (sub-samples along the slice normal, in the generator).
  Tissue fractions come from the anatomy on a grid at least as fine as the voxels (the small
  phantom's 2 mm fractions are block averages of the 1 mm template, so with compartment
  mixing they are the 1 mm anatomy seen through 2 mm voxels).
* Rician noise and the receive field stay in the generator; with the scanner model the receive
  field is the session's coil, one field in scanner space for all of its series
  (:class:`qmriflow.phantom.generate.ReceiveField`), where the exact path draws one per series.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .. import physics
from ..epg import EchoTrain, tse_steady_state, variable_flip_schedule
from .protocols import SeriesProtocol
from .tissues import TISSUES, SubjectTissues

__all__ = [
    "ALL_EFFECTS",
    "BOUND_POOL_FRACTION",
    "MT_COUPLING",
    "NO_EFFECTS",
    "R2_PRIME_PER_S",
    "B1Field",
    "ScannerEffects",
    "SeriesPhysics",
    "compartment_signal",
    "draw_b1_field",
    "draw_series_physics",
    "mt_saturation",
    "noisefree_signal",
    "slice_profile",
]

BOUND_POOL_FRACTION: dict[str, float] = {
    "GM": 0.065, "WM": 0.15, "CSF": 0.0, "WMH": 0.08, "tumour": 0.04, "oedema": 0.06,
    "bone": 0.0, "marrow": 0.03, "fat": 0.0, "muscle": 0.10, "skin": 0.10,
}
"""Macromolecular (bound) pool fraction per tissue (see the module docstring)."""

MT_COUPLING: dict[str, float] = {"t2w": 1.0, "flair": 0.5, "t1w": 0.1, "t1w_gd": 0.1}
"""κ per series role: saturation of the bound pool per unit bound fraction."""

R2_PRIME_PER_S: dict[str, float] = {
    "GM": 5.0, "WM": 4.4, "CSF": 0.5, "WMH": 3.0, "tumour": 3.0, "oedema": 3.0,
    "bone": 50.0, "marrow": 30.0, "fat": 30.0, "muscle": 10.0, "skin": 10.0,
}
"""Reversible dephasing rate R2′ = 1/T2* − 1/T2 (1/s) per tissue."""

INVERSION_EFFICIENCY = 0.96
REFOCUSING_SLICE_WIDENING = 1.3
_PROFILE_U = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
"""Positions across one half of the slice (slice thicknesses from its centre)."""


def slice_profile(u: np.ndarray | float) -> np.ndarray:
    """Flip-angle scale across a 2D slice at ``u`` slice thicknesses from its centre
    (1 at the centre, 0.5 at the nominal edge u = ±0.5): 1 / (1 + (2u)^8)."""
    return 1.0 / (1.0 + (2.0 * np.abs(np.asarray(u, dtype=np.float64))) ** 8)


@dataclass(frozen=True)
class ScannerEffects:
    """Which of the scanner's effects the forward model applies (all on = ``mismatch on``)."""

    echo_train: bool = True
    mt: bool = True
    b1: bool = True
    t2star: bool = True
    partial_volume: bool = True

    @property
    def any(self) -> bool:
        return any(asdict(self).values())

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)


ALL_EFFECTS = ScannerEffects()
NO_EFFECTS = ScannerEffects(False, False, False, False, False)


@dataclass(frozen=True)
class SeriesPhysics:
    """The scanner-side details of one series that its DICOM header does not fully show."""

    role: str
    train: EchoTrain | None
    mt_coupling: float
    two_d: bool

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "mt_coupling": self.mt_coupling, "two_d": self.two_d,
                "echo_train": None if self.train is None else self.train.as_dict()}


def draw_series_physics(sp: SeriesProtocol, cluster_rng: np.random.Generator) -> SeriesPhysics:
    """Echo-train details of a series from its protocol and its protocol cluster's random
    stream (``cluster_rng`` must be seeded by the cluster alone, so every session of a
    cluster shares the refocusing angles, echo spacing and flip schedule)."""
    role = sp.role
    kappa = MT_COUPLING.get(role, 0.0)
    two_d = sp.acquisition.upper() == "2D"
    p = sp.protocol
    if p is None or p.sequence not in ("tse", "flair"):
        return SeriesPhysics(role, None, kappa, two_d)
    etl = int(sp.echo_train_length)
    if p.sequence == "tse":
        # linear phase-encode order: the centre of k-space in the middle of the train, read
        # at the header's TE
        alpha = float(round(cluster_rng.uniform(120.0, 180.0) / 5.0) * 5.0)
        centre = max(1, math.ceil(etl / 2))
        train = EchoTrain(p.te_ms / centre, (alpha,) * etl, centre)
    else:
        esp = float(round(cluster_rng.uniform(3.0, 4.0), 2))
        minimum = float(cluster_rng.uniform(35.0, 50.0))
        end = float(cluster_rng.uniform(100.0, 130.0))
        centre = round(p.te_ms / esp)
        if centre > etl:  # the train must reach the reported TE
            esp = p.te_ms / etl
            centre = etl
        train = EchoTrain(esp, variable_flip_schedule(etl, minimum_deg=minimum, end_deg=end),
                          centre)
    return SeriesPhysics(role, train, kappa, two_d)


@dataclass(frozen=True)
class B1Field:
    """Smooth transmit field (actual / nominal flip angle) in world mm, for one session:
    b1 = lo + (pattern − p1) / (p99 − p1)·(hi − lo), pattern = −Σ w_i x_i² + t·x with
    x = (world − centre) / radius; clipped to [0.8, 1.2]."""

    centre: tuple[float, float, float]
    weights: tuple[float, float, float]
    tilt: tuple[float, float, float]
    p_lo: float
    p_hi: float
    lo: float
    hi: float
    radius_mm: float = 90.0

    def _pattern(self, world: np.ndarray) -> np.ndarray:
        x = (np.asarray(world, dtype=np.float64) - np.asarray(self.centre)) / self.radius_mm
        return -(x * x) @ np.asarray(self.weights) + x @ np.asarray(self.tilt)

    def __call__(self, world: np.ndarray) -> np.ndarray:
        pat = self._pattern(world)
        b1 = self.lo + (pat - self.p_lo) / (self.p_hi - self.p_lo) * (self.hi - self.lo)
        return np.clip(b1, 0.8, 1.2).astype(np.float32)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_b1_field(rng: np.random.Generator, centre: np.ndarray, *,
                  low: tuple[float, float] = (0.85, 0.90),
                  high: tuple[float, float] = (1.10, 1.15)) -> B1Field:
    """A session's transmit field: centre-bright, tilted at random, spanning [lo, hi]
    (lo drawn in ``low``, hi in ``high``) between the 1st and 99th percentile of a 90 mm
    ball around the head ``centre`` (world mm)."""
    weights = tuple(float(w) for w in rng.uniform(0.7, 1.3, 3))
    tilt = tuple(float(t) for t in rng.normal(0.0, 0.3, 3))
    lo, hi = float(rng.uniform(*low)), float(rng.uniform(*high))
    # percentiles of the pattern over a ball of radius 90 mm (deterministic lattice)
    g = np.linspace(-1.0, 1.0, 21)
    xyz = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    xyz = xyz[(xyz * xyz).sum(1) <= 1.0]
    field = B1Field(tuple(float(c) for c in centre), weights, tilt, 0.0, 1.0, lo, hi)
    pat = field._pattern(np.asarray(centre) + 90.0 * xyz)
    p_lo, p_hi = (float(v) for v in np.percentile(pat, [1.0, 99.0]))
    return B1Field(field.centre, weights, tilt, p_lo, p_hi, lo, hi)


def mt_saturation(tissue: str, role: str, subject_scale: float = 1.0) -> float:
    """Fractional loss δ of a tissue's free-pool signal in a series of ``role``."""
    d = MT_COUPLING.get(role, 0.0) * BOUND_POOL_FRACTION.get(tissue, 0.0) * subject_scale
    return float(min(max(d, 0.0), 0.9))


def _grid(lo: float, hi: float, n: int, log: bool) -> np.ndarray:
    if not hi > lo * (1.0 + 1e-9):
        return np.array([lo, lo * (1.0 + 1e-6) + 1e-12])
    return np.geomspace(lo, hi, n) if log else np.linspace(lo, hi, n)


def _train_lut(phys: SeriesPhysics, protocol: physics.Protocol, t1: np.ndarray,
               t2: np.ndarray, b1: np.ndarray, effects: ScannerEffects) -> np.ndarray:
    """Complex centre echo (M0 = 1) on the grid t1 × t2 × b1 (slice profile summed in 2D)."""
    assert phys.train is not None
    tt1, tt2, bb = np.meshgrid(t1, t2, b1, indexing="ij")
    ti = protocol.ti_ms if protocol.sequence == "flair" else None
    eta = INVERSION_EFFICIENCY if ti is not None else 1.0
    if not phys.two_d:
        return tse_steady_state(tt1, tt2, phys.train, protocol.tr_ms, b1=bb, ti_ms=ti,
                                inversion_efficiency=eta)
    # 2D: sum over the slice profile; refocusing scaled relative to the excitation
    total = np.zeros(tt1.shape, np.complex128)
    for u in _PROFILE_U:
        p_ex = float(slice_profile(u))
        p_ref = float(slice_profile(u / REFOCUSING_SLICE_WIDENING))
        ratio = p_ref / p_ex
        tr = EchoTrain(phys.train.esp_ms, tuple(a * ratio for a in phys.train.refocusing_deg),
                       phys.train.centre_echo, phys.train.excitation_deg)
        total += tse_steady_state(tt1, tt2, tr, protocol.tr_ms, b1=bb * p_ex, ti_ms=ti,
                                  inversion_efficiency=eta)
    # normalised so that an ideal (rectangular) slice would read the centre's signal
    return total * (2.0 * (_PROFILE_U[1] - _PROFILE_U[0]))


def compartment_signal(sp: SeriesProtocol, phys: SeriesPhysics, t1_s: np.ndarray,
                       t2_s: np.ndarray, b1: np.ndarray, tissue: str,
                       effects: ScannerEffects = ALL_EFFECTS) -> np.ndarray:
    """Signal per unit PD (before MT) of one tissue compartment at voxels with these T1, T2
    (s) and transmit scale ``b1``, for the series ``sp``."""
    p = sp.protocol
    assert p is not None
    t1 = np.asarray(t1_s, dtype=np.float64)
    t2 = np.asarray(t2_s, dtype=np.float64)
    b = np.asarray(b1, dtype=np.float64) if effects.b1 else np.ones_like(t1)
    if p.sequence in ("gre", "se", "irgre"):
        t2x = t2
        if effects.t2star and p.sequence != "se":
            t2x = 1.0 / (1.0 / np.maximum(t2, 1e-9) + R2_PRIME_PER_S.get(tissue, 0.0))
        if p.sequence == "gre":
            return np.asarray(physics.spoiled_gre(1.0, t1, t2x, p.tr_ms, p.te_ms,
                                                  p.fa_deg * b))
        return np.asarray(physics.signal(p, 1.0, t1, t2x))
    if not effects.echo_train or phys.train is None:
        return np.asarray(physics.signal(p, 1.0, t1, t2))
    if t1.size == 0:
        return np.zeros(0)
    # look-up table over the range these voxels span, then linear interpolation of the
    # complex echo (smooth through the FLAIR null) and its magnitude
    g1 = _grid(float(t1.min()), float(t1.max()), 7, True)
    g2 = _grid(float(t2.min()), float(t2.max()), 5, True)
    gb = _grid(float(b.min()), float(b.max()), 5, False)
    lut = _train_lut(phys, p, g1, g2, gb, effects)
    coords = np.stack([
        np.interp(np.log(t1), np.log(g1), np.arange(g1.size)),
        np.interp(np.log(t2), np.log(g2), np.arange(g2.size)),
        np.interp(b, gb, np.arange(gb.size))])
    re = ndimage.map_coordinates(lut.real, coords, order=1, mode="nearest")
    im = ndimage.map_coordinates(lut.imag, coords, order=1, mode="nearest")
    return np.hypot(re, im)


def noisefree_signal(sp: SeriesProtocol, phys: SeriesPhysics, fractions: np.ndarray,
                     variation: np.ndarray, tissues: SubjectTissues, b1: np.ndarray, *,
                     mt_scale: float = 1.0, effects: ScannerEffects = ALL_EFFECTS
                     ) -> np.ndarray:
    """Noise-free, unit-gain signal at N voxels: ``fractions`` (N_TISSUES, N) tissue volume
    fractions, ``variation`` (3, N) smooth multiplicative PD/T1/T2 fields, ``b1`` (N,)
    transmit scale, ``mt_scale`` the subject's MT effect size. With ``partial_volume`` the
    compartments' signals add (Σ f_t·PD_t·S_t); without it the voxel's proton-weighted
    parameters (:func:`~qmriflow.phantom.tissues.mix_parameters`) give one signal."""
    from .tissues import mix_parameters

    f = np.asarray(fractions, dtype=np.float64)
    var = np.asarray(variation, dtype=np.float64)
    n = f.shape[1]
    out = np.zeros(n)
    if not effects.partial_volume:
        pd, t1, t2 = mix_parameters(f, tissues, var)
        has = pd > 0
        if not has.any():
            return out
        # MT of the mixture: proton-weighted bound-pool saturation; R2' of the main tissue
        main = np.argmax(f[:, has], axis=0)
        sig = np.zeros(int(has.sum()))
        for lab in np.unique(main):
            name = TISSUES[int(lab)].name
            sel = main == lab
            idx = np.flatnonzero(has)[sel]
            sig[sel] = compartment_signal(sp, phys, t1[idx], t2[idx], b1[idx], name, effects)
        if effects.mt:
            w = f[:, has] * tissues.pd[1:, None]
            delta = np.array([mt_saturation(t.name, sp.role, mt_scale) for t in TISSUES])
            sig *= 1.0 - (delta[:, None] * w).sum(0) / np.maximum(w.sum(0), 1e-12)
        out[has] = pd[has] * sig
        return out
    for k, t in enumerate(TISSUES):
        idx = np.flatnonzero(f[k] > 0)
        if idx.size == 0 or tissues.pd[t.label] <= 0:
            continue
        s = compartment_signal(sp, phys, tissues.t1_s[t.label] * var[1, idx],
                               tissues.t2_s[t.label] * var[2, idx], b1[idx], t.name, effects)
        if effects.mt:
            s = s * (1.0 - mt_saturation(t.name, sp.role, mt_scale))
        out[idx] += f[k, idx] * tissues.pd[t.label] * var[0, idx] * s
    return out
