"""bench/gpu_check.py (issue 27) as a smoke test of its code paths: without CUDA every GPU row
is skipped with a reason and the same functions run on the CPU at tiny sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from qmriflow.model.calibration import DEFAULT_METHOD

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
SECTIONS = ("environment", "inference", "training", "archive", "data", "cse_fit",
            "inference_compile", "cse_dual")
SMOKE_FIGURE = {  # section -> (row name prefix, metric) that the tiny run must measure
    "environment": ("matmul", "tflops"),
    "inference": ("inference bf16", "slices_per_s"),
    "training": ("training step", "slices_per_s"),
    "archive": ("archive 3 sessions", "gpu_seconds"),
    "data": ("loader: train.py path", "slices_per_s"),
    "cse_fit": ("cse two-start fit", "voxels_per_s"),
    "cse_dual": ("cse dual network", "train_plus_infer_s"),
}


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None
         ) -> tuple[subprocess.CompletedProcess, dict[str, Any], str]:
    out = tmp_path / "out"
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out), *args],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    info = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert (out / "gpu_check.json").is_file(), info
    return proc, json.loads((out / "gpu_check.json").read_text()), \
        (out / "gpu_check.md").read_text()


def _numbers(metrics: dict[str, Any]) -> list[float]:
    return [v for v in metrics.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _skip_reason() -> str:
    return "no CUDA device" if not torch.cuda.is_available() else "--quick"


def test_gpu_check_smoke_runs_every_code_path(tmp_path: Path) -> None:
    proc, rep, md = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert rep["exit_status"] == 0 and rep["failures"] == []
    assert rep["mode"] == ("cpu-smoke" if not torch.cuda.is_available() else "quick")
    assert tuple(rep["sections"]) == SECTIONS
    for name, sec in rep["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert sec["seconds"] >= 0
        gpu = [r for r in sec["rows"] if r["kind"] == "gpu"]
        smoke = [r for r in sec["rows"] if r["kind"] == "smoke"]
        assert gpu and smoke, name
        for r in gpu:  # the GPU rows: listed, skipped, with the reason
            assert r["status"] == "skipped", (name, r)
            assert r["reason"].startswith(_skip_reason()), (name, r)
            assert r["metrics"] == {}
        for r in smoke:
            if not r["optional"]:
                assert r["status"] == "ok", (name, r)
            if r["status"] == "ok":
                nums = _numbers(r["metrics"])
                assert nums, (name, r)
                assert all(math.isfinite(v) and v >= 0 for v in nums), (name, r)
        if name in SMOKE_FIGURE:
            prefix, metric = SMOKE_FIGURE[name]
            hit = [r for r in smoke if r["name"].startswith(prefix) and r["status"] == "ok"]
            assert hit and all(r["metrics"][metric] > 0 for r in hit), (name, prefix, smoke)
    # the tiny run of the real code paths
    inf = rep["sections"]["inference"]
    assert inf["info"]["parameters"] > 0
    assert inf["info"]["forward_flop_3_contrasts"] > inf["info"]["forward_flop_2_contrasts"] > 0
    assert all(r["metrics"]["finite"] for r in inf["rows"] if r["status"] == "ok")
    assert rep["sections"]["training"]["info"]["scaling"] == DEFAULT_METHOD
    assert any(r["name"].startswith("train():") and r["status"] == "ok"
               for r in rep["sections"]["data"]["rows"])
    # the summary: every issue target is listed, none measured (no GPU rows ran), smoke figures
    keys = {t["key"]: t for t in rep["targets"]}
    assert set(keys) == {"inference_bf16", "inference_bf16_compiled", "training", "archive_600",
                         "loader", "cse_fit", "cse_dual"}
    for t in keys.values():
        assert t["measured"] is None and t["met"] is None, t
        assert _skip_reason() in (t["reason"] or ""), t
    for k in ("inference_bf16", "training", "archive_600", "loader", "cse_fit", "cse_dual"):
        assert keys[k]["smoke"] is not None and keys[k]["smoke"] > 0, keys[k]
    assert "| figure | measured | issue target |" in md
    assert f"not measured: {_skip_reason()}" in md
    assert "≥ 3,000" in md and "~55" in md


def test_gpu_check_isolated_section_and_kill(tmp_path: Path) -> None:
    # one subprocess per section: a section that finishes, then one killed at its time limit
    proc, rep, _ = _run(tmp_path / "a", "--isolate", "yes", "--sections", "environment")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    env = rep["sections"]["environment"]
    assert env["status"] == "ok" and rep["isolated"] is True
    assert env["info"]["torch"] == torch.__version__
    assert rep["sections"]["cse_fit"]["status"] == "skipped"
    assert rep["sections"]["cse_fit"]["reason"] == "not in --sections"
    proc, rep, _ = _run(tmp_path / "b", "--isolate", "yes", "--sections", "cse_fit",
                        "--time-budget-s", "2", env={"QMRI_GPU_CHECK_SLEEP": "cse_fit=300"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sec = rep["sections"]["cse_fit"]
    assert sec["status"] == "timeout", sec
    assert "killed after" in sec["reason"]
    assert sec["seconds"] < 60
