#!/usr/bin/env python3
"""GPU check of issue 27: the relaxometry network and the fat/water fits, measured on one GPU.

    python bench/gpu_check.py [--out DIR] [--quick] [--time-budget-s 420] [--sections a,b]
                              [--threads N] [--isolate auto|yes|no] [--cpu-compile]

One prepared script for a lent H200 (under 8 minutes) that writes ``gpu_check.json`` and
``gpu_check.md`` (and, with isolation, ``gpu_check.log``: the sections' output) to ``--out``
(default ``$OUT`` if set, else ``./gpu_check_out``). It needs only torch, numpy and scipy
(matplotlib for the ``train()`` row) plus this repository's ``src/`` and
``bench/bench_cse.py`` (put on ``sys.path`` here, so a plain checkout runs it without
installing); nibabel is not needed (the packed training data is written in the pack format
directly).

Sections (each timed, each with its own error handling; a global time budget skips what no
longer fits, with the reason):

* ``environment``: device, driver, CUDA, torch, GPU memory, CPUs; a bf16 matrix-product
  ceiling;
* ``inference``: the full-width network (width 64, 8,562,559 parameters, asserted), 224²,
  3 contrasts, bf16 autocast and fp32, channels-last on/off (and bf16 channels-last with
  ``cudnn.benchmark``), batches 64/128/256/512 (an OOM is recorded and larger batches of that
  variant skipped): slices/s after warm-up (synchronised) and peak memory;
* ``training``: one optimiser step of ``train.py``'s loop (contrast dropout, bf16 autocast,
  channels-last, ``physics_loss`` with the default scaling method, session scale groups of an
  archive-sized pack) on a synthetic packed-looking batch resident on the GPU, batches
  16…256 up to the largest that fits; attribution rows (trivial loss; the loss alone);
* ``archive``: ``predict_maps`` (what ``infer_session`` calls) on a checkpoint loaded as
  ``qmriflow infer`` loads it, 600 sessions × 35 slices batched across sessions at the best
  inference batch (GPU seconds), and per session as the CLI runs now (batch 4 and 35,
  extrapolated from a sample);
* ``data``: a packed dataset written in the pack format, then the loader alone: the path
  ``train.py`` uses (``PackedSlices.batch`` + ``_to_device``) and a pinned-memory
  ``DataLoader`` with workers; and ``train()`` itself for one short epoch from that pack;
* ``cse_fit``: the two-start fit (``run_cse(method="fit")``) of bench_cse.py's synthetic
  232 × 256 × 32 × 6-echo series: voxels/s;
* ``inference_compile``: ``torch.compile`` (default mode) of the network, and a CUDA graph of
  the eager network (optional rows; a failure is recorded with its reason);
* ``cse_dual``: the dual network (train + infer, ``run_cse(method="dual")``) on that series.

On CUDA each section runs in its own subprocess (``--isolate auto``) with a hard time limit,
so a crash, a hang or a CUDA error costs one section, not the run. Without CUDA every GPU row
is recorded as skipped ("no CUDA device") and the same code paths run on the CPU at tiny sizes
(width 8, 64², batch 2, a 32 × 32 × 2 × 6 CSE series, a few steps): a smoke test. ``--quick``
does the same on a CUDA device. Exit status 0 when it ran (skips, OOMs and timeouts are
results, not failures), 1 when a section raised (and, in the tiny modes, when a required row
raised).

JSON layout: ``{"script", "version", "mode" (full | quick | cpu-smoke), "device", "started",
"elapsed_s", "time_budget_s", "argv", "exit_status", "sizes", "shared", "sections": {name:
{"status" (ok | error | skipped | timeout), "reason", "seconds", "info", "error", "rows":
[{"name", "kind" (gpu | smoke), "device", "status" (ok | skipped | oom | error | timeout),
"reason", "optional", "params", "metrics"}]}}, "targets": [{"key", "figure", "unit",
"measured", "target", "met", "v100", "physical", "smoke", "source"}]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

T_PROCESS = time.time()  # before torch is imported: "process start to model ready"
REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "bench", REPO / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VERSION = 1
NO_CUDA = "no CUDA device"
FULL_WIDTH_PARAMS = 8_562_559
ISSUE_GFLOP_PER_SLICE = 105.0
FULL_FLOP_PER_SLICE = 106.57e9
"""Forward FLOPs of one 224² slice (3 contrasts) at width 64, counted with torch's
FlopCounterMode (the physical estimate of the tiny modes; full mode counts it again)."""
H200_BF16_TFLOPS = 790.0
V100_TRAIN_SPS = 55.0
ARCHIVE_SLICES = 116_000
"""Training slices of the published run (50 epochs of ~116 k slices): the index space the
training batches' sessions (the loss's scale groups) are drawn from."""
SECTIONS = ("environment", "inference", "training", "archive", "data", "cse_fit",
            "inference_compile", "cse_dual")
SHARE_S = {"environment": 40, "inference": 90, "training": 60, "archive": 60, "data": 60,
           "cse_fit": 50, "inference_compile": 110, "cse_dual": None}
"""Full mode: seconds each section may use at most (None: what is left of the budget)."""
MIN_START_S = {"environment": 5, "inference": 20, "training": 15, "archive": 15, "data": 15,
               "cse_fit": 15, "inference_compile": 40, "cse_dual": 30}
"""Full mode: a section starts only with this much budget left (also reserved for it by the
sections before it)."""
GRACE_S = {"full": 15.0, "quick": 3.0, "cpu-smoke": 3.0}
"""A section's subprocess is killed this long after its soft deadline."""
SLEEP_ENV = "QMRI_GPU_CHECK_SLEEP"
"""Test hook: ``SECTION=SECONDS`` makes that section's worker sleep first (to test the kill)."""


# ---------------------------------------------------------------------------------------------
# sizes, rows, sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of a mode (``full``: the issue's; ``smoke``: tiny, for CPU and --quick)."""

    label: str
    width: int
    hw: int
    infer_batches: tuple[int, ...]
    train_batches: tuple[int, ...]
    min_time_s: float
    min_iters: int
    warmup: int
    slices_per_session: int
    data_sessions: int
    loader_batches: tuple[int, ...]
    loader_workers: int
    archive_sessions: int
    archive_sample_sessions: int
    train_e2e_steps: int
    cse_shape: tuple[int, int, int]
    cse_full_training: bool


FULL = Sizes(label="full", width=64, hw=224, infer_batches=(64, 128, 256, 512),
             train_batches=(16, 32, 64, 128, 256), min_time_s=0.5, min_iters=3, warmup=2,
             slices_per_session=35, data_sessions=128, loader_batches=(16,),
             loader_workers=8, archive_sessions=600, archive_sample_sessions=20,
             train_e2e_steps=30, cse_shape=(232, 256, 32), cse_full_training=True)
SMOKE = Sizes(label="smoke", width=8, hw=64, infer_batches=(2,), train_batches=(2,),
              min_time_s=0.0, min_iters=1, warmup=1, slices_per_session=4, data_sessions=4,
              loader_batches=(2,), loader_workers=1, archive_sessions=3,
              archive_sample_sessions=2, train_e2e_steps=2, cse_shape=(32, 32, 2),
              cse_full_training=False)


@dataclass
class Ctx:
    """What a section runs with."""

    mode: str  # full | quick | cpu-smoke
    device: str
    sizes: Sizes
    deadline: float  # time.time() by which the section should end
    tmp: Path
    shared: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    cpu_compile: bool = False
    partial: Path | None = None  # worker: where the section's partial result is kept

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def kind(self) -> str:
        return "gpu" if self.mode == "full" else "smoke"

    def left(self) -> float:
        return self.deadline - time.time()


class Section:
    """Rows, info and shared results of one section; rows are printed (and, in a worker,
    saved) as they come."""

    def __init__(self, name: str, ctx: Ctx) -> None:
        self.name, self.ctx = name, ctx
        self.rows: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self.shared: dict[str, Any] = {}

    def row(self, name: str, *, status: str = "ok", reason: str | None = None,
            params: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
            optional: bool = False, kind: str | None = None) -> dict[str, Any]:
        r = {"name": name, "kind": kind or self.ctx.kind,
             "device": self.ctx.device if status != "skipped" else None, "status": status,
             "reason": reason, "optional": optional, "params": params or {},
             "metrics": metrics or {}}
        self.rows.append(r)
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in (metrics or {}).items()
                          if isinstance(v, (int, float)))
        print(f"  [{self.name}] {name}: {status}"
              + (f" ({reason})" if reason else "") + (f" — {shown}" if shown else ""),
              flush=True)
        self.save()
        return r

    def result(self, status: str = "running", error: str | None = None) -> dict[str, Any]:
        return {"status": status, "reason": None, "seconds": None, "info": self.info,
                "error": error, "rows": self.rows, "shared": self.shared}

    def save(self, status: str = "running", error: str | None = None) -> None:
        if self.ctx.partial is not None:
            _write_json_atomic(self.ctx.partial, self.result(status, error))


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01 or a == 0:
            return f"{v:.2f}"
        return f"{v:.2e}"
    return str(v)


def _clean(o: Any) -> Any:
    """JSON-safe copy (non-finite floats → None, tuples → lists, numpy scalars → Python)."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return o


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
    os.replace(tmp, path)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> dict[str, float]:
    if dev.type == "cuda":
        return {"peak_gpu_mib": torch.cuda.max_memory_allocated(dev) / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _short(exc: BaseException, n: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:n]}"


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _timed(fn: Callable[[], Any], dev: torch.device, sizes: Sizes,
           deadline: float | None = None, max_iters: int = 200) -> dict[str, float]:
    """Warm-up calls, then synchronised timed calls until ``min_iters`` and ``min_time_s``."""
    for _ in range(sizes.warmup):
        fn()
    _sync(dev)
    times: list[float] = []
    t_all = time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
        total = time.perf_counter() - t_all
        if len(times) >= max_iters or (deadline is not None and time.time() > deadline):
            break
        if len(times) >= sizes.min_iters and total >= sizes.min_time_s:
            break
    return {"iters": len(times), "total_s": float(sum(times)),
            "median_s": float(np.median(times)), "min_s": float(min(times))}


def _flop_counts(width: int, hw: int) -> dict[str, float]:
    """Forward FLOPs per slice (3 and 2 contrasts), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from qmriflow.model.network import SharedAttnUNet

    out = {}
    with torch.device("meta"):
        m = SharedAttnUNet(width)
    for n in (3, 2):
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            m(torch.empty(1, n, hw, hw, device="meta"))
        out[f"forward_flop_{n}_contrasts"] = float(fc.get_total_flops())
    # training: forward + backward ≈ 3 forward; contrast dropout 0.5 feeds 2 or 3 contrasts
    out["train_flop_per_slice_est"] = 3.0 * 0.5 * (out["forward_flop_3_contrasts"]
                                                   + out["forward_flop_2_contrasts"])
    return out


def _autocast(dev: torch.device, precision: str, cache: bool = True):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                          cache_enabled=cache)


def _new_model(width: int, dev: torch.device, seed: int = 0):
    from qmriflow.model.network import SharedAttnUNet, kaiming_init

    model = SharedAttnUNet(width)
    kaiming_init(model, torch.Generator().manual_seed(seed))
    return model.to(dev)


# ---------------------------------------------------------------------------------------------
# synthetic, packed-looking data (mode-normalised images, head masks, real protocols)
# ---------------------------------------------------------------------------------------------

TISSUES = {  # PD (a.u.), T1 (s), T2 (s)
    "wm": (0.70, 0.85, 0.070), "gm": (0.80, 1.35, 0.085), "csf": (1.00, 4.30, 1.50),
    "scalp": (0.90, 0.40, 0.080),
}


@dataclass
class PhantomSession:
    images: np.ndarray  # (S, 3, H, W) float32, WM ≈ 1 (mode-normalised-like)
    head: np.ndarray  # (S, H, W) bool
    brain: np.ndarray  # (S, H, W) bool
    protocols: list[Any]  # physics.Protocol of T1w, T2w, FLAIR
    rows: list[list[float]]  # protocol rows (losses.protocol_row)
    calibrated_rows: list[list[float]]


def phantom_session(n_slices: int, hw: int, cluster: int, seed: int = 0) -> PhantomSession:
    """A toy head (scalp, GM, WM, ventricles) per slice, imaged with the three protocols of one
    of the phantom archive's scanner-protocol clusters, divided by the WM reference signal."""
    from qmriflow import physics
    from qmriflow.model.losses import protocol_row
    from qmriflow.phantom.protocols import CLUSTERS, draw_session_protocols

    rng = np.random.default_rng([seed, cluster])
    _, series = draw_session_protocols(rng, cluster=cluster % len(CLUSTERS))
    protos = [s.protocol for s in series[:3]]  # roles t1w, t2w, flair = CONTRASTS order
    y, x = np.mgrid[-1:1:hw * 1j, -1:1:hw * 1j]
    pd = np.zeros((n_slices, hw, hw))
    t1 = np.full((n_slices, hw, hw), 1.0)
    t2 = np.full((n_slices, hw, hw), 0.1)
    head = np.zeros((n_slices, hw, hw), bool)
    brain = np.zeros((n_slices, hw, hw), bool)
    for z in range(n_slices):
        u = (z - (n_slices - 1) / 2) / (n_slices / 2 + 1)
        f = max(0.4, math.sqrt(max(0.0, 1 - u * u)))
        r_head = (x / (0.85 * f)) ** 2 + (y / (0.95 * f)) ** 2
        r_brain = (x / (0.75 * f)) ** 2 + (y / (0.85 * f)) ** 2
        head[z], brain[z] = r_head < 1, r_brain < 1
        lab = np.where(r_brain < 0.45, "wm", "gm")
        lab = np.where(((np.abs(x) - 0.12 * f) / (0.08 * f)) ** 2 + (y / (0.3 * f)) ** 2 < 1,
                       "csf", lab)
        lab = np.where(brain[z], lab, "scalp")
        for name, (p, a, b) in TISSUES.items():
            sel = (lab == name) & head[z]
            pd[z][sel], t1[z][sel], t2[z][sel] = p, a, b
    imgs = []
    for p in protos:
        s = np.asarray(physics.signal(p, pd, t1, t2)) * physics.wm_reference_scale(p)
        noise = rng.normal(0, 0.02, (2, *s.shape))
        imgs.append(np.sqrt((s + noise[0]) ** 2 + noise[1] ** 2))
    rows = [protocol_row(p) for p in protos]
    cal = [[*r[:5], r[5] * float(np.exp(rng.normal(0, 0.05)))] for r in rows]
    return PhantomSession(np.stack(imgs, 1).astype(np.float32), head, brain, protos, rows, cal)


def write_synthetic_pack(out: Path, n_sessions: int, per_session: int, hw: int,
                         n_variants: int = 9) -> dict[str, Any]:
    """A packed folder in the format of ``qmriflow.model.data.pack_sessions`` (images.npy,
    masks.npy, index.json), one session per subject, from ``n_variants`` phantom sessions
    (one per protocol cluster)."""
    from qmriflow import physics
    from qmriflow.io import write_json
    from qmriflow.model.data import PACK_VERSION
    from qmriflow.model.losses import PROTOCOL_COLUMNS
    from qmriflow.model.normalise import CONTRASTS

    out.mkdir(parents=True, exist_ok=True)
    variants = [phantom_session(per_session, hw, k) for k in range(min(n_variants, n_sessions))]
    n = n_sessions * per_session
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.float16,
                                       shape=(n, 3, hw, hw))
    masks = np.lib.format.open_memmap(out / "masks.npy", mode="w+", dtype=np.uint8,
                                      shape=(n, hw, hw))
    sessions, slice_session, slice_z = [], [], []
    for s in range(n_sessions):
        v = variants[s % len(variants)]
        sl = slice(s * per_session, (s + 1) * per_session)
        images[sl] = v.images.astype(np.float16)
        masks[sl] = v.head.astype(np.uint8) | (v.brain.astype(np.uint8) << 1)
        sub = f"S{s:04d}"
        sessions.append({
            "label": f"sub-{sub}_ses-01", "subject": sub, "session": "01",
            "session_dir": "(synthetic)", "n_slices": per_session,
            "modes": dict.fromkeys(CONTRASTS, 1.0),
            "protocols": {c: p.as_dict() for c, p in zip(CONTRASTS, v.protocols, strict=True)},
            "protocol_rows": v.rows, "calibrated_rows": v.calibrated_rows, "calibration": None,
        })
        slice_session += [s] * per_session
        slice_z += list(range(per_session))
    images.flush()
    masks.flush()
    del images, masks
    index = {
        "version": PACK_VERSION, "contrasts": list(CONTRASTS), "n_slices": n, "height": hw,
        "width": hw, "images_dtype": "float16", "mask_bits": {"head": 1, "brain": 2},
        "min_head_fraction": 0.05, "protocol_columns": list(PROTOCOL_COLUMNS),
        "sequences": list(physics.SEQUENCES), "sessions": sessions,
        "slice_session": slice_session, "slice_z": slice_z, "skipped": [],
    }
    write_json(out / "index.json", index)
    return index


class _PackBatches(torch.utils.data.Dataset):
    """``PackedSlices.batch`` behind a DataLoader (the sampler yields whole index batches);
    the pack is opened lazily in each worker (memory maps are not pickled)."""

    def __init__(self, pack_dir: Path, scaling: str, n: int) -> None:
        self.pack_dir, self.scaling, self.n = pack_dir, scaling, n
        self._packed = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: Any) -> dict[str, torch.Tensor]:
        from qmriflow.model.data import PackedSlices

        if self._packed is None:
            self._packed = PackedSlices(self.pack_dir, self.scaling)
        return {k: torch.from_numpy(np.ascontiguousarray(v))
                for k, v in self._packed.batch(np.asarray(idx)).items()}


def _cse_series(ctx: Ctx, shape: tuple[int, int, int]):
    """bench_cse.py's synthetic series (cached in the run's temporary folder)."""
    from bench_cse import TE_MS, synthetic_series

    from qmriflow.cse import MultiEchoSeries

    cache = ctx.tmp / f"cse_series_{'x'.join(map(str, shape))}.npz"
    if cache.is_file():
        z = np.load(cache)
        return MultiEchoSeries(data=z["data"], te_ms=np.asarray(TE_MS), field_t=3.0,
                               affine=np.eye(4), sources=["synthetic"],
                               prefix="bench"), float(z["sigma"]), 0.0
    t0 = time.perf_counter()
    series, sigma = synthetic_series(shape)
    dt = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        np.savez(cache, data=series.data, sigma=sigma)
    return series, float(sigma), dt


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------


def _versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {}
    for name in ("numpy", "scipy", "nibabel", "matplotlib", "tqdm", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sec_environment(sec: Section) -> None:
    ctx, info = sec.ctx, sec.info
    info["python"] = sys.version.split()[0]
    info["platform"] = platform.platform()
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["packages"] = _versions()
    info["missing_packages"] = [k for k, v in info["packages"].items()
                                if v is None and k in ("scipy", "matplotlib")]
    info["cpu_count"] = os.cpu_count()
    with contextlib.suppress(AttributeError):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    info["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(OSError):
        import shutil

        info["dev_shm_free_gib"] = shutil.disk_usage("/dev/shm").free / 2**30
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        import qmriflow

        info["qmriflow"] = qmriflow.__version__
    except Exception as exc:  # pragma: no cover - recorded
        info["qmriflow"] = f"import failed: {_short(exc)}"
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                            capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    info["cuda_available"] = torch.cuda.is_available()
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.dev)
        info.update({"device_name": p.name, "capability": f"{p.major}.{p.minor}",
                     "gpu_memory_gib": p.total_memory / 2**30,
                     "multiprocessors": p.multi_processor_count,
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                     "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                     "cudnn_benchmark_default": torch.backends.cudnn.benchmark})
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                "clocks.max.sm,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
            info["driver"] = (q.stdout.split(",")[1].strip() if q.stdout.count(",") >= 1
                              else None)
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {_short(exc)}"
    # a matrix-product ceiling to set the network's figures against
    n = 8192 if ctx.mode == "full" else 256
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    a = torch.randn(n, n, device=ctx.dev, dtype=dt)
    b = torch.randn(n, n, device=ctx.dev, dtype=dt)
    t = _timed(lambda: a @ b, ctx.dev, Sizes(**{**asdict(ctx.sizes), "warmup": 3,
                                                 "min_iters": 10, "min_time_s": 0.0}))
    sec.row(f"matmul {n}³ {str(dt).split('.')[-1]}",
            params={"n": n, "dtype": str(dt)},
            metrics={"tflops": 2 * n**3 / t["median_s"] / 1e12})


def _infer_name(prec: str, cl: bool, bench: bool, b: int) -> str:
    return (f"inference {prec} {'channels-last' if cl else 'NCHW'}"
            f"{' cudnn.benchmark' if bench else ''} batch {b}")


def _infer_variants(cuda: bool) -> list[tuple[str, bool, bool]]:
    v = [("bf16", True, False), ("bf16", False, False), ("fp32", True, False),
         ("fp32", False, False)]
    if cuda:
        v.insert(1, ("bf16", True, True))
    return v


def plan_inference(s: Sizes) -> list[str]:
    return [_infer_name(p, c, b, n) for p, c, b in _infer_variants(True)
            for n in s.infer_batches]


def sec_inference(sec: Section) -> None:
    from qmriflow.model.network import count_parameters

    ctx, s, dev = sec.ctx, sec.ctx.sizes, sec.ctx.dev
    model = _new_model(s.width, dev).eval()
    n_par = count_parameters(model)
    sec.info["parameters"] = n_par
    if s.width == 64:
        assert n_par == FULL_WIDTH_PARAMS, f"width 64 has {n_par} parameters, not 8,562,559"
    flops = _flop_counts(s.width, s.hw)
    sec.info.update(flops)
    sec.shared["flops"] = flops
    fps = flops["forward_flop_3_contrasts"]
    best: tuple[float, int] | None = None
    bench_default = torch.backends.cudnn.benchmark
    try:
        for prec, cl, bench in _infer_variants(ctx.cuda):
            torch.backends.cudnn.benchmark = bench
            model.use_channels_last(cl)
            failed_at = None
            for b in s.infer_batches:
                name = _infer_name(prec, cl, bench, b)
                params = {"precision": prec, "channels_last": cl, "cudnn_benchmark": bench,
                          "batch": b, "width": s.width, "hw": s.hw, "contrasts": 3}
                if failed_at is not None:
                    sec.row(name, status="skipped", params=params,
                            reason=f"batch {failed_at} of this variant did not run")
                    continue
                if ctx.left() < 3:
                    sec.row(name, status="skipped", params=params, reason="time budget")
                    continue
                x = None
                try:
                    _free(dev)
                    _reset_peak(dev)
                    x = torch.rand(b, 3, s.hw, s.hw, device=dev) * 2

                    def fwd(x: torch.Tensor = x, prec: str = prec) -> torch.Tensor:
                        with torch.inference_mode(), _autocast(dev, prec):
                            return model(x)

                    y = fwd()
                    finite = bool(torch.isfinite(y).all())
                    del y
                    t = _timed(fwd, dev, s, ctx.deadline)
                    sps = b * t["iters"] / t["total_s"]
                    sec.row(name, params=params, metrics={
                        "slices_per_s": sps, "tflops": sps * fps / 1e12, "finite": finite,
                        **_peak(dev), "median_batch_s": t["median_s"], "iters": t["iters"]})
                    if prec == "bf16" and cl and not bench and (best is None or sps > best[0]):
                        best = (sps, b)
                except Exception as exc:
                    failed_at = b
                    sec.row(name, status="oom" if _is_oom(exc) else "error", params=params,
                            reason=_short(exc))
                finally:
                    del x
    finally:
        torch.backends.cudnn.benchmark = bench_default
    if best is not None:
        sec.shared["infer_best_batch"] = best[1]
        sec.shared["infer_best_sps"] = best[0]


def _compile_plan(s: Sizes, best: int) -> list[tuple[str, bool, int]]:
    """bf16 channels-last at the best eager batch and the largest, the other variants at the
    best batch, then bf16 channels-last at the remaining batches (as the budget allows)."""
    top = max(s.infer_batches)
    plan = [("bf16", True, best)] + ([("bf16", True, top)] if top != best else [])
    plan += [("bf16", False, best), ("fp32", True, best), ("fp32", False, best)]
    return plan + [("bf16", True, b) for b in s.infer_batches if b not in (best, top)]


def plan_inference_compile(s: Sizes) -> list[str]:
    b = s.infer_batches[min(2, len(s.infer_batches) - 1)]
    return ([f"cuda graph bf16 channels-last batch {b}"]
            + [f"compile {p} {'channels-last' if c else 'NCHW'} batch {n}"
               for p, c, n in _compile_plan(s, b)])


def _cuda_graph_row(sec: Section, model: Any, b: int, fps: float) -> None:
    """A CUDA graph of the eager bf16 channels-last network (kernel-launch overhead removed)."""
    ctx, s, dev = sec.ctx, sec.ctx.sizes, sec.ctx.dev
    name = f"cuda graph bf16 channels-last batch {b}"
    params = {"precision": "bf16", "channels_last": True, "batch": b}
    if not ctx.cuda:
        sec.row(name, status="skipped", reason="CUDA graphs need a CUDA device", params=params,
                optional=True)
        return
    if ctx.left() < 10:
        sec.row(name, status="skipped", reason="time budget", params=params, optional=True)
        return
    graph = None
    try:
        model.use_channels_last(True)
        _free(dev)
        _reset_peak(dev)
        x = torch.rand(b, 3, s.hw, s.hw, device=dev) * 2
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode(), _autocast(dev, "bf16", False):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), _autocast(dev, "bf16", False), torch.cuda.graph(graph):
            model(x)
        t = _timed(graph.replay, dev, s, ctx.deadline)
        sps = b * t["iters"] / t["total_s"]
        sec.row(name, params=params, optional=True, metrics={
            "slices_per_s": sps, "tflops": sps * fps / 1e12, **_peak(dev), "iters": t["iters"]})
    except Exception as exc:
        sec.row(name, status="oom" if _is_oom(exc) else "error", reason=_short(exc),
                params=params, optional=True)
    finally:
        del graph
        _free(dev)


def sec_inference_compile(sec: Section) -> None:
    ctx, s, dev = sec.ctx, sec.ctx.sizes, sec.ctx.dev
    best = int(ctx.shared.get("infer_best_batch") or s.infer_batches[min(2, len(
        s.infer_batches) - 1)])
    model = _new_model(s.width, dev).eval()
    fps = (ctx.shared.get("flops") or _flop_counts(s.width, s.hw))["forward_flop_3_contrasts"]
    _cuda_graph_row(sec, model, best, fps)
    can_compile = ctx.cuda or ctx.cpu_compile
    why_not = None if can_compile else ("torch.compile rows run on CUDA only (the CPU build "
                                        "is too slow for a smoke test; --cpu-compile runs it)")
    est = 60.0  # seconds a compile is assumed to take until one has been measured
    variant = None
    compiled = None
    for prec, cl, b in _compile_plan(s, best):
        name = f"compile {prec} {'channels-last' if cl else 'NCHW'} batch {b}"
        params = {"precision": prec, "channels_last": cl, "batch": b, "mode": "default",
                  "grad": "no_grad"}
        if why_not:
            sec.row(name, status="skipped", reason=why_not, params=params, optional=True)
            continue
        new_variant = (prec, cl) != variant
        need = (est * 1.2 if new_variant else est * 0.6) + 5
        if ctx.left() < need:
            sec.row(name, status="skipped", params=params, optional=True,
                    reason=f"time budget ({ctx.left():.0f} s left, ~{need:.0f} s needed)")
            continue
        x = None
        try:
            if new_variant:
                compiled = None
                torch._dynamo.reset()
                model.use_channels_last(cl)
                compiled = torch.compile(model)
                variant = (prec, cl)
            _free(dev)
            _reset_peak(dev)
            x = torch.rand(b, 3, s.hw, s.hw, device=dev) * 2

            def fwd(x: torch.Tensor = x, prec: str = prec, m: Any = compiled) -> Any:
                with torch.no_grad(), _autocast(dev, prec):
                    return m(x)

            t0 = time.perf_counter()
            fwd()
            _sync(dev)
            first = time.perf_counter() - t0
            if new_variant:
                est = first
            t = _timed(fwd, dev, s, ctx.deadline)
            sps = b * t["iters"] / t["total_s"]
            sec.row(name, params=params, optional=True, metrics={
                "slices_per_s": sps, "tflops": sps * fps / 1e12, "first_call_s": first,
                **_peak(dev), "iters": t["iters"]})
        except Exception as exc:
            sec.row(name, status="oom" if _is_oom(exc) else "error", reason=_short(exc),
                    params=params, optional=True)
            if not _is_oom(exc) and new_variant:
                why_not = f"torch.compile failed above ({_short(exc, 120)})"
        finally:
            del x
    if compiled is not None:
        compiled = None
        torch._dynamo.reset()


def plan_training(s: Sizes) -> list[str]:
    return ([f"training step bf16 channels-last batch {b}" for b in s.train_batches]
            + ["attribution: step with a trivial loss (largest batch)",
               "attribution: physics_loss alone, forward + backward (largest batch)"])


def _train_bank(ctx: Ctx) -> dict[str, Any]:
    """Images of three protocol clusters' phantom sessions and an archive-sized session table:
    slice i of the archive is slice i % S of session i // S, whose cluster is session % 3."""
    s = ctx.sizes
    per = s.slices_per_session
    ses = [phantom_session(per, s.hw, k) for k in range(3)]
    n_sessions = ARCHIVE_SLICES // per
    rows_seed = np.stack([np.asarray(v.calibrated_rows, np.float32) for v in ses])  # (3, 3, 6)
    return {"images": np.stack([v.images for v in ses]),  # (3, S, 3, H, W)
            "head": np.stack([v.head for v in ses])[:, :, None],  # (3, S, 1, H, W)
            "rows": rows_seed, "n_sessions": n_sessions, "per": per}


def _train_batch(bank: dict[str, Any], b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What ``PackedSlices.batch`` returns for ``b`` slices drawn at random from the archive."""
    idx = rng.choice(bank["n_sessions"] * bank["per"], b, replace=False)
    ses, z = idx // bank["per"], idx % bank["per"]
    var = ses % 3
    return {"images": bank["images"][var, z], "head": bank["head"][var, z],
            "protocols": bank["rows"][var], "groups": ses.astype(np.int64)}


def sec_training(sec: Section) -> None:
    from qmriflow.model.data import contrast_dropout
    from qmriflow.model.losses import physics_loss
    from qmriflow.model.train import (
        TrainConfig,
        _init,
        _to_device,
        network_forward,
        resolve_precision,
    )
    from qmriflow.model.train import _autocast as train_autocast

    ctx, s, dev = sec.ctx, sec.ctx.sizes, sec.ctx.dev
    cfg = TrainConfig(width=s.width)
    weights = cfg.loss_weights()
    precision = resolve_precision(cfg.precision, dev)
    sec.info.update({"scaling": cfg.scaling, "scale_group": cfg.scale_group,
                     "dropout": cfg.dropout, "precision": precision,
                     "channels_last": ctx.cuda, "lr": cfg.lr,
                     "batch_source": "GPU-resident synthetic batch (packed layout: "
                                     "mode-normalised images, head masks, calibrated protocol "
                                     "rows of the phantom archive's protocol clusters, scale "
                                     "groups = sessions of a 116k-slice archive)"})
    fps = (ctx.shared.get("flops") or _flop_counts(s.width, s.hw))["train_flop_per_slice_est"]
    model = _new_model(s.width, torch.device("cpu"))
    _init(model, cfg.init, cfg.seed)
    model.to(dev)
    if ctx.cuda:
        model.use_channels_last(True)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    bank = _train_bank(ctx)
    rng = np.random.default_rng([cfg.seed, 0])
    largest: tuple[int, float] | None = None
    best_sps = 0.0
    stop = None
    for b in s.train_batches:
        name = f"training step bf16 channels-last batch {b}" if ctx.cuda else \
            f"training step {precision} batch {b}"
        params = {"batch": b, "precision": precision, "width": s.width, "hw": s.hw}
        if stop:
            sec.row(name, status="skipped", reason=stop, params=params)
            continue
        if ctx.left() < 5:
            sec.row(name, status="skipped", reason="time budget", params=params)
            continue
        bt = None
        try:
            _free(dev)
            _reset_peak(dev)
            host = _train_batch(bank, b, rng)
            bt = _to_device(host, dev)
            losses: list[float] = []

            def step(bt: dict[str, torch.Tensor] = bt, losses: list[float] = losses) -> None:
                keep = contrast_dropout(rng, 3, cfg.dropout)
                maps = network_forward(model, bt["images"], keep, dev, precision)
                groups = bt["groups"] if cfg.scale_group == "session" else None
                loss, parts = physics_loss(maps.float(), bt["images"], bt["head"],
                                           bt["protocols"], groups, weights)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss {float(loss)}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(parts["loss"])

            t = _timed(step, dev, s, ctx.deadline)
            sps = b * t["iters"] / t["total_s"]
            sec.row(name, params=params, metrics={
                "slices_per_s": sps, "tflops_est": sps * fps / 1e12, **_peak(dev),
                "median_step_s": t["median_s"], "iters": t["iters"],
                "scale_groups": int(np.unique(host["groups"]).size),
                "last_loss": losses[-1]})
            largest = (b, sps)
            best_sps = max(best_sps, sps)
        except Exception as exc:  # an OOM (or e.g. a 32-bit indexing limit) ends the sweep
            oom = _is_oom(exc)
            stop = f"batch {b} {'did not fit' if oom else 'raised'}"
            sec.row(name, status="oom" if oom else "error", reason=_short(exc), params=params)
        finally:
            del bt
            opt.zero_grad(set_to_none=True)
    if largest is None:
        raise RuntimeError(f"no training batch ran ({sec.rows[-1]['reason']})")
    sec.info["largest_batch"] = largest[0]
    sec.info["largest_batch_slices_per_s"] = largest[1]
    sec.info["best_slices_per_s"] = best_sps
    sec.shared["train_batch"] = largest[0]
    sec.shared["train_sps"] = largest[1]
    # attribution at the largest batch: the network with a trivial loss, the loss alone
    b = largest[0]
    if ctx.left() < 5:
        for n in plan_training(s)[-2:]:
            sec.row(n, status="skipped", reason="time budget", optional=True)
        return
    _free(dev)
    _reset_peak(dev)
    bt = _to_device(_train_batch(bank, b, rng), dev)

    def trivial() -> None:
        keep = contrast_dropout(rng, 3, cfg.dropout)
        maps = network_forward(model, bt["images"], keep, dev, precision)
        loss = (maps.float() - 1.0).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = _timed(trivial, dev, s, ctx.deadline)
    sec.row("attribution: step with a trivial loss (largest batch)", optional=True,
            params={"batch": b}, metrics={"slices_per_s": b * t["iters"] / t["total_s"],
                                          "median_step_s": t["median_s"], **_peak(dev)})
    with torch.no_grad(), train_autocast(dev, precision):
        fixed = model(bt["images"]).float()

    def loss_only() -> None:
        maps = fixed.detach().requires_grad_(True)
        loss, _ = physics_loss(maps, bt["images"], bt["head"], bt["protocols"], bt["groups"],
                               weights)
        loss.backward()

    t = _timed(loss_only, dev, s, ctx.deadline)
    sec.row("attribution: physics_loss alone, forward + backward (largest batch)",
            optional=True, params={"batch": b},
            metrics={"slices_per_s": b * t["iters"] / t["total_s"],
                     "median_s": t["median_s"]})


def plan_data(s: Sizes) -> list[str]:
    b = s.loader_batches[0]
    return [f"loader: train.py path (PackedSlices.batch + _to_device) batch {b}",
            f"loader: DataLoader {s.loader_workers} workers, pin_memory, batch {b}",
            "loader at the training batch (both paths)",
            "train(): one epoch from the pack at the training batch"]


def sec_data(sec: Section) -> None:
    from qmriflow.model.calibration import DEFAULT_METHOD
    from qmriflow.model.data import PackedSlices
    from qmriflow.model.train import TrainConfig, _to_device, train

    ctx, s, dev = sec.ctx, sec.ctx.sizes, sec.ctx.dev
    pack = ctx.tmp / "pack"
    t0 = time.perf_counter()
    index = write_synthetic_pack(pack, s.data_sessions, s.slices_per_session, s.hw)
    nbytes = sum(f.stat().st_size for f in pack.iterdir())
    sec.info.update({"pack_slices": index["n_slices"], "pack_sessions": s.data_sessions,
                     "pack_mib": nbytes / 2**20, "pack_write_s": time.perf_counter() - t0,
                     "pack_written_by": "bench/gpu_check.py in the pack format (PACK_VERSION "
                                        "of qmriflow.model.data; pack_sessions needs NIfTI "
                                        "sessions and nibabel)",
                     "page_cache": "hot (written just before; a 35 GB pack fits a 128 GB "
                                   "node's page cache after the first epoch)",
                     "train_py_loader": "train.py builds no DataLoader: each step calls "
                                        "PackedSlices.batch and _to_device (pin_memory per "
                                        "tensor, then a non-blocking copy) in the loop"})
    packed = PackedSlices(pack, DEFAULT_METHOD)
    n = len(packed)
    train_b = int(ctx.shared.get("train_batch") or s.loader_batches[0])
    batches = list(dict.fromkeys([*s.loader_batches, train_b]))
    rng = np.random.default_rng(0)
    for b in batches:
        tag = "" if b in s.loader_batches else " (training batch)"
        # 1. what train.py does in its loop
        name = f"loader: train.py path (PackedSlices.batch + _to_device) batch {b}{tag}"
        order = rng.permutation(n)
        k = [0]

        def one(b: int = b, order: np.ndarray = order, k: list[int] = k) -> None:
            i = (k[0] * b) % max(n - b, 1)
            k[0] += 1
            out = _to_device(packed.batch(order[i:i + b]), dev)
            assert out["images"].shape[0] == b

        t = _timed(one, dev, s, ctx.deadline)
        sec.row(name, params={"batch": b}, metrics={
            "slices_per_s": b * t["iters"] / t["total_s"], "median_batch_s": t["median_s"],
            "iters": t["iters"]})
        # 2. the host side alone (memory map → float32 arrays)
        t = _timed(lambda b=b, order=order: packed.batch(order[:b]), torch.device("cpu"), s,
                   ctx.deadline)
        sec.row(f"loader: PackedSlices.batch alone (host) batch {b}{tag}",
                params={"batch": b}, optional=True,
                metrics={"slices_per_s": b * t["iters"] / t["total_s"]})
        # 3. a DataLoader with workers and pinned memory
        name = f"loader: DataLoader {s.loader_workers} workers, pin_memory, batch {b}{tag}"
        params = {"batch": b, "workers": s.loader_workers, "pin_memory": ctx.cuda}
        if ctx.left() < 5:
            sec.row(name, status="skipped", reason="time budget", params=params, optional=True)
            continue
        try:
            g = torch.Generator().manual_seed(0)
            sampler = torch.utils.data.BatchSampler(
                torch.utils.data.RandomSampler(range(n), generator=g), b, drop_last=True)
            loader = torch.utils.data.DataLoader(
                _PackBatches(pack, DEFAULT_METHOD, n), batch_size=None, sampler=sampler,
                num_workers=s.loader_workers, pin_memory=ctx.cuda,
                prefetch_factor=4 if s.loader_workers > 0 else None)
            t_start = time.perf_counter()
            got, t_first, t_end = 0, None, None
            need = max(s.min_iters + 2, 4)
            for i, batch in enumerate(loader):
                on = {k2: v.to(dev, non_blocking=True) for k2, v in batch.items()}
                _sync(dev)
                del on
                if i == 1:  # the clock starts once the workers delivered their first batches
                    t_first = time.perf_counter()
                elif i > 1:
                    got += b
                    t_end = time.perf_counter()
                    if i + 1 >= need and t_end - t_first >= s.min_time_s:
                        break
                if time.time() > ctx.deadline:
                    break
            if not got:
                raise RuntimeError(f"too few batches ({len(sampler)}) to time the DataLoader")
            sec.row(name, params=params, optional=True, metrics={
                "slices_per_s": got / (t_end - t_first),
                "startup_s": t_first - t_start, "batches": got // b})
            del loader
        except Exception as exc:
            sec.row(name, status="error", reason=_short(exc), params=params, optional=True)
    # 4. train() itself, one short epoch (loader in the loop), as `qmriflow train` runs it
    name = f"train(): one epoch of {s.train_e2e_steps} steps from the pack, batch {train_b}"
    params = {"batch": train_b, "steps": s.train_e2e_steps, "width": s.width,
              "warmup": "off (steady state)"}
    if ctx.left() < 10:
        sec.row(name, status="skipped", reason="time budget", params=params)
        return
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        sec.row(name, status="skipped", params=params,
                reason="matplotlib is missing (train() plots the training curve)")
        return
    cfg = TrainConfig(width=s.width, epochs=1, batch_size=train_b,
                      steps_per_epoch=s.train_e2e_steps, val_max_slices=train_b,
                      warmup_epochs=0, warmup_min_steps=0, device=ctx.device,
                      threads=ctx.threads)
    _free(dev)
    _reset_peak(dev)
    t0 = time.perf_counter()
    summary = train(pack, ctx.tmp / "train_run", cfg, resume=False, progress=False)
    wall = time.perf_counter() - t0
    h = summary["history"][0]
    sec.row(name, params=params, metrics={
        "slices_per_s": h["train_slices_per_s"], "epoch_s": h["seconds"], "wall_s": wall,
        "train_loss": h["train_loss"], **_peak(dev)})


def plan_archive(s: Sizes) -> list[str]:
    return [f"archive {s.archive_sessions} sessions x {s.slices_per_session} slices, batched "
            "across sessions (best inference batch)",
            "archive, per session as `qmriflow infer` runs now (batch 4, extrapolated)",
            "archive, per session, one batch per session (batch 35, extrapolated)",
            "process start to model ready (import, CUDA init, checkpoint load)"]


def sec_archive(sec: Section) -> None:
    from qmriflow.model.checkpoint import FORMAT, save_checkpoint
    from qmriflow.model.infer import _load_network, predict_maps

    ctx, s, dev = sec.ctx, sec.ctx.sizes, sec.ctx.dev
    per = s.slices_per_session
    ckpt = ctx.tmp / "archive_model.pt"
    model = _new_model(s.width, torch.device("cpu"))
    save_checkpoint(ckpt, {"format": FORMAT, "width": s.width, "state_dict": model.state_dict()})
    del model
    t0 = time.perf_counter()
    net = _load_network(ckpt, ctx.device, "auto", "refined")  # as infer_session loads it
    torch.zeros(1, device=net.device).sum().item()
    load_s = time.perf_counter() - t0
    sec.info.update({"precision": net.precision, "device": str(net.device),
                     "channels_last": bool(getattr(net.model, "channels_last", False)),
                     "code_path": "qmriflow.model.infer._load_network + predict_maps (what "
                                  "infer_session calls), brain mask applied, outputs copied "
                                  "back to host memory"})
    sec.row("process start to model ready (import, CUDA init, checkpoint load)",
            optional=True, params={"own_process": ctx.partial is not None},
            metrics={"since_process_start_s": time.time() - T_PROCESS,
                     "checkpoint_load_s": load_s})
    ses = phantom_session(per, s.hw, 0)
    best = int(ctx.shared.get("infer_best_batch") or (256 if s.label == "full" else 2))
    # the sessions' slices concatenated (batched across sessions), in calls of whole batches
    chunk = best * max(1, math.ceil(2048 / best)) if s.label == "full" else best * 2
    reps = math.ceil(chunk / per)
    imgs = np.concatenate([ses.images] * reps)[:chunk]
    mask = np.concatenate([ses.brain] * reps)[:chunk]
    kw = {"device": net.device, "precision": net.precision}
    predict_maps(net.model, imgs[:best], batch_size=best, mask=mask[:best], **kw)  # warm-up
    _sync(dev)
    _reset_peak(dev)
    n_all = s.archive_sessions * per
    done, t0, out = 0, time.perf_counter(), None
    while done < n_all:
        m = min(chunk, n_all - done)
        out = predict_maps(net.model, imgs[:m], batch_size=best, mask=mask[:m], **kw)
        done += m
        if time.time() > ctx.deadline - 5:
            break
    _sync(dev)
    secs = time.perf_counter() - t0
    sec.row(plan_archive(s)[0], params={"batch": best, "slices_per_call": chunk,
                                        "slices_done": done, "extrapolated": done < n_all},
            metrics={"gpu_seconds": secs * n_all / done, "slices_per_s": done / secs,
                     "finite": bool(np.isfinite(out).all()), **_peak(dev)})
    for bs, name in ((4, plan_archive(s)[1]), (per, plan_archive(s)[2])):
        n = s.archive_sample_sessions
        if ctx.left() < 5:
            sec.row(name, status="skipped", reason="time budget", optional=True)
            continue
        t0 = time.perf_counter()
        for _ in range(n):
            predict_maps(net.model, ses.images, batch_size=bs, mask=ses.brain, **kw)
        secs = time.perf_counter() - t0
        sec.row(name, optional=True, params={"batch": bs, "sessions_timed": n,
                                             "extrapolated": True},
                metrics={"gpu_seconds": secs * s.archive_sessions / n,
                         "slices_per_s": n * per / secs})


def plan_cse_fit(s: Sizes) -> list[str]:
    return ["cse two-start fit {}x{}x{}x6".format(*s.cse_shape)]


def sec_cse_fit(sec: Section) -> None:
    from qmriflow.cse import CseOptions, FitOptions, run_cse

    ctx, s = sec.ctx, sec.ctx.sizes
    threads = ctx.threads or 0
    if s.label == "full":  # first CUDA use of the fit's kernels, not timed
        small, _, _ = _cse_series(ctx, (32, 32, 2))
        run_cse(small, CseOptions(method="fit", device=ctx.device,
                                  fit=FitOptions(device=ctx.device)))
    series, sigma_true, gen_s = _cse_series(ctx, s.cse_shape)
    res = run_cse(series, CseOptions(method="fit", device=ctx.device, threads=threads,
                                     fit=FitOptions(device=ctx.device, threads=threads)))
    n = int(res.mask.sum())
    sec.info.update({"series_generation_s": gen_s, "sigma_true": sigma_true,
                     "sigma_est": res.sigma})
    sec.row(plan_cse_fit(s)[0], params={"shape": [*s.cse_shape, 6], "voxels": n},
            metrics={"voxels_per_s": n / res.seconds["fit"], "fit_s": res.seconds["fit"],
                     "end_to_end_s": res.seconds["total"],
                     "mean_iterations": res.info["fit"]["mean_iterations"],
                     "pdff_median": float(np.median(res.pdff[res.mask])), **_peak(ctx.dev)})


def plan_cse_dual(s: Sizes) -> list[str]:
    return ["cse dual network train + infer {}x{}x{}x6".format(*s.cse_shape)]


def sec_cse_dual(sec: Section) -> None:
    from qmriflow.cse import CseOptions, TrainOptions, run_cse

    ctx, s = sec.ctx, sec.ctx.sizes
    threads = ctx.threads or 1
    tiny = {} if s.cse_full_training else {"max_epochs": 2, "min_epochs": 1,
                                           "steps_per_epoch": 5, "patience": 1}
    if s.label == "full":  # first CUDA use of the networks' kernels, not timed
        small, _, _ = _cse_series(ctx, (32, 32, 2))
        run_cse(small, CseOptions(method="dual", device=ctx.device, train=TrainOptions(
            device=ctx.device, max_epochs=1, min_epochs=1, steps_per_epoch=5)))
    series, _, _ = _cse_series(ctx, s.cse_shape)
    opts = TrainOptions(device=ctx.device, threads=threads, **tiny)
    sec.info["train_options"] = opts.as_dict()
    res = run_cse(series, CseOptions(method="dual", device=ctx.device, train=opts,
                                     threads=ctx.threads or 0))
    n = int(res.mask.sum())
    tr, inf = res.seconds["training"], res.seconds["inference"]
    sec.row(plan_cse_dual(s)[0], params={"shape": [*s.cse_shape, 6], "voxels": n,
                                         "default_training": s.cse_full_training},
            metrics={"train_plus_infer_s": tr + inf, "training_s": tr, "inference_s": inf,
                     "epochs": res.info["training"]["epochs"],
                     "inference_voxels_per_s": res.info["inference_voxels_per_s"],
                     "end_to_end_s": res.seconds["total"], **_peak(ctx.dev)})


RUNNERS: dict[str, Callable[[Section], None]] = {
    "environment": sec_environment, "inference": sec_inference, "training": sec_training,
    "archive": sec_archive, "data": sec_data, "cse_fit": sec_cse_fit,
    "inference_compile": sec_inference_compile, "cse_dual": sec_cse_dual}
PLANS: dict[str, Callable[[Sizes], list[str]]] = {
    "environment": lambda s: ["matmul 8192³ bfloat16"], "inference": plan_inference,
    "training": plan_training, "archive": plan_archive, "data": plan_data,
    "cse_fit": plan_cse_fit, "inference_compile": plan_inference_compile,
    "cse_dual": plan_cse_dual}


def run_section(name: str, ctx: Ctx) -> dict[str, Any]:
    """Run one section in this process; never raises (the error is recorded)."""
    sec = Section(name, ctx)
    t0 = time.perf_counter()
    status, error = "ok", None
    if ctx.threads and not ctx.cuda:
        torch.set_num_threads(ctx.threads)
    try:
        RUNNERS[name](sec)
    except Exception as exc:
        status = "error"
        error = _short(exc, 500) + "\n" + "".join(traceback.format_exc().splitlines(True)[-12:])
        print(f"  [{name}] ERROR {_short(exc)}", flush=True)
    res = sec.result(status, error)
    res["seconds"] = time.perf_counter() - t0
    sec.save(status, error)
    return res


# ---------------------------------------------------------------------------------------------
# isolation: one subprocess per section (CUDA), with a hard time limit
# ---------------------------------------------------------------------------------------------


def worker_main(io_path: Path) -> int:
    spec = json.loads(io_path.read_text())
    s = spec["sizes"]
    sizes = Sizes(**{**s, **{k: tuple(v) for k, v in s.items() if isinstance(v, list)}})
    ctx = Ctx(mode=spec["mode"], device=spec["device"], sizes=sizes, deadline=spec["deadline"],
              tmp=Path(spec["tmp"]), shared=spec["shared"], threads=spec["threads"],
              cpu_compile=spec["cpu_compile"], partial=io_path.with_suffix(".result.json"))
    hook = os.environ.get(SLEEP_ENV, "")
    if hook.partition("=")[0] == spec["section"]:
        time.sleep(float(hook.partition("=")[2]))
    run_section(spec["section"], ctx)
    return 0


def run_isolated(name: str, ctx: Ctx, hard_s: float, log: Path) -> dict[str, Any]:
    io_path = ctx.tmp / f"section_{name}.json"
    result_path = io_path.with_suffix(".result.json")
    _write_json_atomic(io_path, {"section": name, "mode": ctx.mode, "device": ctx.device,
                                 "sizes": asdict(ctx.sizes), "deadline": ctx.deadline,
                                 "tmp": str(ctx.tmp), "shared": ctx.shared,
                                 "threads": ctx.threads, "cpu_compile": ctx.cpu_compile})
    t0 = time.perf_counter()
    with open(log, "a") as lf:
        lf.write(f"\n===== section {name} =====\n")
        lf.flush()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker",
                                 str(io_path)], stdout=lf, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        timed_out = False
        try:
            rc = proc.wait(timeout=hard_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    secs = time.perf_counter() - t0
    res: dict[str, Any]
    if result_path.is_file():
        res = json.loads(result_path.read_text())
    else:
        res = {"status": "error", "reason": None, "info": {}, "error": None, "rows": [],
               "shared": {}}
    res["seconds"] = secs
    tail = log.read_text()[-1500:] if log.is_file() else ""
    if timed_out:
        res["status"] = "timeout"
        res["reason"] = (f"killed after {hard_s:.0f} s (its share of the time budget); rows "
                         "so far are kept")
    elif res.get("status") == "running" or rc != 0:
        res["status"] = "error"
        res["error"] = res.get("error") or f"worker exited with status {rc}; log tail:\n{tail}"
    return res


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _ok_rows(report: dict[str, Any], section: str, kind: str) -> list[dict[str, Any]]:
    sec = report["sections"].get(section) or {}
    return [r for r in sec.get("rows", []) if r["status"] == "ok" and r["kind"] == kind]


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    info_inf = (report["sections"].get("inference") or {}).get("info", {})
    fps = (info_inf.get("forward_flop_3_contrasts") if report["mode"] == "full" else None) \
        or FULL_FLOP_PER_SLICE
    peak = H200_BF16_TFLOPS * 1e12
    phys_inf = peak / fps
    phys_train = peak / (3 * fps)
    out = []

    def best(kind: str, sections: tuple[str, ...], metric: str, pred: Callable | None = None,
             lowest: bool = False) -> tuple[float | None, str | None]:
        rows = [r for sname in sections for r in _ok_rows(report, sname, kind)
                if isinstance(r["metrics"].get(metric), (int, float))
                and (pred is None or pred(r))]
        if not rows:
            return None, None
        r = (min if lowest else max)(rows, key=lambda r: r["metrics"][metric])
        return float(r["metrics"][metric]), r["name"]

    bf16 = lambda r: r["params"].get("precision") == "bf16"  # noqa: E731
    full_infer = lambda r: r["name"].startswith("inference")  # noqa: E731
    train_row = lambda r: r["name"].startswith("training step")  # noqa: E731
    batched = lambda r: "batched" in r["name"]  # noqa: E731
    loader = lambda r: r["name"].startswith("loader: train.py path")  # noqa: E731
    specs = [
        ("inference_bf16", "inference, bf16, full width, 224², slices/s (eager)", "slices/s",
         ("inference",), "slices_per_s", lambda r: bf16(r) and full_infer(r), 3000.0, ">=",
         "not published", f"~{phys_inf:,.0f} ({fps / 1e9:.1f} GFLOP/slice at "
                          f"{H200_BF16_TFLOPS:.0f} TFLOP/s)"),
        ("inference_bf16_compiled", "inference, bf16, compiled or CUDA graph, slices/s",
         "slices/s", ("inference_compile",), "slices_per_s", bf16, 3000.0, ">=",
         "not published", f"~{phys_inf:,.0f}"),
        ("training", "training step, real loss, largest batch that fits, slices/s",
         "slices/s", ("training",), "slices_per_s", train_row, 1000.0, ">=",
         f"~{V100_TRAIN_SPS:.0f} (50 epochs × 116 k slices in ~30 h)",
         f"~{phys_train:,.0f} (3 × forward FLOPs)"),
        ("archive_600", "600 sessions × 35 slices, predict_maps batched, GPU s", "s",
         ("archive",), "gpu_seconds", batched, 30.0, "<", "not published",
         f"~{21000 * fps / peak:.1f} s"),
        ("loader", "loader alone (train.py path), slices/s", "slices/s", ("data",),
         "slices_per_s", loader, None, ">= training", "—", "—"),
        ("cse_fit", "fat/water two-start fit, voxels/s", "voxels/s", ("cse_fit",),
         "voxels_per_s", None, 5e6, ">=", "—", "—"),
        ("cse_dual", "fat/water dual network, train + infer, s", "s", ("cse_dual",),
         "train_plus_infer_s", None, 20.0, "<", "—", "—"),
    ]
    train_sps = None
    for key, fig, unit, secs, metric, pred, target, op, v100, phys in specs:
        lowest = op == "<"
        if key == "training":  # the largest batch that fits, not the fastest
            rows = [r for r in _ok_rows(report, "training", "gpu") if train_row(r)]
            measured = rows[-1]["metrics"]["slices_per_s"] if rows else None
            source = rows[-1]["name"] if rows else None
            srows = [r for r in _ok_rows(report, "training", "smoke") if train_row(r)]
            smoke = srows[-1]["metrics"]["slices_per_s"] if srows else None
            train_sps = measured
        else:
            if key == "loader":  # at the training batch where it was measured there
                at_train = lambda r: loader(r) and "(training batch)" in r["name"]  # noqa: E731
                if best("gpu", secs, metric, at_train)[0] is not None:
                    pred = at_train
            measured, source = best("gpu", secs, metric, pred, lowest)
            smoke, _ = best("smoke", secs, metric, pred, lowest)
        if key == "loader":
            target = train_sps
        met = None
        if measured is not None and target is not None:
            met = measured < target if op == "<" else measured >= target
        reason = None
        if measured is None:
            sec = [report["sections"].get(sn) or {} for sn in secs]
            gpu_rows = [r for sx in sec for r in sx.get("rows", []) if r["kind"] == "gpu"]
            reasons = {r["reason"] for r in gpu_rows if r.get("reason")}
            reason = "; ".join(sorted(reasons))[:160] or next(
                (sx.get("reason") or sx.get("status") for sx in sec if sx), "not run")
        out.append({"key": key, "figure": fig, "unit": unit, "measured": measured,
                    "target": target, "op": op, "met": met, "v100": v100, "physical": phys,
                    "smoke": smoke, "source": source, "reason": reason})
    return out


def markdown(report: dict[str, Any]) -> str:
    env = (report["sections"].get("environment") or {}).get("info", {})
    lines = [f"# GPU check (issue 27) — mode `{report['mode']}`", ""]
    dev = env.get("device_name") or report["device"]
    lines.append(f"Device: {dev}; driver {env.get('driver', '—')}; CUDA {env.get('torch_cuda')}; "
                 f"torch {env.get('torch', report.get('torch'))}; "
                 f"Python {env.get('python', report.get('python'))}; "
                 f"{env.get('cpu_affinity', env.get('cpu_count'))} CPUs; GPU memory "
                 f"{_fmt(env.get('gpu_memory_gib'))} GiB. Started {report['started']}, "
                 f"{_fmt(report.get('elapsed_s'))} s of a {report['time_budget_s']:.0f} s "
                 "budget.")
    lines += ["", "| figure | measured | issue target | met | published V100 | physical estimate "
              "| CPU/quick smoke (tiny sizes) |", "|---|---|---|---|---|---|---|"]
    for t in report.get("targets", []):
        meas = _fmt(t["measured"]) if t["measured"] is not None else \
            f"not measured: {t['reason']}"
        if t["op"] == ">= training":
            tgt = f"≥ training ({_fmt(t['target'])})" if t["target"] is not None else \
                "≥ training slices/s"
        else:
            tgt = f"{'≥' if t['op'] == '>=' else '<'} {_fmt(t['target'])}"
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['figure']} | {meas} | {tgt} | {met} | {t['v100']} | "
                     f"{t['physical']} | {_fmt(t['smoke'])} |")
    lines += ["", "## Sections", "", "| section | status | seconds | reason / error |",
              "|---|---|---|---|"]
    for name, sx in report["sections"].items():
        why = sx.get("reason") or (sx.get("error") or "").split("\n")[0]
        lines.append(f"| {name} | {sx['status']} | {_fmt(sx.get('seconds'))} | {why[:200]} |")
    lines += ["", "## Rows", "", "| section | row | kind | status | main figure | peak MiB | "
              "reason |", "|---|---|---|---|---|---|---|"]
    main_keys = ("slices_per_s", "gpu_seconds", "voxels_per_s", "train_plus_infer_s", "tflops",
                 "since_process_start_s")
    for name, sx in report["sections"].items():
        for r in sx.get("rows", []):
            m = r["metrics"]
            k = next((k for k in main_keys if isinstance(m.get(k), (int, float))), None)
            fig = f"{_fmt(m[k])} {k}" if k else ""
            mem = m.get("peak_gpu_mib", m.get("peak_rss_mib"))
            lines.append(f"| {name} | {r['name']} | {r['kind']} | {r['status']} | {fig} | "
                         f"{_fmt(mem)} | {(r.get('reason') or '')[:120]} |")
    return "\n".join(lines) + "\n"


def _write(out: Path, report: dict[str, Any]) -> None:
    report["elapsed_s"] = time.time() - report["_t0"]
    report["targets"] = _targets(report)
    data = {k: v for k, v in report.items() if not k.startswith("_")}
    _write_json_atomic(out / "gpu_check.json", data)
    (out / "gpu_check.md").write_text(markdown(data))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: $OUT if set, else ./gpu_check_out)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (automatic without CUDA): a smoke test of the code paths")
    ap.add_argument("--time-budget-s", type=float, default=420.0,
                    help="seconds for all sections; what no longer fits is skipped (420)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and CSE")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="one subprocess per section (auto: on CUDA)")
    ap.add_argument("--cpu-compile", action="store_true",
                    help="also run the torch.compile rows on the CPU (slow)")
    ap.add_argument("--no-cuda", action="store_true", help="behave as if there were no GPU")
    ap.add_argument("--_worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_full-on-cpu", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    bad = [s for s in a.sections.split(",") if s and s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a._worker is not None:
        return worker_main(a._worker)
    out = a.out or Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not a.no_cuda
    mode = "full" if cuda and not a.quick else "quick" if cuda else "cpu-smoke"
    if a._full_on_cpu:  # a dry run of the full mode's sizes and scheduling (slow: testing only)
        mode = "full"
    sizes = FULL if mode == "full" else SMOKE
    device = "cuda" if cuda else "cpu"
    isolate = a.isolate == "yes" or (a.isolate == "auto" and cuda)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    deadline = t0 + a.time_budget_s
    wanted = [s for s in SECTIONS if s in a.sections.split(",")]
    report: dict[str, Any] = {
        "_t0": t0, "script": "bench/gpu_check.py", "version": VERSION, "mode": mode,
        "device": device, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "elapsed_s": 0.0, "time_budget_s": a.time_budget_s, "argv": sys.argv[1:],
        "torch": torch.__version__, "python": sys.version.split()[0],
        "isolated": isolate, "exit_status": None, "sizes": asdict(sizes), "shared": {},
        "sections": {}}
    skip_reason = {"cpu-smoke": NO_CUDA, "quick": "--quick (tiny sizes ran instead)"}.get(mode)
    print(f"gpu_check: mode {mode}, device {device}, budget {a.time_budget_s:.0f} s, "
          f"out {out}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="qmri_gpucheck_"))
    log = out / "gpu_check.log"
    if isolate:
        log.write_text("")
    shared: dict[str, Any] = {}
    try:
        for i, name in enumerate(SECTIONS):
            planned = []
            if skip_reason:
                planned = [{"name": n, "kind": "gpu", "device": None, "status": "skipped",
                            "reason": skip_reason, "optional": False, "params": {},
                            "metrics": {}} for n in PLANS[name](FULL)]
            if name not in wanted:
                report["sections"][name] = {"status": "skipped", "reason": "not in --sections",
                                            "seconds": 0.0, "info": {}, "error": None,
                                            "rows": planned}
                continue
            left = deadline - time.time()
            reserve = sum(MIN_START_S[n] for n in SECTIONS[i + 1:] if n in wanted) \
                if mode == "full" else 0.0
            if left < (MIN_START_S[name] if mode == "full" else 0.5):
                report["sections"][name] = {
                    "status": "skipped", "seconds": 0.0, "info": {}, "error": None,
                    "rows": planned, "reason": f"time budget ({left:.0f} s left)"}
                _write(out, report)
                continue
            share = SHARE_S[name] if mode == "full" else None
            soft = max(left - reserve, MIN_START_S[name] if mode == "full" else 1.0)
            if share is not None:
                soft = min(soft, share)
            ctx = Ctx(mode=mode, device=device, sizes=sizes, deadline=time.time() + soft,
                      tmp=tmp, shared=dict(shared), threads=a.threads,
                      cpu_compile=a.cpu_compile)
            print(f"== {name} (up to {soft:.0f} s)", flush=True)
            if isolate:
                at = log.stat().st_size
                res = run_isolated(name, ctx, soft + GRACE_S[mode], log)
                with open(log) as lf:
                    lf.seek(at)
                    print(lf.read()[-6000:], end="", flush=True)
            else:
                res = run_section(name, ctx)
            shared.update(res.pop("shared", None) or {})
            res["rows"] = planned + res.get("rows", [])
            report["sections"][name] = res
            report["shared"] = shared
            print(f"== {name}: {res['status']} in {res['seconds']:.1f} s"
                  + (f" ({res.get('reason')})" if res.get("reason") else ""), flush=True)
            _write(out, report)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    failed = [n for n, sx in report["sections"].items() if sx["status"] == "error"]
    if mode != "full":
        failed += [f"{n}: {r['name']}" for n, sx in report["sections"].items()
                   for r in sx["rows"] if r["status"] == "error" and not r["optional"]]
    report["exit_status"] = 1 if failed else 0
    report["failures"] = failed
    _write(out, report)
    print(markdown({k: v for k, v in report.items() if not k.startswith("_")}), flush=True)
    if failed:
        print(f"gpu_check: code paths raised: {failed}", flush=True)
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
