"""bench/bench_yardstick.py: its metrics on hand-computed data, its tables on a tiny fake
report, and its one-line refusal of bad options (fast: no phantom, no training)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qmriflow.errors import InputError
from qmriflow.stats.metrics import group_centred, slope_r

from .conftest import REPO, load_script

BENCH = REPO / "bench" / "bench_yardstick.py"


by = load_script(BENCH, "bench_yardstick")

# ---------------------------------------------------------------------------------------------
# generic metrics (qmriflow.stats.metrics)
# ---------------------------------------------------------------------------------------------


def test_slope_r_by_hand() -> None:
    x = [1.0, 2.0, 3.0, 4.0]
    assert slope_r(x, x) == pytest.approx((1.0, 1.0))
    assert slope_r(x, [2.0 * v + 1.0 for v in x]) == pytest.approx((2.0, 1.0))
    # y = 3, 1, 4, 2: Sxy = (-1.5)(0.5) + (-0.5)(-1.5) + (0.5)(1.5) + (1.5)(-0.5) = 0
    s, r = slope_r(x, [3.0, 1.0, 4.0, 2.0])
    assert s == pytest.approx(0.0) and r == pytest.approx(0.0)
    # y = 1, 3, 2, 4: Sxy = 4, Sxx = 5, Syy = 5 -> slope 0.8, r 0.8
    assert slope_r(x, [1.0, 3.0, 2.0, 4.0]) == pytest.approx((0.8, 0.8))
    s, r = slope_r(x, [5.0] * 4)  # a constant estimate: slope 0, r undefined
    assert s == 0.0 and math.isnan(r)
    s, r = slope_r([0.9, 1.0, 1.1, 1.2, 1.3, 1.4], [1.35] * 6)  # mean(1.35 × 6) != 1.35
    assert s == 0.0 and math.isnan(r)
    assert all(math.isnan(v) for v in slope_r([2.0, 2.0], [1.0, 3.0]))
    with pytest.raises(InputError, match="at least 2"):
        slope_r([1.0], [1.0])
    with pytest.raises(InputError, match="non-finite"):
        slope_r([1.0, float("nan")], [1.0, 2.0])


def test_group_centred_removes_each_groups_mean() -> None:
    out = group_centred([1.0, 3.0, 10.0, 14.0, 7.0], ["a", "a", "b", "b", "c"])
    assert out == pytest.approx([-1.0, 1.0, -2.0, 2.0, 0.0])
    with pytest.raises(InputError, match="group labels"):
        group_centred([1.0, 2.0], ["a"])


# ---------------------------------------------------------------------------------------------
# the bench's metrics on synthetic session rows
# ---------------------------------------------------------------------------------------------

BASE = {"WM": {"T1": 1.0, "T2": 0.07, "PD": 0.7}, "GM": {"T1": 1.6, "T2": 0.1, "PD": 0.8}}


def _rows(estimate, n_subjects: int = 8, sessions: int = 2,
          clusters: int = 2) -> list[dict[str, Any]]:
    """Rows of subjects whose true values are BASE × g (g spread over ±20 %, T1 and T2 by
    the subject's factor, PD by its own), estimated by ``estimate(true, tissue, param)``."""
    rows = []
    gs = np.linspace(0.8, 1.2, n_subjects)
    for i, g in enumerate(gs):
        g2 = float(gs[n_subjects - 1 - i])  # another order for T2
        for j in range(sessions):
            true = {t: {"T1": BASE[t]["T1"] * g, "T2": BASE[t]["T2"] * g2,
                        "PD": BASE[t]["PD"] * (1.0 + 0.01 * i)} for t in BASE}
            est = {t: {p: estimate(true[t][p], t, p) for p in true[t]} for t in true}
            rows.append({"subject": f"S{i + 1:03d}", "session": f"V{j + 1:02d}",
                         "cluster": (i * sessions + j) % clusters, "seed": 0,
                         "global_factor": {"T1": float(g), "T2": g2},
                         "true": true, "estimated": est})
    return rows


def test_perfect_estimates_give_slope_one_and_no_error() -> None:
    rows = _rows(lambda v, t, p: v)
    for t in ("WM", "GM"):
        for p in ("T1", "T2", "PD"):
            assert by.between_slope(rows, t, p) == pytest.approx((1.0, 1.0))
            assert by.within_cluster_slope(rows, t, p) == pytest.approx((1.0, 1.0))
            e = by.error_summary(rows, t, p)
            assert e["rms"] == pytest.approx(0.0, abs=1e-9)
            assert e["max_abs"] == pytest.approx(0.0, abs=1e-9)
    for p in ("T1", "T2"):
        rs = by.recovered_shift(rows, p)
        assert rs["slope"] == pytest.approx(1.0) and rs["r"] == pytest.approx(1.0)
        assert rs["n_subjects"] == 8 and rs["se"] == pytest.approx(0.0, abs=1e-9)


def test_constant_estimate_gives_slope_zero() -> None:
    rows = _rows(lambda v, t, p: BASE[t][p])
    s, r = by.between_slope(rows, "WM", "T1")
    assert s == pytest.approx(0.0) and math.isnan(r)
    s, r = by.within_cluster_slope(rows, "GM", "T1")
    assert s == 0.0 and math.isnan(r)
    # one session per cluster: nothing varies within a cluster
    single = _rows(lambda v, t, p: v, n_subjects=3, sessions=1, clusters=3)
    assert all(math.isnan(v) for v in by.within_cluster_slope(single, "WM", "T1"))
    rs = by.recovered_shift(rows, "T1")
    # log(c / (c g)) + log g = 0 for every subject: nothing recovered
    assert rs["slope"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.7, 1.0])
def test_recovered_shift_is_beta_for_a_partial_estimator(beta: float) -> None:
    """est = c^(1−β)·true^β recovers the fraction β of the brain-wide shift."""
    c = {"WM": {"T1": 0.85, "T2": 0.07}, "GM": {"T1": 1.35, "T2": 0.09}}
    rows = _rows(lambda v, t, p: c[t][p] ** (1 - beta) * v ** beta if p != "PD" else v)
    for p in ("T1", "T2"):
        rs = by.recovered_shift(rows, p)
        assert rs["slope"] == pytest.approx(beta, abs=1e-9)
        if 0 < beta:
            assert rs["r"] == pytest.approx(1.0)


def test_within_cluster_removes_cluster_offsets() -> None:
    """A cluster-wide offset (a protocol bias) spoils the slope over all sessions but not the
    slope within clusters, which sees only the variation each cluster's mean cannot explain."""
    rows = _rows(lambda v, t, p: v, n_subjects=8, sessions=1, clusters=2)
    for r in rows:  # cluster 1 reads everything 50 % high, and its subjects are the high ones
        r["cluster"] = int(r["global_factor"]["T1"] > 1.0)
        r["estimated"] = {t: {p: v * (1.5 if r["cluster"] else 1.0) for p, v in d.items()}
                          for t, d in r["estimated"].items()}
    s_all, _ = by.between_slope(rows, "WM", "T1")
    assert s_all > 1.5
    s_in, r_in = by.within_cluster_slope(rows, "WM", "T1")
    # within cluster 0 slope 1, within cluster 1 slope 1.5; equal x spread -> pooled 1.25
    assert s_in == pytest.approx(1.25) and r_in > 0.95


def test_slope_standard_error_by_hand() -> None:
    # x = 0..3, y = 0, 2, 1, 3: Sxx 5, Sxy 4 -> slope 0.8; fitted 0.3, 1.1, 1.9, 2.7;
    # residuals -0.3, 0.9, -0.9, 0.3 -> Σ² 1.8; SE = sqrt(1.8 / (4 - 2) / 5)
    se = by.slope_se([0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0])
    assert se == pytest.approx(math.sqrt(1.8 / 2 / 5.0))
    assert math.isnan(by.slope_se([0.0, 1.0], [0.0, 1.0]))


def test_twin_differences_and_seed_spread() -> None:
    rows = _rows(lambda v, t, p: v, n_subjects=2, sessions=2)
    rows[1]["estimated"]["WM"]["T1"] *= 1.1  # S001 V02 reads 10 % high
    d = by.twin_mean_diffs(rows, "WM", "T1")
    assert sorted(d) == pytest.approx([0.0, 200 * 0.1 / 2.1])
    assert by.seed_spread(rows, "WM", "T1") == []  # one seed only
    other = [{**r, "seed": 1, "estimated": {t: {p: v * 1.02 for p, v in dd.items()}
                                            for t, dd in r["estimated"].items()}} for r in rows]
    spread = by.seed_spread(rows + other, "WM", "T1")
    assert len(spread) == 4
    assert max(spread) == pytest.approx(100 * 0.02 / 1.01)


def test_maps_on_record_are_reused_only_with_the_same_model_error(tmp_path: Path) -> None:
    import json

    t1 = tmp_path / "x_T1map.nii.gz"
    side = tmp_path / "x_T1map.json"

    def check(unc: dict | None, requested: dict) -> bool:
        side.write_text(json.dumps({"Scaling": {"pinning": {"uncertainty": unc}}}
                                   if unc is not None else {"Scaling": None}))
        return by.same_model_error(t1, requested)

    from qmriflow.model.calibration import DEFAULT_MODEL_ERROR, DEFAULT_MODEL_ERROR_CLUSTER

    cluster = "scales from a protocol cluster (model_error_cluster)"
    alone = "scales from the session alone (model_error)"
    assert check(None, {"model_error": 0.5})  # no uncertainty maps: nothing to redo
    # made before the sidecar said which error applied
    assert not check({"model_error_log_sd": DEFAULT_MODEL_ERROR}, {})
    # nothing requested: the package's defaults
    assert check({"model_error_log_sd": DEFAULT_MODEL_ERROR_CLUSTER,
                  "model_error_for": cluster}, {})
    assert check({"model_error_log_sd": DEFAULT_MODEL_ERROR, "model_error_for": alone}, {})
    # requested: only the kind that applied counts
    assert check({"model_error_log_sd": 0.03, "model_error_for": cluster},
                 {"model_error_cluster": 0.03, "model_error": 0.2})
    assert not check({"model_error_log_sd": 0.03, "model_error_for": cluster},
                     {"model_error_cluster": 0.05})
    assert check({"model_error_log_sd": 0.2, "model_error_for": alone},
                 {"model_error": 0.2, "model_error_cluster": 0.05})
    assert not check({"model_error_log_sd": 0.2, "model_error_for": alone},
                     {"model_error": 0.1})


def test_resample_world_identity_and_shift() -> None:
    data = np.arange(4 * 5 * 3, dtype=float).reshape(4, 5, 3)
    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    same, inside = by.resample_world(data, aff, aff, data.shape)
    assert np.array_equal(same, data) and inside.all()
    move = np.eye(4)
    move[0, 3] = 2.0  # a grid point x is at x + 2 mm (one voxel) in the source
    shifted, inside = by.resample_world(data, aff, aff, data.shape, move)
    assert np.array_equal(shifted[:-1], data[1:]) and not inside[-1].any()
    nearest, _ = by.resample_world(data, aff, aff @ np.diag([0.5, 1, 1, 1]), (7, 5, 3),
                                   order=0)
    assert nearest[2, 1, 1] == data[1, 1, 1]


def test_twin_voxels_follow_the_true_rigid_transform(tmp_path: Path) -> None:
    """Two sessions of one head in different poses: maps sampled from the same function of
    subject coordinates agree exactly once the second is resampled through P2·P1⁻¹."""
    import nibabel as nib

    from qmriflow.phantom.generate import rigid

    def f(subject_xyz: np.ndarray, p: str) -> np.ndarray:  # smooth, positive, linear
        k = {"T1": 1.0, "T2": 0.5, "PD": 0.2}[p]
        return 1.0 + k * (0.01 * subject_xyz[0] + 0.02 * subject_xyz[1] - 0.005 * subject_xyz[2])

    shape = (20, 20, 8)
    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    aff[:3, 3] = [-20.0, -20.0, -16.0]
    poses = [rigid((2.0, -3.0, 5.0), (1.0, 2.0, -1.0), np.zeros(3)),
             rigid((-4.0, 1.0, -2.0), (-2.0, 0.5, 3.0), np.zeros(3))]
    ijk = np.indices(shape, dtype=float).reshape(3, -1)
    world = aff[:3, :3] @ ijk + aff[:3, 3:4]
    sessions, maps = [], []
    for i, pose in enumerate(poses):
        subj = (np.linalg.inv(pose) @ np.vstack([world, np.ones(world.shape[1])]))[:3]
        paths = {}
        for p, key in by.MAP_KEY.items():
            paths[key] = tmp_path / f"s{i}_{key}.nii.gz"
            nib.save(nib.Nifti1Image(f(subj, p).reshape(shape).astype(np.float32), aff),
                     paths[key])
        maps.append(paths)
        sessions.append(by.Session("S001", f"V0{i + 1}", f"sub-a_ses-{i}", tmp_path, 0,
                                   {"head_pose": pose.tolist()}))
    mask = np.zeros(shape, bool)
    mask[4:16, 4:16, 2:6] = True
    masks = {"WM": mask, "GM": np.zeros(shape, bool)}
    tw = by.twin_voxels(sessions[0], sessions[1], maps[0], maps[1], masks)
    assert tw["n_voxels"] > 100
    for p in by.PARAMS:
        assert tw["r"][p] > 0.9999 and tw["ccc"][p] > 0.9999
    # the other direction is not the same head position: clearly worse
    wrong = by.twin_voxels(sessions[1], sessions[0], maps[0], maps[1], masks)
    assert wrong["ccc"]["T1"] < 0.99


# ---------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------


def _report(segmentation: str = "pipeline") -> dict[str, Any]:
    good = _rows(lambda v, t, p: v * 1.02, n_subjects=3, sessions=2)
    prior = _rows(lambda v, t, p: BASE[t][p], n_subjects=3, sessions=2)
    for r in good:
        r["uncertainty"] = {t: {p: 0.01 * v for p, v in d.items()}
                            for t, d in r["estimated"].items()}
    twins = [{"subject": "S001", "sessions": ["V01", "V02"], "seed": 0, "n_voxels": 900,
              "r": {"T1": 0.98, "T2": 0.97, "PD": 0.9},
              "ccc": {"T1": 0.96, "T2": 0.95, "PD": 0.85}}]
    return {"settings": {"phantom_seed": 4242, "subjects": 3, "sessions": 2, "clusters": 2,
                         "tissue_range": 0.2, "global_shift": 0.1, "gain_model": "protocol",
                         "gain_jitter": 0.03, "mismatch": "on", "segmentation": segmentation,
                         "methods": ["calibrated"], "seeds": [0], "quick": True, "epochs": 6,
                         "default_method": "calibrated", "tissue_table": "independent"},
            "twins_truth": [{**twins[0], "r": {"T1": 0.95, "T2": 0.94, "PD": 0.93}}],
            "methods": {"calibrated": {"sessions": good, "twins": twins},
                        "prior": {"baseline": True, "sessions": prior}}}


def test_tables_from_a_tiny_report() -> None:
    text = by.render_tables(_report())
    titles = [x for x in text.splitlines() if x.startswith("#")]
    assert len(titles) >= 7  # heading, T1, T2, PD, shift, twins, uncertainty
    for t in titles:
        assert "phantom seed 4242" in t and "gain model protocol" in t
        assert "pipeline segmentation" in t and "mismatch on" in t
    t1 = text.split("### T1")[1].split("###")[0]
    cal = next(x for x in t1.splitlines() if x.startswith("| calibrated (default) |"))
    assert "+2.0 ± 0.0" in cal and "| 1.02 (1.00) |" in cal
    pri = next(x for x in t1.splitlines() if x.startswith("| prior (baseline) |"))
    assert "0.00 (—)" in pri  # a constant: slope 0, r undefined
    shift = text.split("brain-wide shift")[1].split("###")[0]
    assert "| calibrated | 1.00 ± 0.00 (1.00) | 1.00 ± 0.00 (1.00) | 3 |" in shift
    prior_shift = next(x for x in shift.splitlines() if x.startswith("| prior |"))
    assert prior_shift.split("|")[2].strip().split()[0] in ("0.00", "-0.00")
    twins = text.split("Protocol twins")[1].split("###")[0]
    assert "0.980 / 0.980" in twins
    ceiling = next(x for x in twins.splitlines() if x.startswith("| truth maps (ceiling) |"))
    assert "| 0.950 / 0.950 | 0.960 / 0.960 |" in ceiling
    assert ceiling.split("|")[2].strip() == "0.00 / 0.00"  # the true means of twins are equal
    assert "Seed spread" not in text  # one seed
    unc = text.split("Reported uncertainty")[1]
    # error +2 % against a stated SD of 1 %: no session is covered
    assert "| calibrated | 2.0 / 1.0 / 0 % |" in unc
    truth = by.render_tables(_report("truth"))
    assert all("TRUTH SEGMENTATION" in x for x in truth.splitlines() if x.startswith("#"))


# ---------------------------------------------------------------------------------------------
# bad options: exit 2, one line on stderr, nothing done
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["--gain-model", "foo"], "argument --gain-model: invalid choice: 'foo'"),
    (["--mismatch", "maybe"], "argument --mismatch: invalid choice: 'maybe'"),
    (["--subjects", "0"], "argument --subjects: must be >= 1, got 0"),
    (["--sessions", "0"], "argument --sessions: must be >= 1"),
    (["--clusters", "0"], "argument --clusters: must be >= 1"),
    (["--tissue-range", "0.5"], "argument --tissue-range: must be in [0, 0.5)"),
    (["--global-shift", "-0.1"], "argument --global-shift: must be in [0, 0.5)"),
    (["--methods", "magic"], "argument --methods: invalid choice: 'magic'"),
    (["--model-error-cluster", "-0.01"], "argument --model-error-cluster: must be >= 0"),
])
def test_bad_options_exit_2_with_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    work = tmp_path / "work"
    res = subprocess.run([sys.executable, str(BENCH), str(work), "--phantom-seed", "3", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("bench_yardstick: error: ") and needle in lines[0]
    assert not work.exists()


def test_negative_or_missing_phantom_seed(tmp_path: Path) -> None:
    for args in (["--phantom-seed", "-1"], []):
        res = subprocess.run([sys.executable, str(BENCH), str(tmp_path / "w"), *args],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
        assert "--phantom-seed" in res.stderr
    assert not (tmp_path / "w").exists()


def test_options_are_checked_before_heavy_imports() -> None:
    code = "\n".join([
        "import sys",
        f"sys.path.insert(0, {str(REPO / 'bench')!r})",
        "import bench_yardstick as b",
        "try:",
        "    b.parse_args(['w', '--phantom-seed', '1', '--subjects', '0'])",
        "except SystemExit as e:",
        "    assert e.code == 2",
        "print(sorted({'numpy', 'torch', 'nibabel', 'qmriflow', 'scipy'} & set(sys.modules)))",
    ])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    a = by.parse_args(["w", "--phantom-seed", "7", "--methods", "network-only", "seed"])
    assert a.methods == ["seed", "network-only"] and a.seeds == [0]
    assert a.gain_model == "protocol" and a.mismatch == "on" and a.clusters == 1
