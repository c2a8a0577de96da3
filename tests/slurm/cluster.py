"""A private single-node Slurm for the tests: munged, slurmctld and slurmd of our own.

Nothing is shared with a Slurm the machine may already run: munged gets its own key and
socket, the daemons their own slurm.conf, ports, state and spool folders, all in one
temporary folder, and the client commands find them through ``SLURM_CONF``. Every
address is the loopback one. The node claims more CPUs than the machine has
(``SlurmdParameters=config_overrides``), so a 5-rank job fits on a 2-core machine;
that oversubscribes the cores, which is what the mpiexec tests do too.

The daemons run in the foreground as our children (``-D``, ``-F``), so stopping them
is terminating the processes we started, by their ids; jobs are cancelled and waited
out first, so that no job step outlives its slurmd.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
PARTITION = "mpibtest"
CPUS = 8  # a 5-rank Downpour job and a 1-rank plot job fit at once
# A requeued job may start again only after the step credentials of its last attempt
# expire (default 120 s); a step launch here verifies its credential within a second,
# so 10 s is ample and keeps the requeue tests short.
CRED_EXPIRE = 10
# Slurm's defaults scan pending jobs every 60 s (main loop) and 30 s (backfill), and a
# requeued job becoming eligible is no event that triggers a scan: it waited 18-27 s
# past its eligible time here.  A one-node test cluster can afford a scan a second.
SCHEDULER = "sched_interval=1,bf_interval=1"
# Terminal job states: a job in any other state may still change.
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def missing() -> list[str]:
    """The Slurm and munge programs this machine lacks (empty: the cluster can start)."""
    found = [shutil.which(p) or shutil.which(p, path="/usr/sbin:/sbin") for p in
             DAEMONS + CLIENTS]
    return [name for name, path in zip(DAEMONS + CLIENTS, found, strict=True) if not path]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


def slurm_conf(root: Path, host: str, user: str) -> str:
    """The whole configuration: one node, one partition, no accounting, no cgroups."""
    return f"""\
ClusterName=mpibtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire={CRED_EXPIRE}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=pmi2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
SchedulerParameters={SCHEDULER}
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=NO MaxTime=60 State=UP
"""


class PrivateSlurm:
    """Start with :meth:`start`, always end with :meth:`stop` (it is safe to call twice).

    ``env`` is the environment for client commands: ``SLURM_CONF`` points at this
    cluster and ``SBATCH_PARTITION`` names its partition, which is not the default one,
    so a script that worked only by naming a partition of its own would fail here.
    """

    def __init__(self):
        # A short path of our own: munge's socket path must fit in sun_path (108 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="mpib-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "SBATCH_PARTITION": PARTITION}
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if var not in ("SLURM_CONF", "SBATCH_PARTITION"):
                del self.env[var]  # we may be inside someone's job: not that cluster

    def start(self, timeout: float = 60) -> None:
        """Write the key and config, start the three daemons, wait for an idle node."""
        self.root.chmod(0o755)  # munged wants its socket's folder searchable by all
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "plugstack.conf").write_text("")
        host = socket.gethostname()
        self.conf.write_text(slurm_conf(self.root, host, _user()))
        self._spawn("munged", "-F", f"--key-file={key}", f"--socket={self.root}/munge.socket",
                    f"--pid-file={self.root}/munged.pid", f"--seed-file={self.root}/munged.seed",
                    f"--log-file={self.root}/munged.log")
        self._wait_for(lambda: (self.root / "munge.socket").exists(), 10, "munged's socket")
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", host)
        self._wait_for(lambda: self.node_state() == "idle", timeout, "an idle node in sinfo")

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.out").open("w")
        self.procs.append(subprocess.Popen([_sbin(name), *args], stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=self.env))

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"no {what} in {timeout:.0f} s"
                raise RuntimeError(f"private Slurm did not start: {why}\n{self.logs()}")
            time.sleep(0.2)

    def node_state(self) -> str:
        return self.query("sinfo", "-h", "-o", "%t")

    def run(self, *cmd: str, check: bool = True, cwd=None, env=None, timeout: float = 30):
        """Run a client command against this cluster."""
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=cwd,
                              env={**self.env, **(env or {})}, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def query(self, *cmd: str) -> str:
        """A client command's output, or "" when it fails or hangs (a daemon is down)."""
        try:
            return self.run(*cmd, check=False, timeout=15).stdout.strip()
        except subprocess.TimeoutExpired:
            return ""

    def jobs(self, job: str) -> list[dict[str, str]]:
        """``scontrol show job`` as one dict per array task (one for a plain job)."""
        out = self.query("scontrol", "-o", "show", "job", job)
        return [dict(word.split("=", 1) for word in line.split() if "=" in word)
                for line in out.splitlines()]

    def states(self, job: str) -> list[str]:
        return [task.get("JobState", "?") for task in self.jobs(job)]

    def wait(self, job: str, timeout: float) -> list[str]:
        """Wait until every task of the job has ended; cancel it and raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(job)
            if states and all(s in DONE for s in states):
                return states
            if time.monotonic() > deadline:
                why = [task.get("Reason", "?") for task in self.jobs(job)]  # before scancel
                self.query("scancel", job)
                raise TimeoutError(f"job {job} still {states} after {timeout:.0f} s"
                                   f" (reason {why})")
            time.sleep(0.5)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, wait them out, then end the daemons we started."""
        if any(p.poll() is None for p in self.procs[1:]):
            self.query("scancel", f"--user={_user()}")
            deadline = time.monotonic() + 30
            while self.query("squeue", "-h"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
