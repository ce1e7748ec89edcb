"""Nightly, incremental runs over a growing archive (``qmriflow nightly``).

One night = one call of :func:`run_nightly`:

1. Take the nightly lock (``<work_dir>/nightly/nightly.lock``, an ``flock`` held by this
   process and the Snakemake run it starts). A second instance started while one runs prints
   one line naming the holder and exits with :data:`EXIT_LOCKED`, changing nothing.
2. If the previous night was killed (its state still says ``running``), remove Snakemake's
   stale lock (``snakemake --unlock``); Snakemake's ``--rerun-incomplete`` then redoes the
   jobs that were cut off (outputs are written atomically, so none is half-written).
3. Run the workflow with the nightly profile (``profiles/nightly``: mtime-only rerun
   triggers, keep-going), a fresh discovery (``--forcerun discover``) with the quiet period
   of ``nightly.quiet_period_min`` (studies still being written are deferred), and
   ``exclude_sessions`` = sessions that failed on ``nightly.max_attempts`` nights. Finished
   sessions are not recomputed: their outputs exist and the discovery tables are
   ``ancient()`` inputs of the per-session rules.
4. If sessions failed, run again without those that failed on their own (a failure record,
   a discovery error): a cohort step (the scanner-protocol cluster fit, whose gains the maps
   use; the group tables) needs every session it lists, so one failed session would hold
   back the good ones. If some are still unfinished, a last pass without all of them brings
   the cohort tables and pages up to date with every finished session.
5. Classify every discovered session from the completion markers (``<work_dir>/done/``,
   rules/done.smk) and this night's failure records, update ``<work_dir>/nightly/state.json``
   and write the night's report (``<output_dir>/reports/nightly/nightly_<stamp>.tsv`` and
   ``.json``: every session with its status, attempts and one-line reason).

The model must be fixed for nightly runs (``model.checkpoint``): retraining on a growing
archive every night would change the maps of every finished session.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..archive.discover import is_deferred, read_sessions_tsv
from ..config import load_config
from ..errors import ConfigError
from ..io import atomic_path, sha256_file, write_json
from .runner import EXIT_LOCKED, exclusive_lock, lock_holder, snakemake_lock_held

__all__ = ["EXIT_LOCKED", "REPORT_COLUMNS", "run_nightly", "write_done_marker"]

REPORT_COLUMNS = ("session", "status", "attempts", "reason")
_SNAKEMAKE_LOCKED = "Directory cannot be locked"


# ---------------------------------------------------------------------------------------------
# completion markers
# ---------------------------------------------------------------------------------------------


def write_done_marker(out: str | Path, outputs: Iterable[str | Path], root: str | Path,
                      label: str) -> Path:
    """Write a session's completion marker: its outputs (relative to ``root``) with size and
    SHA-256. Every output must exist (they are the marker rule's inputs)."""
    root = Path(root)
    files = []
    for f in sorted({Path(p) for p in outputs}):
        rel = os.path.relpath(f, root)
        files.append({"path": Path(rel).as_posix(), "bytes": f.stat().st_size,
                      "sha256": sha256_file(f)})
    return write_json(out, {"session": label,
                            "completed": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "outputs": files})


def _done_sessions(work: Path) -> set[str]:
    d = work / "done"
    return {p.stem for p in d.glob("sub-*_ses-*.json")} if d.is_dir() else set()


# ---------------------------------------------------------------------------------------------
# state, lock, report
# ---------------------------------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, Any]:
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
            if isinstance(state, dict) and isinstance(state.get("sessions"), dict):
                return state
    return {"sessions": {}, "runs": []}


def _failure_reasons(failures: Path, since: float) -> dict[str, str]:
    """This run's failure records: session -> reason (first step that failed)."""
    out: dict[str, tuple[float, str]] = {}
    if failures.is_dir():
        for p in failures.glob("*__*.json"):
            with contextlib.suppress(OSError, ValueError):
                mtime = p.stat().st_mtime
                if mtime < since - 1:
                    continue
                rec = json.loads(p.read_text())
                s, reason = str(rec["session"]), f"{rec['step']}: {rec['reason']}"
                if s not in out or mtime < out[s][0]:
                    out[s] = (mtime, reason)
    return {s: r for s, (_t, r) in out.items()}


def _write_report(rows: Sequence[dict[str, Any]], summary: dict[str, Any], out_dir: Path,
                  stamp: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tsv = out_dir / f"nightly_{stamp}.tsv"
    with atomic_path(tsv) as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=REPORT_COLUMNS, delimiter="\t",
                           extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    write_json(out_dir / f"nightly_{stamp}.json", {**summary, "sessions": list(rows)})
    return tsv


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def _snakemake(cmd: Sequence[str], log: TextIO, lock_fd: int, env: dict[str, str],
               cwd: Path) -> tuple[int, bool]:
    """Run Snakemake, copying its output to ``log`` and stdout; (exit status, lock refused)."""
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    locked = False
    with subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, pass_fds=(lock_fd,), env=env, cwd=cwd) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            locked = locked or _SNAKEMAKE_LOCKED in line
            log.write(line)
            sys.stdout.write(line)
        log.flush()
        return proc.wait(), locked


def run_nightly(
    configfile: str | Path,
    *,
    cores: int | None = None,
    profile: str | Path | None = None,
    directory: str | Path | None = None,
    snakemake_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> int:
    """One nightly run (see the module docstring); returns the exit status: 0 when every
    session attempted tonight either finished or failed on its own (failures are in the
    report), 1 when the run failed as a whole, :data:`EXIT_LOCKED` when another run holds the
    lock."""
    from .demo import repo_root, tool_env

    if cores is not None and (isinstance(cores, bool) or int(cores) != cores or cores < 1):
        raise ConfigError(f"cores must be a whole number of at least 1, got {cores!r}")
    cwd = Path(directory or ".").resolve()
    configfile = Path(configfile).resolve()
    cfg = load_config(configfile)
    if not cfg["model"].get("checkpoint"):
        raise ConfigError("nightly runs need a fixed model: set model.checkpoint to a trained "
                          "model.pt (train once with `snakemake train`, or published weights)",
                          path=configfile)
    work = (cwd / cfg["work_dir"]).resolve()
    out = (cwd / cfg["output_dir"]).resolve()
    ndir = work / "nightly"
    root = repo_root()
    env = env or tool_env()
    with exclusive_lock(ndir / "nightly.lock") as lock:
        if lock is None:
            print(f"qmriflow nightly: another nightly run is in progress on {work} "
                  f"({lock_holder(ndir / 'nightly.lock')}); this one exits and changes nothing")
            return EXIT_LOCKED
        ckpt = Path(cfg["model"]["checkpoint"])
        ckpt = ckpt if ckpt.is_absolute() else cwd / ckpt
        if not ckpt.is_file():  # before any work: every session would fail on it
            raise ConfigError("model.checkpoint not found (nightly runs need a fixed, existing "
                              "model)", path=ckpt)
        state_path = ndir / "state.json"
        state = _load_state(state_path)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        start = time.time()
        max_attempts = int(cfg["nightly"]["max_attempts"])
        given_up = sorted(
            label for label, s in state["sessions"].items()
            if s.get("status") in ("failed", "given up") and s.get("attempts", 0) >= max_attempts
        )
        base = [sys.executable, "-m", "snakemake", "--snakefile", str(root / "Snakefile"),
                "--profile", str(Path(profile) if profile else root / "profiles" / "nightly")]
        if cores:
            base += ["--cores", str(cores)]

        def configs(excluded: Sequence[str]) -> list[str]:
            overlay = ndir / "run_config.yaml"
            with atomic_path(overlay) as tmp:
                tmp.write_text(yaml.safe_dump({
                    "discovery": {"quiet_period_min": cfg["nightly"]["quiet_period_min"]},
                    "exclude_sessions": sorted({*cfg["exclude_sessions"], *excluded}),
                }))
            return ["--configfile", str(configfile), str(overlay)]

        (ndir / "logs").mkdir(parents=True, exist_ok=True)
        log_path = ndir / "logs" / f"nightly_{stamp}.log"
        was_running = state.get("running", False)
        state["running"] = True
        write_json(state_path, state)
        with log_path.open("w") as log:
            if was_running and snakemake_lock_held(cwd):
                log.write("previous nightly run was interrupted: removing its stale lock\n")
                _snakemake([*base, *configs(given_up), "--unlock"], log, lock.fileno(), env,
                           cwd)
            rc, locked = _snakemake([*base, *configs(given_up), "--forcerun", "discover",
                                     *snakemake_args], log, lock.fileno(), env, cwd)
            if locked:
                state["running"] = False
                write_json(state_path, state)
                print(f"qmriflow nightly: Snakemake's lock on {cwd} is held by another "
                      "Snakemake run; this one exits and changes nothing")
                return EXIT_LOCKED
            rows_tsv = work / "sessions.tsv"
            discovered = read_sessions_tsv(rows_tsv) if rows_tsv.is_file() else []
            labels = {f"sub-{r['subject']}_ses-{r['session']}": r for r in discovered}
            skipped = {*given_up, *cfg["exclude_sessions"]}

            def pending() -> list[str]:
                done = _done_sessions(work)
                return [s for s, r in labels.items() if not is_deferred(r)
                        and s not in done and s not in skipped]

            rc2, passes = rc, []
            # A cohort step (the cluster fit, the group tables) needs every session it lists:
            # one failed session holds back the maps or tables of the good ones. Run again
            # without the sessions that failed on their own (a failure record or a discovery
            # error), then, if some still did not finish, without every unfinished one.
            if rc != 0 and pending():
                failed_now = _failure_reasons(work / "failures", start)
                own = [s for s in pending() if s in failed_now
                       or labels[s].get("status", "ok") != "ok"]
                if own and len(own) < len(pending()):
                    log.write(f"second pass without the {len(own)} session(s) that failed: "
                              "the sessions held back by a cohort step\n")
                    rc2, _ = _snakemake([*base, *configs([*given_up, *own]), *snakemake_args],
                                        log, lock.fileno(), env, cwd)
                    passes.append(rc2)
                if rc2 != 0 and pending():
                    log.write(f"pass without {len(pending())} unfinished session(s): cohort "
                              "tables of the finished sessions\n")
                    rc2, _ = _snakemake([*base, *configs([*given_up, *pending()]),
                                         *snakemake_args], log, lock.fileno(), env, cwd)
                    passes.append(rc2)
            failed_now = _failure_reasons(work / "failures", start)
            done = _done_sessions(work)

        before = {s for s, v in state["sessions"].items() if v.get("status") == "done"}
        rows = []
        for label, r in sorted(labels.items()):
            prev = state["sessions"].get(label, {})
            attempts = int(prev.get("attempts", 0))
            if label in done:
                status = "done" if label in before else "new"
                reason = ""
            elif is_deferred(r):
                status, reason = "deferred", r["status"]
            elif label in cfg["exclude_sessions"]:
                status, reason = "excluded", "listed in exclude_sessions"
            elif label in given_up:
                status = "given up"
                reason = f"failed on {attempts} night(s), not retried: {prev.get('reason', '')}"
            else:
                attempts += 1
                status = "failed"
                reason = failed_now.get(label) or (
                    r["status"] if r.get("status", "ok") != "ok"
                    else f"did not finish (see {log_path.name})")
                if attempts >= max_attempts:
                    reason += f" (attempt {attempts} of {max_attempts}: not retried again)"
            rows.append({"session": label, "status": status, "attempts": attempts,
                         "reason": reason})
            state["sessions"][label] = {
                "status": "done" if status in ("done", "new") else status,
                "attempts": attempts, "reason": reason,
                **({"finished": prev.get("finished", stamp)} if label in done else {}),
            }
        counts = {k: sum(1 for r in rows if r["status"] == k)
                  for k in ("new", "done", "failed", "deferred", "given up", "excluded")}
        ok = rc2 == 0
        summary = {"started": stamp, "seconds": round(time.time() - start, 1),
                   "snakemake_exit": rc, "further_passes_exit": passes,
                   "counts": counts, "log": str(log_path)}
        report = _write_report(rows, summary, out / "reports" / "nightly", stamp)
        state["running"] = False
        state["runs"] = [*state.get("runs", []), {"started": stamp, "counts": counts,
                                                   "exit": 0 if ok else 1}][-100:]
        write_json(state_path, state)
    print(f"qmriflow nightly: {counts['new']} new, {counts['done']} already done, "
          f"{counts['failed']} failed, {counts['deferred']} deferred, "
          f"{counts['given up']} given up; report {report}")
    for r in rows:
        if r["status"] in ("failed", "given up"):
            print(f"qmriflow nightly: {r['session']}: {r['status']}: {r['reason']}")
    return 0 if ok else 1
