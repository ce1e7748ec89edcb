"""Optional hyper-parameter search over the seed's Table B.1 space with Optuna.

Space (seed 000, appendix B): learning rate {1e-5, 1e-4, 1e-3, 1e-2}; λ_PD {0, 0.05, 0.1,
0.15, 0.2}; λ_TV {0, 1e-4, 1e-3, 1e-2, 0.1}; initialisation {Xavier, Kaiming, Normal}; batch
size {8, 16, 32}. Each trial trains for a few epochs; the objective is the validation **L1**
(the data term — the full loss is not comparable across λ values). Optuna is not a dependency of
qmriflow: without it this step fails with a one-line message.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import write_json
from .train import TrainConfig, train

__all__ = ["SEARCH_SPACE", "run_search"]

SEARCH_SPACE: dict[str, list[Any]] = {
    "lr": [1e-5, 1e-4, 1e-3, 1e-2],
    "lambda_pd": [0.0, 0.05, 0.1, 0.15, 0.20],
    "lambda_tv": [0.0, 1e-4, 1e-3, 1e-2, 0.1],
    "init": ["xavier", "kaiming", "normal"],
    "batch_size": [8, 16, 32],
}


def run_search(pack_dir: str | Path, out_dir: str | Path, *, trials: int = 20, epochs: int = 5,
               width: int = 64, steps_per_epoch: int | None = None, seed: int = 0,
               device: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Run the study; writes ``search.json`` (all trials, best parameters) into ``out_dir``."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("hyper-parameter search needs optuna, which is not installed "
                          "(pip install optuna)") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def objective(trial: Any) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in SEARCH_SPACE.items()}
        cfg = TrainConfig(width=width, epochs=epochs, seed=seed, steps_per_epoch=steps_per_epoch,
                          device=device, threads=threads, **params)
        summary = train(pack_dir, out / f"trial_{trial.number:03d}", cfg, resume=False,
                        progress=False)
        hist = summary["history"]
        best = min((h["val_l1"] for h in hist), default=math.inf)
        return best if math.isfinite(best) else math.inf

    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(objective, n_trials=trials, catch=(Exception,))
    rows = [{"number": t.number, "value": t.value, "params": t.params, "state": str(t.state)}
            for t in study.trials]
    res = {"space": SEARCH_SPACE, "objective": "validation L1 (data term)", "trials": rows,
           "best_trial": study.best_trial.number, "best_value": study.best_value,
           "best_params": study.best_params, "epochs_per_trial": epochs, "width": width}
    write_json(out / "search.json", res)
    return res
