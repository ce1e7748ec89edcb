"""Sidecars and the session's provenance are shared derivatives: no path of the machine that
ran the steps (issue 24 finding 8), file references relative to the dataset root
(``bids::sub-X/ses-Y/...``) or, outside it, the file name (plus its SHA-256 where recorded);
``dseg.json`` with Units, Description and the label table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qmriflow.cli import main
from qmriflow.io import BIDS_URI, dataset_ref, dataset_root_of, save_nifti, sha256_file
from qmriflow.model.checkpoint import FORMAT, save_checkpoint
from qmriflow.model.infer import infer_session, map_paths
from qmriflow.model.network import SharedAttnUNet
from qmriflow.preproc import segment as segment_mod
from qmriflow.preproc import skullstrip
from qmriflow.synth import synthesise_files
from qmriflow.workflow.provenance import write_step

from .test_model_train import write_tiny_session

SUB, SES = "N01", "V01"
LABEL = f"sub-{SUB}_ses-{SES}"


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_dataset_ref_inside_and_outside(tmp_path):
    f = tmp_path / "res" / "sub-a" / "ses-b" / "anat" / "x.nii.gz"
    assert dataset_root_of(f) == tmp_path / "res"
    assert dataset_ref(f, tmp_path / "res") == "bids::sub-a/ses-b/anat/x.nii.gz"
    assert dataset_ref(tmp_path / "elsewhere" / "model.pt", tmp_path / "res") == "model.pt"
    assert dataset_root_of(tmp_path / "loose.nii.gz") is None


def build_session(base: Path, root: Path, sub: str, ses: str, seed: int,
                  ckpt: Path) -> dict[str, Path]:
    """A tiny session run through the real writers: skull strip, segmentation (CLI,
    relative paths), inference with the checkpoint ``ckpt`` (outside the dataset),
    synthesis and the provenance merge, into ``root`` (the derivatives), the per-step
    provenance into ``base/work/provenance``."""
    import os

    label = f"sub-{sub}_ses-{ses}"
    sdir = write_tiny_session(root, sub, ses, seed=seed, snr=np.inf)
    anat = sdir / "anat"
    pre = anat / f"{label}_space-T2w"
    work = base / "work" / "provenance" / label
    mp = pytest.MonkeyPatch()
    try:
        # skull strip: the network replaced by the tiny session's own brain mask
        import nibabel as nib

        brain = np.asarray(nib.load(str(pre) + "_desc-brain_mask.nii.gz").dataobj) > 0
        aff = nib.load(str(pre) + "_desc-preproc_T1w.nii.gz").affine
        mp.setattr(skullstrip, "_canonical", lambda vol: (vol.data, aff, None))
        mp.setattr(skullstrip, "_from_canonical", lambda data, ornt: data)
        mp.setattr(skullstrip, "_run_hdbet_v1", lambda arr, *k, **kw: brain.copy())
        prov = skullstrip.skull_strip(Path(str(pre) + "_desc-preproc_T1w.nii.gz"),
                                      Path(str(pre) + "_desc-brain_mask.nii.gz"),
                                      resample_mm=None, t2w=Path(str(pre) + "_desc-preproc_"
                                                                 "T2w.nii.gz"),
                                      csf_fill_mm=2.0, min_volume_ml=1.0, max_volume_ml=1e6)
        write_step(work / "skullstrip.json", "skullstrip", prov)
        # segmentation through the CLI, with paths relative to the working folder as a
        # workflow rule may pass them
        mp.setattr(segment_mod, "MIN_BRAIN_ML", 1.0)
        mp.chdir(base)
        rel = Path(os.path.relpath(pre, base))
        assert main(["segment", f"{rel}_desc-preproc_T1w.nii.gz",
                     f"{rel}_desc-brain_mask.nii.gz", "--out-prefix", str(rel),
                     "--t2w", f"{rel}_desc-preproc_T2w.nii.gz", "--subject", sub,
                     "--session", ses, "--provenance", str(work / "segment.json")]) == 0
        info = infer_session(sdir, ckpt, anat, device="cpu", precision="fp32", threads=1)
        write_step(work / "infer.json", "infer", info)
        maps = map_paths(anat, label)
        synthesise_files(maps["T1map"], maps["T2map"], maps["PDmap"], sequence="gre",
                         tr_ms=20.0, te_ms=4.0, ti_ms=None, fa_deg=20.0, te_correction=None,
                         out=anat / f"{label}_desc-synth_T1w.nii.gz")
        assert main(["provenance", str(sdir / f"{label}_desc-provenance.json"),
                     str(work / "skullstrip.json"), str(work / "segment.json"),
                     str(work / "infer.json"), "--label", label]) == 0
    finally:
        mp.undo()
    return {"sdir": sdir, "work": work}


def tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, {"format": FORMAT, "width": 8, "epoch": 0,
                           "state_dict": SharedAttnUNet(8).state_dict(),
                           "hyperparameters": {"scaling": "calibrated"}})
    return path


@pytest.fixture(scope="module")
def derivatives(tmp_path_factory) -> dict[str, Path]:
    """A tiny session run through skull strip, segmentation (CLI, relative paths), inference
    with a checkpoint outside the dataset, synthesis and the provenance merge."""
    base = tmp_path_factory.mktemp("sidecars")
    root = base / "results"
    ckpt = tiny_checkpoint(base / "elsewhere" / "model.pt")
    made = build_session(base, root, SUB, SES, 3, ckpt)
    return {"base": base, "root": root, "sdir": made["sdir"], "ckpt": ckpt,
            "work": made["work"]}


def test_no_sidecar_holds_a_path_of_this_machine(derivatives):
    base, root = derivatives["base"], derivatives["root"]
    jsons = [p for p in root.rglob("*.json") if "truth" not in p.parts]
    assert len(jsons) >= 15, jsons
    for p in jsons:
        doc = json.loads(p.read_text())
        for s in _strings(doc):
            assert str(base) not in s and not s.startswith("/"), (p.name, s)
    # ... while the operator's per-step log in the work folder keeps them
    assert str(base) in (derivatives["work"] / "skullstrip.json").read_text()


def test_file_references_are_bids_uris_or_names(derivatives):
    anat = derivatives["sdir"] / "anat"
    uri = f"{BIDS_URI}sub-{SUB}/ses-{SES}/"
    side = json.loads((anat / f"{LABEL}_space-T2w_T1map.json").read_text())
    assert side["Sources"] == [f"{uri}anat/{LABEL}_space-T2w_desc-preproc_{c}.nii.gz"
                               for c in ("T1w", "T2w", "FLAIR")] + [
        f"{uri}anat/{LABEL}_space-T2w_desc-brain_mask.nii.gz",
        f"{uri}{LABEL}_desc-protocol_params.json"]
    assert side["MaskedBy"] == f"{uri}anat/{LABEL}_space-T2w_desc-brain_mask.nii.gz"
    assert side["Scaling"]["Segmentation"] == f"{uri}anat/{LABEL}_space-T2w_dseg.nii.gz"
    # outside the dataset: the name and its checksum
    assert side["ModelCheckpoint"] == "model.pt"
    assert side["ModelCheckpointSHA256"] == sha256_file(derivatives["ckpt"])
    mask = json.loads((anat / f"{LABEL}_space-T2w_desc-brain_mask.json").read_text())
    assert mask["Sources"] == [f"{uri}anat/{LABEL}_space-T2w_desc-preproc_T1w.nii.gz",
                               f"{uri}anat/{LABEL}_space-T2w_desc-preproc_T2w.nii.gz"]
    eroded = json.loads((anat / f"{LABEL}_space-T2w_label-WM_desc-eroded_mask.json")
                        .read_text())
    assert eroded["Sources"] == [f"{uri}anat/{LABEL}_space-T2w_dseg.nii.gz"]
    synth = json.loads((anat / f"{LABEL}_desc-synth_T1w.json").read_text())
    assert synth["Sources"][0] == f"{uri}anat/{LABEL}_space-T2w_T1map.nii.gz"
    prov = json.loads((derivatives["sdir"] / f"{LABEL}_desc-provenance.json").read_text())
    assert prov["steps"]["segment"]["inputs"]["T1w"] == (
        f"{uri}anat/{LABEL}_space-T2w_desc-preproc_T1w.nii.gz")
    assert prov["steps"]["infer"]["checkpoint"] == "model.pt"


def test_dseg_sidecar_has_units_description_and_labels(derivatives):
    anat = derivatives["sdir"] / "anat"
    side = json.loads((anat / f"{LABEL}_space-T2w_dseg.json").read_text())
    assert side["Units"] == "label" and "segmentation" in side["Description"]
    assert side["Labels"] == {"0": "outside brain mask", "1": "GM", "2": "WM", "3": "CSF"}
    assert side["LabelDescriptions"]["1"] == "grey matter"
    assert side["GeneratedBy"]["inputs"]["brain_mask"] == (
        f"{BIDS_URI}sub-{SUB}/ses-{SES}/anat/{LABEL}_space-T2w_desc-brain_mask.nii.gz")
    for t in ("GM", "WM", "CSF"):
        prob = json.loads((anat / f"{LABEL}_space-T2w_label-{t}_probseg.json").read_text())
        assert prob["Units"] and prob["Description"].startswith(t)


def test_save_nifti_outside_any_dataset_writes_names(tmp_path):
    out = save_nifti(tmp_path / "loose.nii.gz", np.zeros((2, 2, 2)), np.eye(4),
                     {"Sources": [tmp_path / "a" / "b.nii.gz"], "Note": "1/s"})
    side = json.loads(out.with_name("loose.json").read_text())
    assert side == {"Sources": ["b.nii.gz"], "Note": "1/s"}


def test_reproducibility_json_holds_no_path_of_this_machine(tmp_path, monkeypatch):
    """group/reproducibility.json (shared, beside the maps) records each pair's registration:
    its images by BIDS URI, the transform in the work folder by name."""
    from qmriflow.stats import pipeline as sp
    from qmriflow.stats.repro import PairResult

    root = tmp_path / "results"
    dirs = [root / "sub-A" / f"ses-{v}" for v in ("V01", "V02")]
    for d in dirs:
        (d / "anat").mkdir(parents=True)

    def t2w(f) -> Path:
        return f.root / "anat" / f"sub-A_ses-{f.session}_space-T2w_desc-preproc_T2w.nii.gz"

    def fake_pair(first, later, **kw):
        return PairResult(subject="A", first=first.session, later=later.session, rows=[],
                          registration={"fixed": str(t2w(first)), "moving": str(t2w(later)),
                                        "transform_file": str(tmp_path / "work" / "x.mat"),
                                        "rotation_deg": 1.5},
                          values={})

    monkeypatch.setattr(sp, "pair_reproducibility", fake_pair)
    monkeypatch.setattr(sp.figures, "repro_png", lambda *a, **k: b"\x89PNG")
    meta = sp.run_repro(dirs, root / "group")
    assert meta["registration"][0]["transform_file"] == str(tmp_path / "work" / "x.mat")
    reg = json.loads((root / "group" / "reproducibility.json").read_text())["registration"][0]
    assert reg["fixed"] == ("bids::sub-A/ses-V01/anat/"
                            "sub-A_ses-V01_space-T2w_desc-preproc_T2w.nii.gz")
    assert reg["transform_file"] == "x.mat" and reg["rotation_deg"] == 1.5
