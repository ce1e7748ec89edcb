"""Physics-guided self-supervised loss (seed 000, section 2.2.2).

For every contrast (T1w, T2w, FLAIR — all three, also when one was withheld from the input),
the predicted maps are turned back into a weighted image by :func:`qmriflow.physics.signal`
with each slice's own protocol (TSE/FLAIR TE correction included), rescaled by the bounded
closed-form least-squares scale (:func:`qmriflow.physics.ls_global_scale`, ±20 % around the
white-matter reference scale) and compared with the mode-normalised input:

    L = L1 + λ_TV · TV + λ_PD · mean(max(0, 0.60 − PD)) [+ λ_D · D]

* ``L1``: mean absolute error **inside the head mask only** (the published code averages over
  the whole slice, so the background dilutes it), averaged over the three contrasts;
* ``TV``: isotropic total variation ‖∇Q‖₂ of PD/0.70, T1/0.85 s, T2/0.070 s (the WM reference
  values, so the three maps weigh alike), mean over head voxels, averaged over the three maps;
* PD hinge: soft lower bound on PD, mean over head voxels;
* ``D`` (optional, ``LossWeights.distill`` = λ_D > 0, calibrated scaling; issue 22): mean over
  brain voxels of |log Q − log Q_nf| against the session's ``network-free`` maps Q_nf (the
  calibration's tissue values made consistent with all three inputs under the calibrated
  scales and the series' own signal models, echo trains included; packed by ``qmriflow pack
  --targets``). Self-supervised too (no truth): it teaches the network the estimate the
  per-voxel solver reaches, so that its maps alone (the fast path) are calibrated.

Per-slice protocols travel as a float tensor of shape (B, 6) per contrast, columns
:data:`PROTOCOL_COLUMNS`: sequence code (index into ``physics.SEQUENCES``), TR (ms), effective
TE (ms, TE correction already applied), TI (ms, NaN if none), flip angle (deg, NaN if none) and
the WM reference scale ``1 / S_WM`` — or, with ``scaling: calibrated``, the session's
calibrated scale (:mod:`qmriflow.model.calibration`), which is then used as it is: the free
global scales of the seed's objective are pinned before training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .. import physics

__all__ = [
    "PROTOCOL_COLUMNS",
    "TV_SCALES",
    "LossWeights",
    "bounded_scale",
    "distill_l1",
    "isotropic_tv",
    "masked_l1",
    "mono_exponential",
    "pd_hinge",
    "physics_loss",
    "protocol_row",
    "synthesise",
    "training_scale",
    "warmup_loss",
]

PROTOCOL_COLUMNS = ("sequence", "tr_ms", "te_eff_ms", "ti_ms", "fa_deg", "ref_scale")
TV_SCALES = (physics.WM_REFERENCE["pd"], physics.WM_REFERENCE["t1_s"],
             physics.WM_REFERENCE["t2_s"])
"""Normalisers of PD, T1 (s), T2 (s) in the TV term."""


@dataclass(frozen=True)
class LossWeights:
    """Weights and constants of the loss (seed defaults)."""

    tv: float = 0.01
    pd: float = 0.1
    pd_threshold: float = 0.60
    scale_bound: float = 0.2
    scaling: str = "seed"
    """``seed``: bounded LS scale (±scale_bound around the reference in column 5);
    ``calibrated``: column 5 is the session's calibrated scale, used as it is (no freedom)."""
    distill: float = 0.0
    """λ_D of the distillation term :func:`distill_l1` (0 = off, the published loss)."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def mono_exponential(protocol: physics.Protocol) -> physics.Protocol:
    """The protocol without its echo train: the seed's mono-exponential model with the TE
    factor, which the network's training loss uses (and ``scaling: seed`` everywhere)."""
    return replace(protocol, echo_train=None) if protocol.echo_train is not None else protocol


def training_scale(protocol: physics.Protocol, scale: float) -> float:
    """A calibrated scale (found with the series' own signal model, echo train included) as
    the scale of the network's mono-exponential training model: matched at reference white
    matter, ``scale · S(WM) / S_mono(WM)``; unchanged without an echo train."""
    if protocol.echo_train is None:
        return float(scale)
    return float(scale) * (physics.wm_reference_signal(protocol)
                           / physics.wm_reference_signal(mono_exponential(protocol)))


def protocol_row(protocol: physics.Protocol,
                 reference: dict[str, float] | None = None) -> list[float]:
    """The (6,) protocol row of one series (see :data:`PROTOCOL_COLUMNS`): always the
    mono-exponential model (:func:`mono_exponential`), as the published training."""
    p = mono_exponential(protocol)
    return [float(physics.SEQUENCES.index(p.sequence)), float(p.tr_ms), float(p.effective_te_ms),
            math.nan if p.ti_ms is None else float(p.ti_ms),
            math.nan if p.fa_deg is None else float(p.fa_deg),
            physics.wm_reference_scale(p, reference)]


def synthesise(maps: torch.Tensor, protocols: torch.Tensor) -> torch.Tensor:
    """Weighted images (B, 1, H, W) from maps (B, 3, H, W: PD, T1 s, T2 s) and protocol rows
    (B, 6), grouped by sequence family and computed by :func:`qmriflow.physics.signal`."""
    maps = maps.float()
    out = torch.empty_like(maps[:, :1])
    codes = protocols[:, 0].round().long()
    for code in torch.unique(codes).tolist():
        idx = (codes == code).nonzero(as_tuple=True)[0]
        rows = protocols[idx].to(maps.device, torch.float32)

        def col(j: int, rows: torch.Tensor = rows) -> torch.Tensor:
            return rows[:, j].view(-1, 1, 1, 1)

        seq = physics.SEQUENCES[code]
        proto = physics.Protocol(
            sequence=seq, tr_ms=col(1), te_ms=col(2),  # type: ignore[arg-type]
            ti_ms=col(3) if seq in ("flair", "irgre") else None,  # type: ignore[arg-type]
            fa_deg=col(4) if seq in ("gre", "irgre", "se") else None,  # type: ignore[arg-type]
            te_correction=1.0,  # TE already effective
        )
        m = maps[idx]
        out[idx] = physics.signal(proto, m[:, 0:1], m[:, 1:2], m[:, 2:3])
    return out


def bounded_scale(synth: torch.Tensor, real: torch.Tensor, mask: torch.Tensor,
                  ref_scale: torch.Tensor, groups: torch.Tensor | None = None,
                  bound: float = 0.2) -> torch.Tensor:
    """Bounded least-squares scale per group of slices (B, 1, 1, 1).

    ``groups`` (B,) integer ids (e.g. the session of each slice): slices of one group share
    one scale ``clamp(Σ m·f·r / Σ m·f², (1 ± bound)·ref)``; ``None`` = one scale per slice.
    The gradient flows through the scale, as in the published training.
    """
    b = synth.shape[0]
    if groups is None:
        groups = torch.arange(b, device=synth.device)
    out = torch.empty(b, 1, 1, 1, dtype=synth.dtype, device=synth.device)
    for g in torch.unique(groups).tolist():
        idx = (groups == g).nonzero(as_tuple=True)[0]
        ref = ref_scale[idx[0]].to(synth.dtype)
        out[idx] = physics.ls_global_scale(synth[idx], real[idx], mask[idx],
                                           reference_scale=ref, bound=bound).reshape(1, 1, 1, 1)
    return out


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred − target| over the voxels where ``mask`` is set (0 if the mask is empty)."""
    m = mask.to(pred.dtype)
    return (m * (pred - target).abs()).sum() / m.sum().clamp_min(1.0)


def distill_l1(maps: torch.Tensor, targets: torch.Tensor, brain: torch.Tensor,
               floor: float = 1e-3) -> torch.Tensor:
    """Mean over the brain voxels with a target of |log Q − log Q_t|, averaged over PD, T1
    and T2: ``maps`` and ``targets`` (B, 3, H, W), ``brain`` (B, 1, H, W); a voxel whose
    target is 0 (no target, outside the brain) does not count. 0 if no voxel counts."""
    m = brain.bool() & (targets > 0).all(dim=1, keepdim=True)
    diff = (torch.log(maps.float().clamp_min(floor))
            - torch.log(targets.float().clamp_min(floor))).abs()
    w = m.to(diff.dtype)
    return (diff * w).sum() / (3.0 * w.sum()).clamp_min(1.0)


def isotropic_tv(maps: torch.Tensor, mask: torch.Tensor,
                 scales: Sequence[float] = TV_SCALES, eps: float = 1e-12) -> torch.Tensor:
    """Isotropic TV of each map channel divided by its ``scale``, averaged over channels.

    Forward differences (zero beyond the last row/column):
    TV(Q) = Σ_i m_i·sqrt(dx_i² + dy_i² + eps) / Σ_i m_i, with ``maps`` (B, C, H, W) and
    ``mask`` (B, 1, H, W).
    """
    q = maps / torch.as_tensor(list(scales), dtype=maps.dtype, device=maps.device).view(1, -1, 1, 1)
    dx = torch.zeros_like(q)
    dy = torch.zeros_like(q)
    dx[..., :-1, :] = q[..., 1:, :] - q[..., :-1, :]
    dy[..., :, :-1] = q[..., :, 1:] - q[..., :, :-1]
    mag = torch.sqrt(dx * dx + dy * dy + eps)
    m = mask.to(q.dtype)
    per_map = (mag * m).sum(dim=(0, 2, 3)) / m.sum().clamp_min(1.0)
    return per_map.mean()


def pd_hinge(pd: torch.Tensor, mask: torch.Tensor, threshold: float = 0.60) -> torch.Tensor:
    """Soft lower bound on PD: mean of max(0, threshold − PD) over the mask."""
    m = mask.to(pd.dtype)
    return (m * torch.relu(threshold - pd)).sum() / m.sum().clamp_min(1.0)


def warmup_loss(maps: torch.Tensor, head: torch.Tensor,
                scales: Sequence[float] = TV_SCALES) -> torch.Tensor:
    """Warm-up term of the published training: mean over the head of |Q/Q_WM − 1| for PD,
    T1 and T2 (Q_WM = 0.70, 0.85 s, 0.070 s), averaged over the three maps. It pulls a freshly
    initialised network (sigmoid ≈ 0.5: T1 2.5 s, T2 1.5 s, where the weighted signals hardly
    depend on T2) into the physiological range before the physics loss takes over."""
    ref = torch.as_tensor(list(scales), dtype=maps.dtype, device=maps.device).view(1, -1, 1, 1)
    m = head.to(maps.dtype)
    per_map = (m * (maps / ref - 1.0).abs()).sum(dim=(0, 2, 3)) / m.sum().clamp_min(1.0)
    return per_map.mean()


def physics_loss(maps: torch.Tensor, images: torch.Tensor, head: torch.Tensor,
                 protocols: torch.Tensor, groups: torch.Tensor | None = None,
                 weights: LossWeights | None = None, targets: torch.Tensor | None = None,
                 brain: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective for one batch.

    ``maps`` (B, 3, H, W) PD/T1/T2; ``images`` (B, 3, H, W) mode-normalised T1w/T2w/FLAIR;
    ``head`` (B, 1, H, W) head mask; ``protocols`` (B, 3, 6) protocol rows per contrast;
    ``groups`` (B,) scale groups; ``targets`` (B, 3, H, W) and ``brain`` (B, 1, H, W): the
    distillation term's targets and where it counts (needed when ``weights.distill`` > 0).
    Returns the loss and its parts as floats.
    """
    w = weights or LossWeights()
    maps = maps.float()
    images = images.float()
    head = head.bool()
    l1_terms = []
    scales = []
    for c in range(images.shape[1]):
        real = images[:, c:c + 1]
        m = head & (real > 0)
        synth = synthesise(maps, protocols[:, c])
        bound = 0.0 if w.scaling == "calibrated" else w.scale_bound
        a = bounded_scale(synth, real, m, protocols[:, c, 5], groups, bound)
        scales.append(a.detach().flatten() / protocols[:, c, 5].to(a.device))
        l1_terms.append(masked_l1(a * synth, real, m))
    l1 = torch.stack(l1_terms).mean()
    tv = isotropic_tv(maps, head)
    pdh = pd_hinge(maps[:, 0:1], head, w.pd_threshold)
    total = l1 + w.tv * tv + w.pd * pdh
    parts = {"loss": float(total.detach()), "l1": float(l1.detach()), "tv": float(tv.detach()),
             "pd_hinge": float(pdh.detach())}
    if w.distill > 0:
        if targets is None or brain is None:
            raise ValueError("the distillation term needs targets and a brain mask")
        dist = distill_l1(maps, targets, brain)
        total = total + w.distill * dist
        parts.update(loss=float(total.detach()), distill=float(dist.detach()))
    for c, s in enumerate(scales):
        parts[f"scale_rel_{c}"] = float(s.mean())
    return total, parts


def protocol_table(rows: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """Stack per-session protocol rows into a (S, 3, 6) float64 array."""
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 3, len(PROTOCOL_COLUMNS))
