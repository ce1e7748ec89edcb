"""Acquisition protocols and scanners of the phantom archive (seed 000 Table 1 and Table C.1).

Each session is acquired on one of the four Philips 3 T systems of the seed, with a protocol
drawn around one of the nine protocol-cluster centroids of Table C.1 (then jittered, staying
inside Table 1's ranges), so that scanner and protocol groups exist in every archive.

Scanner gains. The gain of a series is the factor between the noise-free signal (times the
receive field) and the scanner's floating-point image (Philips "FP" value; dimensionless,
arbitrary units per unit of ``physics.signal``). Two models (``GAIN_MODELS``):

* ``"independent"``: every series draws its own gain, log-uniform in :data:`GAIN_RANGE`.
* ``"protocol"``: gain = cluster_ratio[cluster][role] × session gain × exp(N(0, jitter)).
  The per-cluster, per-role factor is fixed for an archive (:func:`cluster_gain_ratios`,
  drawn from the phantom seed and the cluster index only): a cluster base log-uniform in
  :data:`GAIN_RANGE` (the T2w's gain) times a role ratio log-uniform in
  :data:`ROLE_RATIO_RANGE` (T2w: 1; the post-contrast T1w shares the T1w's ratio). The session
  gain (coil loading) is log-normal around 1 with log-SD :data:`SESSION_GAIN_LOG_SD`; the
  jitter is per series. So within a cluster FP ratios between series of one session are
  fixed up to the jitter, as Philips FP values of one examination are meant to be comparable.
  These are modelling assumptions of the phantom, not measured values.

Philips stored/display scaling (:func:`draw_philips_scaling`): the display slope RS is
log-uniform in :data:`RESCALE_SLOPE_RANGE` and the largest FP value of a series is stored at a
fraction of the 12-bit range drawn from :data:`FILL_RANGE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..physics import Protocol

# (model, share of sessions in seed 000, software version string)
SCANNERS: tuple[tuple[str, float, str], ...] = (
    ("Achieva", 0.341, "5.4.1\\5.4.1.1"),
    ("Ingenia", 0.275, "5.6.1\\5.6.1.2"),
    ("Ingenia CX", 0.218, "5.7.1\\5.7.1.3"),
    ("Ingenia Elition X", 0.166, "5.7.1\\5.7.1.3"),
)

# Table C.1 centroids: T1w TR, TE | T2w TR, TE | FLAIR TR, TE, TI  (ms); FA 10 / 90 / 90.
CLUSTERS: tuple[tuple[float, float, float, float, float, float, float], ...] = (
    (5.17, 2.31, 4315, 80, 4800, 288, 1650),
    (5.23, 2.38, 3955, 80, 4800, 301, 1650),
    (5.28, 2.40, 3853, 80, 4800, 304, 1650),
    (5.24, 2.35, 4313, 80, 4800, 337, 1650),
    (5.15, 2.30, 4340, 80, 4800, 336, 1650),
    (5.27, 2.38, 4331, 80, 4800, 293, 1650),
    (5.30, 2.40, 4143, 80, 4800, 353, 1650),
    (5.29, 2.40, 3905, 80, 4800, 351, 1650),
    (5.28, 2.40, 4062, 80, 4800, 302, 1650),
)

GAIN_MODELS = ("independent", "protocol")
"""Names of the gain models (module docstring)."""
GAIN_RANGE = (300.0, 3000.0)
"""Log-uniform range of an independent series gain and of a cluster's base gain (FP units)."""
ROLE_RATIO_RANGE = (0.25, 4.0)
"""Log-uniform range of a cluster's T1w/T2w and FLAIR/T2w gain ratios."""
SESSION_GAIN_LOG_SD = 0.15
"""Log-SD of the per-session common gain factor (coil loading)."""
GAIN_ROLES = ("t1w", "t1w_gd", "t2w", "flair")
"""Roles that get a cluster ratio (the fat/water series keeps an independent gain)."""
RESCALE_SLOPE_RANGE = (0.5, 5.0)
"""Log-uniform range of the Philips display RescaleSlope RS."""
FILL_RANGE = (0.6, 1.0)
"""Uniform range of the fraction of the 12-bit range the series maximum is stored at."""

# SeedSequence tag of the per-cluster gain stream (distinct from every other phantom stream)
_CLUSTER_GAIN_TAG = 900_001

# Table 1 ranges, used to clip the jitter.
RANGES = {
    "t1w_tr": (5.03, 5.40),
    "t1w_te": (2.247, 2.493),
    "t2w_tr": (3848.0, 4557.0),
    "flair_te": (280.0, 370.0),
}
# Gadolinium prevalence in seed 000 (Table 1): T2w 98.1 %, FLAIR 35.9 %, T1w never.
GD_PREVALENCE = {"t2w": 0.981, "flair": 0.359}
GD_AGENT = "Gadovist"


@dataclass
class SeriesProtocol:
    """One series to acquire: its physics protocol and the header values a scanner writes."""

    role: str  # t1w | t2w | flair | t1w_gd | megre
    protocol: Protocol | None  # None for the multi-echo CSE series
    description: str
    acquisition: str  # "2D" | "3D"
    scanning_sequence: str
    sequence_variant: str
    echo_train_length: int
    contrast_agent: str | None = None
    echo_times_ms: tuple[float, ...] | None = None
    tr_ms: float | None = None
    fa_deg: float | None = None
    pixel_bandwidth: float = 200.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def te_ms(self) -> float:
        if self.protocol is not None:
            return self.protocol.te_ms
        assert self.echo_times_ms is not None
        return self.echo_times_ms[0]

    def manifest(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "role": self.role,
            "description": self.description,
            "MRAcquisitionType": self.acquisition,
            "ScanningSequence": self.scanning_sequence,
            "SequenceVariant": self.sequence_variant,
            "EchoTrainLength": self.echo_train_length,
            "ContrastBolusAgent": self.contrast_agent,
        }
        if self.protocol is not None:
            d["protocol"] = self.protocol.as_dict()
        else:
            d["protocol"] = {
                "sequence": "megre",
                "tr_ms": self.tr_ms,
                "te_ms": self.echo_times_ms[0] if self.echo_times_ms else None,
                "echo_times_ms": list(self.echo_times_ms or ()),
                "fa_deg": self.fa_deg,
                "ti_ms": None,
            }
        return d


def draw_scanner(rng: np.random.Generator) -> tuple[str, str]:
    p = np.array([s[1] for s in SCANNERS])
    i = int(rng.choice(len(SCANNERS), p=p / p.sum()))
    return SCANNERS[i][0], SCANNERS[i][2]


def cluster_scanner(cluster: int) -> tuple[str, str]:
    """Fixed scanner (model, software version) of protocol cluster ``cluster`` when sessions
    are assigned to clusters: ``SCANNERS[cluster % len(SCANNERS)]``."""
    model, _, sw = SCANNERS[int(cluster) % len(SCANNERS)]
    return model, sw


def assigned_cluster(subject: int, session: int, sessions: int, clusters: int) -> int:
    """Round-robin cluster of a session (0-based ``subject``/``session`` indices): the global
    session index n = subject · sessions + session, cluster n mod ``clusters``."""
    if not 1 <= clusters <= len(CLUSTERS):
        raise ValueError(f"clusters must be in 1..{len(CLUSTERS)}, got {clusters}")
    return (int(subject) * int(sessions) + int(session)) % int(clusters)


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def cluster_gain_ratios(seed: int, cluster: int) -> dict[str, float]:
    """Per-role FP gain of protocol cluster ``cluster`` under the ``"protocol"`` gain model,
    before the session gain and jitter: base × role ratio (T2w ratio 1, T1w and T1w +C share
    one ratio). Deterministic in (``seed``, ``cluster``) only."""
    rng = np.random.default_rng([int(seed), _CLUSTER_GAIN_TAG, int(cluster)])
    base = _log_uniform(rng, GAIN_RANGE)
    t1w = _log_uniform(rng, ROLE_RATIO_RANGE)
    flair = _log_uniform(rng, ROLE_RATIO_RANGE)
    return {"t1w": base * t1w, "t1w_gd": base * t1w, "t2w": base, "flair": base * flair}


def draw_session_gain(rng: np.random.Generator) -> float:
    """Per-session common gain factor: exp(N(0, SESSION_GAIN_LOG_SD)), dimensionless."""
    return float(np.exp(rng.normal(0.0, SESSION_GAIN_LOG_SD)))


def draw_philips_scaling(rng: np.random.Generator) -> tuple[float, float]:
    """(display RescaleSlope RS, fill fraction of the stored range) of one series."""
    rs = _log_uniform(rng, RESCALE_SLOPE_RANGE)
    fill = float(rng.uniform(*FILL_RANGE))
    return rs, fill


def draw_session_protocols(
    rng: np.random.Generator,
    *,
    cluster: int | None = None,
    post_gd_t1w: bool = False,
    cse: bool = False,
    field_t: float = 3.0,
) -> tuple[int, list[SeriesProtocol]]:
    """Draw the protocols of one session: (cluster index, series list)."""
    k = int(rng.integers(len(CLUSTERS))) if cluster is None else int(cluster)
    t1_tr, t1_te, t2_tr, t2_te, fl_tr, fl_te, fl_ti = CLUSTERS[k]

    def jitter(v: float, sd: float, lo_hi: tuple[float, float]) -> float:
        return float(np.clip(v + rng.normal(0, sd), *lo_hi))

    t1_tr = round(jitter(t1_tr, 0.03, RANGES["t1w_tr"]), 2)
    t1_te = round(jitter(t1_te, 0.02, RANGES["t1w_te"]), 3)
    t2_tr = round(jitter(t2_tr, 40.0, RANGES["t2w_tr"]))
    fl_te = round(jitter(fl_te, 6.0, RANGES["flair_te"]))
    gd_t2 = rng.random() < GD_PREVALENCE["t2w"]
    gd_fl = rng.random() < GD_PREVALENCE["flair"]

    series = [
        SeriesProtocol(
            role="t1w",
            protocol=Protocol("gre", t1_tr, t1_te, fa_deg=10.0),
            description="T1W_3D_FFE",
            acquisition="3D",
            scanning_sequence="GR",
            sequence_variant="SP",
            echo_train_length=1,
            pixel_bandwidth=541.0,
        ),
        SeriesProtocol(
            role="t2w",
            protocol=Protocol("tse", float(t2_tr), float(t2_te), fa_deg=90.0),
            description="T2W_TSE" + (" +C" if gd_t2 else ""),
            acquisition="2D",
            scanning_sequence="SE",
            sequence_variant="SK",
            echo_train_length=int(rng.integers(14, 19)),
            contrast_agent=GD_AGENT if gd_t2 else None,
            pixel_bandwidth=float(round(rng.uniform(184, 206))),
        ),
        SeriesProtocol(
            role="flair",
            protocol=Protocol("flair", float(fl_tr), float(fl_te), ti_ms=float(fl_ti), fa_deg=90.0),
            description="3D_FLAIR" + (" +C" if gd_fl else ""),
            acquisition="3D",
            scanning_sequence="SE\\IR",
            sequence_variant="SK\\MP",
            echo_train_length=int(rng.integers(150, 190)),
            contrast_agent=GD_AGENT if gd_fl else None,
            pixel_bandwidth=float(round(rng.uniform(943, 1468))),
        ),
    ]
    if post_gd_t1w:
        # same protocol as the pre-contrast T1w, acquired after gadolinium
        series.append(replace(series[0], role="t1w_gd", description="T1W_3D_FFE +C",
                              contrast_agent=GD_AGENT, extra={}))
    if cse:
        dte = 1.15 * 3.0 / field_t
        series.append(
            SeriesProtocol(
                role="megre",
                protocol=None,
                description="mFFE_6echo_FF",
                acquisition="3D",
                scanning_sequence="GR",
                sequence_variant="SP",
                echo_train_length=6,
                echo_times_ms=tuple(round(dte * (i + 1), 4) for i in range(6)),
                tr_ms=8.5,
                fa_deg=3.0,
                pixel_bandwidth=1100.0,
            )
        )
    return k, series
