"""Acquisition parameters from dcm2niix sidecars: exact values, and refusals in one line."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from qmriflow.archive.convert import run_dcm2niix
from qmriflow.archive.discover import discover
from qmriflow.archive.params import (
    extract_series_params,
    extract_session_params,
    validate_session_params,
)
from qmriflow.errors import InputError
from qmriflow.io import write_json
from qmriflow.phantom.generate import CANARY, CANARY_BIRTH_DATE
from qmriflow.physics import TECorrection
from tests.conftest import SHARED_DATA

REAL = SHARED_DATA / "dicom"
needs_real = pytest.mark.skipif(not REAL.is_dir(),
                                reason=f"real DICOM test data not found at {REAL}")
TOL = 1e-6


@pytest.fixture(scope="module")
def converted(phantom_archive, manifest, tmp_path_factory):
    """dicom_dir -> dcm2niix output of every phantom series."""
    out = tmp_path_factory.mktemp("params_conv")
    return {m["dicom_dir"]: run_dcm2niix(phantom_archive / m["dicom_dir"],
                                         out / m["dicom_dir"].replace("/", "_"))
            for m in manifest["series"]}


def _close(a, b):
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= TOL)


def test_phantom_series_parameters_equal_the_manifest(converted, manifest):
    for m in manifest["series"]:
        conv = converted[m["dicom_dir"]]
        role = "t1w" if m["role"] == "t1w_gd" else m["role"]
        seq = m["protocol"]["sequence"]
        per = [extract_series_params(c.metadata, role, seq) for c in conv]
        p = per[0]
        assert _close(p["tr_ms"], m["RepetitionTime_ms"]), m["dicom_dir"]
        assert _close(p["te_ms"], m["EchoTime_ms"]), m["dicom_dir"]
        assert _close(p["ti_ms"], m["InversionTime_ms"]), m["dicom_dir"]
        assert _close(p["fa_deg"], m["FlipAngle_deg"]), m["dicom_dir"]
        assert p["acquisition"] == m["MRAcquisitionType"]
        assert p["field_strength_t"] == 3.0 and p["manufacturer"] == "Philips"
        assert p["manufacturer_model"] == m["ManufacturerModelName"]
        if role == "megre":
            tes = [t for q in per for t in q["echo_times_ms"]]
            want = m["protocol"]["echo_times_ms"]
            assert len(tes) == len(want) and all(_close(a, b) for a, b in zip(tes, want,
                                                                               strict=True))


@pytest.fixture(scope="module")
def phantom_tables(phantom_archive):
    return discover(phantom_archive / "dicom", "params-salt")


def _dicom_dir(converted, folder_ref_: str) -> str:
    """The manifest's ``dicom_dir`` behind a series table's (salted, non-identifying) folder."""
    from qmriflow.archive.discover import folder_ref

    (hit,) = [d for d in converted
              if folder_ref(d.removeprefix("dicom/"), "params-salt") == folder_ref_]
    return hit


def _session_inputs(series_rows, converted, subject, session):
    conv: dict[str, list[Path]] = {}
    for r in series_rows:
        if (r["subject"], r["session"]) != (subject, session) or not r["selected"]:
            continue
        key = r["role"] if r["role"] != "megre" else f"megre:{r['series_id']}"
        conv[key] = [c.sidecar for c in converted[_dicom_dir(converted, r["folder"])]]
    return conv


def test_phantom_session_params(phantom_tables, converted, manifest, tmp_path):
    sessions, series = phantom_tables
    by_dir = {m["dicom_dir"]: m for m in manifest["series"]}
    for s in sessions:
        label = f"sub-{s['subject']}_ses-{s['session']}"
        conv = _session_inputs(series, converted, s["subject"], s["session"])
        p = extract_session_params(conv, series, session=label)
        assert p["session"] == label
        for role in ("t1w", "t2w", "flair"):
            e = p[role]
            m = by_dir[_dicom_dir(by_dir, next(r["folder"] for r in series
                                               if r["series_id"] == e["series_id"]))]
            assert m["role"] == role
            assert (e["tr_ms"], e["te_ms"], e["ti_ms"], e["fa_deg"]) == pytest.approx(
                (m["RepetitionTime_ms"], m["EchoTime_ms"], m["InversionTime_ms"],
                 m["FlipAngle_deg"]), abs=TOL)
            assert e["gadolinium"] is bool(m["ContrastBolusAgent"])
            assert e["te_correction_factor"] == pytest.approx(m["protocol"][
                "te_correction_factor"])
        assert (p["t1w"]["sequence"], p["t2w"]["sequence"], p["flair"]["sequence"]) == (
            "gre", "tse", "flair")
        # Philips-like headers: the T2w FlipAngle is the 90° excitation (no refocusing angle:
        # TE factor); the long 3D FLAIR takes the assumed variable-angle train
        assert p["t2w"]["signal_model"] == "te-factor" and p["t2w"]["echo_train"] is None
        assert p["flair"]["signal_model"] == "epg" and "ASSUMED" in p["flair"][
            "echo_train_source"]
        assert p["t2w"]["te_correction_factor"] == 0.90
        assert len(p["megre"]) == 1 and p["megre"][0]["echo_times_ms"] == pytest.approx(
            [1.15, 2.3, 3.45, 4.6, 5.75, 6.9], abs=TOL)
        text = write_json(tmp_path / f"{label}.json", p).read_text()
        assert CANARY not in text and CANARY_BIRTH_DATE not in text
    # the configured TE correction is used
    s = sessions[0]
    conv = _session_inputs(series, converted, s["subject"], s["session"])
    p = extract_session_params(conv, series, te_correction={"tse": 0.8, "flair": 0.5},
                               session=f"sub-{s['subject']}_ses-{s['session']}")
    assert (p["t2w"]["te_correction_factor"], p["flair"]["te_correction_factor"]) == (0.8, 0.5)


# ---------------------------------------------------------------------------------------------
# real scanner data (values of ../shared/data/README.md)
# ---------------------------------------------------------------------------------------------

REAL_VALUES = {  # folder: (sequence, TR, TE, TI, FA)
    "ge_mprage_3d": ("irgre", 2217.66, 3.172, 1000.0, 8.0),
    "philips_mprage_3d": ("irgre", 6.501, 2.93, 900.0, 9.0),
    "siemens_xa30_tfl_3d": ("irgre", 1800.0, 2.41, 900.0, 9.0),
    "siemens_t1_fl2d_HFS": ("gre", 300.0, 2.46, None, 80.0),
    "siemens_t1_fl2d_HFDL": ("gre", 300.0, 2.46, None, 80.0),
}


@pytest.fixture(scope="module")
def real_converted(tmp_path_factory):
    if not REAL.is_dir():
        pytest.skip(f"real DICOM test data not found at {REAL}")
    out = tmp_path_factory.mktemp("real_conv")
    return {d.name: run_dcm2niix(d, out / d.name) for d in sorted(REAL.iterdir()) if d.is_dir()}


@needs_real
@pytest.mark.parametrize("folder", sorted(REAL_VALUES))
def test_real_t1w_parameters(real_converted, folder):
    seq, tr, te, ti, fa = REAL_VALUES[folder]
    (conv,) = real_converted[folder]
    p = extract_series_params(conv.metadata, "t1w", seq)
    assert _close(p["tr_ms"], tr) and _close(p["te_ms"], te)
    assert _close(p["ti_ms"], ti) and _close(p["fa_deg"], fa)
    assert p["field_strength_t"] == 3 and p["echo_times_ms"] == [te]
    rows = [{"series_id": "0001abcdef", "role": "t1w", "sequence": seq, "selected": "true",
             "gadolinium": "false"}]
    if folder == "philips_mprage_3d":
        with pytest.raises(InputError) as err:
            extract_session_params({"t1w": [conv.sidecar]}, rows, session="sub-p_ses-1",
                                   required_roles=("t1w",))
        msg = str(err.value)
        assert msg.startswith(f"session sub-p_ses-1: {conv.sidecar}: T1w (IR-GRE): ")
        assert "RepetitionTime 6.501 ms is an excitation TR" in msg
        assert "time between inversions" in msg and "\n" not in msg
    else:
        out = extract_session_params({"t1w": [conv.sidecar]}, rows, session="sub-p_ses-1",
                                     required_roles=("t1w",))
        assert out["t1w"]["tr_ms"] == tr and out["t1w"]["te_correction_factor"] == 1.0


@needs_real
def test_real_dual_echo_ffe(real_converted):
    conv = real_converted["philips_dualecho_ffe"]
    assert len(conv) == 4  # two echoes, magnitude and phase
    rows = [{"series_id": "2001abcdef", "role": "megre", "sequence": "megre",
             "selected": True, "gadolinium": False}]
    p = extract_session_params({"megre:2001abcdef": [c.sidecar for c in reversed(conv)]}, rows,
                               session="sub-p_ses-1", required_roles=())
    (e,) = p["megre"]
    assert e["echo_times_ms"] == [2.3, 4.6]
    assert (e["tr_ms"], e["fa_deg"], e["te_ms"]) == (20.0, 10.0, 2.3)
    assert e["sidecar"].endswith("_e1.json")


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def _entry(role, seq, tr, te, ti, fa, **kw):
    return {"role": role, "sequence": seq, "tr_ms": tr, "te_ms": te, "ti_ms": ti, "fa_deg": fa,
            "acquisition": "3D", "field_strength_t": 3.0, "echo_times_ms": [te],
            "sidecar": f"/conv/{role}.json", "series_id": "0001abcdef", **kw}


VALID = {
    "session": "sub-a_ses-b",
    "t1w": _entry("t1w", "gre", 5.2, 2.3, None, 10.0),
    "t2w": _entry("t2w", "tse", 4000.0, 80.0, None, 90.0),
    "flair": _entry("flair", "flair", 4800.0, 300.0, 1650.0, 90.0),
    "megre": [_entry("megre", "megre", 8.5, 1.15, None, 3.0,
                     echo_times_ms=[1.15, 2.3, 3.45])],
}


def _with(role, **changes):
    p = copy.deepcopy(VALID)
    target = p[role][0] if role == "megre" else p[role]
    target.update(changes)
    return p


@pytest.mark.parametrize(("role", "changes", "reason"), [
    ("t2w", {"te_ms": 4000.0}, "EchoTime 4000 ms ≥ RepetitionTime 4000 ms"),
    ("flair", {"ti_ms": None}, "FLAIR series has no InversionTime"),
    ("t1w", {"fa_deg": 0.0}, "FlipAngle 0° outside [1, 180]°"),
    ("t1w", {"fa_deg": 200.0}, "FlipAngle 200° outside [1, 180]°"),
    ("t2w", {"field_strength_t": 1.5}, "1.5 T acquisition; the models are calibrated for 3 T"),
    ("t1w", {"tr_ms": None}, "missing RepetitionTime"),
    ("flair", {"te_ms": math.nan}, "EchoTime is not a finite number (nan)"),
    ("t1w", {"tr_ms": math.inf}, "RepetitionTime is not a finite number (inf)"),
    ("flair", {"ti_ms": -10.0}, "negative InversionTime"),
    ("t1w", {"sequence": "irgre", "ti_ms": 900.0, "tr_ms": 6.5},
     "IR-GRE RepetitionTime 6.5 ms is an excitation TR"),
    ("t1w", {"sequence": "irgre", "ti_ms": None, "tr_ms": 2000.0}, "no InversionTime"),
    ("megre", {"echo_times_ms": [1.15, 1.15, 2.3]}, "not increasing"),
    ("megre", {"echo_times_ms": [1.15, 2.3, 9.0]}, "EchoTime 9 ms ≥ RepetitionTime 8.5 ms"),
    ("megre", {"field_strength_t": None}, "missing MagneticFieldStrength"),
])
def test_validation_refuses_in_one_line(role, changes, reason):
    with pytest.raises(InputError) as err:
        validate_session_params(_with(role, **changes), True, "sub-a_ses-b")
    msg = str(err.value)
    assert msg.startswith(f"session sub-a_ses-b: /conv/{role}.json: ")
    assert reason in msg
    assert "\n" not in msg


@pytest.mark.parametrize(("role", "field", "reason"), [
    ("t2w", None, "missing MagneticFieldStrength in the sidecar (required even with "
                  "require_3t: false)"),
    ("t1w", 30.0, "MagneticFieldStrength 30 T outside the 0.1–11.7 T"),
    ("flair", 0.05, "MagneticFieldStrength 0.05 T outside the 0.1–11.7 T"),
    ("megre", 15000.0, "MagneticFieldStrength 15000 T outside"),
])
def test_field_strength_required_and_plausible_without_require_3t(role, field, reason):
    """Issue 24 finding 5: with require_3t: false a missing or 30 T field was accepted."""
    with pytest.raises(InputError) as err:
        validate_session_params(_with(role, field_strength_t=field), False, "sub-a_ses-b")
    msg = str(err.value)
    assert msg.startswith(f"session sub-a_ses-b: /conv/{role}.json: ") and reason in msg
    validate_session_params(_with(role, field_strength_t=0.55), False, "sub-a_ses-b")
    validate_session_params(_with(role, field_strength_t=7.0), False, "sub-a_ses-b")


def test_validation_accepts_valid_and_other_fields_when_allowed():
    validate_session_params(VALID, True, "sub-a_ses-b")
    validate_session_params(_with("t2w", field_strength_t=1.5), False, "sub-a_ses-b")
    validate_session_params(_with("t1w", field_strength_t=2.89), True, "sub-a_ses-b")
    with pytest.raises(InputError, match="no FLAIR series converted"):
        validate_session_params({**VALID, "flair": None}, True, "sub-a_ses-b")


def test_bad_sidecars_are_refused_naming_the_file(converted, manifest, tmp_path):
    m = next(m for m in manifest["series"] if m["role"] == "t2w")
    meta = converted[m["dicom_dir"]][0].metadata
    rows = [{"series_id": "0301abcdef", "role": "t2w", "sequence": "tse", "selected": True,
             "gadolinium": True}]
    cases = {
        "no_tr.json": ({k: v for k, v in meta.items() if k != "RepetitionTime"},
                       "missing RepetitionTime"),
        "nan_te.json": ({**meta, "EchoTime": math.nan}, "EchoTime is not a finite number"),
        "text_fa.json": ({**meta, "FlipAngle": "ninety"}, "FlipAngle is not a finite number"),
        "te_ge_tr.json": ({**meta, "EchoTime": meta["RepetitionTime"]}, "≥ RepetitionTime"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(content))
        p = extract_series_params(content, "t2w", "tse")  # extraction alone never refuses
        assert p["role"] == "t2w"
        with pytest.raises(InputError) as err:
            extract_session_params({"t2w": [path]}, rows, session="sub-x_ses-y",
                                   required_roles=("t2w",))
        assert str(err.value).startswith(f"session sub-x_ses-y: {path}: T2w (TSE): "), name
        assert reason in str(err.value), name
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable JSON sidecar"):
        extract_session_params({"t2w": [tmp_path / "broken.json"]}, rows, session="sub-x_ses-y")


def test_te_correction_factor_follows_the_config():
    meta = {"RepetitionTime": 4.8, "EchoTime": 0.12, "InversionTime": 1.65, "FlipAngle": 90}
    assert extract_series_params(meta, "flair", "flair")["te_correction_factor"] == 0.89
    short = TECorrection(flair_short=0.7)
    assert extract_series_params(meta, "flair", "flair",
                                 te_correction=short)["te_correction_factor"] == 0.7
    assert extract_series_params({**meta, "EchoTime": 0.3}, "flair",
                                 "flair")["te_correction_factor"] == 0.42
    assert extract_series_params(meta, "megre", "megre")["te_correction_factor"] == 1.0
