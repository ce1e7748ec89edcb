"""Self-supervised training of the relaxometry network on packed slices (seed 000, 2.2.3).

Adam (lr 1e-3, β = 0.9/0.999), batches of 16 slices drawn at random from the training
subjects, Kaiming initialisation, 50 epochs, contrast dropout 0.5, the physics loss of
:mod:`qmriflow.model.losses`; as in the published implementation, the first epoch
(``warmup_epochs``) adds :func:`~qmriflow.model.losses.warmup_loss`, which pulls the maps
towards white-matter values (without it a narrow network stalls at T2 ≈ 1 s, where the weighted
signals hardly depend on T2: measured on the phantom, bench/RESULTS.md). On the seed's data an
epoch is thousands of steps; on a small archive it can be a dozen, too few to leave that
plateau, so the warm-up also lasts at least ``warmup_min_steps`` optimiser steps.
The split is by subject (80/5/15, deterministic from the seed).

Outputs in the training folder:

* ``model.pt`` — weights of the epoch with the lowest validation loss (qmriflow format);
* ``last.pt`` — everything needed to resume (weights, optimizer, epoch, history); an
  interrupted run started again with the same settings continues where it stopped and ends with
  the same weights as an uninterrupted run (shuffling and dropout are drawn from a generator
  seeded with ``(seed, epoch)``, so no random state has to be restored);
* ``hyperparameters.json``, ``split.json``, ``history.tsv``, ``training_curve.png``.

On CUDA the forward pass runs under bf16 autocast with channels-last weights; the physics and
the loss are always computed in float32. CPU works (fp32 by default).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError, InputError
from ..io import atomic_path, dataset_root_of, portable_paths, write_json
from .calibration import DEFAULT_METHOD, METHODS
from .checkpoint import FORMAT, load_checkpoint_file, save_checkpoint
from .data import PackedSlices, contrast_dropout, split_subjects
from .losses import LossWeights, physics_loss, warmup_loss
from .network import SharedAttnUNet, count_parameters, kaiming_init

__all__ = ["TrainConfig", "config_from_dict", "resolve_device", "resolve_precision", "train"]

INITS = ("kaiming", "xavier", "normal")


@dataclass
class TrainConfig:
    """Hyper-parameters (seed defaults) and run settings."""

    width: int = 64
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    lambda_tv: float = 0.01
    lambda_pd: float = 0.1
    pd_threshold: float = 0.60
    scale_bound: float = 0.2
    dropout: float = 0.5
    init: str = "kaiming"
    seed: int = 0
    split: tuple[float, float, float] = (0.80, 0.05, 0.15)
    scale_group: str = "session"  # session | slice
    scaling: str = DEFAULT_METHOD  # seed | calibrated (qmriflow.model.calibration)
    steps_per_epoch: int | None = None  # None: one pass over the training slices
    val_max_slices: int | None = 1024
    warmup_epochs: int = 1  # published: one epoch pulling the maps towards WM values
    warmup_min_steps: int = 300  # ... and at least this many steps (small archives)
    distill: float = 0.0  # λ_D of the distillation term (losses.distill_l1); needs packed
    # targets; with it there is no warm-up (its targets put the maps in the physiological range)
    # run settings (may change between an interrupted run and its resumption)
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    RUN_SETTINGS = ("epochs", "device", "precision", "threads", "extra")

    def __post_init__(self) -> None:
        self.split = tuple(float(x) for x in self.split)  # type: ignore[assignment]
        checks = [
            (self.width >= 1, "width must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.warmup_min_steps >= 0, "warmup_min_steps must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be > 0"),
            (self.lambda_tv >= 0 and self.lambda_pd >= 0, "loss weights must be >= 0"),
            (math.isfinite(self.distill) and self.distill >= 0, "distill must be >= 0"),
            (self.distill == 0 or self.scaling == "calibrated",
             "distill needs scaling: calibrated (its targets are on the calibrated scales)"),
            (0 <= self.dropout <= 1, "dropout must be in [0, 1]"),
            (0 < self.scale_bound < 1, "scale_bound must be in (0, 1)"),
            (self.init in INITS, f"init must be one of {INITS}"),
            (self.scale_group in ("session", "slice"), "scale_group must be session or slice"),
            (self.scaling in METHODS, f"scaling must be one of {METHODS}"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"train: {msg}")

    def hyperparameters(self) -> dict[str, Any]:
        """Settings that define the trained model (must match to resume); ``distill`` only
        when it is on (models trained with the published loss record what they did before)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in self.RUN_SETTINGS and not (f.name == "distill"
                                                            and self.distill == 0)}

    def loss_weights(self) -> LossWeights:
        return LossWeights(tv=self.lambda_tv, pd=self.lambda_pd, pd_threshold=self.pd_threshold,
                           scale_bound=self.scale_bound, scaling=self.scaling,
                           distill=self.distill)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; an unavailable CUDA request is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"bad device {device!r}: {exc}") from None


def resolve_precision(precision: str, device: torch.device, inference: bool = False) -> str:
    """``auto`` → bf16 on CUDA; on CPU fp32 for training, and for inference bf16 where the CPU
    has native bf16 arithmetic (AVX-512 BF16 / AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if inference and _cpu_has_bf16():
        return "bf16"
    return "fp32"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _init(model: torch.nn.Module, how: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(int(seed))
    if how == "kaiming":
        kaiming_init(model, gen)
        return
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            if how == "xavier":
                torch.nn.init.xavier_normal_(m.weight, generator=gen)
            else:
                torch.nn.init.normal_(m.weight, 0.0, 0.02, generator=gen)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def _pack_fingerprint(packed: PackedSlices) -> str:
    h = hashlib.sha256()
    h.update(str(len(packed)).encode())
    for s in packed.index["sessions"]:
        h.update(f"{s['label']}:{s['n_slices']}".encode())
    return h.hexdigest()[:16]


def _to_device(batch: dict[str, np.ndarray], dev: torch.device) -> dict[str, torch.Tensor]:
    nb = dev.type == "cuda"
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if nb:
            t = t.pin_memory()
        out[k] = t.to(dev, non_blocking=nb)
    return out


def _autocast(dev: torch.device, precision: str):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def network_forward(model: torch.nn.Module, images: torch.Tensor, keep: Any,
                    dev: torch.device, precision: str) -> torch.Tensor:
    """The training forward pass: the kept contrasts of a batch (channels-last on CUDA)
    through the network under the training precision."""
    x = images[:, keep]
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(dev, precision):
        return model(x)


def _evaluate(model: SharedAttnUNet, packed: PackedSlices, idx: np.ndarray, cfg: TrainConfig,
              dev: torch.device, precision: str) -> dict[str, float]:
    """Mean loss parts over ``idx`` with all three contrasts (no dropout)."""
    model.eval()
    tot: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for i in range(0, idx.size, cfg.batch_size):
            b = _to_device(packed.batch(idx[i:i + cfg.batch_size]), dev)
            with _autocast(dev, precision):
                maps = model(b["images"])
            groups = b["groups"] if cfg.scale_group == "session" else None
            _, parts = physics_loss(maps.float(), b["images"], b["head"], b["protocols"],
                                    groups, cfg.loss_weights(), b.get("targets"),
                                    b["brain"])
            k = int(b["images"].shape[0])
            for key, v in parts.items():
                tot[key] = tot.get(key, 0.0) + v * k
            n += k
    model.train()
    return {k: v / max(n, 1) for k, v in tot.items()}


def _plot_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax.plot(ep, [h.get("val_loss") for h in history], "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (L1 + λ_TV·TV + λ_PD·hinge)")
    ax.set_title("qmriflow relaxometry training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_history(history: list[dict[str, Any]], path: Path) -> None:
    cols = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    lines = ["\t".join(cols)]
    for h in history:
        lines.append("\t".join("n/a" if h.get(c) is None else
                               (f"{h[c]:.6g}" if isinstance(h[c], float) else str(h[c]))
                               for c in cols))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _save_best(path: Path, state: dict[str, torch.Tensor], cfg: TrainConfig,
               hp: dict[str, Any], epoch: int, val_loss: float) -> None:
    save_checkpoint(path, {"format": FORMAT, "width": cfg.width, "state_dict": state,
                           "hyperparameters": hp, "epoch": epoch, "val_loss": val_loss,
                           "qmriflow_version": __version__})


def train(pack_dir: str | Path, out_dir: str | Path, cfg: TrainConfig | None = None, *,
          resume: bool = True, progress: bool = True, max_epochs_this_run: int | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume training) on a packed folder; returns a summary.

    ``max_epochs_this_run`` stops after that many epochs of this invocation (for time-limited
    jobs; start again with the same arguments to continue).
    """
    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packed = PackedSlices(pack_dir, cfg.scaling)
    if cfg.distill > 0 and packed.targets is None:
        raise ConfigError("distill > 0 needs the network-free targets in the pack: pack with "
                          "`qmriflow pack --targets`", path=pack_dir)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dev = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, dev)

    split = split_subjects(packed.subjects, cfg.seed, cfg.split)
    slice_split = np.asarray([split[s] for s in packed.slice_subjects()])
    train_idx = np.nonzero(slice_split == "train")[0]
    val_idx = np.nonzero(slice_split == "val")[0]
    if train_idx.size == 0:
        raise InputError("no training slices after the subject split", path=pack_dir)
    if cfg.val_max_slices and val_idx.size > cfg.val_max_slices:
        sel = np.random.default_rng([cfg.seed, 999]).choice(val_idx.size, cfg.val_max_slices,
                                                               replace=False)
        val_idx = np.sort(val_idx[sel])
    val_on_train = val_idx.size == 0
    if val_on_train:  # fewer than 3 subjects: select on (a fixed sample of) the training data
        val_idx = train_idx[: min(train_idx.size, cfg.val_max_slices or train_idx.size)]

    model = SharedAttnUNet(cfg.width)
    _init(model, cfg.init, cfg.seed)
    model.to(dev)
    if dev.type == "cuda":
        model.use_channels_last(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    fingerprint = _pack_fingerprint(packed)
    hp = {**cfg.hyperparameters(), "split": list(cfg.split)}
    history: list[dict[str, Any]] = []
    best = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    start_epoch = 0
    last_path = out / "last.pt"
    if resume and last_path.is_file():
        state = load_checkpoint_file(last_path)
        if state.get("hyperparameters") != json.loads(json.dumps(hp)):
            raise ConfigError("last.pt in this folder was trained with other hyper-parameters; "
                              "use the same settings, --no-resume, or a new folder",
                              path=last_path)
        if state.get("pack_fingerprint") != fingerprint:
            raise ConfigError("last.pt in this folder was trained on other packed data; use "
                              "--no-resume or a new folder", path=last_path)
        model.load_state_dict(state["state_dict"], strict=True)
        opt.load_state_dict(state["optimizer"])
        history = list(state["history"])
        best = float(state["best_val"])
        best_state = state.get("best_state")
        best_epoch = int(state.get("best_epoch", 0))
        start_epoch = int(state["epoch"]) + 1
        if best_state is not None and not (out / "model.pt").is_file():
            # e.g. removed by a workflow manager after an interrupted job: restore it
            _save_best(out / "model.pt", best_state, cfg, hp, best_epoch, best)
    if dev.type == "cuda":
        model.use_channels_last(True)

    n_params = count_parameters(model)
    steps = cfg.steps_per_epoch or math.ceil(train_idx.size / cfg.batch_size)
    meta = {
        "qmriflow_version": __version__, "torch_version": torch.__version__,
        "hyperparameters": hp, "epochs": cfg.epochs, "device": str(dev), "precision": precision,
        "parameters": n_params, "pack_dir": Path(pack_dir), "pack_fingerprint": fingerprint,
        "n_slices": {"train": int(train_idx.size), "val": int(val_idx.size),
                     "val_is_train_sample": val_on_train},
        "n_subjects": {k: sum(1 for v in split.values() if v == k)
                       for k in ("train", "val", "test")},
        "steps_per_epoch": steps, "optimizer": "Adam(betas=(0.9, 0.999))",
        "loss": "L1 (head) + lambda_tv*TV + lambda_pd*mean(max(0, pd_threshold - PD))"
                + (" + distill*mean|log maps - log network-free maps| (brain)"
                   if cfg.distill > 0 else ""),
    }
    # the model folder is shared with the maps: file references relative to the dataset, or
    # the name alone for the pack in the work folder (io.dataset_ref)
    write_json(out / "hyperparameters.json",
               portable_paths(meta, dataset_root_of(out / "hyperparameters.json")))
    write_json(out / "split.json", {"seed": cfg.seed, "fractions": list(cfg.split),
                                    "subjects": split})
    weights = cfg.loss_weights()
    ran = 0
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if max_epochs_this_run is not None and ran >= max_epochs_this_run:
            break
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(train_idx.size)
        need = steps * cfg.batch_size
        while order.size < need:
            order = np.concatenate([order, rng.permutation(train_idx.size)])
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        bar = None
        if progress and sys.stderr.isatty():  # a bar on a terminal; logs get the epoch lines
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       leave=True, dynamic_ncols=True)
        for step in range(steps):
            idx = train_idx[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
            keep = contrast_dropout(rng, 3, cfg.dropout)
            b = _to_device(packed.batch(idx), dev)
            maps = network_forward(model, b["images"], keep, dev, precision)
            groups = b["groups"] if cfg.scale_group == "session" else None
            loss, parts = physics_loss(maps.float(), b["images"], b["head"], b["protocols"],
                                       groups, weights, b.get("targets"), b["brain"])
            # the warm-up pulls a fresh network into the physiological range; the
            # distillation term's targets do that already (and better), so it has none
            if cfg.distill == 0 and (epoch < cfg.warmup_epochs
                                     or epoch * steps + step < cfg.warmup_min_steps):
                loss = loss + warmup_loss(maps.float(), b["head"])
            if not torch.isfinite(loss):
                raise InputError(f"training diverged (loss {float(loss)}) at epoch {epoch + 1} "
                                 f"step {step + 1}; lower the learning rate", path=out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.4f}")
        if bar is not None:
            bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        val = _evaluate(model, packed, val_idx, cfg, dev, precision)
        rec = {"epoch": epoch + 1, "train_loss": sums["loss"] / steps,
               "train_l1": sums["l1"] / steps, "val_loss": val["loss"], "val_l1": val["l1"],
               "val_tv": val["tv"], "val_pd_hinge": val["pd_hinge"],
               "seconds": round(dt, 3), "train_slices_per_s": steps * cfg.batch_size / dt}
        history.append(rec)
        improved = val["loss"] < best
        if improved:
            best = val["loss"]
            best_epoch = epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            _save_best(out / "model.pt", best_state, cfg, hp, best_epoch, best)
        save_checkpoint(last_path, {
            "format": FORMAT, "width": cfg.width, "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(), "epoch": epoch, "history": history,
            "best_val": best, "best_state": best_state, "best_epoch": best_epoch,
            "hyperparameters": hp, "pack_fingerprint": fingerprint,
        })
        _write_history(history, out / "history.tsv")
        _plot_curve(history, out / "training_curve.png")
        msg = (f"epoch {epoch + 1}/{cfg.epochs}: train {rec['train_loss']:.4f} "
               f"val {val['loss']:.4f}{' *' if improved else ''} "
               f"({rec['train_slices_per_s']:.1f} slices/s)")
        print(msg, flush=True)  # one line per epoch, also into a rule's log
        if on_epoch is not None:
            on_epoch(rec)
        ran += 1
    done = bool(history) and history[-1]["epoch"] >= cfg.epochs
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"] if history else None
    summary = {**meta, "history": history, "best_val_loss": best, "best_epoch": best_epoch,
               "finished": done}
    write_json(out / "hyperparameters.json", portable_paths(
        {k: v for k, v in summary.items() if k != "history"},
        dataset_root_of(out / "hyperparameters.json")))
    return summary


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a mapping (missing keys take defaults; unknown keys are refused)."""
    names = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(d) - names)
    if bad:
        raise ConfigError(f"unknown training setting(s): {', '.join(bad)}")
    return TrainConfig(**d)

