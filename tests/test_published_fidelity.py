"""``scaling: seed`` reproduces the published (seed 000) inference (issue 23).

The published weights are stood in for by a state dict built here from the published key
layout (NOTES.md section A, "State-dict layout": 92 tensors, 8,562,559 parameters), with
random values from a fixed seed, saved as the published file name (``latest_net_G.pth``) in a
model folder. ``qmriflow infer --scaling seed`` on a real-sized, non-RAS volume is compared
with an independent implementation, written below from the paper (section 2.1.2: centre
crop/zero pad to 224 × 224; section 2.2: division by the histogram mode) and NOTES.md section A
(closest-canonical orientation, 5 % edge slices out of the normalisation, Otsu of the inverted
T1w with ITK's 128-bin histogram, percentile windows T1w 60-95 / T2w and FLAIR 35-95 applied
one after the other, 512-bin mode, inputs times the brain mask, outputs times (1, 5, 3) and
the mask). It uses nibabel's ``as_closest_canonical``, NumPy percentiles and histograms and
explicit loops, not :mod:`qmriflow.model.published`.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qmriflow import physics
from qmriflow.cli import main
from qmriflow.io import save_nifti, write_json
from qmriflow.model.network import SharedAttnUNet

PUBLISHED_PARAMETERS = 8_562_559


# ---------------------------------------------------------------------------------------------
# the published state dict, from the documented layout
# ---------------------------------------------------------------------------------------------


def published_layout() -> dict[str, tuple[int, ...]]:
    """Key → shape of the published ``SharedAttnUNet`` state dict (NOTES.md A)."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        keys[f"{name}.weight"] = (c_out, c_in, k, k)
        keys[f"{name}.bias"] = (c_out,)

    def norm(name: str, c: int) -> None:
        keys[f"{name}.weight"] = (c,)
        keys[f"{name}.bias"] = (c,)

    def linear(name: str, c_out: int, c_in: int) -> None:
        keys[f"{name}.weight"] = (c_out, c_in)
        keys[f"{name}.bias"] = (c_out,)

    for i, (c_in, c) in enumerate(((1, 64), (64, 128), (128, 256))):
        rb = f"enc_blocks.{i}.residual_block"
        conv(f"{rb}.conv1", c, c_in, 3)
        norm(f"{rb}.bn1", c)
        conv(f"{rb}.conv2", c, c, 3)
        norm(f"{rb}.bn2", c)
        conv(f"{rb}.residual_connection", c, c_in, 1)
        conv(f"enc_blocks.{i}.strided_conv", c, c, 3)
    conv("bottleneck.0", 512, 256, 3)
    norm("bottleneck.1", 512)
    conv("bottleneck.3", 512, 512, 3)
    norm("bottleneck.4", 512)
    for i, c in enumerate((64, 128, 256)):
        linear(f"skip_fusers.{i}.mlp.0", max(c // 16, 4), c)
        linear(f"skip_fusers.{i}.mlp.2", c, max(c // 16, 4))
    linear("bottleneck_fuser.mlp.0", 32, 512)
    linear("bottleneck_fuser.mlp.2", 512, 32)
    for i, (c_in, c) in enumerate(((512, 256), (256, 128), (128, 64))):
        keys[f"dec_blocks.{i}.upconv.weight"] = (c_in, c, 2, 2)  # ConvTranspose2d: (in, out)
        keys[f"dec_blocks.{i}.upconv.bias"] = (c,)
        conv(f"dec_blocks.{i}.conv.0", c, 2 * c, 3)
        norm(f"dec_blocks.{i}.conv.1", c)
        conv(f"dec_blocks.{i}.conv.3", c, c, 3)
        norm(f"dec_blocks.{i}.conv.4", c)
    conv("output_layer.0", 3, 64, 1)
    return keys


def published_state_dict(seed: int = 23) -> dict[str, torch.Tensor]:
    """Random weights in the published layout: He-normal convolutions and linears, small
    biases, instance-norm scales near 1 (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in published_layout().items():
        if len(shape) == 1:
            base = 1.0 if (".bn" in k or k.startswith("bottleneck.1") or k.startswith(
                "bottleneck.4") or ".conv.1." in k or ".conv.4." in k) and k.endswith(
                "weight") else 0.0
            sd[k] = base + 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[0] * shape[2] * shape[3] if "upconv" in k else math.prod(shape[1:])
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
    return sd


def test_published_layout_is_the_documented_one():
    layout = published_layout()
    assert len(layout) == 92
    assert sum(math.prod(s) for s in layout.values()) == PUBLISHED_PARAMETERS
    ours = {k: tuple(v.shape) for k, v in SharedAttnUNet(64).state_dict().items()}
    assert ours == layout


# ---------------------------------------------------------------------------------------------
# a real-sized subject, not in RAS orientation
# ---------------------------------------------------------------------------------------------

SHAPE = (230, 219, 20)  # crop one in-plane axis, pad the other by an odd amount
AFFINE = np.array([[-1.0, 0, 0, 114.0], [0, -1.0, 0, 108.0], [0, 0, 4.0, -40.0],
                   [0, 0, 0, 1.0]])  # LPS: the canonical orientation flips both in-plane axes


def _ellipse(shape, c, r):
    y, x = np.indices(shape, dtype=np.float64)
    return ((y - c[0]) / r[0]) ** 2 + ((x - c[1]) / r[1]) ** 2 <= 1.0


def write_subject(root: Path) -> Path:
    """sub-P01/ses-01 in the preprocessing layout: an elliptical head (scalp fat, skull, GM,
    WM, ventricles) whose brain sits off-centre, three contrasts from physics.signal with
    arbitrary scanner scales and Rician noise, and a head-plus-margin brain mask."""
    rng = np.random.default_rng(2301)
    h, w, s = SHAPE
    lab = np.zeros(SHAPE, np.uint8)
    cy, cx = h / 2 + 7.3, w / 2 - 4.6
    for k in range(s):
        f = 1.0 - 0.025 * abs(k - s / 2)
        sl = np.zeros((h, w), np.uint8)
        sl[_ellipse((h, w), (cy, cx), (96 * f, 80 * f))] = 9
        sl[_ellipse((h, w), (cy, cx), (91 * f, 75 * f))] = 7
        sl[_ellipse((h, w), (cy, cx), (86 * f, 70 * f))] = 1
        sl[_ellipse((h, w), (cy, cx), (78 * f, 62 * f))] = 2
        for side in (-1, 1):
            sl[_ellipse((h, w), (cy - 5, cx + side * 11), (22 * f, 5))] = 3
        sl[_ellipse((h, w), (cy + 20, cx + 3), (9, 12))] = 1
        lab[..., k] = sl
    values = {1: (0.80, 1.35, 0.090), 2: (0.70, 0.85, 0.070), 3: (1.0, 4.3, 2.0),
              7: (0.08, 0.40, 0.004), 9: (0.90, 0.38, 0.130)}
    pd, t1, t2 = (np.zeros(SHAPE) for _ in range(3))
    for v, (p, a, b) in values.items():
        pd[lab == v], t1[lab == v], t2[lab == v] = p, a, b
    from scipy import ndimage as ndi

    texture = ndi.gaussian_filter(rng.normal(0, 1, SHAPE), (2, 2, 0))
    pd *= 1 + 0.02 * texture
    t1 *= 1 + 0.05 * texture
    protos = {"t1w": physics.Protocol("gre", 8.1, 3.7, fa_deg=8.0),
              "t2w": physics.Protocol("tse", 4000.0, 90.0),
              "flair": physics.Protocol("flair", 4800.0, 300.0, ti_ms=1650.0)}
    d = root / "sub-P01" / "ses-01"
    anat = d / "anat"
    pre = anat / "sub-P01_ses-01_space-T2w"
    params: dict = {"session": "sub-P01_ses-01"}
    for role, name, scale in (("t1w", "T1w", 2900.0), ("t2w", "T2w", 410.0),
                              ("flair", "FLAIR", 1200.0)):
        sig = scale * np.asarray(physics.signal(protos[role], pd, t1, t2))
        sigma = 0.02 * float(sig[lab == 2].mean())
        img = np.hypot(sig + rng.normal(0, sigma, SHAPE), rng.normal(0, sigma, SHAPE))
        save_nifti(Path(f"{pre}_desc-preproc_{name}.nii.gz"), img, AFFINE)
        params[role] = {"role": role, **protos[role].as_dict(), "field_strength_t": 3.0}
    brain = ndi.binary_dilation(np.isin(lab, (1, 2, 3)), iterations=2)
    save_nifti(Path(f"{pre}_desc-brain_mask.nii.gz"), brain.astype(np.uint8), AFFINE,
               dtype=np.uint8)
    write_json(d / "sub-P01_ses-01_desc-protocol_params.json", params)
    return d


# ---------------------------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------------------------


def ref_canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, np.float32)


def ref_crop_pad(vol: np.ndarray, n: int = 224) -> np.ndarray:
    out = vol
    for axis in (0, 1):
        size = out.shape[axis]
        if size > n:
            a = (size - n) // 2
            out = np.take(out, np.arange(a, a + n), axis=axis)
        elif size < n:
            widths = [(0, 0)] * out.ndim
            widths[axis] = ((n - size) // 2, n - size - (n - size) // 2)
            out = np.pad(out, widths)
    return out


def ref_otsu_inverted(t1w: np.ndarray) -> np.ndarray:
    """ITK OtsuThreshold (128 bins, histogram to max + range/12800, threshold = upper edge of
    the best lower class, inside = at or below) of 255 - T1w, written as a loop."""
    inv = (np.float32(255) - t1w.astype(np.float32)).astype(np.float64).ravel()
    lo, hi = inv.min(), inv.max()
    hi += (hi - lo) / 128 / 100
    counts, edges = np.histogram(inv, bins=128, range=(lo, hi))
    mids = (edges[:-1] + edges[1:]) / 2
    total, mu = counts.sum(), (counts * mids).sum() / counts.sum()
    best, best_k = -1.0, 0
    for k in range(127):
        w0 = counts[:k + 1].sum()
        w1 = total - w0
        m0 = (counts[:k + 1] * mids[:k + 1]).sum() / w0 if w0 else 0.0
        m1 = (mu * total - m0 * w0) / w1 if w1 else 0.0
        var = (w0 * m0 ** 2 + w1 * m1 ** 2) / total
        if var > best * (1 + 1e-12):
            best, best_k = var, k
    thr = np.float32(edges[best_k + 1])
    return (np.float32(255) - t1w.astype(np.float32)) <= thr


def ref_mode(values: np.ndarray, lower: float, upper: float) -> float:
    v = values.astype(np.float64)
    v = v[v >= np.percentile(v, lower)]
    v = v[v <= np.percentile(v, upper)]
    counts, edges = np.histogram(v, bins=512, range=(v.min(), v.max()))
    k = int(np.argmax(counts))
    return float((edges[k] + edges[k + 1]) / 2)


def reference_maps(session: Path, state_dict: dict, slices: list[int]) -> tuple[
        np.ndarray, np.ndarray]:
    """Published maps (PD, T1 s, T2 s) on the canonical 224 x 224 grid of the given canonical
    slices, and the brain mask there."""
    pre = session / "anat" / "sub-P01_ses-01_space-T2w"
    imgs = {c: ref_crop_pad(ref_canonical(Path(f"{pre}_desc-preproc_{c}.nii.gz")))
            for c in ("T1w", "T2w", "FLAIR")}
    brain = ref_crop_pad(ref_canonical(Path(f"{pre}_desc-brain_mask.nii.gz"))) != 0
    depth = brain.shape[2]
    edge = int(0.05 * depth)
    keep = slice(edge, depth - edge)
    otsu = ref_otsu_inverted(imgs["T1w"][..., keep])
    windows = {"T1w": (60, 95), "T2w": (35, 95), "FLAIR": (35, 95)}
    normed = {c: imgs[c] / ref_mode(imgs[c][..., keep][otsu], *windows[c]) * brain
              for c in imgs}
    net = SharedAttnUNet(64)
    net.load_state_dict(state_dict, strict=True)
    net.eval()
    x = torch.from_numpy(np.stack([np.stack([normed[c][..., k] for c in ("T1w", "T2w",
                                                                          "FLAIR")])
                                   for k in slices]).astype(np.float32))
    with torch.no_grad():
        out = net(x).numpy()  # the network's outputs times (1, 5, 3)
    m = np.stack([brain[..., k] for k in slices])
    return out * m[:, None], m


def test_seed_scaling_reproduces_the_published_inference(tmp_path, capsys):
    torch.manual_seed(0)
    session = write_subject(tmp_path / "results")
    folder = tmp_path / "checkpoints" / "qstar_model_PD0p1_TV0p01_lq20"
    folder.mkdir(parents=True)
    sd = published_state_dict()
    torch.save(sd, folder / "latest_net_G.pth")  # plain state dict, the published file name
    out = tmp_path / "maps"
    rc = main(["infer", str(session), "--checkpoint", str(folder), "--scaling", "seed",
               "--precision", "fp32", "--threads", "2", "--no-synth", "--out-dir", str(out),
               "--subject", "P01", "--session", "01"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "precision fp32 (requested)" in err
    slices = [1, 7, 12, 18]  # canonical slices inside the normalisation's range [1, 19)
    ref, m = reference_maps(session, sd, slices)
    for ch, key in enumerate(("PDmap", "T1map", "T2map")):
        img = nib.load(str(out / f"sub-P01_ses-01_space-T2w_{key}.nii.gz"))
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)  # the input grid
        assert img.shape == SHAPE
        ours = ref_crop_pad(np.asarray(nib.as_closest_canonical(img).dataobj, np.float32))
        ours = np.stack([ours[..., k] for k in slices])
        a, b = ours[m].astype(np.float64), ref[:, ch][m].astype(np.float64)
        assert b.std() > 0.01 * b.mean()  # the random network's maps carry structure
        r = np.corrcoef(a, b)[0, 1]
        rel = np.abs(a - b) / np.abs(b)
        assert r >= 0.9999, (key, r)
        assert rel.max() <= 1e-3, (key, rel.max())
        # and zero outside the brain mask
        assert np.all(ours[~m] == 0)
    side = (out / "sub-P01_ses-01_space-T2w_T1map.json").read_text()
    assert "published (seed 000)" in side and '"PrecisionChoice": "fp32 (requested)"' in side


def test_a_checkpoint_folder_without_weights_is_refused(tmp_path, capsys):
    session = write_subject(tmp_path / "results")
    empty = tmp_path / "model"
    empty.mkdir()
    out = tmp_path / "maps"
    rc = main(["infer", str(session), "--checkpoint", str(empty), "--scaling", "seed",
               "--out-dir", str(out), "--subject", "P01", "--session", "01"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model weights" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    session = write_subject(tmp_path / "results")
    sd = published_state_dict()
    sd["output_layer.0.weight"] = torch.zeros(3, 32, 1, 1)  # a narrower head: not this network
    torch.save(sd, tmp_path / "latest_net_G.pth")
    out = tmp_path / "maps"
    rc = main(["infer", str(session), "--checkpoint", str(tmp_path / "latest_net_G.pth"),
               "--scaling", "seed", "--out-dir", str(out), "--subject", "P01",
               "--session", "01"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "incompatible model checkpoint" in err[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("shape", [(230, 219, 7), (201, 240, 5), (224, 224, 3)])
def test_seed_grid_round_trip(shape):
    """Crop/pad and orientation there and back: every voxel of the 224 x 224 field of view
    returns to its place, the rest is zero."""
    from qmriflow.model.published import crop_pad, seed_inputs

    rng = np.random.default_rng(1)
    vol = rng.uniform(1, 2, shape).astype(np.float32)
    brain = np.ones(shape, bool)
    prep = seed_inputs({"T1w": vol}, brain, AFFINE, ("T1w",))
    back = prep.to_input_grid(prep.images * np.float32(prep.modes["T1w"]))[:, 0]
    back = np.moveaxis(back, 0, 2)
    fov = np.moveaxis(prep.to_input_grid(np.ones_like(prep.images))[:, 0], 0, 2) > 0
    np.testing.assert_allclose(back[fov], vol[fov], rtol=1e-6)
    assert np.all(back[~fov] == 0)
    assert fov.sum() == min(shape[0], 224) * min(shape[1], 224) * shape[2]
    # the network's grid is the canonical crop/pad of the input
    canon = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(vol, AFFINE)).dataobj)
    np.testing.assert_allclose(prep.images[:, 0] * np.float32(prep.modes["T1w"]),
                               np.moveaxis(crop_pad(canon), 2, 0), rtol=1e-6)
