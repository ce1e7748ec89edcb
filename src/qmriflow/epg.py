"""Echo trains by the extended phase graph (EPG): the one place qmriflow simulates them.

A turbo spin echo (TSE) image is read from one echo of a train of refocusing pulses, not
from a single spin echo. With refocusing angles below 180° (SAR limits at 3 T, the variable
angles of 3D TSE, the edges of a 2D slice profile) part of the magnetisation is stored along
z between pulses and returns later as stimulated echoes: the echo amplitude then decays
more slowly than exp(−TE/T2) and depends on T1 and on the transmit field. The EPG tracks the
magnetisation as dephasing orders ``k`` of transverse (F+, F−) and longitudinal (Z) states
(Hennig, J Magn Reson 1988; Weigel, JMRI 2015 — "Extended phase graphs: dephasing, RF
pulses, and echoes - pure and simple", whose equations and conventions this module follows):

* an RF pulse of angle α about an axis at phase φ mixes the states of one order k with the
  matrix of Weigel eq. 15;
* relaxation over τ multiplies F± by E2 = exp(−τ/T2) and Z by E1 = exp(−τ/T1), and regrows
  Z0 by M0·(1 − E1) (eq. 23);
* a gradient (crusher/readout) lobe shifts every state by one order (eq. 26):
  F+_k → F+_{k+1}, F−_k → F−_{k−1}, with F+_0 = (F−_0)*.

A CPMG train (excitation at phase 90°, refocusing at 0°, echo spacing ESP) is, per echo:
relax ESP/2, shift, refocus, relax ESP/2, shift, read F+_0. Units as in
:mod:`qmriflow.physics`: times in ms, T1/T2 in s, angles in degrees. Everything is NumPy,
vectorised over any broadcastable shape of T1, T2 and the transmit scale ``b1`` (the actual
flip angle divided by the nominal one).

The train is linear in the initial longitudinal magnetisation m and the equilibrium M0, so
:func:`cpmg_affine` returns each echo and the final Z0 as ``c·m + d`` and ``a·m + b``; the
steady states of repeated trains (:func:`tse_steady_state`, with an optional inversion for
FLAIR) follow in closed form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TABLE_NODES",
    "TABLE_T1_S",
    "TABLE_T2_S",
    "EchoTrain",
    "SignalTable",
    "cpmg",
    "cpmg_affine",
    "equivalent_te_ms",
    "steady_state_table",
    "tse_steady_state",
    "variable_flip_schedule",
]


@dataclass(frozen=True)
class EchoTrain:
    """One TSE echo train: echo spacing (ms), refocusing angle of every echo (degrees),
    the echo at the centre of k-space (1-based) and the excitation angle (degrees)."""

    esp_ms: float
    refocusing_deg: tuple[float, ...]
    centre_echo: int
    excitation_deg: float = 90.0

    def __post_init__(self) -> None:
        if not self.refocusing_deg:
            raise ValueError("an echo train needs at least one refocusing pulse")
        if not (self.esp_ms > 0 and math.isfinite(self.esp_ms)):
            raise ValueError(f"echo spacing must be positive, got {self.esp_ms!r}")
        if not 1 <= self.centre_echo <= len(self.refocusing_deg):
            raise ValueError(f"centre echo {self.centre_echo} outside 1..{self.length}")

    @property
    def length(self) -> int:
        """Echo train length (turbo factor)."""
        return len(self.refocusing_deg)

    @property
    def duration_ms(self) -> float:
        """Excitation to the last echo."""
        return self.length * self.esp_ms

    @property
    def centre_te_ms(self) -> float:
        """Time of the k-space centre echo after the excitation (the physical echo time)."""
        return self.centre_echo * self.esp_ms

    def as_dict(self) -> dict[str, object]:
        return {"echo_spacing_ms": self.esp_ms, "echo_train_length": self.length,
                "centre_echo": self.centre_echo, "centre_te_ms": self.centre_te_ms,
                "excitation_deg": self.excitation_deg,
                "refocusing_deg": [float(a) for a in self.refocusing_deg]}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> EchoTrain:
        """Inverse of :meth:`as_dict` (``echo_train_length`` and ``centre_te_ms`` are
        derived and ignored)."""
        angles = d["refocusing_deg"]
        if not isinstance(angles, list | tuple):
            raise ValueError("echo_train.refocusing_deg must be a list of angles")
        return cls(float(d["echo_spacing_ms"]), tuple(float(a) for a in angles),  # type: ignore[arg-type]
                   int(d["centre_echo"]), float(d.get("excitation_deg", 90.0)))  # type: ignore[arg-type]


def _rotation(alpha: np.ndarray, phi: float) -> tuple[np.ndarray, ...]:
    """Elements of Weigel eq. 15 for angle(s) ``alpha`` (rad) about the axis at ``phi``."""
    c2 = np.cos(alpha / 2.0) ** 2
    s2 = np.sin(alpha / 2.0) ** 2
    s = np.sin(alpha)
    c = np.cos(alpha)
    e1 = np.exp(1j * phi)
    e2 = np.exp(2j * phi)
    return (c2, e2 * s2, -1j * e1 * s,
            np.conj(e2) * s2, c2, 1j * np.conj(e1) * s,
            -0.5j * np.conj(e1) * s, 0.5j * e1 * s, c)


def _rotate(fp: np.ndarray, fm: np.ndarray, z: np.ndarray, r: tuple[np.ndarray, ...]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply a rotation to states laid out (order, batch)."""
    t11, t12, t13, t21, t22, t23, t31, t32, t33 = r
    return (t11 * fp + t12 * fm + t13 * z,
            t21 * fp + t22 * fm + t23 * z,
            t31 * fp + t32 * fm + t33 * z)


def _shift(fp: np.ndarray, fm: np.ndarray) -> None:
    """Dephase by one order in place (Weigel eq. 26); states laid out (order, batch)."""
    fp[1:] = fp[:-1].copy()
    fm[:-1] = fm[1:].copy()
    fm[-1] = 0.0
    fp[0] = np.conj(fm[0])


def cpmg(t1_s: np.ndarray | float, t2_s: np.ndarray | float, train: EchoTrain, *,
         b1: np.ndarray | float = 1.0, mz0: np.ndarray | float = 1.0,
         m0: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Echoes of a CPMG train and the longitudinal magnetisation after it.

    ``mz0``: Z0 just before the excitation; ``m0``: the equilibrium magnetisation Z0 regrows
    towards. Returns ``(echoes, z_end)``: complex echo amplitudes F+_0 of shape
    ``broadcast(t1, t2, b1, mz0, m0) + (train.length,)`` and the real Z0 right after the last
    echo (transverse states and Z_k, k > 0, are assumed spoiled after the train). With every
    refocusing angle 180° and ``b1`` = 1 the echoes are mz0·sin(excitation)·exp(−n·ESP/T2).
    Computed in double precision; states beyond the order from which F+_0 can no longer be
    reached before the last echo are dropped (exact).
    """
    t1, t2, b1a, mz, m0a = (a.ravel() for a in np.broadcast_arrays(
        *(np.asarray(x, dtype=np.float64) for x in (t1_s, t2_s, b1, mz0, m0))))
    shape = np.broadcast_shapes(*(np.shape(x) for x in (t1_s, t2_s, b1, mz0, m0)))
    n = train.length
    half = train.esp_ms / 2000.0  # s
    e1 = np.exp(-half / np.maximum(t1, 1e-9))
    e2 = np.exp(-half / np.maximum(t2, 1e-9))
    regrow = m0a * (1.0 - e1)
    k = n + 2  # two shifts per echo
    fp = np.zeros((k, t1.size), np.complex128)
    fm = np.zeros_like(fp)
    z = np.zeros_like(fp)
    z[0] = mz
    fp, fm, z = _rotate(fp, fm, z, _rotation(np.deg2rad(train.excitation_deg) * b1a,
                                             math.pi / 2.0))
    echoes = np.empty((n, t1.size), np.complex128)

    def relax_and_shift(kk: int) -> None:
        fp[:kk] *= e2
        fm[:kk] *= e2
        z[:kk] *= e1
        z[0] += regrow
        _shift(fp[:kk], fm[:kk])  # views: shifted in place

    for i, angle in enumerate(train.refocusing_deg):
        # active orders: by echo i the train reaches order 2i + 2, and an order above
        # 2(n − i) + 1 can no longer come back to F+_0 (exact truncation)
        kk = min(k, 2 * min(i + 1, n - i) + 2)
        relax_and_shift(kk)
        fp[:kk], fm[:kk], z[:kk] = _rotate(fp[:kk], fm[:kk], z[:kk],
                                           _rotation(np.deg2rad(angle) * b1a, 0.0))
        relax_and_shift(kk)
        echoes[i] = fp[0]
    return (np.moveaxis(echoes, 0, -1).reshape(*shape, n),
            z[0].real.copy().reshape(shape))


def cpmg_affine(t1_s: np.ndarray | float, t2_s: np.ndarray | float, train: EchoTrain, *,
                b1: np.ndarray | float = 1.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The train as affine maps of the initial Z0 = m (M0 = 1): echoes = c·m + d and
    z_end = a·m + b. Returns ``(c, d, a, b)`` (c, d complex with the echo axis last)."""
    m = np.array([1.0, 0.0]).reshape((2,) + (1,) * np.ndim(np.broadcast(t1_s, t2_s, b1)))
    echoes, z_end = cpmg(np.asarray(t1_s)[None], np.asarray(t2_s)[None], train,
                         b1=np.asarray(b1)[None], mz0=m)
    d, b = echoes[1], z_end[1]
    return echoes[0] - d, d, z_end[0] - b, b


def tse_steady_state(t1_s: np.ndarray | float, t2_s: np.ndarray | float, train: EchoTrain,
                     tr_ms: float, *, b1: np.ndarray | float = 1.0,
                     ti_ms: float | None = None, inversion_efficiency: float = 1.0
                     ) -> np.ndarray:
    """Complex centre-echo amplitude (M0 = 1) of a TSE repeated every ``tr_ms``, in the
    steady state; with ``ti_ms`` an inversion pulse precedes each excitation by TI (FLAIR).

    Between trains Z0 relaxes freely (the transverse states are spoiled). Without inversion
    the excitation sees m = 1 − (1 − z_end)·E_r, E_r = exp(−(TR − train)/T1); with one,
    z_end relaxes until the inversion (TR − TI − train), is inverted with efficiency η
    (Mz → −η·Mz; η = 1 a perfect, B1-insensitive adiabatic inversion) and relaxes for TI.
    With z_end = a·m + b (:func:`cpmg_affine`) the fixed point is closed-form.
    """
    c, d, a, b = cpmg_affine(t1_s, t2_s, train, b1=b1)
    t1 = np.maximum(np.asarray(t1_s, dtype=np.float64), 1e-9)
    if ti_ms is None:
        rest = tr_ms - train.duration_ms
        if rest < 0:
            raise ValueError(f"TR {tr_ms} ms is shorter than the echo train "
                             f"({train.duration_ms} ms)")
        er = np.exp(-rest / 1000.0 / t1)
        m = (b * er + 1.0 - er) / (1.0 - a * er)
    else:
        rest = tr_ms - ti_ms - train.duration_ms
        if rest < 0 or ti_ms <= 0:
            raise ValueError(f"TR {tr_ms} ms cannot hold TI {ti_ms} ms and the echo train "
                             f"({train.duration_ms} ms)")
        er = np.exp(-rest / 1000.0 / t1)
        ei = np.exp(-ti_ms / 1000.0 / t1)
        eta = float(inversion_efficiency)
        m = (-eta * ei * (b * er + 1.0 - er) + 1.0 - ei) / (1.0 + eta * ei * er * a)
    i = train.centre_echo - 1
    return c[..., i] * m + d[..., i]


def variable_flip_schedule(n: int, *, start_deg: float = 160.0, minimum_deg: float = 40.0,
                           end_deg: float = 120.0, decay_echoes: float = 4.0,
                           rise_from: float = 0.6) -> tuple[float, ...]:
    """Refocusing angles of a long 3D-TSE train (SPACE/VISTA/CUBE-like shape; Busse et al.
    MRM 2006, Mugler JMRI 2014): a fast exponential decrease from ``start_deg`` to a low
    plateau ``minimum_deg`` (a pseudo steady state carried by stimulated echoes), then a
    linear rise to ``end_deg`` over the last ``1 − rise_from`` of the train."""
    if n < 1:
        raise ValueError("echo train length must be >= 1")
    i = np.arange(n, dtype=np.float64)
    a = minimum_deg + (start_deg - minimum_deg) * np.exp(-i / max(decay_echoes, 1e-6))
    j0 = round(rise_from * n)
    if j0 < n - 1:
        ramp = (i[j0:] - j0) / (n - 1 - j0)
        a[j0:] = np.maximum(a[j0:], minimum_deg + (end_deg - minimum_deg) * ramp)
    return tuple(float(x) for x in a)


def equivalent_te_ms(train: EchoTrain, *, t1_ref_s: float = 1.0, t2_ref_s: float = 0.1,
                     echo: int | None = None) -> float:
    """The spin-echo TE that gives a reference tissue the same T2 attenuation as ``echo``
    (default: the centre echo) of ``train`` — what 3D-TSE consoles report as (equivalent)
    TE: TE_eq = −T2_ref·ln(S(T1_ref, T2_ref) / S(no relaxation)) (Busse et al. MRM 2006;
    the reference tissue is an assumption of the vendor, here T1 1.0 s, T2 100 ms)."""
    idx = (train.centre_echo if echo is None else echo) - 1
    relaxed, _ = cpmg(t1_ref_s, t2_ref_s, train)
    ideal, _ = cpmg(1e9, 1e9, train)
    ratio = abs(relaxed[..., idx]) / max(abs(ideal[..., idx]), 1e-12)
    return float(-t2_ref_s * 1000.0 * math.log(max(ratio, 1e-12)))


# ---------------------------------------------------------------------------------------------
# the estimator's view: a steady-state signal table over (log T1, log T2)
# ---------------------------------------------------------------------------------------------

TABLE_T1_S = (0.1, 8.0)
"""T1 range (s) of :func:`steady_state_table`; outside it the signal is held at the edge."""
TABLE_T2_S = (0.01, 4.0)
"""T2 range (s) of :func:`steady_state_table`."""
TABLE_NODES = 40
"""Nodes per axis, log-spaced; cubic interpolation between them is accurate to ~1e-4 of the
signal (tests/test_epg.py)."""


@dataclass(frozen=True, eq=False)
class SignalTable:
    """Centre-echo steady-state signal per unit PD of one protocol on a log-spaced grid:
    ``values[i, j]`` at T1 = exp(lo[0] + i·step[0]) s, T2 = exp(lo[1] + j·step[1]) s; signed
    (negative where a FLAIR's longitudinal magnetisation is still inverted at excitation)."""

    lo: tuple[float, float]
    step: tuple[float, float]
    values: np.ndarray


@functools.lru_cache(maxsize=4096)
def steady_state_table(train: EchoTrain, tr_ms: float, ti_ms: float | None = None
                       ) -> SignalTable:
    """:func:`tse_steady_state` at ideal transmit (b1 = 1, perfect inversion) tabulated for
    an estimator: the estimator knows the train from the headers (or assumes it), not the
    subject's transmit field, slice profile or inversion efficiency. Cached per protocol
    (a 170-echo train takes a few seconds; 12.8 kB a table): large enough that a cluster fit
    over thousands of sessions, which evaluates every session's protocol at each step, never
    rebuilds one."""
    lo = (math.log(TABLE_T1_S[0]), math.log(TABLE_T2_S[0]))
    hi = (math.log(TABLE_T1_S[1]), math.log(TABLE_T2_S[1]))
    n = TABLE_NODES
    g1 = np.exp(np.linspace(lo[0], hi[0], n))
    g2 = np.exp(np.linspace(lo[1], hi[1], n))
    t1, t2 = np.meshgrid(g1, g2, indexing="ij")
    # the whole grid, T2 > T1 included (unphysical, but finite and smooth: the interpolant
    # near T2 ≈ T1 then needs no special edge)
    vals = tse_steady_state(t1, t2, train, float(tr_ms),
                            ti_ms=None if ti_ms is None else float(ti_ms)).real
    vals.setflags(write=False)
    step = ((hi[0] - lo[0]) / (n - 1), (hi[1] - lo[1]) / (n - 1))
    return SignalTable(lo, step, vals)
