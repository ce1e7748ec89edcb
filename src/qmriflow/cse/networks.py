"""Self-supervised voxel networks of seed 004: constrained 'water'/'fat' networks and the naive one.

Each network is the seed's encoder: five fully connected layers, the first four ``N_TE`` wide
with ELU, the last with 3 outputs (x0, x1, x2), followed by a constraining transform and the
physics decoder (:func:`qmriflow.physics.cse_magnitude`); the loss is the Rician negative
log-likelihood (:func:`qmriflow.physics.rician_nll`) of the measured signal.

Transforms (b = 0.58, the seed's split of the PDFF axis):

* ``water``: PDFF = (b/2)(sin x1 + 1) ∈ [0, b];
* ``fat``:   PDFF = 1 − ((1 − b)/2)(sin x1 + 1) ∈ [b, 1];
* ``single`` (naive, unconstrained): PDFF = (sin x1 + 1)/2 ∈ [0, 1];
* all: S0 = ref · x0² and R2* = ``r2star_scale`` · x2² (non-negative by squaring). ``ref`` is
  the voxel's largest echo: the network sees the log of the signal divided by ``ref`` (its
  shape; floored at 1e-3) and S0 comes back on the voxel's own scale, so one network serves
  voxels of any intensity and x0 ≈ 1, x2 ≈ 1 at initialisation (R2* ≈ 100 1/s):
  well-conditioned training. The log makes the R2* decay linear in the input; on the seed's
  in-silico grid it lowered the dual network's swap rate at R2* ≥ 400 1/s from ~+8 to ~+1
  percentage points above the exact two-start fit (``log_input=False`` feeds the ratio).

Several networks are held as one batched module (weights stacked along a leading network
axis, ``torch.baddbmm``): they see the same minibatches and are trained in one loop, each with
its own Adam moments (Adam is element-wise) and its own early stopping — the loop's Python
overhead, which dominates such small networks on a CPU, is paid once.

Training (seed: Adam lr 1e-3, minibatch 128, early stopping patience 10 on held-out voxels):
20 % of the voxels are held out; an *epoch* is ``steps_per_epoch`` minibatches drawn at
random from the training voxels (not a full pass: on a 10⁶-voxel series a full pass would be
~8,000 steps, and the loss is converged long before). Validation uses a fixed random subset of
at most ``val_voxels`` held-out voxels. Each network keeps the weights of its best validation
epoch; training stops when every network has gone ``patience`` epochs without improving its
validation NLL by more than ``min_improvement_nats`` per voxel (a thousandth of a nat: far
below what moves a water/fat choice), or when the step budget is spent. The budget scales with
the voxels: ``max_steps_per_voxel`` · N_train steps, at least ``min_step_budget`` (the steps a
6-wide network needs to converge on a slice: on a 31k-voxel in-silico grid the dual network
reached the two-start fit's mean |PDFF bias| after ~12,000 steps) and at most ``max_epochs``
epochs — a 232 × 256 slice trains for ~120 epochs, a 32-slice volume for up to 500. With
3 echoes the likelihood is flat (see ``FLAT_LIKELIHOOD_ECHOES``): the networks train for the
whole ``max_epochs`` with any improvement counting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..physics import FatSpectrum, cse_magnitude, rician_nll, rician_nll_with_derivatives

__all__ = ["KINDS", "NetworkSet", "Prediction", "TrainOptions", "TrainReport", "predict",
           "train_networks"]

KINDS = ("water", "fat", "single")
#: at or below this many echoes the networks train for the whole ``max_epochs`` budget
FLAT_LIKELIHOOD_ECHOES = 3
PDFF_BOUNDARY = 0.58


@dataclass(frozen=True)
class TrainOptions:
    """Training settings (defaults: the seed's, plus the epoch definition above)."""

    lr: float = 1e-3
    batch_size: int = 128
    patience: int = 10
    steps_per_epoch: int = 100
    max_epochs: int = 500
    min_epochs: int = 20
    val_fraction: float = 0.2
    val_voxels: int = 20_000
    r2star_scale_per_s: float = 100.0
    boundary: float = PDFF_BOUNDARY
    log_input: bool = True
    min_improvement_nats: float = 1e-3
    max_steps_per_voxel: float = 0.075
    min_step_budget: int = 12_000
    seed: int = 0
    threads: int = 1
    device: str = "cpu"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainReport:
    """Training-curve summary per network (JSON-serialisable via :meth:`as_dict`)."""

    kinds: tuple[str, ...]
    epochs: int
    best_epoch: dict[str, int]
    best_val_nll: dict[str, float]
    val_curve: dict[str, list[float]]
    train_curve: dict[str, list[float]]
    seconds: float
    n_train: int
    n_val: int
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, curve: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        if not curve:
            d.pop("val_curve")
            d.pop("train_curve")
        return d


def _torch():
    import torch

    return torch


class NetworkSet:
    """K voxel MLPs (one per kind) with stacked weights, on a torch device."""

    def __init__(self, kinds: Sequence[str], n_echo: int, *, r2star_scale_per_s: float = 100.0,
                 boundary: float = PDFF_BOUNDARY, seed: int = 0, device: str = "cpu",
                 log_input: bool = True):
        torch = _torch()
        self.log_input = bool(log_input)
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown network kind {k!r}; expected one of {KINDS}")
        self.kinds = tuple(kinds)
        self.n_echo = int(n_echo)
        self.r2star_scale = float(r2star_scale_per_s)
        self.boundary = float(boundary)
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(int(seed))
        k = len(self.kinds)
        widths = [self.n_echo] * 5 + [3]
        chunks = []
        self._shapes: list[tuple[int, ...]] = []
        for i in range(5):
            fan_in, fan_out = widths[i], widths[i + 1]
            bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default initialisation
            w = (torch.rand(k, fan_in, fan_out, generator=gen) * 2 - 1) * bound
            b = (torch.rand(k, 1, fan_out, generator=gen) * 2 - 1) * bound
            if i == 4:  # start at S0 ≈ ref, mid-range PDFF, R2* ≈ r2star_scale
                b[..., 0] += 1.0
                b[..., 2] += 1.0
            chunks += [w.reshape(-1), b.reshape(-1)]
            self._shapes += [tuple(w.shape), tuple(b.shape)]
        # one flat leaf tensor: the optimiser then updates a single tensor per step (the
        # per-tensor overhead dominates with networks this small)
        self.flat = torch.cat(chunks).to(self.device).requires_grad_(True)

    def _views(self, flat: Any) -> list[Any]:
        out, o = [], 0
        for shp in self._shapes:
            n = math.prod(shp)
            out.append(flat[o:o + n].view(shp))
            o += n
        return out

    def parameters(self) -> list[Any]:
        return [self.flat]

    def state(self) -> list[Any]:
        return [self.flat.detach().clone()]

    def load(self, state: Sequence[Any], which: int | None = None) -> None:
        """Copy ``state`` into the parameters (only network ``which`` if given)."""
        torch = _torch()
        with torch.no_grad():
            if which is None:
                self.flat.copy_(state[0])
                return
            for dst, src in zip(self._views(self.flat), self._views(state[0]), strict=True):
                dst[which].copy_(src[which])

    def raw(self, shape: Any) -> Any:
        """Network outputs (K, N, 3) for normalised signals ``shape`` (N, E)."""
        torch = _torch()
        views = self._views(self.flat)
        h = shape.unsqueeze(0).expand(len(self.kinds), -1, -1)
        for i in range(5):
            h = torch.baddbmm(views[2 * i + 1], h, views[2 * i])
            if i < 4:
                h = torch.nn.functional.elu(h)
        return h

    def transform(self, out: Any, ref: Any) -> tuple[Any, Any, Any]:
        """Constraining transforms: (S0, PDFF, R2* 1/s), each (K, N)."""
        torch = _torch()
        s0 = ref.unsqueeze(0) * out[..., 0] ** 2
        r2s = self.r2star_scale * out[..., 2] ** 2
        u = (torch.sin(out[..., 1]) + 1.0) / 2.0  # [0, 1]
        b = self.boundary
        pd = []
        for i, k in enumerate(self.kinds):
            if k == "water":
                pd.append(b * u[i])
            elif k == "fat":
                pd.append(1.0 - (1.0 - b) * u[i])
            else:
                pd.append(u[i])
        return s0, torch.stack(pd), r2s

    def predict_params(self, m: Any) -> tuple[Any, Any, Any]:
        """(S0, PDFF, R2*) per network, (K, N), for signals ``m`` (N, E) in σ units."""
        torch = _torch()
        ref = torch.clamp(m.amax(-1), min=1e-6)
        x = m / ref[:, None]
        if self.log_input:
            x = torch.log(torch.clamp(x, min=1e-3))
        return self.transform(self.raw(x), ref)


def _split(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    n_val = max(1, round(val_fraction * n))
    return perm[n_val:], perm[:n_val]


def train_networks(
    signal: Any,
    te_ms: Sequence[float] | np.ndarray,
    field_t: float,
    sigma: float,
    kinds: Sequence[str] = ("water", "fat"),
    *,
    options: TrainOptions | None = None,
    spectrum: FatSpectrum | None = None,
    even_echo_gain: float = 1.0,
) -> tuple[NetworkSet, TrainReport]:
    """Train one network per kind on the voxels ``signal`` (N, E) of one series, self-supervised.

    ``sigma``: noise SD in signal units (the Rician likelihood's σ). ``even_echo_gain``: the
    bipolar odd/even factor of the decoder (:func:`qmriflow.physics.cse_magnitude`; 1 =
    monopolar). Returns the networks (best validation weights) and the training report.
    """
    torch = _torch()
    opts = options or TrainOptions()
    te = np.asarray(te_ms, dtype=np.float64)
    t0 = time.perf_counter()
    from .fit import granted_threads

    prev_threads = torch.get_num_threads()
    if opts.device == "cpu" or str(opts.device).startswith("cpu"):
        torch.set_num_threads(granted_threads(opts.threads))
    # Adam's second moments of a slowly varying weight reach the subnormal range, where CPU
    # arithmetic is ~100x slower; flushing them to zero changes nothing else
    torch.set_flush_denormal(True)
    try:
        dev = torch.device(opts.device)
        m_all = torch.as_tensor(np.asarray(signal, dtype=np.float32) / float(sigma), device=dev)
        n = int(m_all.shape[0])
        if n < 10:
            raise ValueError(f"need at least 10 voxels to train, got {n}")
        rng = np.random.default_rng(opts.seed)
        tr_idx, va_idx = _split(n, opts.val_fraction, rng)
        if va_idx.size > opts.val_voxels:
            va_idx = rng.choice(va_idx, opts.val_voxels, replace=False)
        m_tr = m_all[torch.as_tensor(tr_idx, device=dev)]
        m_va = m_all[torch.as_tensor(va_idx, device=dev)]
        nets = NetworkSet(kinds, te.size, r2star_scale_per_s=opts.r2star_scale_per_s,
                          boundary=opts.boundary, seed=opts.seed, device=opts.device,
                          log_input=opts.log_input)
        adam = torch.optim.Adam(nets.parameters(), lr=opts.lr, foreach=False)
        k = len(nets.kinds)
        gen = torch.Generator(device="cpu").manual_seed(opts.seed + 1)

        def loss_per_net(m: Any) -> Any:
            s0, pd, r2 = nets.predict_params(m)
            pred = cse_magnitude(s0, pd, r2, te, field_t, spectrum,
                                 even_echo_gain=even_echo_gain)  # (K, B, E)
            return rician_nll(m.unsqueeze(0), pred, 1.0).sum(-1).mean(-1)  # (K,)

        budget = max(opts.min_step_budget, opts.max_steps_per_voxel * len(tr_idx))
        tol = float(opts.min_improvement_nats)
        if te.size <= FLAT_LIKELIHOOD_ECHOES:
            # 3 echoes, 3 parameters: the likelihood is flat over much of the PDFF axis, and
            # small NLL differences move PDFF a lot; on ISMRM case 17 (36k voxels) the dual's
            # median |PDFF - fit| was 0.043 after 12,000 steps, 0.031 after early stopping at
            # 1e-3 nats (304 epochs) and 0.026 after the full 500 epochs: train to the end
            budget, tol = opts.max_epochs * opts.steps_per_epoch, 0.0
        max_epochs = max(1, min(opts.max_epochs, math.ceil(budget / opts.steps_per_epoch)))
        best = [math.inf] * k
        best_epoch = [0] * k
        since = [0] * k
        best_state = nets.state()
        val_curve: list[list[float]] = [[] for _ in range(k)]
        train_curve: list[list[float]] = [[] for _ in range(k)]
        epoch = 0
        n_tr = m_tr.shape[0]
        bs = opts.batch_size
        for epoch in range(1, max_epochs + 1):
            draw = torch.randint(0, n_tr, (opts.steps_per_epoch, bs), generator=gen)
            acc = torch.zeros(k, device=dev)
            for step in range(opts.steps_per_epoch):
                lk = loss_per_net(m_tr[draw[step].to(dev)])
                adam.zero_grad(set_to_none=True)
                lk.sum().backward()
                adam.step()
                acc += lk.detach()
            with torch.no_grad():
                vk = loss_per_net(m_va).cpu().numpy()
            tk = (acc / opts.steps_per_epoch).cpu().numpy()
            for i in range(k):
                val_curve[i].append(float(vk[i]))
                train_curve[i].append(float(tk[i]))
                if np.isfinite(vk[i]) and (not math.isfinite(best[i]) or vk[i] < best[i]):
                    # keep the best weights; count as progress only a real improvement
                    if not math.isfinite(best[i]) or vk[i] < best[i] - tol:
                        since[i] = 0
                    else:
                        since[i] += 1
                    best[i], best_epoch[i] = float(vk[i]), epoch
                    for dst, src in zip(nets._views(best_state[0]), nets._views(nets.flat),
                                        strict=True):
                        dst[i].copy_(src[i].detach())
                else:
                    since[i] += 1
            if epoch >= opts.min_epochs and all(s >= opts.patience for s in since):
                break
        nets.load(best_state)
    finally:
        torch.set_num_threads(prev_threads)
        torch.set_flush_denormal(False)
    shift = te.size * math.log(float(sigma))  # per-voxel NLL in signal units
    report = TrainReport(
        kinds=nets.kinds, epochs=epoch,
        best_epoch={kd: best_epoch[i] for i, kd in enumerate(nets.kinds)},
        best_val_nll={kd: best[i] + shift for i, kd in enumerate(nets.kinds)},
        val_curve={kd: [v + shift for v in val_curve[i]] for i, kd in enumerate(nets.kinds)},
        train_curve={kd: [v + shift for v in train_curve[i]] for i, kd in enumerate(nets.kinds)},
        seconds=time.perf_counter() - t0, n_train=int(n_tr), n_val=int(m_va.shape[0]),
        options=opts.as_dict())
    return nets, report


@dataclass
class Prediction:
    """Per-network estimates (K, N) and per-voxel NLL (signal units) of each candidate."""

    kinds: tuple[str, ...]
    s0: np.ndarray
    pdff: np.ndarray
    r2star_per_s: np.ndarray
    nll: np.ndarray
    seconds: float

    def get(self, kind: str) -> dict[str, np.ndarray]:
        i = self.kinds.index(kind)
        return {"s0": self.s0[i], "pdff": self.pdff[i], "r2star_per_s": self.r2star_per_s[i],
                "nll": self.nll[i]}


def predict(
    nets: NetworkSet,
    signal: Any,
    te_ms: Sequence[float] | np.ndarray,
    field_t: float,
    sigma: float,
    *,
    chunk: int = 32_768,
    threads: int = 0,
    spectrum: FatSpectrum | None = None,
    even_echo_gain: float = 1.0,
) -> Prediction:
    """Inference of every network on ``signal`` (N, E), with each candidate's Rician NLL.

    Cache-sized chunks (at most 32768 voxels, at most N/threads) in ``threads`` worker threads
    with single-threaded torch ops (0: all CPUs; never more than ``os.sched_getaffinity``
    allows): ~3× faster than large chunks on a 2-core CPU, and no intra-op threading.
    """
    torch = _torch()
    from .fit import granted_threads

    te = np.asarray(te_ms, dtype=np.float64)
    t0 = time.perf_counter()
    m_all = torch.as_tensor(np.asarray(signal, dtype=np.float32), device=nets.device)
    n = int(m_all.shape[0])
    inv_sigma = 1.0 / float(sigma)

    def run(start: int) -> tuple[Any, Any, Any, Any]:
        with torch.no_grad():
            m = m_all[start:start + chunk] * inv_sigma
            s0, pd, r2 = nets.predict_params(m)
            pred = cse_magnitude(s0, pd, r2, te, field_t, spectrum,
                                 even_echo_gain=even_echo_gain)
            nll = rician_nll_with_derivatives(m.unsqueeze(0), pred, 1.0,
                                              derivatives=False)[0].sum(-1)
            return s0 * float(sigma), pd, r2, nll

    on_cpu = nets.device.type == "cpu"
    workers = granted_threads(threads) if on_cpu else 1
    if on_cpu:  # every granted worker gets a chunk, however small the series
        chunk = max(1, min(chunk, -(-n // workers)))
    starts = list(range(0, n, chunk))
    workers = max(1, min(workers, len(starts)))
    prev = torch.get_num_threads()
    try:
        if on_cpu:
            torch.set_num_threads(1)
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(run, starts))
        else:
            parts = [run(s) for s in starts]
    finally:
        torch.set_num_threads(prev)
    k = len(nets.kinds)
    if parts:
        cat = [torch.cat([p[j] for p in parts], dim=1).cpu().numpy() for j in range(4)]
    else:
        cat = [np.zeros((k, 0), np.float32) for _ in range(4)]
    shift = te.size * math.log(float(sigma))
    return Prediction(kinds=nets.kinds, s0=cat[0], pdff=cat[1], r2star_per_s=cat[2],
                      nll=cat[3].astype(np.float64) + shift,
                      seconds=time.perf_counter() - t0)
