"""The relaxometry model of seed 000: network, normalisation, physics loss, data, training and
inference. Import the submodules (``qmriflow.model.network`` etc.); torch is imported there."""

from __future__ import annotations

__all__ = ["calibration", "checkpoint", "data", "infer", "losses", "network", "normalise",
           "search", "train"]
