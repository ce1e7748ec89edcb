"""Classify MR series from header fields, and pick one series per role in a session.

Everything here is a pure function of header values (DICOM keywords, or dcm2niix/BIDS sidecar
fields), so the rules can be unit-tested without files. :mod:`qmriflow.archive.discover` reads the
headers and calls these functions.

Roles and sequence families (``physics.SEQUENCES`` plus ``megre``):

=========  ==========================================================  ===========
role       recognised as                                               sequence
=========  ==========================================================  ===========
``t1w``    single-echo GRE, TE ≤ 10 ms, FA ≥ 5°, not prepared           ``gre``
``t1w``    single-echo GRE, inversion/magnetisation prepared: ``IR``    ``irgre``
           in ScanningSequence, InversionTime > 0, or ``MP`` in
           SequenceVariant (MPRAGE/TFL/T1TFE/BRAVO)
``t1w``    2D spin echo, TE ≤ 30 ms, TR ≤ 1000 ms, no inversion         ``se``
``t2w``    spin echo, TE ≥ 50 ms, TR ≥ 1500 ms, no inversion            ``tse`` (echo
                                                                        train) / ``se``
``flair``  inversion-recovery spin echo, TE ≥ 50 ms, TI ≥ 1200 ms       ``flair``
           (or no TI in the header)
``megre``  GRE magnitude with ≥ 2 distinct echo times, not prepared     ``megre``
=========  ==========================================================  ===========

Everything else is ``ignored`` with the reason recorded: not MR, localizer/survey, calibration
scan, secondary/derived reformat, phase/real/imaginary-only, Dixon water/fat image, dynamic
(several temporal positions), echo-planar, angiography/SWI/perfusion by description, T2*-
weighted or low-flip-angle single-echo GRE, STIR/T1-FLAIR, multi-echo spin echo, multi-echo
IR-prepared GRE (ME-MPRAGE echoes), or an unrecognised combination (``unrecognised sequence
SE (2D, TR 3000 ms, TE 20 ms)``). When ScanningSequence is absent or research-mode (GE ``RM``),
short TE and small flip angle mean gradient echo.

Phase images mixed into a magnitude series (Philips writes both into one series) are set aside:
the series is classified from its magnitude images.

Long because the header rules for every role and vendor are kept together, as one table of
rules, so they can be read and tested side by side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ROLES",
    "Classification",
    "Selection",
    "SeriesHeader",
    "classify_series",
    "gadolinium_evidence",
    "header_from_sidecar",
    "image_kind",
    "select_session",
    "summarise_headers",
]

ROLES = ("t1w", "t2w", "flair", "megre")
"""Roles a series can take; anything else is ``ignored``."""

REQUIRED_ROLES = ("t1w", "t2w", "flair")
ROLE_LABEL = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR", "megre": "multi-echo GRE"}

# Thresholds (ms, degrees) used by the rules above.
GRE_T1W_MAX_TE_MS = 10.0
GRE_T1W_MIN_FA_DEG = 5.0
LONG_TE_MS = 50.0
T2W_MIN_TR_MS = 1500.0
SE_T1W_MAX_TE_MS = 30.0
SE_T1W_MAX_TR_MS = 1000.0
FLAIR_MIN_TI_MS = 1200.0
STIR_MAX_TI_MS = 400.0

_NO_AGENT = {"", "none", "no", "n/a", "na", "-", "0", "nil", "without", "null"}
_WB = r"(?<![a-z0-9])"
_WE = r"(?![a-z0-9])"
_GD_NEGATIVE = re.compile(
    _WB + r"(pre|non|no|without|w o|nativ|native|ohne)\s*(iv\s*)?"
    r"(contrast|kontrast|gd|gad|gado\w*|km|c|ce)" + _WE
)
_GD_POSITIVE = re.compile(
    r"\+\s*(c|gd|gad|gado|contrast|km|ce)" + _WE
    + "|" + _WB + r"c\s*\+"
    + "|" + _WB + r"t1 ?(c|ce|gd|km)" + _WE
    + "|" + _WB + r"(gd|gad|gado\w*|contrast|kontrast|km|ce|post|postcontrast|postgd|"
    r"dotarem|gadovist|magnevist|prohance|multihance|clariscan|omniscan|dotagraf|vueway|"
    r"elucirem|eovist|primovist)" + _WE
)
_LOCALIZER = re.compile(
    _WB + r"(localizer|localiser|locator|scout|survey|smartbrain|3 ?plane|tri ?plane|"
    r"plane loc|aahead|aascout|pilot|haste loc)" + _WE
)
_CALIBRATION = re.compile(
    _WB + r"(sense ?ref\w*|coil ?survey|ref ?scan|asset ?cal\w*|calibration|pure ?cal\w*|"
    r"prescan|b1 ?map\w*|b1 ?cal\w*)" + _WE
)
_NON_ANATOMICAL = re.compile(
    _WB + r"(tof|angio\w*|mra|mrv|cow|swi|swan|venobold|perfusion|perf|dsc|dce|asl|pcasl|"
    r"pasl|dwi|dti|diffusion|bold|fmri|resting|mtr|mt|phase ?contrast|pc|flow|cine|"
    r"spectro\w*|svs|csi|mrs)" + _WE
)
_DERIVED_TOKENS = {"MPR", "MIP", "MINIP", "PROJECTION IMAGE", "REFORMATTED", "SUBTRACTION",
                   "SUB", "CPR", "CSA MPR", "CSAPARALLEL", "MNIP", "VRT"}
_DIXON_TOKENS = {"W", "F", "WATER", "FAT", "IP", "OP", "IN_PHASE", "OUT_PHASE", "FF"}
_PHASE_TOKENS = {"P", "PHASE", "PHASE MAP", "PHASE_MAP"}
_REAL_TOKENS = {"R", "REAL"}
_IMAG_TOKENS = {"I", "IMAGINARY"}
_GE_IMAGE_KIND = {0: "magnitude", 1: "phase", 2: "real", 3: "imaginary"}


# ---------------------------------------------------------------------------------------------
# header values
# ---------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if isinstance(value, list | tuple):
        return "\\".join(_text(v) for v in value)
    return " ".join(str(value).split())


def _tokens(value: Any) -> tuple[str, ...]:
    """``'SE\\IR'``, ``['SE', 'IR']`` -> ``('SE', 'IR')`` (upper case, blanks dropped)."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts: Iterable[Any] = value.split("\\")
    elif isinstance(value, bytes):
        parts = [value]
    elif isinstance(value, list | tuple) or hasattr(value, "__iter__"):
        parts = value
    else:
        parts = [value]
    out = []
    for p in parts:
        t = _text(p).strip().upper()
        if t:
            out.extend(s for s in t.split("\\") if s)
    return tuple(out)


def _float(value: Any) -> float | None:
    """A header number as float; None when absent or unparsable (NaN is kept: validation
    reports it)."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        value = value[0] if value else None
        if value is None:
            return None
    try:
        text = _text(value) if not isinstance(value, int | float) else value
        return float(text) if text != "" else None
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    f = _float(value)
    if f is None or not math.isfinite(f):
        return None
    return round(f)


def image_kind(image_type: Any, ge_image_kind: Any = None) -> str:
    """``magnitude``, ``phase``, ``real`` or ``imaginary`` from ImageType (and GE's private
    image-type tag 0043,102F where present)."""
    ge = _int(ge_image_kind)
    if ge in _GE_IMAGE_KIND:
        return _GE_IMAGE_KIND[ge]
    toks = set(_tokens(image_type))
    if toks & {"M", "MAGNITUDE"} or any(t.startswith("M_") for t in toks):
        return "magnitude"
    if toks & _PHASE_TOKENS or any(t.startswith("PHASE") for t in toks):
        return "phase"
    if toks & _REAL_TOKENS or any(t.startswith("R_") for t in toks):
        return "real"
    if toks & _IMAG_TOKENS or any(t.startswith("I_") for t in toks):
        return "imaginary"
    return "magnitude"


@dataclass(frozen=True)
class SeriesHeader:
    """What classification needs to know about one series (times in ms, angles in degrees).

    ``te_ms``/``echo_times_ms`` come from the magnitude images; ``n_images`` counts every
    image of the series, ``n_magnitude`` the magnitude ones.
    """

    modality: str = "MR"
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    sequence_name: str = ""
    acquisition: str = ""
    tr_ms: float | None = None
    te_ms: float | None = None
    echo_times_ms: tuple[float, ...] = ()
    ti_ms: float | None = None
    fa_deg: float | None = None
    echo_train_length: int | None = None
    image_types: tuple[tuple[str, ...], ...] = ()
    description: str = ""
    protocol_name: str = ""
    contrast_agent: str = ""
    n_images: int = 0
    n_magnitude: int = 0
    kinds: tuple[str, ...] = ("magnitude",)
    n_orientations: int = 1
    n_temporal: int = 1

    @property
    def n_echoes(self) -> int:
        return len(self.echo_times_ms)


def _pulse_family(h: Mapping[str, Any]) -> tuple[str, ...]:
    """ScanningSequence, or its equivalent from an enhanced MR header."""
    seq = _tokens(h.get("ScanningSequence"))
    if seq:
        return seq
    out = []
    eps = _text(h.get("EchoPulseSequence")).upper()
    if eps in ("GRADIENT", "BOTH"):
        out.append("GR")
    if eps in ("SPIN", "BOTH"):
        out.append("SE")
    if _text(h.get("InversionRecovery")).upper() == "YES":
        out.append("IR")
    return tuple(out)


def _orientation_key(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = [float(v) for v in (value if isinstance(value, list | tuple) else
                                   _text(value).split("\\"))]
    except (TypeError, ValueError):
        return None
    return tuple(round(v, 2) + 0.0 for v in vals) if len(vals) == 6 else None


def _frames(h: Mapping[str, Any]) -> int:
    return max(_int(h.get("NumberOfFrames")) or 1, 1)


def summarise_headers(headers: Iterable[Mapping[str, Any]]) -> SeriesHeader:
    """Aggregate the per-image headers of one series (DICOM keywords -> values, times in ms).

    Series-level values come from the first magnitude image (the first image if none);
    echo times are the distinct EchoTime values of the magnitude images; orientations and
    temporal positions are counted over all magnitude images; images count NumberOfFrames
    (multi-frame files). ``GEImageKind`` (if given) is
    GE's private image-type value (0 magnitude, 1 phase, 2 real, 3 imaginary).
    """
    headers = list(headers)
    kinds = [image_kind(h.get("ImageType"), h.get("GEImageKind")) for h in headers]
    mags = [h for h, k in zip(headers, kinds, strict=True) if k == "magnitude"]
    ref = mags[0] if mags else (headers[0] if headers else {})
    tes: set[float] = set()
    orients: set[tuple[float, ...]] = set()
    temporal: set[int] = set()
    n_temporal_declared = 1
    for h in mags:
        te = _float(h.get("EchoTime"))
        if te is not None and math.isfinite(te):
            tes.add(round(te, 6))
        o = _orientation_key(h.get("ImageOrientationPatient"))
        if o is not None:
            orients.add(o)
        tp = _int(h.get("TemporalPositionIdentifier"))
        if tp is not None:
            temporal.add(tp)
        n_temporal_declared = max(n_temporal_declared, _int(h.get("NumberOfTemporalPositions"))
                                  or 1)
    echo_times = tuple(sorted(tes))
    te_ref = _float(ref.get("EchoTime"))
    return SeriesHeader(
        modality=_text(ref.get("Modality")).upper() or "",
        scanning_sequence=_pulse_family(ref),
        sequence_variant=_tokens(ref.get("SequenceVariant")),
        scan_options=_tokens(ref.get("ScanOptions")),
        sequence_name=_text(ref.get("SequenceName")),
        acquisition=_text(ref.get("MRAcquisitionType")).upper(),
        tr_ms=_float(ref.get("RepetitionTime")),
        te_ms=echo_times[0] if echo_times else te_ref,
        echo_times_ms=echo_times,
        ti_ms=_float(ref.get("InversionTime")),
        fa_deg=_float(ref.get("FlipAngle")),
        echo_train_length=_int(ref.get("EchoTrainLength")),
        image_types=tuple(sorted({_tokens(h.get("ImageType")) for h in headers})),
        description=_text(ref.get("SeriesDescription")),
        protocol_name=_text(ref.get("ProtocolName")),
        contrast_agent=_text(ref.get("ContrastBolusAgent")),
        n_images=sum(_frames(h) for h in headers),
        n_magnitude=sum(_frames(h) for h in mags),
        kinds=tuple(sorted(set(kinds))),
        n_orientations=max(len(orients), 1),
        n_temporal=max(len(temporal), n_temporal_declared, 1),
    )


def header_from_sidecar(
    meta: Mapping[str, Any], *, echo_times_ms: Sequence[float] | None = None, n_images: int = 1
) -> SeriesHeader:
    """A :class:`SeriesHeader` from a dcm2niix/BIDS JSON sidecar (times in seconds).

    ``echo_times_ms``: all echo times of a multi-echo series (one sidecar per echo in BIDS).
    """

    def ms(key: str) -> float | None:
        v = _float(meta.get(key))
        return None if v is None else round(v * 1000.0, 9)

    te = ms("EchoTime")
    tes = tuple(sorted({round(float(t), 6) for t in echo_times_ms})) if echo_times_ms else (
        (round(te, 6),) if te is not None else ())
    agent = meta.get("ContrastBolusAgent") or meta.get("ContrastBolusIngredient")
    kind = image_kind(meta.get("ImageType"))
    return SeriesHeader(
        modality=_text(meta.get("Modality") or "MR").upper(),
        scanning_sequence=_pulse_family(meta),
        sequence_variant=_tokens(meta.get("SequenceVariant")),
        scan_options=_tokens(meta.get("ScanOptions")),
        sequence_name=_text(meta.get("SequenceName")),
        acquisition=_text(meta.get("MRAcquisitionType")).upper(),
        tr_ms=ms("RepetitionTime"),
        te_ms=tes[0] if tes else te,
        echo_times_ms=tes,
        ti_ms=ms("InversionTime"),
        fa_deg=_float(meta.get("FlipAngle")),
        echo_train_length=_int(meta.get("EchoTrainLength")),
        image_types=(_tokens(meta.get("ImageType")),) if meta.get("ImageType") else (),
        description=_text(meta.get("SeriesDescription")),
        protocol_name=_text(meta.get("ProtocolName")),
        contrast_agent=_text(agent),
        n_images=n_images,
        n_magnitude=n_images if kind == "magnitude" else 0,
        kinds=(kind,),
    )


# ---------------------------------------------------------------------------------------------
# gadolinium
# ---------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[_\-./:;,()\[\]]", " ", text.lower()).split())


def gadolinium_evidence(contrast_agent: Any = None, *descriptions: Any) -> str | None:
    """Why a series counts as acquired after gadolinium, or None.

    Evidence: a non-empty ContrastBolusAgent (other than "none"/"no"/...), or a series
    description/protocol name saying so (``+C``, ``C+``, ``Gd``, ``gado...``, ``post``,
    ``contrast``, ``KM``, ``T1C``, agent brand names), unless it says *pre*/*non*/*without*
    contrast.
    """
    agent = _text(contrast_agent).strip()
    if agent.lower() not in _NO_AGENT:
        return "ContrastBolusAgent set"
    for d in descriptions:
        text = _GD_NEGATIVE.sub(" ", _normalise(_text(d)))
        m = _GD_POSITIVE.search(text)
        if m:
            return f"description says {m.group(0).strip()!r}"
    return None


# ---------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    role: str  # t1w | t2w | flair | megre | ignored
    sequence: str  # gre | irgre | se | tse | flair | megre | "" (ignored)
    acquisition: str  # "2D" | "3D" | ""
    gadolinium: bool
    reason: str  # what it was recognised as, or why it is ignored
    gadolinium_reason: str = ""


def _fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:g}"


def _describe(h: SeriesHeader) -> str:
    bits = [h.acquisition or "?", f"TR {_fmt(h.tr_ms)} ms", f"TE {_fmt(h.te_ms)} ms"]
    if h.ti_ms:
        bits.append(f"TI {_fmt(h.ti_ms)} ms")
    if h.fa_deg is not None:
        bits.append(f"FA {_fmt(h.fa_deg)}°")
    seq = "\\".join(h.scanning_sequence) or "?"
    if h.sequence_variant:
        seq += "/" + "\\".join(h.sequence_variant)
    return f"{seq} ({', '.join(bits)})"


def _ignored(h: SeriesHeader, reason: str, gd: str | None) -> Classification:
    return Classification("ignored", "", h.acquisition, gd is not None, reason, gd or "")


def _pre_checks(h: SeriesHeader) -> str | None:
    """Reasons to ignore a series before looking at its sequence."""
    if h.modality != "MR":
        return f"not MR (Modality {h.modality or 'missing'})"
    if h.n_images == 0:
        return "no images"
    if h.n_magnitude == 0:
        kinds = [k for k in h.kinds if k != "magnitude"] or ["non-magnitude"]
        return f"{'/'.join(kinds)} image" + ("s" if len(kinds) > 1 else "") + " only"
    toks = {t for it in h.image_types for t in it}
    text = _normalise(f"{h.description} {h.protocol_name}")
    if "LOCALIZER" in toks or _LOCALIZER.search(text):
        return "localizer"
    if h.n_orientations > 1:
        return f"localizer ({h.n_orientations} slice orientations in one series)"
    if _CALIBRATION.search(text):
        return "calibration/reference scan"
    if any(len(it) > 1 and it[1] == "SECONDARY" for it in h.image_types):
        return "secondary (derived) image"
    derived = sorted(toks & _DERIVED_TOKENS)
    if derived:
        return f"derived image ({derived[0]})"
    if h.image_types and all(set(it[2:]) & _DIXON_TOKENS for it in h.image_types):
        return "Dixon water/fat/in-/opposed-phase image"
    if h.n_temporal > 1:
        return f"dynamic series ({h.n_temporal} temporal positions)"
    if "EP" in h.scanning_sequence:
        return f"echo-planar sequence (diffusion/perfusion/fMRI): {_describe(h)}"
    m = _NON_ANATOMICAL.search(text)
    if m:
        return f"not a structural series (description says {m.group(0)!r})"
    return None


def classify_series(h: SeriesHeader) -> Classification:
    """Role, sequence family and acquisition of one series (see the module docstring)."""
    gd = gadolinium_evidence(h.contrast_agent, h.description, h.protocol_name)
    why = _pre_checks(h)
    if why:
        return _ignored(h, why, gd)
    seq, var = set(h.scanning_sequence), set(h.sequence_variant)
    tr, te, ti, fa = h.tr_ms, h.te_ms, h.ti_ms, h.fa_deg
    has_ti = ti is not None and math.isfinite(ti) and ti > 0
    acq = h.acquisition
    desc = _describe(h)

    def result(role: str, sequence: str, what: str) -> Classification:
        return Classification(role, sequence, acq, gd is not None, what, gd or "")

    spin = "SE" in seq
    gradient = "GR" in seq or (
        not spin and te is not None and te < GRE_T1W_MAX_TE_MS
        and (fa is None or fa < 60.0)
    )
    if spin:
        if h.n_echoes > 1:
            return _ignored(h, f"multi-echo spin echo ({h.n_echoes} echoes): {desc}", gd)
        ir = "IR" in seq or has_ti
        long_te = te is not None and te >= LONG_TE_MS
        if ir:
            if long_te and (not has_ti or ti >= FLAIR_MIN_TI_MS):
                note = "" if has_ti else "; no InversionTime in the header"
                return result("flair", "flair", f"inversion-recovery TSE (FLAIR) {desc}{note}")
            if has_ti and ti <= STIR_MAX_TI_MS:
                return _ignored(h, f"STIR (short-tau inversion recovery): {desc}", gd)
            return _ignored(h, f"T1-weighted inversion-recovery spin echo: {desc}", gd)
        if long_te and tr is not None and tr >= T2W_MIN_TR_MS:
            train = (h.echo_train_length or 1) > 1 or "SK" in var
            if train or "TSE" in h.sequence_name.upper():
                return result("t2w", "tse", f"turbo spin echo T2w {desc}")
            return result("t2w", "se", f"conventional spin echo T2w {desc}")
        if (te is not None and te <= SE_T1W_MAX_TE_MS and tr is not None
                and tr <= SE_T1W_MAX_TR_MS):
            if acq == "3D":
                return _ignored(h, f"3D T1w turbo spin echo (not modelled): {desc}", gd)
            return result("t1w", "se", f"2D spin echo T1w {desc}")
        return _ignored(h, f"unrecognised sequence {desc}", gd)
    if gradient:
        prepared = "IR" in seq or has_ti or "MP" in var
        if h.n_echoes > 1:
            if prepared:
                return _ignored(h, f"multi-echo IR-prepared GRE ({h.n_echoes} echoes; use the "
                                   f"combined series): {desc}", gd)
            tes = ", ".join(_fmt(t) for t in h.echo_times_ms)
            return result("megre", "megre",
                          f"multi-echo GRE, {h.n_echoes} echoes (TE {tes} ms) {desc}")
        if te is not None and te > GRE_T1W_MAX_TE_MS:
            return _ignored(h, f"T2*-weighted GRE (TE {_fmt(te)} ms): {desc}", gd)
        if prepared:
            note = "" if has_ti else "; no InversionTime in the header"
            return result("t1w", "irgre", f"IR-prepared GRE (MPRAGE-like) {desc}{note}")
        if fa is not None and fa < GRE_T1W_MIN_FA_DEG:
            return _ignored(h, f"low flip angle GRE (PD-weighted): {desc}", gd)
        if "SS" in var and "SP" not in var:
            return _ignored(h, f"steady-state (unspoiled) GRE: {desc}", gd)
        return result("t1w", "gre", f"spoiled GRE T1w {desc}")
    return _ignored(h, f"unrecognised sequence {desc}", gd)


# ---------------------------------------------------------------------------------------------
# selection per session
# ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """Outcome of :func:`select_session`.

    ``status``: ``ok`` or ``incomplete: no FLAIR series`` (etc.); ``chosen``: role ->
    series_ids (one for t1w/t2w/flair, all for megre); ``rows``: the input rows with
    ``selected``, ``reason`` and ``gadolinium`` filled in.
    """

    status: str
    chosen: dict[str, list[str]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _after(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Was series ``a`` acquired after series ``b``? Acquisition/series time when both have
    one and they differ, else SeriesNumber."""
    ta, tb = a.get("time_s"), b.get("time_s")
    if ta is not None and tb is not None and ta != tb:
        return float(ta) > float(tb)
    return int(a.get("series_number") or 0) > int(b.get("series_number") or 0)


def _rank(row: Mapping[str, Any], prefer_3d: bool) -> tuple:
    n = row.get("n_images")
    n = int(row.get("n_files") or 0) if n is None else int(n)
    return (prefer_3d and row.get("acquisition") == "3D", n, int(row.get("series_number") or 0),
            str(row.get("series_id")))


def select_session(rows: Sequence[Mapping[str, Any]]) -> Selection:
    """Pick one series per role t1w/t2w/flair (and all megre series) in one session.

    Each row needs ``series_id``, ``role``, ``acquisition``, ``series_number``, ``gadolinium``,
    ``n_images`` (or ``n_files``), ``reason`` (the classification note) and optionally
    ``time_s`` (acquisition time, seconds) and ``gadolinium_reason``.

    Rules: a T1w acquired after gadolinium is excluded — flagged by its own header, or
    acquired after any series whose header shows contrast (its ``gadolinium`` then becomes
    true). Gadolinium on T2w/FLAIR/multi-echo GRE is allowed and recorded. Among the remaining
    candidates of a role: 3D first (T1w and FLAIR), then the most images, then the highest
    SeriesNumber.
    """
    out = [dict(r) for r in rows]
    flagged = [r for r in out if r.get("gadolinium")]
    for r in out:
        r.setdefault("gadolinium_reason", "")
        if r["role"] == "t1w" and not r.get("gadolinium"):
            first = next((g for g in sorted(flagged, key=lambda g: int(g.get("series_number")
                                                                          or 0))
                          if _after(r, g)), None)
            if first is not None:
                r["gadolinium"] = True
                r["gadolinium_reason"] = (f"acquired after contrast-enhanced series "
                                          f"{first['series_id']}")
    chosen: dict[str, list[str]] = {role: [] for role in ROLES}
    missing: list[str] = []
    only_gd = False
    for role in ROLES:
        cands = [r for r in out if r["role"] == role]
        for r in cands:
            if role == "t1w" and r.get("gadolinium"):
                r["selected"] = False
                why = r.get("gadolinium_reason") or "contrast agent"
                r["reason"] = f"T1w after gadolinium ({why}); {r.get('reason', '')}".rstrip("; ")
        usable = [r for r in cands if not (role == "t1w" and r.get("gadolinium"))]
        if role == "megre":
            for r in usable:
                r["selected"] = True
                r["reason"] = f"selected; {r.get('reason', '')}".rstrip("; ")
            chosen[role] = [r["series_id"] for r in sorted(usable, key=lambda r: str(
                r["series_id"]))]
            continue
        if not usable:
            missing.append(role)
            only_gd = only_gd or bool(cands and role == "t1w")
            continue
        best = max(usable, key=lambda r: _rank(r, prefer_3d=role in ("t1w", "flair")))
        chosen[role] = [best["series_id"]]
        for r in usable:
            if r is best:
                r["selected"] = True
                r["reason"] = f"selected; {r.get('reason', '')}".rstrip("; ")
            else:
                r["selected"] = False
                r["reason"] = (f"another {ROLE_LABEL[role]} series preferred "
                               f"({best['series_id']}); {r.get('reason', '')}").rstrip("; ")
    for r in out:
        r.setdefault("selected", False)
    if missing:
        labels = [ROLE_LABEL[m] for m in missing]
        text = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]
        status = f"incomplete: no {text} series"
        if only_gd:
            status += " (only T1w after gadolinium)"
    else:
        status = "ok"
    return Selection(status=status, chosen=chosen, rows=out)

