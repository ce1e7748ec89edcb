"""Shared fixtures: one small phantom archive per test session (generated, not stored)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from qmriflow.workflow.demo import tool_env

__all__ = ["load_script", "tool_env", "tool_missing"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_script(path: Path, name: str) -> ModuleType:
    """Import a script that is not part of the package (bench/*.py, scripts/*.py) as module
    ``name``, registered in ``sys.modules`` (so that its dataclasses and its own imports of
    sibling scripts by that name work)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def tool_missing(reason: str) -> NoReturn:
    """A system tool a test needs (podman and the image, chromium, SLURM) is not here: skip
    with the reason, but fail under CI (``CI=true``, set by ``.ci/run``), where
    ``scripts/test.sh`` installs them: a green CI run has run every test."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


#: test files run last: the CPU image they need is built in the background meanwhile
#: (scripts/test.sh)
RUN_LAST = ("test_container.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda it: it.path.name in RUN_LAST)  # stable: keeps the order otherwise


def assert_no_identifiers(*roots: Path) -> int:
    """Fail if the phantom's identifying canary or birth date is in any file name or content
    (gzip files decompressed) below ``roots``; return the number of files checked."""
    import gzip

    from qmriflow.phantom.generate import CANARY, CANARY_BIRTH_DATE

    n = 0
    for root in roots:
        for f in Path(root).rglob("*"):
            if not f.is_file():
                continue
            data = f.read_bytes()
            if f.name.endswith(".gz"):
                data = gzip.decompress(data)
            assert CANARY.encode() not in data, f
            assert CANARY.lower().encode() not in data, f
            assert CANARY_BIRTH_DATE.encode() not in data, f
            assert CANARY not in str(f), f
            n += 1
    return n


def rewrite_study(folder: Path, tag: str, drop_ti: bool = False) -> str:
    """Give a copied session a new StudyInstanceUID (and new series UIDs)."""
    import pydicom
    from pydicom.uid import generate_uid

    study = generate_uid(entropy_srcs=[tag, "study"])
    for f in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[tag, str(f.parent.name)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, str(f)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if drop_ti and "InversionTime" in ds:
            del ds.InversionTime
        ds.save_as(f, enforce_file_format=True)
    return str(study)


@pytest.fixture(scope="session")
def phantom_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 subjects × 2 sessions, small size, with the CSE series; seed 11."""
    from qmriflow.phantom.generate import PhantomOptions, generate_archive

    out = tmp_path_factory.mktemp("phantom")
    generate_archive(out, PhantomOptions(subjects=2, sessions=2, size="small", seed=11,
                                         cse=True, workers=2))
    return out


@pytest.fixture(scope="session")
def manifest(phantom_archive: Path) -> dict:
    from qmriflow.phantom.generate import load_manifest

    return load_manifest(phantom_archive)
