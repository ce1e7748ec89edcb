"""Acquisition parameters of one session, from dcm2niix sidecars, checked before any model
uses them.

Two steps, kept apart:

* :func:`extract_series_params` turns one sidecar into numbers (ms, degrees, tesla) exactly as
  the sidecar says them (TR 2217.66, not rounded: seconds × 1000 rounded to 1e-9 ms, as
  :func:`qmriflow.archive.convert.sidecar_times_ms`); it never refuses a value;
* :func:`validate_session_params` refuses what no signal model may use, with a one-line
  :class:`~qmriflow.errors.InputError` naming the session and the sidecar.

:func:`extract_session_params` does both for a converted session and returns the session JSON
(``{"session", "t1w", "t2w", "flair", "megre": [...]}``), each role holding ``sequence``,
``tr_ms``, ``te_ms``, ``ti_ms`` (None if absent), ``fa_deg``, ``acquisition``,
``field_strength_t``, ``manufacturer``, ``manufacturer_model``, ``gadolinium``,
``echo_times_ms``, ``te_correction_factor``, ``intensity_scaling`` (what the intensities are:
Philips floating-point values compare between series; :func:`intensity_scaling`),
``series_id`` and ``sidecar``.

Refused: missing or non-finite TR/TE/FA, negative times, TE ≥ TR (the last echo for multi-echo
GRE), FLAIR or IR-GRE without an inversion time, TI ≥ TR for those, flip angle outside
[1, 180]°, a missing field strength or one outside :data:`FIELD_RANGE_T` (0.1–11.7 T, also
with ``require_3t: false``), a field other than 3 T for T1w/T2w/FLAIR when ``require_3t``
(2.5–3.5 T counts as 3 T; Siemens writes 2.89), fewer than two or non-increasing echo times
for multi-echo GRE, and an IR-GRE whose TR is below 100 ms: Philips T1TFE (MPRAGE) reports
the excitation TR (≈ 6.5 ms) while the IR-GRE model needs the time between inversions, which
Philips keeps in private tags only — computed with the excitation TR the model would be wrong
by orders of magnitude, so the session is refused rather than processed silently
(../shared/NOTES.md E).

Long because each parameter's extraction and its validation (per sequence type and vendor) sit
together, with the echo-train choice that depends on them.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..epg import EchoTrain, variable_flip_schedule
from ..errors import InputError
from ..physics import SEQUENCES, TECorrection, te_correction_factor
from .classify import image_kind

__all__ = [
    "ASSUMED_3D_SCHEDULE",
    "FIELD_RANGE_T",
    "IRGRE_MIN_TR_MS",
    "EchoTrainSettings",
    "estimator_echo_train",
    "extract_series_params",
    "extract_session_params",
    "intensity_scaling",
    "validate_session_params",
]

IRGRE_MIN_TR_MS = 100.0
"""Below this, an IR-GRE TR is the excitation TR, not the inversion repetition time."""
FIELD_3T_RANGE = (2.5, 3.5)
FIELD_RANGE_T = (0.1, 11.7)
"""Field strengths (tesla) any series may have, whatever ``require_3t`` says: from low-field
(0.1 T) to the strongest human MRI scanner (11.7 T). Outside it the header is wrong (a
missing unit conversion: 30 for 3 T, 15000 gauss) and no signal model should trust it."""
SINGLE_ROLES = ("t1w", "t2w", "flair")
ROLE_LABEL = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR", "megre": "multi-echo GRE"}
SEQ_LABEL = {"gre": "GRE", "irgre": "IR-GRE", "se": "spin-echo", "tse": "TSE",
             "flair": "FLAIR", "megre": "multi-echo GRE"}
_NON_MAGNITUDE_NAME = re.compile(r"_(ph|real|imaginary|phMag)(\d+)?\.json$")


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """Sidecar number -> float; absent -> None; unparsable -> NaN (validation reports it)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, list | tuple):
        return _number(value[0]) if value else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ms(value: Any) -> float | None:
    s = _number(value)
    if s is None or not math.isfinite(s):
        return s
    return round(s * 1000.0, 9)  # as convert.sidecar_times_ms


def _clean(value: Any) -> Any:
    return None if value in (None, "") else value


def _te_factor(sequence: str, te_ms: float | None,
               te_correction: TECorrection | Mapping[str, Any] | None) -> float | None:
    if sequence not in SEQUENCES:
        return 1.0
    if te_ms is None or not math.isfinite(te_ms):
        return None
    corr = (te_correction if isinstance(te_correction, TECorrection) or te_correction is None
            else TECorrection.from_mapping(te_correction))
    return te_correction_factor(sequence, te_ms, corr)


def extract_series_params(
    sidecar_meta: Mapping[str, Any],
    role: str,
    sequence: str,
    *,
    te_correction: TECorrection | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Parameters of one series from its dcm2niix/BIDS sidecar (times in seconds there).

    Pure extraction: absent values are None, unparsable ones NaN; nothing is refused here.
    ``echo_times_ms`` holds this sidecar's echo time (all echoes when the sidecar lists
    several); :func:`extract_session_params` fills it from the per-echo sidecars of a
    multi-echo series.
    """
    te_raw = sidecar_meta.get("EchoTime")
    if isinstance(te_raw, list | tuple):
        echo_times = [_ms(v) for v in te_raw]
    else:
        echo_times = [] if te_raw is None else [_ms(te_raw)]
    te = echo_times[0] if echo_times else None
    fa = _number(sidecar_meta.get("FlipAngle"))
    field = _number(sidecar_meta.get("MagneticFieldStrength"))
    acq = _clean(sidecar_meta.get("MRAcquisitionType"))
    return {
        "role": role,
        "sequence": sequence,
        "tr_ms": _ms(sidecar_meta.get("RepetitionTime")),
        "te_ms": te,
        "ti_ms": _ms(sidecar_meta.get("InversionTime")),
        "fa_deg": fa,
        "acquisition": str(acq).upper() if acq is not None else None,
        "field_strength_t": field,
        "manufacturer": _clean(sidecar_meta.get("Manufacturer")),
        "manufacturer_model": _clean(sidecar_meta.get("ManufacturersModelName")
                                     or sidecar_meta.get("ManufacturerModelName")),
        "echo_times_ms": [t for t in echo_times if t is not None],
        "echo_train_length": _number(sidecar_meta.get("EchoTrainLength")),
        "te_correction_factor": _te_factor(sequence, te, te_correction),
        "intensity_scaling": intensity_scaling(sidecar_meta),
    }


# ---------------------------------------------------------------------------------------------
# the echo train the estimator simulates (issue 22: an estimator that models what TSE does)
# ---------------------------------------------------------------------------------------------

ASSUMED_3D_SCHEDULE = {"start_deg": 150.0, "minimum_deg": 30.0, "end_deg": 100.0,
                       "echo_spacing_ms": 4.0}
"""Variable refocusing angles assumed for a long 3D TSE (SPACE/VISTA/CUBE) whose schedule
the headers do not give: a fast decay from 150° to a 30° plateau carried by stimulated
echoes, rising to 100° at the end of the train, 4 ms apart (the shape of Busse et al. MRM
2006 and Mugler JMRI 2014; the vendors' exact schedules are proprietary and depend on the
protocol's T1/T2 targets). An assumption of the estimator, stated in the sidecar."""
LONG_TRAIN = 40
"""A 3D TSE with at least this many echoes per train is taken to use variable angles."""


@dataclass(frozen=True)
class EchoTrainSettings:
    """How the estimator models echo trains (config ``physics.echo_train``).

    ``model``: ``auto`` — simulate the train (extended phase graphs) where its refocusing
    angles are known: a ``RefocusingFlipAngle`` sidecar field, a TSE ``FlipAngle`` above 90°
    (Siemens writes the refocusing angle there), or the site's value below; ``off`` — the
    seed's TE factors everywhere. ``t2w_refocusing_deg``/``flair_refocusing_deg``: the
    constant refocusing angle of the site's 2D T2w/FLAIR protocol (from its exam card) when
    the headers do not give it. ``flair_3d_schedule``: ``assumed`` — a long 3D FLAIR train
    uses :data:`ASSUMED_3D_SCHEDULE`; ``off`` — the TE factor."""

    model: str = "auto"
    t2w_refocusing_deg: float | None = None
    flair_refocusing_deg: float | None = None
    flair_3d_schedule: str = "assumed"
    flair_3d_start_deg: float | None = None
    flair_3d_minimum_deg: float | None = None
    flair_3d_end_deg: float | None = None
    flair_3d_echo_spacing_ms: float | None = None
    """The site's own 3D FLAIR schedule (exam card: first and plateau refocusing angles, the
    angle at the end of the train, echo spacing); each one not given keeps its value in
    :data:`ASSUMED_3D_SCHEDULE`, and the sidecar says which were the site's."""

    def __post_init__(self) -> None:
        if self.model not in ("auto", "off"):
            raise ValueError(f"physics.echo_train.model must be auto or off, got {self.model!r}")
        if self.flair_3d_schedule not in ("assumed", "off"):
            raise ValueError("physics.echo_train.flair_3d_schedule must be assumed or off, "
                             f"got {self.flair_3d_schedule!r}")
        for k, lo in (("t2w_refocusing_deg", 60.0), ("flair_refocusing_deg", 60.0),
                      ("flair_3d_start_deg", 10.0), ("flair_3d_minimum_deg", 10.0),
                      ("flair_3d_end_deg", 10.0)):
            v = getattr(self, k)
            if v is not None and not lo <= float(v) <= 180.0:
                raise ValueError(f"physics.echo_train.{k} must be in [{lo:g}, 180]°, "
                                 f"got {v!r}")
        esp = self.flair_3d_echo_spacing_ms
        if esp is not None and not 1.0 <= float(esp) <= 50.0:
            raise ValueError("physics.echo_train.flair_3d_echo_spacing_ms must be in "
                             f"[1, 50] ms, got {esp!r}")

    def schedule_3d(self) -> tuple[dict[str, float], list[str]]:
        """The 3D FLAIR schedule to simulate and the names of the values the site gave."""
        site = {"start_deg": self.flair_3d_start_deg, "minimum_deg": self.flair_3d_minimum_deg,
                "end_deg": self.flair_3d_end_deg,
                "echo_spacing_ms": self.flair_3d_echo_spacing_ms}
        given = [k for k, v in site.items() if v is not None]
        return ({k: float(site[k] if site[k] is not None else ASSUMED_3D_SCHEDULE[k])
                 for k in ASSUMED_3D_SCHEDULE}, given)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> EchoTrainSettings:
        return cls(**dict(m or {}))


def estimator_echo_train(entry: Mapping[str, Any], sidecar_meta: Mapping[str, Any],
                         settings: EchoTrainSettings | None = None
                         ) -> tuple[dict[str, Any] | None, str]:
    """The echo train the estimator will simulate for one T2w/FLAIR series, or None, and a
    one-line statement of where it came from (written to the protocol sidecar).

    Needed: the echo train length (``EchoTrainLength``), the refocusing angle(s) and the
    echo spacing. A constant-angle train (2D TSE/FLAIR, short 3D trains) takes its angle
    from the sidecar (``RefocusingFlipAngle``; a ``FlipAngle`` above 90°, which Siemens
    writes for TSE) or from the site's settings, and assumes linear phase-encode order: the
    header's TE is echo ⌈ETL/2⌉, so the spacing is TE/⌈ETL/2⌉. A long 3D train (ETL ≥
    :data:`LONG_TRAIN`) takes :data:`ASSUMED_3D_SCHEDULE` when allowed, its centre echo at
    the header's TE. Anything missing or inconsistent (a TR too short for the train): None,
    and the seed's TE factor applies."""
    st = settings or EchoTrainSettings()
    seq, role = entry.get("sequence"), entry.get("role")
    if seq not in ("tse", "flair") or role not in ("t2w", "flair"):
        return None, "not an echo-train series"
    factor = entry.get("te_correction_factor")
    fallback = f"seed TE factor {factor:g}" if isinstance(factor, float) else "seed TE factor"
    if st.model == "off":
        return None, f"{fallback} (physics.echo_train.model: off)"
    etl_v = entry.get("echo_train_length")
    te, tr = entry.get("te_ms"), entry.get("tr_ms")
    ti = entry.get("ti_ms") if seq == "flair" else None
    if etl_v is None or not math.isfinite(float(etl_v)) or int(etl_v) < 2:
        return None, f"{fallback}: the sidecar gives no EchoTrainLength > 1"
    etl = int(etl_v)
    if te is None or tr is None or not (math.isfinite(te) and math.isfinite(tr)) or te <= 0:
        return None, f"{fallback}: no usable TE/TR"
    three_d = str(entry.get("acquisition") or "").upper() == "3D"
    if three_d and etl >= LONG_TRAIN:
        if st.flair_3d_schedule != "assumed" or seq != "flair":
            return None, (f"{fallback}: variable refocusing angles of a {etl}-echo 3D train "
                          "are not in the headers")
        sched, given = st.schedule_3d()
        esp = sched["echo_spacing_ms"]
        centre = round(te / esp)
        if centre > etl:
            esp, centre = te / etl, etl
        centre = max(centre, 1)
        angles = variable_flip_schedule(etl, start_deg=sched["start_deg"],
                                        minimum_deg=sched["minimum_deg"],
                                        end_deg=sched["end_deg"])
        whose = ("ASSUMED" if not given else "from the site's physics.echo_train"
                 if len(given) == len(sched) else
                 f"site's {', '.join(given)}, the rest ASSUMED")
        source = (f"EPG, {etl}-echo 3D train from EchoTrainLength; variable refocusing angles "
                  f"{whose} ({sched['start_deg']:g}° → {sched['minimum_deg']:g}° → "
                  f"{sched['end_deg']:g}°, spacing {esp:.3g} ms, centre echo {centre} at the "
                  "header's TE)")
    else:
        angle, where = None, ""
        rfa = _number(sidecar_meta.get("RefocusingFlipAngle"))
        fa = entry.get("fa_deg")
        site = st.t2w_refocusing_deg if role == "t2w" else st.flair_refocusing_deg
        if rfa is not None and math.isfinite(rfa) and 60.0 <= rfa <= 180.0:
            angle, where = rfa, "sidecar RefocusingFlipAngle"
        elif fa is not None and math.isfinite(fa) and 90.0 < fa <= 180.0:
            angle, where = float(fa), "FlipAngle > 90° read as the refocusing angle"
        elif site is not None:
            angle, where = float(site), f"physics.echo_train.{role}_refocusing_deg"
        if angle is None:
            return None, (f"{fallback}: the headers give no refocusing angle (set "
                          f"physics.echo_train.{role}_refocusing_deg from the exam card)")
        centre = math.ceil(etl / 2)
        esp = te / centre
        angles = (angle,) * etl
        source = (f"EPG, {etl}-echo train at {angle:g}° ({where}); linear phase-encode order "
                  f"assumed: centre echo {centre}, spacing {esp:.4g} ms")
    train = EchoTrain(round(esp, 6), tuple(round(a, 3) for a in angles), int(centre))
    busy = train.duration_ms + (float(ti) if ti is not None else 0.0)
    if busy >= tr:
        return None, (f"{fallback}: a {etl}-echo train of {train.duration_ms:.0f} ms does not "
                      f"fit in TR {tr:g} ms")
    return train.as_dict(), source


def intensity_scaling(sidecar_meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the converted image's intensities are, from the dcm2niix sidecar.

    Philips stores SV with a display scaling DV = SV·RS + RI and a private ScaleSlope SS; the
    floating-point value FP = DV / (RS·SS) is the one that compares between the series of a
    session (../shared/NOTES.md F). dcm2niix writes FP by default (``-p y``) and says so with
    ``UsePhilipsFloatNotDisplayScaling: 1`` beside ``PhilipsRescaleSlope``,
    ``PhilipsRescaleIntercept`` and ``PhilipsScaleSlope``. Returns ``{"vendor", "values":
    "philips-fp" | "philips-display" | "vendor-default", "rescale_slope", "rescale_intercept",
    "scale_slope", "comparable_between_series"}``; the last is True only for Philips FP (other
    vendors' magnitude images carry no float scale: their receiver gains are set per series).
    Contradicting fields are kept as found and refused by :func:`validate_session_params`.
    """
    manufacturer = str(_clean(sidecar_meta.get("Manufacturer")) or "")
    rs = _number(sidecar_meta.get("PhilipsRescaleSlope"))
    ri = _number(sidecar_meta.get("PhilipsRescaleIntercept"))
    ss = _number(sidecar_meta.get("PhilipsScaleSlope"))
    flag = sidecar_meta.get("UsePhilipsFloatNotDisplayScaling")
    flag_n = _number(flag) if flag is not None else None
    if flag_n == 1:
        values = "philips-fp"
    elif flag_n == 0 or (flag is None and ss is not None):
        values = "philips-display"
    else:
        values = "vendor-default"
    return {"vendor": manufacturer or None, "values": values, "rescale_slope": rs,
            "rescale_intercept": ri, "scale_slope": ss,
            "comparable_between_series": values == "philips-fp"}


def _check_scaling(sc: Mapping[str, Any] | None) -> str | None:
    """Why a series' intensity-scaling fields contradict each other (None if they agree)."""
    if not sc:
        return None
    philips = str(sc.get("vendor") or "").lower().startswith("philips")
    fields = [sc.get(k) for k in ("rescale_slope", "rescale_intercept", "scale_slope")]
    if sc.get("values") in ("philips-fp", "philips-display") and not philips:
        return (f"sidecar gives Philips intensity scaling for a {sc.get('vendor') or 'unknown'} "
                "series (PhilipsScaleSlope/UsePhilipsFloatNotDisplayScaling)")
    if sc.get("values") == "philips-fp":
        ss, rs = sc.get("scale_slope"), sc.get("rescale_slope")
        if ss is None or not (math.isfinite(ss) and ss > 0):
            return (f"UsePhilipsFloatNotDisplayScaling is 1 but PhilipsScaleSlope is "
                    f"{ss!r}: the floating-point values cannot be trusted")
        if rs is not None and not (math.isfinite(rs) and rs > 0):
            return f"PhilipsRescaleSlope {rs!r} is not positive"
    if any(v is not None and not math.isfinite(v) for v in fields):
        return "a Philips scaling field is not a finite number"
    return None


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:g}"


def _check_entry(p: Mapping[str, Any], require_3t: bool, session: str | None) -> None:
    role, seq = p.get("role", "?"), p.get("sequence", "?")
    what = f"{ROLE_LABEL.get(role, role)} ({SEQ_LABEL.get(seq, seq)})"

    def fail(reason: str) -> None:
        raise InputError(f"{what}: {reason}", session=session, path=p.get("sidecar"))

    if seq not in SEQUENCES and seq != "megre":
        fail(f"unknown sequence family {seq!r}")
    values = {}
    for key, label in (("tr_ms", "RepetitionTime"), ("te_ms", "EchoTime"),
                       ("fa_deg", "FlipAngle")):
        v = p.get(key)
        if v is None:
            fail(f"missing {label} in the sidecar")
        v = float(v)
        if not math.isfinite(v):
            fail(f"{label} is not a finite number ({v})")
        values[key] = v
    tr, te, fa = values["tr_ms"], values["te_ms"], values["fa_deg"]
    if tr <= 0 or te < 0:
        fail(f"negative or zero time (RepetitionTime {_fmt(tr)} ms, EchoTime {_fmt(te)} ms)")
    if te == 0:
        fail("EchoTime is 0 ms")
    ti = p.get("ti_ms")
    if ti is not None:
        ti = float(ti)
        if not math.isfinite(ti):
            fail(f"InversionTime is not a finite number ({ti})")
        if ti < 0:
            fail(f"negative InversionTime ({_fmt(ti)} ms)")
    if not 1.0 <= fa <= 180.0:
        fail(f"FlipAngle {_fmt(fa)}° outside [1, 180]°")
    echoes = [float(t) for t in (p.get("echo_times_ms") or [te])]
    if seq == "megre":
        if len(echoes) < 2:
            fail(f"{len(echoes)} echo time(s); a multi-echo GRE needs at least 2")
        if not all(math.isfinite(t) and t > 0 for t in echoes):
            fail(f"invalid echo times {echoes} ms")
        if any(b <= a for a, b in itertools.pairwise(echoes)):
            fail(f"echo times {echoes} ms are not increasing")
    last_te = max([*echoes, te])
    if last_te >= tr:
        fail(f"EchoTime {_fmt(last_te)} ms ≥ RepetitionTime {_fmt(tr)} ms")
    if seq in ("flair", "irgre"):
        kind = "FLAIR" if seq == "flair" else "IR-GRE"
        if ti is None or ti <= 0:
            fail(f"{kind} series has no InversionTime; the {kind} model needs it")
        if seq == "irgre" and tr < IRGRE_MIN_TR_MS:
            fail(f"IR-GRE RepetitionTime {_fmt(tr)} ms is an excitation TR (Philips T1TFE "
                 f"reports that one), not the time between inversions that the IR-GRE model "
                 f"needs, and the standard header does not give that time; refusing rather "
                 f"than computing a wrong signal")
        if ti >= tr:
            fail(f"InversionTime {_fmt(ti)} ms ≥ RepetitionTime {_fmt(tr)} ms")
    bad_scaling = _check_scaling(p.get("intensity_scaling"))
    if bad_scaling:
        fail(f"contradicting intensity scaling: {bad_scaling}")
    field = p.get("field_strength_t")
    field = None if field is None else float(field)
    if field is None:
        fail("missing MagneticFieldStrength in the sidecar" + (
            " (the fat/water model needs it)" if role == "megre" else
            "; 3 T required (require_3t)" if require_3t else
            " (required even with require_3t: false)"))
    if not (math.isfinite(field) and field > 0):
        fail(f"MagneticFieldStrength is not a positive number ({field})")
    if not FIELD_RANGE_T[0] <= field <= FIELD_RANGE_T[1]:
        fail(f"MagneticFieldStrength {_fmt(field)} T outside the {FIELD_RANGE_T[0]}–"
             f"{FIELD_RANGE_T[1]} T of human MRI scanners (a header in other units?)")
    if role != "megre" and require_3t:
        if not FIELD_3T_RANGE[0] <= field <= FIELD_3T_RANGE[1]:
            fail(f"{_fmt(field)} T acquisition; the models are calibrated for 3 T (set "
                 f"require_3t: false to process other field strengths)")


def validate_session_params(
    params: Mapping[str, Any],
    require_3t: bool = True,
    session: str | None = None,
    *,
    required_roles: Sequence[str] = SINGLE_ROLES,
) -> None:
    """Raise :class:`InputError` (one line: session, sidecar, reason) for the first value no
    model may use; see the module docstring for the rules. ``session`` defaults to
    ``params["session"]``."""
    session = session or params.get("session")
    for role in SINGLE_ROLES:
        entry = params.get(role)
        if entry is None:
            if role in required_roles:
                raise InputError(f"no {ROLE_LABEL[role]} series converted", session=session)
            continue
        _check_entry(entry, require_3t, session)
    for entry in params.get("megre") or []:
        _check_entry(entry, require_3t, session)


# ---------------------------------------------------------------------------------------------
# a whole session
# ---------------------------------------------------------------------------------------------


def _truthy(v: Any) -> bool:
    return v is True or str(v).strip().lower() in ("true", "1", "yes")


def _session_rows(rows: Sequence[Mapping[str, Any]], label: str | None) -> list[Mapping]:
    m = re.fullmatch(r"sub-([^_]+)_ses-([^_]+)", label or "")
    if m:
        mine = [r for r in rows if (str(r.get("subject")), str(r.get("session")))
                == (m.group(1), m.group(2))]
        if mine:
            return mine
    return list(rows)


def _read_sidecar(path: Path, session: str | None) -> dict[str, Any]:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable JSON sidecar ({type(exc).__name__})", session=session,
                         path=path) from None
    if not isinstance(meta, dict):
        raise InputError("JSON sidecar is not an object", session=session, path=path)
    return meta


def _magnitude(sidecars: Sequence[Path], session: str | None) -> list[tuple[Path, dict]]:
    out = []
    for p in sidecars:
        meta = _read_sidecar(Path(p), session)
        if _NON_MAGNITUDE_NAME.search(Path(p).name) or image_kind(meta.get("ImageType")) != (
                "magnitude"):
            continue
        out.append((Path(p), meta))
    return out


def _same(entries: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    for k in keys:
        vals = {repr(e.get(k)) for e in entries}
        if len(vals) > 1:
            return k
    return None


def extract_session_params(
    converted: Mapping[str, Sequence[str | Path]],
    series_rows: Sequence[Mapping[str, Any]],
    *,
    require_3t: bool = True,
    te_correction: TECorrection | Mapping[str, Any] | None = None,
    session: str | None = None,
    required_roles: Sequence[str] = SINGLE_ROLES,
    echo_train: EchoTrainSettings | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Session JSON from converted sidecars, validated.

    ``converted``: ``"t1w"``/``"t2w"``/``"flair"`` -> the sidecar(s) of that role's selected
    series; ``"megre:<series_id>"`` -> the per-echo sidecars of that series. Phase/real/
    imaginary sidecars are set aside. ``series_rows``: rows of ``series.tsv`` (this
    session's, or all: with ``session="sub-X_ses-Y"`` they are narrowed to it) giving
    sequence, gadolinium and series_id. Raises :class:`InputError` naming ``session`` and the
    sidecar (:func:`validate_session_params`).
    ``echo_train``: how T2w/FLAIR echo trains are modelled
    (:class:`EchoTrainSettings`); each such entry gets ``signal_model`` (``epg`` or
    ``te-factor``), ``echo_train`` (the train, or None) and ``echo_train_source`` (one line:
    where the train came from, or why the TE factor is used).
    """
    rows = _session_rows(series_rows, session)
    out: dict[str, Any] = {"session": session, **{r: None for r in SINGLE_ROLES}, "megre": []}
    metas: dict[str, Mapping[str, Any]] = {}
    for key, sidecars in converted.items():
        role, _, sid = key.partition(":")
        if role not in (*SINGLE_ROLES, "megre"):
            raise InputError(f"unknown role {key!r} in the converted series", session=session)
        if sid:
            match = [r for r in rows if str(r.get("series_id")) == sid]
        else:
            match = [r for r in rows if r.get("role") == role and _truthy(r.get("selected"))]
        if len(match) != 1:
            raise InputError(f"{ROLE_LABEL[role]} series {sid or ''} is not "
                             f"{'in' if not match else 'unique in'} the series table "
                             f"({len(match)} selected rows)", session=session)
        row = match[0]
        sequence = str(row.get("sequence") or "")
        mags = _magnitude(list(sidecars), session)
        if not mags:
            first = next(iter(sidecars), None)
            raise InputError(f"no magnitude image among the {len(sidecars)} converted "
                             f"file(s) of the {ROLE_LABEL[role]} series", session=session,
                             path=first)
        if role == "megre":
            def echo_key(item: tuple[Path, dict]) -> tuple:
                meta = item[1]
                n = _number(meta.get("EchoNumber"))
                te = _ms(meta.get("EchoTime"))
                return (n if n is not None and math.isfinite(n) else math.inf,
                        te if te is not None and math.isfinite(te) else math.inf)

            mags.sort(key=echo_key)
        per = [extract_series_params(m, role, sequence, te_correction=te_correction)
               for _p, m in mags]
        entry = per[0]
        entry["sidecar"] = str(mags[0][0])
        metas[role] = mags[0][1]
        if role == "megre":
            differ = _same(per, ("tr_ms", "fa_deg", "field_strength_t"))
            entry["echo_times_ms"] = [t for e in per for t in e["echo_times_ms"]]
        else:
            differ = _same(per, ("tr_ms", "te_ms", "ti_ms", "fa_deg"))
        if differ:
            raise InputError(f"{ROLE_LABEL[role]} series converted to {len(per)} images with "
                             f"different {differ}", session=session, path=mags[0][0])
        entry["gadolinium"] = _truthy(row.get("gadolinium"))
        entry["series_id"] = str(row.get("series_id") or "")
        if not entry.get("acquisition") and row.get("acquisition"):
            entry["acquisition"] = str(row["acquisition"])
        if role == "megre":
            out["megre"].append(entry)
        else:
            out[role] = entry
    out["megre"].sort(key=lambda e: e["series_id"])
    validate_session_params(out, require_3t, session, required_roles=required_roles)
    settings = (echo_train if isinstance(echo_train, EchoTrainSettings)
                else EchoTrainSettings.from_mapping(echo_train))
    for role in ("t2w", "flair"):
        entry = out.get(role)
        if entry is None:
            continue
        meta = metas[role]
        train, source = estimator_echo_train(entry, meta, settings)
        entry["signal_model"] = "epg" if train is not None else "te-factor"
        entry["echo_train"] = train
        entry["echo_train_source"] = source
    return out
