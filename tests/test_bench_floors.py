"""bench/bench_calibration_floor.py and bench/bench_cluster_floor.py: they run (the first had
stopped running unnoticed after the calibration package split) and their best case is what
the accuracy page says it is (fast: a few clusters, no images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .conftest import REPO, load_script

calfloor = load_script(REPO / "bench" / "bench_calibration_floor.py", "bench_calibration_floor")
clfloor = load_script(REPO / "bench" / "bench_cluster_floor.py", "bench_cluster_floor")


def test_mode_normalise_brings_each_contrast_to_its_brighter_tissue() -> None:
    med = {"WM": {"T1w": 0.03, "T2w": 40.0}, "GM": {"T1w": 0.02, "T2w": 50.0},
           "CSF": {"T1w": 0.006, "T2w": 100.0}}
    logs = calfloor.mode_normalise(med)
    assert med["WM"]["T1w"] == 1.0 and med["GM"]["T2w"] == 1.0
    assert abs(med["CSF"]["T1w"] - 0.2) < 1e-12
    assert abs(logs["T2w"] - np.log(50.0)) < 1e-12


def test_calibration_floor_runs_and_is_near_exact_for_subjects_near_the_literature() -> None:
    r = calfloor.run(draws=20, spread=0.05, csf_exact=True, log_sd=None, csf_sd=None,
                     use_csf_flair=False, seed=3)
    assert max(r["rms"]) < 4.0  # % (300 draws: 1.5-2.4 %)
    assert r["share_ok"] >= 0.85


def test_cluster_floor_without_jitter_keeps_the_subjects_differences(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    assert clfloor.main(["--clusters", "2", "--sizes", "6", "--jitters", "0",
                         "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    cl = rows["cluster"]
    for k, (slope, r) in cl["pooled_slope_r"].items():
        assert 0.8 < slope < 1.2 and r > 0.9, (k, slope, r)
    assert cl["share_sessions_ok"] >= 0.8
    # the baselines: a prior has no slope, a session alone only part of it
    assert all(s == 0.0 for s, _ in rows["prior"]["pooled_slope_r"].values())
    assert rows["per-session"]["pooled_slope_r"]["WM T1"][0] < 0.6
    assert rows["prior"]["twin_share_ok"] == 1.0  # twins agree trivially: why twins alone
    assert rows["prior"]["share_sessions_ok"] == 0.0  # ... do not measure
