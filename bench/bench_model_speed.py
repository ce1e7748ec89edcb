"""Speed of the relaxometry network: inference and training slices/s, peak memory, and one
35-slice session end to end (read → normalise → infer → write maps + re-synthesis).

    python bench/bench_model_speed.py [--width 64] [--threads 2] [--slices 35] [--quick]

Uses random weights saved as a checkpoint (speed does not depend on the values) and a
synthetic 224×224×N session written in the preprocessing layout. On CUDA (if present) it also
reports GPU numbers with bf16 autocast and channels-last. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_session(root: Path, n_slices: int, size: int = 224) -> Path:
    """A size×size×N session (the tests' elliptical toy head) in the preprocessing layout."""
    from test_model_train import write_tiny_session

    return write_tiny_session(root, "bench", "01", seed=0, size=size, n_slices=n_slices)


def bench_inference(model, dev, precision: str, n: int, batch: int) -> float:
    from qmriflow.model.infer import channels_last_pays, predict_maps

    model.use_channels_last(channels_last_pays(dev, precision))
    x = np.random.default_rng(0).uniform(0, 2, (n, 3, 224, 224)).astype(np.float32)
    predict_maps(model, x[:batch], device=dev, precision=precision, batch_size=batch)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    predict_maps(model, x, device=dev, precision=precision, batch_size=batch)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def bench_training(width: int, dev, precision: str, batch: int, steps: int) -> float:
    from qmriflow.model.losses import physics_loss, protocol_row
    from qmriflow.model.network import SharedAttnUNet
    from qmriflow.physics import Protocol

    model = SharedAttnUNet(width).to(dev)
    if dev.type == "cuda":
        model.use_channels_last(True)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    protos = [Protocol("gre", 5.2, 2.3, fa_deg=10.0), Protocol("tse", 4300.0, 80.0),
              Protocol("flair", 4800.0, 300.0, ti_ms=1650.0)]
    rows = torch.tensor([[protocol_row(p) for p in protos]] * batch, device=dev)
    x = torch.rand(batch, 3, 224, 224, device=dev) * 2
    head = torch.ones(batch, 1, 224, 224, dtype=torch.bool, device=dev)
    groups = torch.arange(batch, device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            maps = model(x[:, [0, 2]])
        loss, _ = physics_loss(maps.float(), x, head, rows, groups)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=35)
    ap.add_argument("--quick", action="store_true", help="fewer slices for the slices/s rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qmriflow.model.checkpoint import FORMAT, save_checkpoint
    from qmriflow.model.infer import infer_session
    from qmriflow.model.network import SharedAttnUNet, count_parameters

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="qmri_speed_"))
    model = SharedAttnUNet(args.width).eval()
    ckpt = save_checkpoint(tmp / "model.pt", {"format": FORMAT, "width": args.width,
                                              "state_dict": model.state_dict()})
    print(f"width {args.width}: {count_parameters(model):,} parameters; torch "
          f"{torch.__version__}; CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"threads {args.threads}", flush=True)
    dev = torch.device("cpu")
    n_inf = 4 if args.quick else 8
    # accuracy of bf16 vs fp32 on the same input
    from qmriflow.model.infer import predict_maps

    x = np.random.default_rng(1).uniform(0, 2, (2, 3, 224, 224)).astype(np.float32)
    y32 = predict_maps(model, x, device=dev, precision="fp32", batch_size=2)
    y16 = predict_maps(model, x, device=dev, precision="bf16", batch_size=2)
    rel = np.abs(y16 - y32) / np.maximum(np.abs(y32), 1e-3)
    print(f"bf16 vs fp32 (random weights): median rel. diff {np.median(rel):.2e}, "
          f"99th pct {np.percentile(rel, 99):.2e}", flush=True)
    for prec in ("fp32", "bf16"):
        sps = bench_inference(model, dev, prec, n_inf, 4)
        rows.append(("CPU", f"inference {prec}", f"{sps:.2f} slices/s", f"{_rss_mib():.0f}"))
        print(rows[-1], flush=True)
    for prec in ("fp32", "bf16"):
        sps = bench_training(args.width, dev, prec, 2, 1 if args.quick else 2)
        rows.append(("CPU", f"training {prec} (batch 2, 2 contrasts in, loss on 3)",
                     f"{sps:.2f} slices/s", f"{_rss_mib():.0f}"))
        print(rows[-1], flush=True)
    sdir = make_session(tmp / "results", args.slices)
    # seed: the network's maps as they are; calibrated (the default method): plus calibration,
    # pinning and per-voxel data consistency (qmriflow.model.calibration)
    for prec, scaling in (("fp32", "seed"), ("bf16", "seed"), ("bf16", "calibrated")):
        t0 = time.perf_counter()
        info = infer_session(sdir, ckpt, tmp / f"maps_{prec}_{scaling}", device="cpu",
                             precision=prec, threads=args.threads, batch_size=4,
                             scaling=scaling)
        wall = time.perf_counter() - t0
        rows.append(("CPU", f"session {args.slices} slices end to end, {prec}, scaling "
                            f"{scaling}",
                     f"{wall:.1f} s (network {info['timing_s']['network']:.1f} s, read "
                     f"{info['timing_s']['read']:.1f} s)", f"{_rss_mib():.0f}"))
        print(rows[-1], flush=True)
    if torch.cuda.is_available():
        g = torch.device("cuda")
        gm = SharedAttnUNet(args.width).to(g).eval().use_channels_last(True)
        torch.cuda.reset_peak_memory_stats()
        sps = bench_inference(gm, g, "bf16", 64, 32)
        rows.append(("GPU", "inference bf16", f"{sps:.0f} slices/s",
                     f"{torch.cuda.max_memory_allocated() / 2**20:.0f} (GPU)"))
        torch.cuda.reset_peak_memory_stats()
        sps = bench_training(args.width, g, "bf16", 16, 20)
        rows.append(("GPU", "training bf16 (batch 16)", f"{sps:.0f} slices/s",
                     f"{torch.cuda.max_memory_allocated() / 2**20:.0f} (GPU)"))
    print("\n| device | what | speed | peak RSS MiB |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
