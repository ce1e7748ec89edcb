"""``qmriflow infer-nifti`` (issue 23 item 2): plain NIfTIs, masks and a protocol in the
published CSV format give the same maps as the workflow's ``infer`` on the same data; bad
input ends with one line, exit status 1 and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qmriflow import physics
from qmriflow.cli import main
from qmriflow.io import save_nifti, write_json
from qmriflow.model.checkpoint import FORMAT, save_checkpoint
from qmriflow.model.network import SharedAttnUNet, kaiming_init

SHAPE = (64, 60, 5)
AFFINE = np.diag([-1.0, 1.0, 4.0, 1.0])
PROTOCOLS = {"T1w": physics.Protocol("gre", 8.1, 3.7, fa_deg=8.0),
             "T2w": physics.Protocol("tse", 4000.0, 90.0),
             "FLAIR": physics.Protocol("flair", 4800.0, 300.0, ti_ms=1650.0)}
CSV_HEADER = ("ID,T1w_seq_type,T1w_TE,T1w_TR,T1w_TI,T1w_FA,T2w_seq_type,T2w_TE,T2w_TR,T2w_TI,"
              "T2w_FA,FLAIR_seq_type,FLAIR_TE,FLAIR_TR,FLAIR_TI,FLAIR_FA,T1w_rescale,"
              "T2w_rescale,FLAIR_rescale")
CSV_ROW = "example_001,GRE,3.7,8.1,,8,TSE,90.0,4000.0,,90,IR,300.0,4800.0,1650.0,90,1,1,1"


def _phantom(rng):
    from scipy import ndimage as ndi

    h, w, s = SHAPE
    y, x = np.indices((h, w), dtype=np.float64)
    lab = np.zeros(SHAPE, np.uint8)
    for k in range(s):
        def ell(ry, rx, cy=h / 2, cx=w / 2):
            return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        sl = np.zeros((h, w), np.uint8)
        sl[ell(28, 25)] = 9
        sl[ell(25, 22)] = 1
        sl[ell(20, 17)] = 2
        sl[ell(6, 3, cx=w / 2 - 5)] = 3
        sl[ell(6, 3, cx=w / 2 + 5)] = 3
        lab[..., k] = sl
    vals = {1: (0.80, 1.35, 0.090), 2: (0.70, 0.85, 0.070), 3: (1.0, 4.3, 2.0),
            9: (0.90, 0.38, 0.130)}
    pd, t1, t2 = (np.zeros(SHAPE) for _ in range(3))
    for v, (p, a, b) in vals.items():
        pd[lab == v], t1[lab == v], t2[lab == v] = p, a, b
    pd, t1, t2 = (ndi.gaussian_filter(m, (0.6, 0.6, 0)) for m in (pd, t1, t2))
    imgs = {}
    for c, scale in (("T1w", 2500.0), ("T2w", 700.0), ("FLAIR", 1300.0)):
        sig = scale * np.asarray(physics.signal(PROTOCOLS[c], pd, t1, t2))
        sigma = 0.025 * float(sig[lab == 2].mean())
        imgs[c] = np.hypot(sig + rng.normal(0, sigma, SHAPE), rng.normal(0, sigma, SHAPE))
    return lab, imgs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same subject twice: a workflow session folder and the published example layout
    (images/, masks/, a protocol CSV), plus a small qmriflow checkpoint."""
    root = tmp_path_factory.mktemp("nifti")
    lab, imgs = _phantom(np.random.default_rng(7))
    brain = np.isin(lab, (1, 2, 3))
    dseg = np.where(brain, lab, 0).astype(np.uint8)
    # the workflow's session folder
    sess = root / "results" / "sub-example001" / "ses-01"
    pre = sess / "anat" / "sub-example001_ses-01_space-T2w"
    for c, img in imgs.items():
        save_nifti(Path(f"{pre}_desc-preproc_{c}.nii.gz"), img, AFFINE)
    save_nifti(Path(f"{pre}_desc-brain_mask.nii.gz"), brain, AFFINE, dtype=np.uint8)
    save_nifti(Path(f"{pre}_dseg.nii.gz"), dseg, AFFINE, dtype=np.uint8)
    write_json(sess / "sub-example001_ses-01_desc-protocol_params.json",
               {"session": "sub-example001_ses-01",
                **{r: {"role": r, **PROTOCOLS[c].as_dict(), "field_strength_t": 3.0}
                   for c, r in (("T1w", "t1w"), ("T2w", "t2w"), ("FLAIR", "flair"))}})
    # the published example's layout
    ex = root / "example_data"
    for c, img in imgs.items():
        save_nifti(ex / "images" / f"example_001_{c}.nii.gz", img, AFFINE)
    save_nifti(ex / "masks" / "example_001_brain.nii.gz", brain, AFFINE, dtype=np.uint8)
    for t, v in (("gm", 1), ("wm", 2), ("csf", 3)):
        save_nifti(ex / "masks" / f"example_001_{t}.nii.gz", lab == v, AFFINE, dtype=np.uint8)
    (ex / "test_example.csv").write_text(CSV_HEADER + "\n" + CSV_ROW + "\n\n")
    model = kaiming_init(SharedAttnUNet(8), torch.Generator().manual_seed(3))
    ckpt = save_checkpoint(root / "model.pt", {"format": FORMAT, "width": 8,
                                               "state_dict": model.state_dict(),
                                               "hyperparameters": {"scaling": "calibrated"}})
    return {"root": root, "session": sess, "example": ex, "ckpt": ckpt}


def _nifti_args(ex: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    img, msk = ex / "images", ex / "masks"
    return ["infer-nifti", str(img / "example_001_T1w.nii.gz"),
            str(img / "example_001_T2w.nii.gz"), str(img / "example_001_FLAIR.nii.gz"),
            "--brain-mask", str(msk / "example_001_brain.nii.gz"),
            "--wm", str(msk / "example_001_wm.nii.gz"), "--gm", str(msk / "example_001_gm.nii.gz"),
            "--csf", str(msk / "example_001_csf.nii.gz"),
            "--protocol", str(ex / "test_example.csv"), "--checkpoint", str(ckpt),
            "--out-dir", str(out), "--device", "cpu", "--threads", "1", *extra]


MAPS = ("T1map", "T2map", "PDmap")


def _maps(folder: Path, label: str = "sub-example001_ses-01") -> dict[str, np.ndarray]:
    return {k: np.asarray(nib.load(str(folder / f"{label}_space-T2w_{k}.nii.gz")).dataobj)
            for k in MAPS}


@pytest.mark.parametrize("scaling", ["calibrated", "seed"])
def test_infer_nifti_equals_the_workflow_infer(data, tmp_path, scaling):
    wf, nf = tmp_path / "wf", tmp_path / "nf"
    assert main(["infer", str(data["session"]), "--checkpoint", str(data["ckpt"]),
                 "--out-dir", str(wf), "--subject", "example001", "--session", "01",
                 "--device", "cpu", "--threads", "1", "--scaling", scaling]) == 0
    # no --subject/--session: taken from the file names (example_001 -> example001, ses 01)
    assert main(_nifti_args(data["example"], nf, data["ckpt"], "--scaling", scaling)) == 0
    a, b = _maps(wf), _maps(nf)
    for k in MAPS:
        assert a[k].shape == SHAPE and np.any(a[k] > 0)
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-9)
    # the same outputs (and the protocol/dseg the maps came from beside them)
    names = {p.name for p in wf.iterdir()}
    assert names <= {p.name for p in nf.iterdir()}
    assert (nf / "sub-example001_ses-01_desc-protocol_params.json").is_file()
    if scaling == "calibrated":
        assert (nf / "sub-example001_ses-01_space-T2w_desc-refinestatus_dseg.nii.gz").is_file()
        assert (nf / "sub-example001_ses-01_space-T2w_dseg.nii.gz").is_file()
    side_a = json.loads((wf / "sub-example001_ses-01_space-T2w_T1map.json").read_text())
    side_b = json.loads((nf / "sub-example001_ses-01_space-T2w_T1map.json").read_text())
    for key in ("InputContrasts", "Normalisation", "Precision", "Estimator", "SignalModels"):
        assert side_a[key] == side_b[key], key


def test_infer_nifti_protocol_from_json_and_command_line(data, tmp_path):
    """A JSON with the CSV's fields, one value overridden on the command line: the same maps
    as the CSV when the override restores the CSV's value; names given with --t1w etc."""
    ex = data["example"]
    ref = tmp_path / "csv"
    assert main(_nifti_args(ex, ref, data["ckpt"], "--scaling", "seed", "--no-synth")) == 0
    proto = {"T1w": {"seq_type": "GRE", "TR": 8.1, "TE": 3.7, "FA": 8},
             "T2w": {"seq_type": "TSE", "TR": 4000, "TE": 90},
             "FLAIR": {"seq_type": "IR", "TR": 4800, "TE": 300, "TI": 999}}
    (tmp_path / "p.json").write_text(json.dumps(proto))
    img, msk = ex / "images", ex / "masks"
    out = tmp_path / "json"
    assert main(["infer-nifti", "--t1w", str(img / "example_001_T1w.nii.gz"),
                 "--t2w", str(img / "example_001_T2w.nii.gz"),
                 "--flair", str(img / "example_001_FLAIR.nii.gz"),
                 "--brain-mask", str(msk / "example_001_brain.nii.gz"),
                 "--protocol", str(tmp_path / "p.json"), "--flair-ti", "1650",
                 "--subject", "example001", "--scaling", "seed", "--no-synth",
                 "--checkpoint", str(data["ckpt"]), "--out-dir", str(out), "--device", "cpu",
                 "--threads", "1"]) == 0
    a, b = _maps(ref), _maps(out)
    for k in MAPS:
        np.testing.assert_array_equal(a[k], b[k])
    params = json.loads((out / "sub-example001_ses-01_desc-protocol_params.json").read_text())
    assert params["flair"]["ti_ms"] == 1650.0 and params["flair"]["sequence"] == "flair"
    assert params["t2w"]["te_correction_factor"] == pytest.approx(0.90)


def _fails_with_one_line(args: list[str], out: Path, capsys, *needles: str) -> None:
    capsys.readouterr()
    assert main(args) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if not ln.startswith("warning")]
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    assert not out.exists() or not any(out.iterdir())


def test_bad_input_mask_of_another_shape(data, tmp_path, capsys):
    bad = tmp_path / "brain_small.nii.gz"
    save_nifti(bad, np.ones((64, 60, 4)), AFFINE, dtype=np.uint8)
    out = tmp_path / "out"
    args = _nifti_args(data["example"], out, data["ckpt"])
    args[args.index("--brain-mask") + 1] = str(bad)
    _fails_with_one_line(args, out, capsys, "brain mask shape (64, 60, 4) differs", "infer-nifti")


def test_bad_input_csv_without_a_needed_column(data, tmp_path, capsys):
    cols, vals = CSV_HEADER.split(","), CSV_ROW.split(",")
    i = cols.index("FLAIR_TI")
    csv = tmp_path / "no_ti.csv"
    csv.write_text(",".join(cols[:i] + cols[i + 1:]) + "\n" + ",".join(vals[:i] + vals[i + 1:])
                   + "\n")
    out = tmp_path / "out"
    args = _nifti_args(data["example"], out, data["ckpt"])
    args[args.index("--protocol") + 1] = str(csv)
    _fails_with_one_line(args, out, capsys, "FLAIR_TI", "no_ti.csv")


def test_bad_input_contrast_named_twice(data, tmp_path, capsys):
    twin = tmp_path / "other_T1w.nii.gz"
    shutil.copy(data["example"] / "images" / "example_001_T1w.nii.gz", twin)
    out = tmp_path / "out"
    args = [*_nifti_args(data["example"], out, data["ckpt"]), "--t1w", str(twin)]
    _fails_with_one_line(args, out, capsys, "contrast T1w given twice")


def test_bad_input_checkpoint_of_another_architecture(data, tmp_path, capsys):
    sd = SharedAttnUNet(8).state_dict()
    del sd["bottleneck_fuser.mlp.0.weight"]
    bad = tmp_path / "latest_net_G.pth"
    torch.save(sd, bad)
    out = tmp_path / "out"
    _fails_with_one_line(_nifti_args(data["example"], out, bad), out, capsys,
                         "incompatible model checkpoint")
