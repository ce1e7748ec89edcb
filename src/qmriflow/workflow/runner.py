"""``qmriflow run``: a plain workflow run that cleans up after a killed one.

A ``snakemake`` run that is killed (SIGKILL, power loss, a closed terminal, an OOM kill) can
leave its running jobs behind, still writing, and always leaves its lock in
``.snakemake/locks``, so the next ``snakemake`` stops with "Directory cannot be locked" until
someone runs ``snakemake --unlock``. :func:`run_workflow` does what a careful user would do:

1. Take the run lock ``<work_dir>/run/run.lock`` (an ``flock`` held by this process and
   passed on to Snakemake, so it lasts exactly as long as the run). A second ``qmriflow run``
   on the same working directory while one is going prints one line naming the holder and
   exits with :data:`EXIT_LOCKED`, changing nothing.
2. If the previous run did not end cleanly (``<work_dir>/run/state.json`` still says
   ``running``): stop every process it left (each job of a run carries the run's id in its
   environment, ``QMRIFLOW_RUN_ID``; SIGTERM, then SIGKILL after a grace period), then remove
   Snakemake's stale lock (``snakemake --unlock``).
3. Run Snakemake (the workstation profile unless another is given: ``keep-going``,
   ``rerun-incomplete``) in its own process group with a new run id. SIGINT, SIGTERM and
   SIGHUP given to ``qmriflow run`` go to Snakemake's group; when Snakemake has ended, any
   process of this run still alive is stopped, so no job outlives its run.

Jobs submitted to a cluster (``--profile profiles/slurm``) run on other machines: they are
SLURM's, cancelled by the executor plugin or ``scancel``, not by step 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import load_config
from ..errors import ConfigError
from ..io import write_json

__all__ = ["EXIT_LOCKED", "RUN_ID_VAR", "exclusive_lock", "lock_holder", "run_processes",
           "run_workflow", "snakemake_lock_held", "stop_processes"]

#: exit status when another run holds the lock (EX_TEMPFAIL; ``qmriflow nightly`` too)
EXIT_LOCKED = 75
#: environment variable carrying the run id into Snakemake and every job it starts
RUN_ID_VAR = "QMRIFLOW_RUN_ID"


def run_processes(run_id: str, *, proc_root: Path = Path("/proc")) -> list[int]:
    """PIDs of the live processes (of any user whose environment this process can read)
    whose environment holds ``QMRIFLOW_RUN_ID=<run_id>``; never this process."""
    needle = f"{RUN_ID_VAR}={run_id}".encode()
    found = []
    for d in proc_root.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
    return sorted(found)


def stop_processes(run_id: str, *, grace_s: float = 10.0) -> list[int]:
    """Stop every process of run ``run_id``: SIGTERM, then SIGKILL for those still alive after
    ``grace_s``. Returns the PIDs that were found."""
    pids = run_processes(run_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline and run_processes(run_id):
        time.sleep(0.2)
    for pid in run_processes(run_id):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[Any]:
    """Yield the open lock file, holding an ``flock`` on it and naming this process in it
    (pass its descriptor on to Snakemake so that the lock lasts as long as the run), or None
    when another process holds it. Used by ``qmriflow run`` and ``qmriflow nightly``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        fh.flush()
        yield fh
    finally:
        fh.close()


def lock_holder(path: Path) -> str:
    """Who holds the lock file written by :func:`exclusive_lock` (for the refusal message)."""
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        info = json.loads(path.read_text().splitlines()[0])
        return f"pid {info['pid']}, started {info['started']}"
    return "unknown process"


def _read_state(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(path.read_text())
        if isinstance(state, dict):
            return state
    return {}


def _say(text: str) -> None:
    print(f"qmriflow run: {text}", flush=True)


def _snakemake(cmd: Sequence[str], env: dict[str, str], cwd: Path, lock_fd: int) -> int:
    """Run Snakemake in its own process group, passing our termination signals on to the
    group; returns its exit status (-N: killed by signal N). Output goes straight to the
    terminal (a lock held by another plain ``snakemake`` is Snakemake's own message, exit 1)."""
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, pass_fds=(lock_fd,),
                            start_new_session=True)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum if signum != signal.SIGHUP else signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def snakemake_lock_held(cwd: Path) -> bool:
    """Whether Snakemake's own working-directory lock is present in ``cwd``."""
    locks = cwd / ".snakemake" / "locks"
    return locks.is_dir() and any(locks.iterdir())


def run_workflow(
    configfile: str | Path,
    *,
    cores: int | None = None,
    profile: str | Path | None = None,
    directory: str | Path | None = None,
    snakemake_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    grace_s: float = 10.0,
) -> int:
    """One workflow run (see the module docstring); returns Snakemake's exit status (0 done,
    1 failed jobs or a failed run), or :data:`EXIT_LOCKED` when another run holds the lock."""
    from .demo import repo_root, tool_env

    if cores is not None and (isinstance(cores, bool) or int(cores) != cores or cores < 1):
        raise ConfigError(f"cores must be a whole number of at least 1, got {cores!r}")
    cwd = Path(directory or ".").resolve()
    configfile = Path(configfile).resolve()
    cfg = load_config(configfile)  # a config error stops here, in one line
    work = (cwd / cfg["work_dir"]).resolve()
    rdir = work / "run"
    root = repo_root()
    env = dict(env or tool_env())
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(root / "Snakefile"),
            "--profile", str(Path(profile) if profile else root / "profiles" / "workstation"),
            "--configfile", str(configfile)]
    if cores:
        base += ["--cores", str(cores)]
    with exclusive_lock(rdir / "run.lock") as lock:
        if lock is None:
            _say(f"another qmriflow run is in progress on {cwd} ({lock_holder(rdir / 'run.lock')});"
                 " this one exits and changes nothing")
            return EXIT_LOCKED
        state_path = rdir / "state.json"
        prev = _read_state(state_path)
        if prev.get("running"):
            old_id = str(prev.get("run_id", ""))
            left = stop_processes(old_id, grace_s=grace_s) if old_id else []
            _say(f"the run started {prev.get('started', '?')} did not end cleanly: stopped "
                 f"{len(left)} process(es) it left running"
                 + (", removing its stale lock" if snakemake_lock_held(cwd) else ""))
            if snakemake_lock_held(cwd):
                rc = _snakemake([*base, "--unlock"], env, cwd, lock.fileno())
                if rc != 0:
                    _say(f"snakemake --unlock failed (exit {rc})")
                    return 1
        run_id = uuid.uuid4().hex
        env[RUN_ID_VAR] = run_id
        write_json(state_path, {"running": True, "run_id": run_id, "pid": os.getpid(),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "command": [*base, *snakemake_args][3:]})
        rc = 1
        try:
            rc = _snakemake([*base, *snakemake_args], env, cwd, lock.fileno())
        finally:
            left = stop_processes(run_id, grace_s=grace_s)
            if left:
                _say(f"stopped {len(left)} job process(es) that outlived Snakemake")
            write_json(state_path, {"running": False, "run_id": run_id, "exit": rc,
                                    "started": _read_state(state_path).get("started"),
                                    "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if rc < 0:
        _say(f"Snakemake was stopped by signal {-rc}")
        return 1
    return rc
