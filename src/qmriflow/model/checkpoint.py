"""Saving and loading network weights — never a silent fall-back to random weights.

Two formats load:

* the published layout: a plain ``state_dict`` (92 tensors, keys ``enc_blocks.*``,
  ``bottleneck.*``, ``skip_fusers.*``, ``bottleneck_fuser.*``, ``dec_blocks.*``,
  ``output_layer.0.*``; an optional ``module.`` prefix from DataParallel is removed);
* qmriflow's own: ``{"format": FORMAT, "width": w, "state_dict": ..., ...}``, which also
  carries the hyper-parameters, epoch and validation loss of the weights.

Both load with ``strict=True``. A missing, unreadable, truncated or incompatible file raises
:class:`~qmriflow.errors.InputError` with a one-line reason.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..io import atomic_path, sha256_file
from .network import SharedAttnUNet

__all__ = ["FORMAT", "load_checkpoint_file", "load_model", "save_checkpoint", "sha256_file"]

FORMAT = "qmriflow.relaxometry.v1"


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """``torch.save`` atomically (a crash never leaves a truncated checkpoint behind)."""
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)
    return Path(path)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) or raise a one-line InputError."""
    p = Path(path)
    if not p.is_file():
        raise InputError("model checkpoint not found (train a model first, or give the path "
                         "of published weights)", path=p)
    if p.stat().st_size == 0:
        raise InputError("model checkpoint is empty (interrupted copy?)", path=p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, KeyError, TypeError, IndexError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"model checkpoint is corrupt or not a PyTorch weights file "
                         f"({type(exc).__name__}: {first})", path=p) from None
    if not isinstance(obj, dict):
        raise InputError(f"model checkpoint holds a {type(obj).__name__}, not a state_dict",
                         path=p)
    return obj


def _state_dict_of(obj: Mapping[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], int,
                                                                  dict[str, Any]]:
    if obj.get("format") == FORMAT:
        sd = obj.get("state_dict")
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer")}
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
        meta = {}
    else:
        sd = obj
        meta = {}
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError("model checkpoint has no tensor state_dict", path=path)
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    w = sd.get("output_layer.0.weight")
    if w is None or w.ndim != 4 or w.shape[0] != 3:
        raise InputError("incompatible model checkpoint: no 3-channel `output_layer.0.weight` "
                         "(not a seed-000 relaxometry network)", path=path)
    return sd, int(w.shape[1]), meta


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[SharedAttnUNet, dict[str, Any]]:
    """Build the network from a checkpoint (strict); returns ``(model in eval mode, meta)``.

    ``meta`` has ``sha256``, ``path``, ``width`` and, for qmriflow checkpoints, the stored
    hyper-parameters, epoch and validation loss.
    """
    p = Path(path)
    obj = load_checkpoint_file(p)
    sd, width, meta = _state_dict_of(obj, p)
    model = SharedAttnUNet(width)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        raise InputError(f"incompatible model checkpoint: {text[:300]}", path=p) from None
    for t in model.state_dict().values():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError("model checkpoint contains NaN or infinite weights", path=p)
    meta = {**meta, "width": width, "path": str(p), "sha256": sha256_file(p)}
    return model.to(device).eval(), meta
