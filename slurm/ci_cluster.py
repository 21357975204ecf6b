"""A one-node Slurm cluster on this machine, for CI and for trying slurm/train.sbatch.

  python slurm/ci_cluster.py start [STATE_DIR]   # prints `export SLURM_CONF=...`
  python slurm/ci_cluster.py stop  [STATE_DIR]

It uses the Debian packages (`apt-get install -y slurm-wlm munge`; `--install` runs that
when `slurmctld` is missing) and starts the daemons itself (no systemd): `munged` as the
munge user (unless one already answers), then `slurmctld` and `slurmd` in the
foreground as child processes, with a `slurm.conf` written to STATE_DIR: one node
`localhost` (127.0.0.1, this machine's CPU count), `proctrack/linuxproc`, `task/none`,
`auth/munge`, `select/cons_tres` + `CR_CPU`, no accounting, and free ports. It waits
until the node is idle. Clients find the cluster through `SLURM_CONF`. `stop` cancels
the cluster's jobs and stops the daemons this helper started (their pids are in
STATE_DIR), nothing else. The tests use it from a session fixture (tests/slurm_fixture.py).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

DEFAULT_STATE = "/tmp/sd_func-slurm"
MUNGE_KEY = "/etc/munge/munge.key"
MUNGE_RUN = "/run/munge"
DAEMONS = ("munged", "slurmctld", "slurmd")  # started in this order, stopped in reverse


class ClusterError(RuntimeError):
    pass


def installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


def install() -> None:
    """apt-get the Debian packages (root only); a ClusterError saying why when it cannot."""
    if installed():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterError("slurm-wlm and munge are not installed and this is not a root Debian machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        if p.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {p.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conf_text(state: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """The slurm.conf of the one-node cluster."""
    return "\n".join([
        "ClusterName=sdfunc", "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
        "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
        f"StateSaveLocation={state}/ctld", f"SlurmdSpoolDir={state}/spool",
        f"SlurmctldPidFile={state}/slurmctld.pid", f"SlurmdPidFile={state}/slurmd.pid",
        f"SlurmctldLogFile={state}/slurmctld.log", f"SlurmdLogFile={state}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "ReturnToService=2",
        "SchedulerType=sched/backfill", "JobRequeue=1", "KillWait=10", "MinJobAge=600",
        "InactiveLimit=0", "SlurmdTimeout=60",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""])


def _munge_up() -> bool:
    if not shutil.which("munge"):
        return False
    p = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, timeout=10, check=False)
    return p.returncode == 0


def _start_munge(state: str) -> int | None:
    """Start munged as the munge user unless one answers already; its pid, or None if not ours."""
    if _munge_up():
        return None
    if not os.path.isfile(MUNGE_KEY):
        subprocess.run(["mungekey", "--create", "--keyfile", MUNGE_KEY], check=True, timeout=30)
    shutil.chown(MUNGE_KEY, "munge", "munge")
    os.chmod(MUNGE_KEY, 0o400)
    os.makedirs(MUNGE_RUN, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    pid = _spawn(["munged", "--foreground"], os.path.join(state, "munged.log"), user="munge", group="munge",
                 extra_groups=[])
    _wait(_munge_up, 20, "munged", state)
    return pid


def _spawn(cmd: list[str], log: str, **popen) -> int:
    """Start a daemon in the foreground, in its own session, output to log; its pid."""
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, **popen).pid


def _wait(ready, seconds: float, what: str, state: str) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if ready():
            return
        time.sleep(0.2)
    raise ClusterError(f"{what} did not come up within {seconds:.0f} s (logs in {state})")


def env(state: str = DEFAULT_STATE) -> dict:
    """os.environ plus SLURM_CONF of the cluster in state (for sbatch, scontrol, ...)."""
    return dict(os.environ, SLURM_CONF=os.path.join(state, "slurm.conf"))


def node_state(state: str = DEFAULT_STATE) -> str:
    p = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env(state), capture_output=True, text=True,
                       timeout=10, check=False)
    return p.stdout.strip() if p.returncode == 0 else ""


def start(state: str = DEFAULT_STATE) -> dict:
    """Bring the cluster up (stopping a previous one of this state dir first); returns env(state)."""
    if not installed():
        raise ClusterError("slurm-wlm / munge are not installed (python slurm/ci_cluster.py start --install)")
    stop(state)
    for d in ("ctld", "spool"):
        os.makedirs(os.path.join(state, d), exist_ok=True)
    with open(os.path.join(state, "slurm.conf"), "w") as fh:
        fh.write(conf_text(state, os.cpu_count() or 1, _free_port(), _free_port()))
    pids = {}
    try:
        munged = _start_munge(state)
        if munged is not None:
            pids["munged"] = munged
        e = env(state)
        for name, cmd in (("slurmctld", ["slurmctld", "-D", "-i"]), ("slurmd", ["slurmd", "-D", "-N", "localhost"])):
            pids[name] = _spawn(cmd, os.path.join(state, f"{name}.out"), env=e)
            _write_pids(state, pids)
            if name == "slurmctld":
                _wait(lambda: node_state(state) != "", 30, "slurmctld", state)
        _wait(lambda: node_state(state) == "idle", 30, "the node (sinfo: idle)", state)
    except BaseException:
        _write_pids(state, pids)
        stop(state)
        raise
    return env(state)


def _write_pids(state: str, pids: dict) -> None:
    with open(os.path.join(state, "pids"), "w") as fh:
        fh.writelines(f"{k} {v}\n" for k, v in pids.items())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of this process counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def stop(state: str = DEFAULT_STATE) -> None:
    """Cancel the cluster's jobs and stop the daemons start() recorded in state/pids."""
    path = os.path.join(state, "pids")
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        pids = dict(line.split() for line in fh if line.strip())
    if "slurmctld" in pids and shutil.which("scancel"):
        subprocess.run(["scancel", "--user=root", "--full"], env=env(state), capture_output=True, timeout=20,
                       check=False)
    for name in reversed(DAEMONS):
        if name not in pids:
            continue
        pid = int(pids[name])
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
        end = time.time() + 15
        while _alive(pid) and time.time() < end:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    os.remove(path)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in ("start", "stop"):
        sys.exit(f"usage: {argv[0]} start|stop [STATE_DIR] [--install]")
    rest = [a for a in argv[2:] if a != "--install"]
    state = os.path.abspath(rest[0]) if rest else DEFAULT_STATE
    try:
        if argv[1] == "stop":
            stop(state)
            return
        if "--install" in argv:
            install()
        start(state)
    except ClusterError as e:
        sys.exit(f"{argv[0]}: error: {e}")
    print(f"export SLURM_CONF={os.path.join(state, 'slurm.conf')}")


if __name__ == "__main__":
    main(sys.argv)
