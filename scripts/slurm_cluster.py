"""A throwaway single-node SLURM cluster on localhost, from Debian's slurm-wlm and munge.

Used by tests/test_slurm.py; also runnable by hand to try profiles/slurm-test:

    sudo .venv/bin/python scripts/slurm_cluster.py start /tmp/qslurm   # prints SLURM_CONF=...
    export SLURM_CONF=/tmp/qslurm/slurm.conf
    .venv/bin/snakemake --profile profiles/slurm-test ...
    sudo .venv/bin/python scripts/slurm_cluster.py stop /tmp/qslurm

Everything lives in one folder: munge key, socket and log; slurm.conf; slurmctld state,
slurmd spool, PID and log files. The daemons run as root (slurmd has to, to start jobs
as their submitting user) without cgroups (proctrack/linuxproc, task/none), without
accounting (no slurmdbd: `sacct` has no records, so the Snakemake plugin must query
`squeue`), on free TCP ports of 127.0.0.1. Clients and jobs find the cluster through the
SLURM_CONF environment variable; /etc/slurm and /etc/munge are neither read nor written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODE = "localhost"
PARTITION = "debug"
CLUSTER = "qmriflowtest"
#: squeue keeps a finished job for MinJobAge seconds; the plugin polls every 5-180 s and
#: falls back to sacct (useless here) when MinJobAge < 3 x its first-check delay
MIN_JOB_AGE = 900
APT_PACKAGES = ("slurm-wlm", "munge")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo", "sacct", "sacctmgr",
           "sshare", "salloc")


def _which(name: str) -> str | None:
    """Find a program on PATH or in the sbin folders (not always on a non-root PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_programs() -> list[str]:
    progs = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo", "scontrol")
    return [p for p in progs if _which(p) is None]


def ensure_installed(timeout: float = 900) -> str | None:
    """Make sure slurm-wlm and munge are installed; install them with apt-get when missing
    and possible (root, apt-get present). Returns None when usable, else the reason."""
    missing = missing_programs()
    if not missing:
        return None
    if sys.platform != "linux":
        return f"SLURM test cluster needs Linux (missing: {', '.join(missing)})"
    if os.geteuid() != 0:
        return (f"{', '.join(missing)} not installed and not root: cannot apt-get install "
                f"{' '.join(APT_PACKAGES)}")
    apt = shutil.which("apt-get")
    if apt is None:
        return f"{', '.join(missing)} not installed and no apt-get on this machine"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [apt, "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    log = []
    for attempt in ([cmd], [[apt, "update"], cmd]):
        try:
            for c in attempt:
                res = subprocess.run(c, env=env, capture_output=True, text=True,
                                     timeout=timeout)
                log.append(f"$ {' '.join(c)} -> {res.returncode}\n{res.stdout[-2000:]}"
                           f"{res.stderr[-2000:]}")
                if res.returncode != 0:
                    break
        except subprocess.TimeoutExpired:
            log.append(f"$ {' '.join(c)} timed out after {timeout:.0f} s")
            break
        if not missing_programs():
            return None
    tail = log[-1] if log else ""
    return (f"apt-get install {' '.join(APT_PACKAGES)} failed; still missing "
            f"{', '.join(missing_programs())}: {tail[-800:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detected_memory_mb() -> int:
    """RealMemory as slurmd sees this machine (`slurmd -C`); /proc/meminfo as fallback."""
    try:
        out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True,
                             text=True, timeout=30).stdout
        m = re.search(r"RealMemory=(\d+)", out)
        if m:
            return int(m.group(1))
    except (OSError, subprocess.TimeoutExpired):
        pass
    with open("/proc/meminfo") as f:
        kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return kb // 1024


class LocalSlurm:
    """slurmctld + slurmd + munged for one node ``localhost`` with ``cpus`` CPUs."""

    def __init__(self, root: Path | str | None = None, *, cpus: int = 2,
                 memory_mb: int | None = None, def_mem_per_cpu: int = 500):
        # a short folder: the munge socket path must fit in sockaddr_un (108 bytes)
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="qslurm-"))
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.def_mem_per_cpu = def_mem_per_cpu
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}

    # -- configuration -----------------------------------------------------------------
    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: os.environ) for clients of this cluster (sbatch, squeue, ...
        and Snakemake): SLURM_CONF set, and :attr:`bin_dir` (client wrappers that set
        SLURM_CONF themselves) first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", os.defpath)])
        env["SLURM_CONF"] = str(self.conf)
        return env

    @property
    def env(self) -> dict[str, str]:
        return self.environ()

    def write_client_wrappers(self) -> None:
        """One wrapper per SLURM client program in :attr:`bin_dir`, setting SLURM_CONF.

        Needed because snakemake-executor-plugin-slurm-jobstep (0.6.1) removes every
        SLURM_* variable but a few job ids from the environment of the `srun` it runs inside
        each job, SLURM_CONF included; without /etc/slurm/slurm.conf that srun then finds
        no configuration. Jobs inherit PATH (sbatch --export=ALL), hence the wrappers.
        """
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for prog in CLIENTS:
            real = _which(prog)
            if real is None:
                continue
            w = self.bin_dir / prog
            w.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{real}" "$@"\n')
            w.chmod(0o755)

    def write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        mem = self.memory_mb or detected_memory_mb()
        self.memory_mb = mem
        user = _user()
        self.conf.write_text(f"""\
# Generated by scripts/slurm_cluster.py: single-node test cluster, no cgroups, no slurmdbd.
ClusterName={CLUSTER}
SlurmctldHost={NODE}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={self.def_mem_per_cpu}
MinJobAge={MIN_JOB_AGE}
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
# report the configured CPUs/memory whatever the hardware (no drain on a mismatch)
SlurmdParameters=config_overrides
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
        self.write_client_wrappers()
        (r / "cluster.json").write_text(json.dumps({"root": str(r), "pids": self.pids}))

    # -- daemons -------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)
        log.close()
        self.pids[name] = self.procs[name].pid
        (self.root / "cluster.json").write_text(json.dumps({"root": str(self.root),
                                                             "pids": self.pids}))

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.logs()}")

    def start(self, timeout: float = 90) -> LocalSlurm:
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"not installed: {', '.join(missing)}")
        self.write_config()
        r = self.root
        sock = r / "munge" / "munge.socket"
        # --force: munged refuses some set-ups (e.g. running as root) without it
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force",
            f"--key-file={r / 'munge' / 'munge.key'}", f"--socket={sock}",
            f"--pid-file={r / 'munge' / 'munged.pid'}",
            f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'seed'}"])
        self._wait(lambda: sock.exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: "UP" in self._run("scontrol", "ping").stdout, timeout, "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait(self._node_ready, timeout, "node idle")
        return self

    def _run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True,
                                  text=True, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, 124, "", "timeout")

    def node_state(self) -> str:
        return self._run("sinfo", "-h", "-N", "-n", NODE, "-o", "%T").stdout.strip()

    def _node_ready(self) -> bool:
        state = self.node_state().lower()
        if state.startswith("idle") or state.startswith("mix") or state.startswith("alloc"):
            return True
        if any(s in state for s in ("down", "drain", "fail")):
            # e.g. left down by a previous slurmctld state: put it back in service
            self._run("scontrol", "update", f"nodename={NODE}", "state=resume")
        return False

    def _wait(self, ok, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self._check_alive()
            if ok():
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM test cluster: timed out waiting for {what} "
                           f"(node state {self.node_state()!r}):\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")
            out.append(f"==> {f.name} <==\n{text[-tail:]}")
        return "\n".join(out)

    def stop(self, timeout: float = 20) -> None:
        """Cancel what is left of the jobs, then end the daemons by PID (slurmd, slurmctld,
        munged in that order): SIGTERM, then SIGKILL after ``timeout`` s."""
        if "slurmctld" in self.pids:
            self._run("scancel", "--quiet", f"--partition={PARTITION}", timeout=10)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            proc = self.procs.pop(name, None)
            _terminate(pid, proc, timeout)
        (self.root / "cluster.json").write_text(json.dumps({"root": str(self.root),
                                                             "pids": self.pids}))

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, proc: subprocess.Popen | None, timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not _alive(pid):
                return
            time.sleep(0.2)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("root", type=Path, help="folder for config, state and logs")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--install", action="store_true",
                    help="apt-get install slurm-wlm munge when missing (root)")
    a = ap.parse_args(argv)
    if a.action == "start":
        if a.install and (reason := ensure_installed()):
            print(reason, file=sys.stderr)
            return 1
        a.root.mkdir(parents=True, exist_ok=True)
        c = LocalSlurm(a.root, cpus=a.cpus).start()
        # the daemons were started in their own sessions: they outlive this script
        print(f"SLURM_CONF={c.conf}")
        print(f"pids: {c.pids}")
        return 0
    state = json.loads((a.root / "cluster.json").read_text())
    c = LocalSlurm(a.root)
    c.pids = {k: int(v) for k, v in state["pids"].items()}
    c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
