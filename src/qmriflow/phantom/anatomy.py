"""Digital head anatomy built from a real brain: the MNI152 2009a template shipped in nilearn.

The brain (GM/WM probability maps and brain mask of ICBM152 2009a, inside the nilearn wheel,
no download) gives GM/WM/CSF volume fractions; CSF = brain − GM − WM. Around the brain we add
extracerebral CSF, a skull (outer table, diploë marrow, inner table), temporalis muscle,
subcutaneous fat and skin whose thicknesses vary smoothly and per subject, so that skull
stripping is a real task. Lesions (WM hyperintensities; a tumour with oedema) are placed in
template space so they deform with the subject.

A subject is (template-space tissue fractions, smooth parameter-variation fields, a smooth
non-linear warp with size change). :meth:`SubjectAnatomy.sample` evaluates the fractions at
arbitrary world points for a given head pose; that is how each series "sees" the subject.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .tissues import BY_NAME, N_TISSUES, SubjectTissues

# index into the fraction stack = label - 1
_I = {name: t.label - 1 for name, t in BY_NAME.items()}


@dataclass(frozen=True)
class Template:
    """GM/WM/CSF fractions and brain mask on a padded template grid (RAS mm affine)."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # bool
    affine: np.ndarray
    res_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def load_template(res_mm: float = 1.0, pad_mm: float = 24.0) -> Template:
    """ICBM152 2009a from nilearn's wheel, block-averaged to ``res_mm``, padded by ``pad_mm``."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), np.float32)
    gm = np.asarray(gm_img.get_fdata(), np.float32)
    affine = gm_img.affine.copy()
    f = round(res_mm)
    if f > 1:
        # block average (partial volume) on a grid that starts at the same corner
        def block(a: np.ndarray) -> np.ndarray:
            s = [n - n % f for n in a.shape]
            a = a[: s[0], : s[1], : s[2]]
            return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))

        gm, wm, brain = block(gm), block(wm), block(brain)
        scale = np.diag([f, f, f, 1.0])
        affine = affine @ scale
        affine[:3, 3] += affine[:3, :3] @ np.full(3, (1.0 - 1.0 / f) / 2.0)  # centre of block
    brain_b = brain >= 0.5
    gm = np.where(brain_b, gm, 0.0)
    wm = np.where(brain_b, wm, 0.0)
    tot = gm + wm
    over = tot > 1.0
    gm = np.where(over, gm / np.maximum(tot, 1e-6), gm)
    wm = np.where(over, wm / np.maximum(tot, 1e-6), wm)
    csf = np.where(brain_b, 1.0 - gm - wm, 0.0)
    pad = int(np.ceil(pad_mm / f))
    padw = ((pad, pad), (pad, pad), (pad, pad))
    gm, wm, csf = (np.pad(a, padw).astype(np.float32) for a in (gm, wm, csf))
    brain_b = np.pad(brain_b, padw)
    affine = affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    for a in (gm, wm, csf, brain_b):
        a.setflags(write=False)
    return Template(gm=gm, wm=wm, csf=csf, brain=brain_b, affine=affine, res_mm=float(f))


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float
) -> np.ndarray:
    """A smooth Gaussian random field with zero mean and unit SD (on a coarse grid, zoomed)."""
    step = max(1, int(sigma_vox // 3))
    coarse_shape = tuple(max(2, int(np.ceil(n / step)) + 1) for n in shape)
    g = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma_vox / step, mode="wrap")
    g = ndimage.zoom(g, [n / c for n, c in zip(shape, coarse_shape, strict=True)], order=1)
    g = g[tuple(slice(0, n) for n in shape)]
    g -= g.mean()
    sd = g.std()
    return (g / sd if sd > 0 else g).astype(np.float32)


@dataclass
class Warp:
    """Subject space (mm) → template space (mm): t = y / scale + u(y / scale)."""

    scale: np.ndarray  # (3,) per-axis size factors (subject / template)
    disp: np.ndarray  # (3, X, Y, Z) displacement (mm) on a coarse grid in template mm
    disp_affine: np.ndarray  # coarse grid voxel -> template mm

    def __call__(self, y: np.ndarray) -> np.ndarray:
        t = y / self.scale
        vox = _apply_affine(np.linalg.inv(self.disp_affine), t)
        u = np.stack(
            [ndimage.map_coordinates(d, vox.T, order=1, mode="nearest") for d in self.disp], 1
        )
        return t + u

    def describe(self) -> dict[str, Any]:
        mag = np.sqrt((self.disp**2).sum(0))
        return {
            "scale": self.scale.tolist(),
            "displacement_rms_mm": float(np.sqrt((mag**2).mean())),
            "displacement_max_mm": float(mag.max()),
        }


def _apply_affine(aff: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ aff[:3, :3].T + aff[:3, 3]


@dataclass
class SubjectAnatomy:
    """One phantom subject: tissue fractions + variation fields in template space, and a warp."""

    fractions: np.ndarray  # (N_TISSUES, X, Y, Z) float32, label-1 indexed
    variation: np.ndarray  # (3, X, Y, Z) float32: PD, T1, T2 multiplicative fields (≈ 1)
    template_affine: np.ndarray
    warp: Warp
    tissues: SubjectTissues
    lesions: dict[str, Any] = field(default_factory=dict)
    head_centre_subject_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def sample(
        self, world_pts: np.ndarray, pose: np.ndarray, chunk: int = 2_000_000
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fractions (N_TISSUES, N) and variation (3, N) at world points for head ``pose``.

        ``pose`` (4×4) maps subject-space mm to scanner world mm (RAS).
        """
        n = world_pts.shape[0]
        frac = np.zeros((N_TISSUES, n), np.float32)
        var = np.ones((3, n), np.float32)
        inv_pose = np.linalg.inv(pose)
        to_vox = np.linalg.inv(self.template_affine)
        head = self.fractions.sum(0)
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            y = _apply_affine(inv_pose, world_pts[sl])
            vox = _apply_affine(to_vox, self.warp(y)).T
            inside = ndimage.map_coordinates(head, vox, order=1, cval=0.0) > 0
            if not inside.any():
                continue
            v = vox[:, inside]
            idx = np.flatnonzero(inside) + s
            for k in range(N_TISSUES):
                frac[k, idx] = ndimage.map_coordinates(self.fractions[k], v, order=1, cval=0.0)
            for k in range(3):
                var[k, idx] = ndimage.map_coordinates(self.variation[k], v, order=1, cval=1.0)
        return frac, var


def _ball(dist_mm: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """Soft ball: 1 inside ``radius``, linear ramp of width ``edge`` mm, 0 outside."""
    return np.clip((radius - dist_mm) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def build_subject(
    rng: np.random.Generator,
    tissues: SubjectTissues,
    *,
    res_mm: float = 1.0,
    lesion: str = "none",
    deformation_mm: float = 2.5,
    size_sd: float = 0.04,
    variation: float = 0.03,
    variation_scale_mm: float = 15.0,
) -> SubjectAnatomy:
    """Build one subject's head. ``lesion``: "none" | "wmh" | "tumour"."""
    tpl = load_template(res_mm)
    r = tpl.res_mm
    shape = tpl.shape
    frac = np.zeros((N_TISSUES, *shape), np.float32)
    frac[_I["GM"]] = tpl.gm
    frac[_I["WM"]] = tpl.wm
    frac[_I["CSF"]] = tpl.csf

    # world (template mm) coordinates of every voxel, needed for lesions and muscle
    ijk = np.indices(shape, dtype=np.float32)
    xyz = np.tensordot(tpl.affine[:3, :3].astype(np.float32), ijk, axes=(1, 0))
    xyz += tpl.affine[:3, 3].astype(np.float32)[:, None, None, None]

    # --- extracerebral layers by distance from the brain mask, with smooth thickness -----
    d = ndimage.distance_transform_edt(~tpl.brain).astype(np.float32) * r
    sig = 25.0 / r

    def thickness(mean: float, sd: float, lo: float) -> np.ndarray:
        return np.maximum(lo, mean + sd * smooth_field(rng, shape, sig)) * rng.uniform(0.85, 1.15)

    t_csf = thickness(2.0, 0.6, 0.8)
    t_skull = thickness(6.5, 1.2, 3.5)
    # temporalis: lateral, between the orbit level and the vertex
    lateral = np.clip((np.abs(xyz[0]) - 40.0) / 15.0, 0, 1) * np.clip((45.0 - xyz[2]) / 20.0, 0, 1)
    lateral *= np.clip((xyz[2] + 35.0) / 15.0, 0, 1)
    t_muscle = lateral * rng.uniform(5.0, 9.0)
    t_fat = thickness(4.0, 1.2, 1.5)
    t_skin = thickness(2.5, 0.4, 1.5)
    b = np.cumsum(np.stack([t_csf, t_skull / 3, t_skull / 3, t_skull / 3, t_muscle, t_fat, t_skin]),
                  axis=0)
    out = ~tpl.brain
    layers = ["CSF", "bone", "marrow", "bone", "muscle", "fat", "skin"]
    lo = np.zeros(shape, np.float32)
    for name, hi in zip(layers, b, strict=True):
        sel = out & (d > lo) & (d <= hi)
        frac[_I[name]][sel] = 1.0
        lo = hi
    del d, b, lo

    # --- lesions --------------------------------------------------------------------------
    lesions: dict[str, Any] = {"type": lesion}
    if lesion == "wmh":
        cand = np.argwhere(tpl.wm > 0.97)
        n = int(rng.integers(4, 9))
        blobs = []
        for c in cand[rng.choice(len(cand), n, replace=False)]:
            centre = tpl.affine[:3, :3] @ c + tpl.affine[:3, 3]
            radius = float(rng.uniform(3.0, 7.0))
            dist = np.sqrt(((xyz - centre[:, None, None, None].astype(np.float32)) ** 2).sum(0))
            f_les = _ball(dist, radius, max(r, 1.5)) * frac[_I["WM"]]
            frac[_I["WMH"]] = np.maximum(frac[_I["WMH"]], f_les)
            blobs.append({"centre_mm": centre.tolist(), "radius_mm": radius})
        frac[_I["WM"]] -= frac[_I["WMH"]]
        lesions["blobs"] = blobs
    elif lesion == "tumour":
        deep = ndimage.distance_transform_edt(tpl.brain) * r > 25.0
        cand = np.argwhere((tpl.wm > 0.6) & deep)
        c = cand[rng.integers(len(cand))]
        centre = tpl.affine[:3, :3] @ c + tpl.affine[:3, 3]
        radius = float(rng.uniform(8.0, 13.0))
        shell = float(rng.uniform(6.0, 11.0))
        dist = np.sqrt(((xyz - centre[:, None, None, None].astype(np.float32)) ** 2).sum(0))
        core = _ball(dist, radius, max(r, 2.0)) * tpl.brain
        for k in ("GM", "WM", "CSF"):
            frac[_I[k]] *= 1.0 - core
        frac[_I["tumour"]] = core
        oed = _ball(dist, radius + shell, 4.0) * (1.0 - core) * frac[_I["WM"]]
        frac[_I["WM"]] -= oed
        frac[_I["oedema"]] = oed
        lesions.update(centre_mm=centre.tolist(), radius_mm=radius, oedema_mm=shell)
    elif lesion != "none":
        raise ValueError(f"unknown lesion type {lesion!r}")
    del xyz, ijk

    # --- smooth spatial variation of PD, T1, T2 (a few percent) ----------------------------
    # (Gaussian smoothing of white noise with sigma ``variation_scale_mm``: regional tissue
    # differences; a much longer scale would be indistinguishable from a receive-coil field)
    var = np.stack([1.0 + variation * np.clip(smooth_field(rng, shape, variation_scale_mm / r),
                                              -3, 3)
                    for _ in range(3)]).astype(np.float32)

    # --- subject size and smooth non-linear deformation ----------------------------------
    scale = np.exp(rng.normal(0.0, size_sd)) * np.exp(rng.normal(0.0, size_sd / 3, 3))
    step_mm = 16.0
    cshape = tuple(int(np.ceil(n * r / step_mm)) + 1 for n in shape)
    disp = np.stack([
        ndimage.gaussian_filter(rng.standard_normal(cshape), 1.0) for _ in range(3)
    ])
    disp *= deformation_mm / max(1e-6, float(np.sqrt((disp**2).sum(0).mean())))
    disp_aff = tpl.affine @ np.diag([step_mm / r, step_mm / r, step_mm / r, 1.0])
    warp = Warp(scale=scale, disp=disp.astype(np.float32), disp_affine=disp_aff)

    brain_com = np.array(ndimage.center_of_mass(tpl.brain))
    centre_t = tpl.affine[:3, :3] @ brain_com + tpl.affine[:3, 3]
    return SubjectAnatomy(
        fractions=frac,
        variation=var,
        template_affine=tpl.affine,
        warp=warp,
        tissues=tissues,
        lesions=lesions,
        head_centre_subject_mm=centre_t * scale,
    )
