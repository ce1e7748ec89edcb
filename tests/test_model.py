"""Unit tests of the relaxometry model: every loss term, the mode normalisation, the bounded
scale and the dropout against values computed by hand; the network's size, published key
layout, subset/order invariance; checkpoint errors; the subject split."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from qmriflow import physics
from qmriflow.errors import InputError
from qmriflow.model.checkpoint import FORMAT, load_model, save_checkpoint
from qmriflow.model.data import contrast_dropout, split_subjects
from qmriflow.model.losses import (
    LossWeights,
    bounded_scale,
    isotropic_tv,
    masked_l1,
    pd_hinge,
    physics_loss,
    protocol_row,
    synthesise,
    warmup_loss,
)
from qmriflow.model.network import SharedAttnUNet, count_parameters
from qmriflow.model.normalise import histogram_mode, mode_normalise

torch.set_num_threads(1)

T1W = physics.Protocol("gre", 5.2, 2.3, fa_deg=10.0)
T2W = physics.Protocol("tse", 4300.0, 80.0, fa_deg=90.0)
FLAIR = physics.Protocol("flair", 4800.0, 300.0, ti_ms=1650.0, fa_deg=90.0)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# loss terms, by hand
# ---------------------------------------------------------------------------------------------


def test_masked_l1_by_hand_and_not_diluted_by_background():
    pred = _t([[1, 2], [3, 4]])[None, None]
    target = _t([[1, 1], [1, 1]])[None, None]
    mask = _t([[1, 1], [0, 1]])[None, None]
    # |0| + |1| + |3| over 3 masked voxels
    assert masked_l1(pred, target, mask).item() == pytest.approx(4 / 3, abs=1e-7)
    # 100 background voxels with a large error outside the mask change nothing
    big_p = torch.zeros(1, 1, 2, 52)
    big_t = torch.full((1, 1, 2, 52), 7.0)
    big_m = torch.zeros(1, 1, 2, 52)
    big_p[..., :2], big_t[..., :2], big_m[..., :2] = pred, target, mask
    assert masked_l1(big_p, big_t, big_m).item() == pytest.approx(4 / 3, abs=1e-7)
    # an empty mask gives 0, not NaN
    assert masked_l1(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_isotropic_tv_by_hand():
    q = _t([[1, 4], [5, 4]])
    # forward differences: dx(0,0)=5-1=4, dy(0,0)=4-1=3 -> 5; (0,1): dx=0, dy=0 -> 0;
    # (1,0): dx=0 (last row), dy=4-5=-1 -> 1; (1,1): 0.  Mean over 4 voxels: 6/4 = 1.5
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = 0.70 * q  # PD is divided by 0.70
    full = torch.ones(1, 1, 2, 2)
    # channels PD, T1, T2 averaged: (1.5 + 0 + 0) / 3
    assert isotropic_tv(maps, full).item() == pytest.approx(0.5, abs=1e-5)
    maps2 = torch.zeros(1, 3, 2, 2)
    maps2[0, 1] = 0.85 * q  # T1 / 0.85 s
    maps2[0, 2] = 0.070 * q  # T2 / 0.070 s
    assert isotropic_tv(maps2, full).item() == pytest.approx(1.0, abs=1e-5)
    # mask without voxel (0,0): (0 + 1 + 0) / 3 voxels, PD channel only -> 1/3 / 3
    m = _t([[0, 1], [1, 1]])[None, None]
    assert isotropic_tv(maps, m).item() == pytest.approx(1 / 9, abs=1e-5)
    # isotropic, not anisotropic: |dx| + |dy| would give 7 at (0,0)
    assert isotropic_tv(maps, _t([[1, 0], [0, 0]])[None, None]).item() == pytest.approx(
        5 / 3, abs=1e-5)


def test_pd_hinge_by_hand():
    pd = _t([[0.5, 0.7], [0.3, 0.6]])[None, None]
    assert pd_hinge(pd, torch.ones_like(pd)).item() == pytest.approx((0.1 + 0.3) / 4, abs=1e-7)
    m = _t([[1, 1], [0, 1]])[None, None]
    assert pd_hinge(pd, m).item() == pytest.approx(0.1 / 3, abs=1e-7)
    assert pd_hinge(pd, torch.ones_like(pd), threshold=0.8).item() == pytest.approx(
        (0.3 + 0.1 + 0.5 + 0.2) / 4, abs=1e-7)


def test_warmup_loss_by_hand():
    maps = torch.tensor([0.70, 0.85, 0.070]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    head = torch.ones(1, 1, 2, 2)
    assert warmup_loss(maps, head).item() == pytest.approx(0.0, abs=1e-7)
    maps[0, 0] = 0.35  # PD at half the WM value: |0.5 - 1| = 0.5 for PD, averaged over 3 maps
    assert warmup_loss(maps, head).item() == pytest.approx(0.5 / 3, abs=1e-6)
    maps[0, 2, 0, 0] = 0.14  # T2 twice WM in one of four voxels: + 1 / 4 / 3
    assert warmup_loss(maps, head).item() == pytest.approx(0.5 / 3 + 0.25 / 3, abs=1e-6)
    head[0, 0, 0, 0] = 0  # outside the head it does not count
    assert warmup_loss(maps, head).item() == pytest.approx(0.5 / 3, abs=1e-6)


def test_bounded_scale_by_hand():
    f = _t([1, 2]).view(1, 1, 1, 2)
    r = _t([2, 4]).view(1, 1, 1, 2)
    m = torch.ones_like(f)
    # a = (1*2 + 2*4) / (1 + 4) = 2
    assert bounded_scale(f, r, m, _t([1.9])).item() == pytest.approx(2.0, abs=1e-6)
    assert bounded_scale(f, r, m, _t([1.5])).item() == pytest.approx(1.8, abs=1e-6)  # 1.2*1.5
    assert bounded_scale(f, r, m, _t([3.0])).item() == pytest.approx(2.4, abs=1e-6)  # 0.8*3
    assert bounded_scale(f, r, m, _t([1.5]), bound=0.5).item() == pytest.approx(2.0, abs=1e-6)
    # the mask: only the first voxel -> a = 2
    m1 = _t([1, 0]).view(1, 1, 1, 2)
    r2 = _t([2, 40]).view(1, 1, 1, 2)
    assert bounded_scale(f, r2, m1, _t([2.0])).item() == pytest.approx(2.0, abs=1e-6)
    # groups: slices 0 and 1 share a scale (2 + 4) / (1 + 1) = 3; slice 2 alone: 5
    fb = torch.ones(3, 1, 1, 1)
    rb = _t([2, 4, 5]).view(3, 1, 1, 1)
    ref = _t([3, 3, 5])
    a = bounded_scale(fb, rb, torch.ones_like(fb), ref, groups=torch.tensor([7, 7, 2]))
    np.testing.assert_allclose(a.flatten().numpy(), [3, 3, 5], atol=1e-6)
    a = bounded_scale(fb, rb, torch.ones_like(fb), ref, groups=None)
    np.testing.assert_allclose(a.flatten().numpy(), [2.4, 3.6, 5], atol=1e-6)
    # the gradient flows through the scale (not detached), as in the published training
    fg = f.clone().requires_grad_(True)
    bounded_scale(fg, r, m, _t([1.9])).sum().backward()
    assert fg.grad is not None and torch.any(fg.grad != 0)


@pytest.mark.parametrize("proto", [
    T1W, T2W, FLAIR,
    physics.Protocol("flair", 9000.0, 120.0, ti_ms=2500.0),  # 2D FLAIR: short-TE factor 0.89
    physics.Protocol("irgre", 2000.0, 3.0, ti_ms=1000.0, fa_deg=8.0),
    physics.Protocol("se", 500.0, 14.0, fa_deg=90.0),
    physics.Protocol("tse", 4000.0, 90.0, te_correction=1.0),
])
def test_batched_synthesis_is_physics_signal(proto):
    rng = np.random.default_rng(0)
    pd, t1, t2 = rng.uniform(0.5, 1, (4, 4)), rng.uniform(0.5, 4, (4, 4)), rng.uniform(
        0.04, 2, (4, 4))
    maps = torch.from_numpy(np.stack([pd, t1, t2])[None]).float()
    row = torch.tensor([protocol_row(proto)])
    got = synthesise(maps, row)[0, 0].double().numpy()
    want = physics.signal(proto, pd, t1, t2)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert row[0, 2].item() == pytest.approx(proto.te_ms * proto.te_factor, rel=1e-6)
    assert row[0, 5].item() == pytest.approx(1 / physics.wm_reference_signal(proto), rel=1e-6)


def test_mixed_sequences_in_one_batch():
    protos = [T1W, physics.Protocol("irgre", 2000.0, 3.0, ti_ms=1000.0, fa_deg=8.0)]
    maps = torch.tensor([0.7, 0.85, 0.07]).view(1, 3, 1, 1).repeat(2, 1, 2, 2)
    rows = torch.tensor([protocol_row(p) for p in protos])
    got = synthesise(maps, rows)
    for i, p in enumerate(protos):
        assert got[i].mean().item() == pytest.approx(physics.wm_reference_signal(p), rel=1e-5)


def test_physics_loss_by_hand():
    """Reference WM maps against mode-normalised inputs: L1 = 0 when the input is within the
    ±20 % bound of the reference scale, and exactly the clamped residual outside it."""
    b, h, w = 2, 4, 4
    maps = torch.tensor([0.70, 0.85, 0.070]).view(1, 3, 1, 1).repeat(b, 1, h, w)
    head = torch.ones(b, 1, h, w, dtype=torch.bool)
    rows = torch.tensor([[protocol_row(p) for p in (T1W, T2W, FLAIR)]] * b)
    groups = torch.tensor([0, 1])
    for level, l1 in ((1.0, 0.0), (1.1, 0.0), (0.85, 0.0), (1.5, 0.3), (0.5, 0.3)):
        images = torch.full((b, 3, h, w), level)
        loss, parts = physics_loss(maps, images, head, rows, groups, LossWeights())
        assert parts["l1"] == pytest.approx(l1, abs=2e-6), level
        assert parts["pd_hinge"] == 0.0
        assert parts["tv"] == pytest.approx(0.0, abs=2e-6)
        assert loss.item() == pytest.approx(l1, abs=3e-6)
    # PD below the threshold everywhere: hinge 0.1, weighted 0.1 -> +0.01 on top of L1
    maps_pd = maps.clone()
    maps_pd[:, 0] = 0.5
    images = torch.ones(b, 3, h, w)
    loss, parts = physics_loss(maps_pd, images, head, rows, groups, LossWeights())
    assert parts["pd_hinge"] == pytest.approx(0.1, abs=1e-6)
    assert loss.item() == pytest.approx(parts["l1"] + 0.01 * parts["tv"] + 0.1 * 0.1, abs=1e-6)
    # background outside the head never enters: a huge value there changes nothing
    head2 = head.clone()
    head2[..., 0, 0] = False
    images = torch.ones(b, 3, h, w)
    images[..., 0, 0] = 1000.0
    _, parts = physics_loss(maps, images, head2, rows, groups, LossWeights())
    assert parts["l1"] == pytest.approx(0.0, abs=2e-6)


# ---------------------------------------------------------------------------------------------
# mode normalisation, by hand
# ---------------------------------------------------------------------------------------------


def test_histogram_mode_by_hand():
    # 10 × 1, 50 × 5, 20 × 7, 5 × 100: the 35th percentile is 5 and the 95th is
    # 7 + 0.8·93 = 81.4 (linear interpolation at rank 0.95·84 = 79.8), so the 1s and the
    # 100s are outside the window; 512 bins over [5, 81.4] -> the mode is the first bin,
    # centre 5 + 76.4 / 1024.
    v = np.array([1.0] * 10 + [5.0] * 50 + [7.0] * 20 + [100.0] * 5)
    assert histogram_mode(v, (35, 95)) == pytest.approx(5 + 76.4 / 1024, rel=1e-12)
    # no window: bins over [1, 100], width 99/512; 5 falls in bin floor(4/(99/512)) = 20
    width = 99 / 512
    assert histogram_mode(v) == pytest.approx(1 + 20.5 * width, rel=1e-12)


def test_mode_normalise_uses_the_head_only():
    rng = np.random.default_rng(1)
    img = np.zeros((40, 40, 3), np.float32)  # background air: many zeros
    head = np.zeros_like(img, bool)
    head[5:35, 5:35] = True
    vals = np.concatenate([np.full(1200, 200.0), rng.uniform(50, 400, head.sum() - 1200)])
    rng.shuffle(vals)
    img[head] = vals
    norm, mode = mode_normalise(img, head, "T2w")
    lo, hi = np.percentile(vals, (35, 95))
    edges = np.linspace(lo, hi, 513)
    k = np.searchsorted(edges, 200.0, side="right") - 1
    assert mode == pytest.approx(0.5 * (edges[k] + edges[k + 1]), rel=1e-9)
    np.testing.assert_allclose(norm, img / np.float32(mode), rtol=1e-6)
    # more background does not move it
    img2 = np.zeros((80, 80, 3), np.float32)
    head2 = np.zeros_like(img2, bool)
    img2[:40, :40], head2[:40, :40] = img, head
    assert mode_normalise(img2, head2, "T2w")[1] == mode
    with pytest.raises(InputError, match="empty head mask"):
        mode_normalise(img, np.zeros_like(head), "T2w")
    with pytest.raises(InputError, match="histogram mode"):
        mode_normalise(np.zeros_like(img), head, "T1w")


# ---------------------------------------------------------------------------------------------
# contrast dropout
# ---------------------------------------------------------------------------------------------


def test_contrast_dropout():
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert sorted(contrast_dropout(rng, 3, p=0.0)) == [0, 1, 2]
        kept = contrast_dropout(rng, 3, p=1.0)
        assert len(kept) == 2 and len(set(kept)) == 2
    # the documented draws: random() < p decides, integers(3) picks the dropped contrast
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        u = rng_b.random()
        expect = [0, 1, 2]
        if u < 0.5:
            expect.pop(int(rng_b.integers(3)))
        expect = [expect[i] for i in rng_b.permutation(len(expect))]
        assert contrast_dropout(rng_a, 3, 0.5) == expect
    # frequencies: one contrast withheld in ~50 % of batches, each contrast equally often
    rng = np.random.default_rng(123)
    n = 6000
    dropped = Counter()
    n_drop = 0
    orders = Counter()
    for _ in range(n):
        kept = contrast_dropout(rng, 3, 0.5)
        orders[tuple(kept)] += 1
        if len(kept) == 2:
            n_drop += 1
            dropped[({0, 1, 2} - set(kept)).pop()] += 1
    assert abs(n_drop / n - 0.5) < 0.025
    for c in range(3):
        assert abs(dropped[c] / n_drop - 1 / 3) < 0.03
    assert len([o for o in orders if len(o) == 3]) == 6  # input order is shuffled
    assert contrast_dropout(rng, 1, p=1.0) == [0]  # never drops the only contrast
    with pytest.raises(InputError):
        contrast_dropout(rng, 3, p=1.5)


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------


def published_state_dict(width: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict in the published ``SharedAttnUNet`` key layout, built from the layout
    description alone (not from qmriflow's modules)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, *shape: int) -> None:
        sd[f"{key}.weight"] = torch.randn(*shape, generator=g) * 0.05
        sd[f"{key}.bias"] = torch.randn(shape[0] if len(shape) != 4 or "upconv" not in key
                                        else shape[1], generator=g) * 0.01

    def norm(key: str, c: int) -> None:
        sd[f"{key}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{key}.bias"] = 0.1 * torch.randn(c, generator=g)

    ch = [width, 2 * width, 4 * width]
    for i, (cin, c) in enumerate(zip([1, *ch[:2]], ch, strict=True)):
        rb = f"enc_blocks.{i}.residual_block"
        put(f"{rb}.conv1", c, cin, 3, 3)
        norm(f"{rb}.bn1", c)
        put(f"{rb}.conv2", c, c, 3, 3)
        norm(f"{rb}.bn2", c)
        put(f"{rb}.residual_connection", c, cin, 1, 1)
        put(f"enc_blocks.{i}.strided_conv", c, c, 3, 3)
    deep = 8 * width
    put("bottleneck.0", deep, 4 * width, 3, 3)
    norm("bottleneck.1", deep)
    put("bottleneck.3", deep, deep, 3, 3)
    norm("bottleneck.4", deep)
    for i, c in enumerate(ch):
        put(f"skip_fusers.{i}.mlp.0", max(c // 16, 4), c)
        put(f"skip_fusers.{i}.mlp.2", c, max(c // 16, 4))
    put("bottleneck_fuser.mlp.0", max(deep // 16, 4), deep)
    put("bottleneck_fuser.mlp.2", deep, max(deep // 16, 4))
    dec = [deep, 4 * width, 2 * width, width]
    for i in range(3):
        cin, c = dec[i], dec[i + 1]
        put(f"dec_blocks.{i}.upconv", cin, c, 2, 2)
        put(f"dec_blocks.{i}.conv.0", c, 2 * c, 3, 3)
        norm(f"dec_blocks.{i}.conv.1", c)
        put(f"dec_blocks.{i}.conv.3", c, c, 3, 3)
        norm(f"dec_blocks.{i}.conv.4", c)
    put("output_layer.0", 3, width, 1, 1)
    return sd


def test_parameter_count_and_published_layout():
    model = SharedAttnUNet(64)
    n = count_parameters(model)
    assert n == 8_562_559
    assert f"{n:,}".startswith("8,56")
    sd = published_state_dict(64)
    assert len(sd) == 92
    assert sum(v.numel() for v in sd.values()) == n
    mine = model.state_dict()
    assert set(mine) == set(sd)
    assert all(tuple(mine[k].shape) == tuple(v.shape) for k, v in sd.items())
    # InstanceNorm without running statistics: no buffers in the state_dict
    assert not any("running" in k for k in mine)
    assert count_parameters(SharedAttnUNet(8)) < 200_000


def test_published_checkpoint_loads_strictly(tmp_path):
    sd = published_state_dict(64, seed=3)
    path = tmp_path / "published.pth"
    torch.save(sd, path)  # plain state_dict, as published
    model, meta = load_model(path)
    assert meta["width"] == 64 and len(meta["sha256"]) == 64
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # DataParallel's "module." prefix is accepted too
    torch.save({f"module.{k}": v for k, v in published_state_dict(8).items()},
               tmp_path / "dp.pth")
    assert load_model(tmp_path / "dp.pth")[1]["width"] == 8


def test_forward_any_subset_any_order():
    torch.manual_seed(0)
    model = SharedAttnUNet(8).eval()
    x = torch.rand(2, 3, 32, 40) * 2
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 3, 32, 40)
        for perm in ([2, 0, 1], [1, 2, 0], [0, 2, 1]):
            torch.testing.assert_close(model(x[:, perm]), y, rtol=1e-5, atol=1e-5)
        for subset in ([0], [1], [2], [0, 1], [1, 2], [0, 2]):
            ys = model(x[:, subset])
            torch.testing.assert_close(model(x[:, subset[::-1]]), ys, rtol=1e-5, atol=1e-5)
            assert torch.isfinite(ys).all()
        # ranges: PD [0, 1], T1 [0, 5] s, T2 [0, 3] s
        assert 0 <= y[:, 0].min() and y[:, 0].max() <= 1
        assert y[:, 1].max() <= 5 and y[:, 2].max() <= 3
        # a mask zeroes the maps outside it
        mask = torch.zeros(2, 1, 32, 40)
        mask[..., 8:24, 8:24] = 1
        ym = model(x, mask)
        assert ym[..., :8, :].abs().max() == 0
        torch.testing.assert_close(ym[..., 8:24, 8:24], y[..., 8:24, 8:24])
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError):
        model(torch.rand(1, 0, 32, 32))


def test_channels_last_only_where_it_pays_and_same_maps():
    from qmriflow.model.infer import channels_last_pays, predict_maps

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert channels_last_pays(cuda, "fp32") and channels_last_pays(cuda, "bf16")
    assert channels_last_pays(cpu, "bf16") and not channels_last_pays(cpu, "fp32")
    torch.manual_seed(0)
    model = SharedAttnUNet(8).eval()
    x = np.random.default_rng(0).uniform(0, 2, (3, 3, 30, 36)).astype(np.float32)
    ref = predict_maps(model, x, device=cpu, precision="fp32", batch_size=2)
    model.use_channels_last(True)
    y = predict_maps(model, x, device=cpu, precision="fp32", batch_size=2)
    assert y.shape == (3, 3, 30, 36)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# checkpoint errors: never random weights
# ---------------------------------------------------------------------------------------------


def _one_line(exc: BaseException, path: Path) -> str:
    msg = str(exc)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_checkpoint_errors(tmp_path):
    good = tmp_path / "model.pt"
    model = SharedAttnUNet(8)
    save_checkpoint(good, {"format": FORMAT, "width": 8, "state_dict": model.state_dict(),
                           "epoch": 3})
    _, meta = load_model(good)
    assert meta["epoch"] == 3 and meta["width"] == 8

    missing = tmp_path / "nope.pt"
    with pytest.raises(InputError, match="not found") as ei:
        load_model(missing)
    _one_line(ei.value, missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(InputError, match="corrupt") as ei:
        load_model(garbage)
    _one_line(ei.value, garbage)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt") as ei:
        load_model(truncated)
    _one_line(ei.value, truncated)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_model(empty)

    sd = published_state_dict(8)
    del sd["dec_blocks.1.conv.3.weight"]
    partial = tmp_path / "partial.pt"
    torch.save(sd, partial)
    with pytest.raises(InputError, match=r"incompatible.*dec_blocks\.1\.conv\.3\.weight") as ei:
        load_model(partial)
    _one_line(ei.value, partial)

    sd = published_state_dict(8)
    sd["extra.weight"] = torch.zeros(1)
    extra = tmp_path / "extra.pt"
    torch.save(sd, extra)
    with pytest.raises(InputError, match="incompatible"):
        load_model(extra)

    sd = published_state_dict(8)
    sd["enc_blocks.1.strided_conv.weight"] = torch.zeros(16, 16, 5, 5)
    shape = tmp_path / "shape.pt"
    torch.save(sd, shape)
    with pytest.raises(InputError, match="incompatible"):
        load_model(shape)

    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(InputError, match="incompatible"):
        load_model(other)

    lst = tmp_path / "list.pt"
    torch.save([1, 2, 3], lst)
    with pytest.raises(InputError, match="not a state_dict"):
        load_model(lst)

    sd = published_state_dict(8)
    sd["output_layer.0.bias"] = torch.tensor([math.nan, 0.0, 0.0])
    nan = tmp_path / "nan.pt"
    torch.save(sd, nan)
    with pytest.raises(InputError, match="NaN"):
        load_model(nan)


# ---------------------------------------------------------------------------------------------
# subject-level split
# ---------------------------------------------------------------------------------------------


def test_split_subject_level_deterministic():
    subjects = [f"s{i:03d}" for i in range(100)]
    a = split_subjects(subjects * 3, seed=4)  # every subject with three sessions
    assert set(a) == set(subjects)
    counts = Counter(a.values())
    assert counts == {"train": 80, "val": 5, "test": 15}
    assert split_subjects(reversed(subjects), seed=4) == a
    assert split_subjects(subjects, seed=5) != a
    small = split_subjects(["x", "y", "z", "w"], seed=0)
    assert Counter(small.values()) == {"train": 2, "val": 1, "test": 1}
    assert Counter(split_subjects(["x", "y"], seed=0).values()) == {"train": 2}
    with pytest.raises(InputError):
        split_subjects(subjects, fractions=(0.8, 0.1, 0.2))
