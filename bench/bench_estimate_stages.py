"""Time the calibrated estimate's stages alone (pinning, data consistency, smoothing,
uncertainty) on the session of ``bench_model_speed.py``.

    python bench/bench_estimate_stages.py [--threads 2] [--slices 35] [--save-maps FILE.npy]

One ``qmriflow infer`` of the default path runs up to the estimate (width-64 network, random
Kaiming weights, seed 0, as in ``bench_model_speed.py``); the estimate's inputs are kept and
the stage runs again alone, each of its four functions timed. ``--save-maps`` writes the
estimated maps (S, 3, H, W), so two versions of the code can be compared map for map.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model_speed as speed


class _Captured(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=35)
    ap.add_argument("--save-maps", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from qmriflow.model import infer as inf
    from qmriflow.model.checkpoint import FORMAT, save_checkpoint
    from qmriflow.model.network import SharedAttnUNet, kaiming_init

    tmp = Path(tempfile.mkdtemp(prefix="qmriflow_stages_"))
    session, _ = speed.make_real_session(tmp / "results", a.slices)
    model = kaiming_init(SharedAttnUNet(64), torch.Generator().manual_seed(0))
    ckpt = save_checkpoint(tmp / "model.pt", {
        "format": FORMAT, "width": 64, "state_dict": model.state_dict(),
        "hyperparameters": {"scaling": "calibrated"}})
    captured: dict[str, Any] = {}
    estimate = inf._estimate

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured.update(args=args, kwargs=kwargs)
        raise _Captured

    inf._estimate = capture
    try:
        speed.run_infer(session, ckpt, tmp / "out", a.threads, [])
    except _Captured:
        pass
    finally:
        inf._estimate = estimate
    times: dict[str, float] = {}
    for name in ("pin_maps", "refine_maps", "smooth_maps", "scale_sensitivity"):
        fn = getattr(inf, name)

        def timed(*x: Any, _fn: Any = fn, _name: str = name, **y: Any) -> Any:
            t = time.perf_counter()
            try:
                return _fn(*x, **y)
            finally:
                times[_name] = times.get(_name, 0.0) + time.perf_counter() - t

        setattr(inf, name, timed)
    t0 = time.perf_counter()
    maps, _, info = inf._estimate(*captured["args"], **captured["kwargs"])
    total = time.perf_counter() - t0
    if a.save_maps:
        np.save(a.save_maps, maps)
    print(json.dumps({"stages_s": {k: round(v, 2) for k, v in times.items()},
                      "estimate_s": round(total, 2),
                      "refine_status": info["refine"]["status_counts"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
