"""Threads (issue 25 item 2): the fit and the networks' inference run with exactly the threads
granted by the rule's ``--threads``, never more than the CPUs of this process, at any size."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qmriflow.cli import main
from qmriflow.cse import fit as fit_mod
from qmriflow.cse import networks as net_mod
from qmriflow.physics import cse_magnitude

TE = 1.15 * np.arange(1, 7)


def _series(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 36), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    pd = np.where(((x - 0.3) ** 2 + y**2) < 0.08, 0.9, 0.05)
    nu = cse_magnitude(np.repeat(body[..., None] * 1.0, 2, -1), np.repeat(pd[..., None], 2, -1),
                       np.full((40, 36, 2), 50.0), TE, 3.0)
    data = np.abs(nu + 0.01 * (rng.standard_normal(nu.shape)
                               + 1j * rng.standard_normal(nu.shape))).astype(np.float32)
    f = tmp_path / "t_MEGRE.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), f)
    f.with_name("t_MEGRE.json").write_text(json.dumps(
        {"EchoTime": [t / 1000 for t in TE], "MagneticFieldStrength": 3.0}))
    return f


def _pool_spy(monkeypatch):
    """Record the max_workers of every thread pool the code creates."""
    import concurrent.futures as cf

    sizes: list[int] = []
    orig = cf.ThreadPoolExecutor

    class Pool(orig):
        def __init__(self, max_workers=None, *a, **k):
            sizes.append(max_workers)
            super().__init__(max_workers, *a, **k)

    monkeypatch.setattr(cf, "ThreadPoolExecutor", Pool)
    return sizes


def _spy(monkeypatch, module, name):
    seen: list[tuple[int, int]] = []
    orig = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return seen


@pytest.mark.parametrize("threads", [1, 2])
def test_fit_of_a_small_series_uses_exactly_the_granted_threads(tmp_path, monkeypatch,
                                                                 threads):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))
    seen = _spy(monkeypatch, fit_mod, "_fit_chunk")
    pools = _pool_spy(monkeypatch)
    f = _series(tmp_path)  # ~2,200 voxels: far below one 32,768-voxel chunk
    rc = main(["cse-fit", str(f), "--out", str(tmp_path / "o"), "--method", "fit",
               "--readout", "monopolar", "--threads", str(threads)])
    assert rc == 0
    # one chunk per granted thread, fitted by a pool of that many workers (a pool thread may
    # take both chunks if it is quick; never more threads than granted)
    assert len(seen) == threads and len({ident for ident, _ in seen}) <= threads
    assert pools == ([threads] if threads > 1 else [])
    assert {n for _, n in seen} == {1}  # each worker single-threaded: no intra-op threads
    summary = json.loads((tmp_path / "o" / "t_desc-fit_PDFFmap.json").read_text())
    assert summary["Details"]["fit"]["threads"] == threads


def test_threads_never_exceed_the_cpus_available(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert fit_mod.granted_threads(8) == 1 and fit_mod.granted_threads(0) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert fit_mod.granted_threads(2) == 2 and fit_mod.granted_threads(0) == 3
    seen = _spy(monkeypatch, fit_mod, "_fit_chunk")
    pools = _pool_spy(monkeypatch)
    rng = np.random.default_rng(1)
    m = cse_magnitude(np.ones(300), rng.uniform(0, 1, 300), rng.uniform(0, 300, 300), TE, 3.0)
    res = fit_mod.fit_two_start(m + 0.01, TE, 3.0, 0.01,
                                options=fit_mod.FitOptions(threads=16))
    assert res.threads == 3 and len(seen) == 3 and pools == [3]


def test_inference_of_a_small_series_uses_the_granted_threads(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    nets = net_mod.NetworkSet(("water", "fat"), 6)
    seen = _spy(monkeypatch, nets, "predict_params")
    pools = _pool_spy(monkeypatch)
    m = np.abs(np.random.default_rng(2).normal(1, 0.1, (3000, 6))).astype(np.float32)
    net_mod.predict(nets, m, TE, 3.0, 0.01, threads=2)
    assert len(seen) == 2 and pools == [2] and {n for _, n in seen} == {1}
