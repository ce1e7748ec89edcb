"""Series classification and per-session selection from header values (no files)."""

from __future__ import annotations

import pytest

from qmriflow.archive.classify import (
    classify_series,
    gadolinium_evidence,
    header_from_sidecar,
    image_kind,
    select_session,
    summarise_headers,
)

MAG_PHILIPS = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
PHASE_PHILIPS = ["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"]


def series(n: int = 10, echoes=None, **fields) -> list[dict]:
    """``n`` image headers of one series (per echo when ``echoes`` is given)."""
    base = {"Modality": "MR", "ImageType": MAG_PHILIPS, **fields}
    out = []
    for e, te in enumerate(echoes or [fields.get("EchoTime")], start=1):
        for k in range(n):
            h = dict(base, EchoTime=te, EchoNumbers=e,
                     ImageOrientationPatient=[1, 0, 0, 0, 1, 0], InstanceNumber=k)
            out.append(h)
    return out


def classify(headers):
    return classify_series(summarise_headers(headers))


# Real headers as the vendors write them (values checked against ../shared/data/dicom).
VENDOR = {
    "ge_mprage": dict(ScanningSequence=["RM", "IR"], SequenceVariant="NONE",
                      MRAcquisitionType="3D", RepetitionTime="2217.66", EchoTime="3.172",
                      InversionTime="1000", FlipAngle="8", EchoTrainLength="1",
                      ImageType=["ORIGINAL", "PRIMARY", "OTHER"],
                      SeriesDescription="3D Ax T1 MP-RAGE_R22"),
    "philips_t1tfe": dict(ScanningSequence="GR", SequenceVariant="MP", MRAcquisitionType="3D",
                          RepetitionTime="6.50099992752075", EchoTime="2.93", FlipAngle="9",
                          EchoTrainLength="256", SeriesDescription="ADNI_Sag3D MPRAGE",
                          ContrastBolusAgent=""),
    "siemens_tfl": dict(ScanningSequence="GR", SequenceVariant="SK", MRAcquisitionType="3D",
                        RepetitionTime="1800", EchoTime="2.41", InversionTime="900",
                        FlipAngle="9", SequenceName="*tfl3d1_16ns",
                        ImageType=["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D", "MFSPLIT"],
                        SeriesDescription="anat-T1w_acq-tfl"),
    "siemens_fl2d": dict(ScanningSequence="GR", SequenceVariant=["SP", "OSP"],
                         MRAcquisitionType="2D", RepetitionTime="300", EchoTime="2.46",
                         FlipAngle="80", SequenceName="*fl2d1", SeriesDescription="t1_fl2d_sag",
                         ImageType=["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]),
}


@pytest.mark.parametrize(("name", "sequence", "acq"), [
    ("ge_mprage", "irgre", "3D"),
    ("philips_t1tfe", "irgre", "3D"),
    ("siemens_tfl", "irgre", "3D"),
    ("siemens_fl2d", "gre", "2D"),
])
def test_vendor_t1w_headers(name, sequence, acq):
    c = classify(series(**VENDOR[name]))
    assert (c.role, c.sequence, c.acquisition, c.gadolinium) == ("t1w", sequence, acq, False)


def test_philips_dual_echo_with_phase_images_is_megre():
    fields = dict(ScanningSequence="GR", SequenceVariant="SP", MRAcquisitionType="3D",
                  RepetitionTime="20", FlipAngle="10", EchoTrainLength="2",
                  SeriesDescription="fcMRI Field Mapping")
    headers = series(5, echoes=["2.3", "4.6"], **fields)
    headers += series(5, echoes=["2.3", "4.6"], **{**fields, "ImageType": PHASE_PHILIPS})
    h = summarise_headers(headers)
    assert h.echo_times_ms == (2.3, 4.6)
    assert (h.n_images, h.n_magnitude) == (20, 10)
    c = classify_series(h)
    assert (c.role, c.sequence) == ("megre", "megre")
    assert "2 echoes" in c.reason


PHANTOM = {
    "t1w": dict(ScanningSequence="GR", SequenceVariant="SP", MRAcquisitionType="3D",
                RepetitionTime=5.17, EchoTime=2.31, FlipAngle=10, EchoTrainLength=1,
                SeriesDescription="T1W_3D_FFE"),
    "t2w": dict(ScanningSequence="SE", SequenceVariant="SK", MRAcquisitionType="2D",
                RepetitionTime=4402, EchoTime=80, FlipAngle=90, EchoTrainLength=17,
                SeriesDescription="T2W_TSE +C", ContrastBolusAgent="Gadovist"),
    "flair": dict(ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "MP"],
                  MRAcquisitionType="3D", RepetitionTime=4800, EchoTime=336,
                  InversionTime=1650, FlipAngle=90, EchoTrainLength=170,
                  SeriesDescription="3D_FLAIR"),
}


def test_phantom_roles():
    assert (classify(series(**PHANTOM["t1w"])).sequence) == "gre"
    t2 = classify(series(**PHANTOM["t2w"]))
    assert (t2.role, t2.sequence, t2.gadolinium) == ("t2w", "tse", True)
    fl = classify(series(**PHANTOM["flair"]))
    assert (fl.role, fl.sequence, fl.acquisition) == ("flair", "flair", "3D")
    me = classify(series(3, echoes=[1.15, 2.3, 3.45, 4.6, 5.75, 6.9],
                         **{**PHANTOM["t1w"], "FlipAngle": 3, "RepetitionTime": 8.5}))
    assert (me.role, me.sequence) == ("megre", "megre")
    se = classify(series(ScanningSequence="SE", SequenceVariant="NONE", MRAcquisitionType="2D",
                         RepetitionTime=550, EchoTime=12, FlipAngle=90))
    assert (se.role, se.sequence, se.acquisition) == ("t1w", "se", "2D")


@pytest.mark.parametrize(("fields", "expect"), [
    (dict(PHANTOM["t1w"], Modality="CT"), "not MR (Modality CT)"),
    (dict(PHANTOM["t1w"], ImageType=PHASE_PHILIPS), "phase image"),
    (dict(PHANTOM["t1w"], SeriesDescription="SURVEY"), "localizer"),
    (dict(PHANTOM["t1w"], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), "localizer"),
    (dict(PHANTOM["t1w"], ImageType=["DERIVED", "SECONDARY", "MPR"]), "secondary"),
    (dict(PHANTOM["t1w"], ImageType=["DERIVED", "PRIMARY", "MIP", "M"]), "derived image (MIP)"),
    (dict(PHANTOM["t1w"], SeriesDescription="TOF_3D_multi-slab"), "not a structural"),
    (dict(ScanningSequence="SE", SequenceVariant="SK", MRAcquisitionType="2D",
          RepetitionTime=3000, EchoTime=20, FlipAngle=90), "unrecognised sequence SE"),
    (dict(ScanningSequence=["SE", "IR"], SequenceVariant="SK", MRAcquisitionType="2D",
          RepetitionTime=4000, EchoTime=60, InversionTime=160, FlipAngle=90), "STIR"),
    (dict(ScanningSequence="GR", SequenceVariant="SP", MRAcquisitionType="2D",
          RepetitionTime=600, EchoTime=20, FlipAngle=20), "T2*-weighted GRE"),
    (dict(ScanningSequence=["EP", "SE"], SequenceVariant="SK", MRAcquisitionType="2D",
          RepetitionTime=5000, EchoTime=70, FlipAngle=90), "echo-planar"),
    (dict(ScanningSequence="GR", SequenceVariant="SP", MRAcquisitionType="3D",
          RepetitionTime=8, EchoTime=2, FlipAngle=3), "low flip angle"),
])
def test_ignored_with_reason(fields, expect):
    c = classify(series(**fields))
    assert c.role == "ignored"
    assert c.sequence == ""
    assert expect in c.reason


def test_multi_echo_mprage_and_multi_orientation_localizer_are_ignored():
    me_mprage = series(4, echoes=[1.7, 3.6, 5.5], **VENDOR["siemens_tfl"])
    assert "multi-echo IR-prepared" in classify(me_mprage).reason
    loc = series(**{**PHANTOM["t1w"], "SeriesDescription": "T1"})
    for h in loc[:3]:
        h["ImageOrientationPatient"] = [0, 1, 0, 0, 0, -1]
    assert classify(loc).reason.startswith("localizer (2 slice orientations")


def test_image_kind():
    assert image_kind(MAG_PHILIPS) == "magnitude"
    assert image_kind(PHASE_PHILIPS) == "phase"
    assert image_kind("ORIGINAL\\PRIMARY\\P\\ND") == "phase"
    assert image_kind(["ORIGINAL", "PRIMARY", "OTHER"]) == "magnitude"
    assert image_kind(["ORIGINAL", "PRIMARY", "OTHER"], ge_image_kind=1) == "phase"
    assert image_kind(["ORIGINAL", "PRIMARY", "REAL"]) == "real"


@pytest.mark.parametrize(("agent", "desc", "expected"), [
    ("Gadovist", "T1W_3D_FFE", True),
    ("", "T1W_3D_FFE +C", True),
    (None, "AX T1 C+", True),
    (None, "t1_mprage_post_Gd", True),
    (None, "T1 SE GADO", True),
    (None, "T1 post contrast", True),
    (None, "T1C", True),
    ("NONE", "T1W_3D_FFE", False),
    ("", "ADNI_Sag3D MPRAGE", False),
    (None, "T1 pre contrast", False),
    (None, "T1_nonGd", False),
    (None, "T1 w/o contrast", False),
    (None, "posterior fossa T1", False),
    (None, "T2W_TSE", False),
])
def test_gadolinium_evidence(agent, desc, expected):
    assert (gadolinium_evidence(agent, desc) is not None) is expected


def row(sid, role, *, number, acq="3D", n=100, gd=False, time_s=None, reason="x"):
    return {"series_id": sid, "role": role, "acquisition": acq, "series_number": number,
            "n_images": n, "gadolinium": gd, "time_s": time_s, "reason": reason}


def test_selection_prefers_3d_then_more_images_then_higher_number():
    rows = [row("a", "t1w", number=2, acq="2D", n=500), row("b", "t1w", number=3, n=100),
            row("c", "t1w", number=4, n=120), row("d", "t1w", number=5, n=120),
            row("t", "t2w", number=6, acq="2D", n=30), row("u", "t2w", number=7, acq="3D",
                                                            n=20),
            row("f", "flair", number=8), row("m1", "megre", number=9),
            row("m2", "megre", number=10)]
    sel = select_session(rows)
    assert sel.status == "ok"
    assert sel.chosen == {"t1w": ["d"], "t2w": ["t"], "flair": ["f"], "megre": ["m1", "m2"]}
    by = {r["series_id"]: r for r in sel.rows}
    assert by["c"]["selected"] is False and "another T1w series preferred (d)" in by["c"][
        "reason"]
    assert by["m1"]["selected"] and by["m2"]["selected"]


def test_t1w_after_gadolinium_is_excluded():
    rows = [row("pre", "t1w", number=2), row("post", "t1w", number=5, gd=True, n=999),
            row("t2", "t2w", number=3, gd=True), row("fl", "flair", number=4, gd=True)]
    sel = select_session(rows)
    assert sel.status == "ok" and sel.chosen["t1w"] == ["pre"]
    by = {r["series_id"]: r for r in sel.rows}
    assert by["post"]["selected"] is False
    assert by["post"]["reason"].startswith("T1w after gadolinium")
    assert by["t2"]["selected"] and by["t2"]["gadolinium"]  # Gd on T2w is allowed


def test_t1w_acquired_after_a_contrast_series_counts_as_post_gadolinium():
    rows = [row("t2", "t2w", number=3, gd=True), row("t1", "t1w", number=6),
            row("fl", "flair", number=4)]
    sel = select_session(rows)
    assert sel.status == "incomplete: no T1w series (only T1w after gadolinium)"
    t1 = next(r for r in sel.rows if r["series_id"] == "t1")
    assert t1["gadolinium"] is True and "acquired after contrast-enhanced series t2" in t1[
        "reason"]
    # acquisition times win over series numbers when both series have one
    rows[1]["time_s"], rows[0]["time_s"] = 100.0, 200.0
    assert select_session(rows).chosen["t1w"] == ["t1"]


def test_incomplete_status():
    rows = [row("t1", "t1w", number=2), row("t2", "t2w", number=3)]
    assert select_session(rows).status == "incomplete: no FLAIR series"
    assert select_session(rows[:1]).status == "incomplete: no T2w or FLAIR series"
    assert select_session([]).status == "incomplete: no T1w, T2w or FLAIR series"


def test_header_from_dcm2niix_sidecar():
    meta = {"Modality": "MR", "ScanningSequence": "GR", "SequenceVariant": "MP",
            "MRAcquisitionType": "3D", "RepetitionTime": 0.006501, "EchoTime": 0.00293,
            "InversionTime": 0.9, "FlipAngle": 9,
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "FFE", "M", "FFE", "MAGNITUDE"]}
    h = header_from_sidecar(meta, n_images=170)
    assert (h.tr_ms, h.te_ms, h.ti_ms) == (6.501, 2.93, 900.0)
    c = classify_series(h)
    assert (c.role, c.sequence) == ("t1w", "irgre")
