"""Data parallelism with torch.distributed: the launcher's environment, the process group,
and host-side reductions.

`launch_env(environ)` reads who this process is from the launcher's variables, torchrun's
first (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT;
also under `srun torchrun`), else Slurm's inside an `srun` step (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; the master is the first host of SLURM_JOB_NODELIST as
`scontrol show hostnames` expands it, the port MASTER_PORT or one derived from
SLURM_JOB_ID). A batch script outside `srun` (no SLURM_STEP_ID) is one process.
`init()` starts the default process group from it: NCCL when CUDA is available, gloo on
CPU; one process needs no group and `init()` is a no-op. The group's store is a TCPStore
client of torchrun's agent store (or hosted by rank 0 without torchrun) under a
PrefixStore named by the restart count: after `torchrun --max-restarts` restarts a group,
a plain env:// init reads the dead round's gloo addresses from the same store and fails
in connectFullMesh or hangs (seen with torch 2.13); a fresh prefix per round does not.

The gradient all-reduce of the train step itself does not live here: it is traced into
the compiled step with functional collectives (see sd_func/train/step.py). These helpers
are for the host side: metrics, barriers, agreeing on a stop, rank-0-only work. This is
the only module that reads the launcher's environment variables: everyone else asks
`launch_rank()`, `launch_world_size()`, `rank()` or `slurm_job_id()`.
"""

import datetime
import os
import re

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from sd_func.errors import UserError

_PORT_BASE, _PORT_SPAN = 15000, 15000  # a Slurm job's port: 15000 + job id mod 15000 (below the ephemeral range)
_BRACKET = re.compile(r"\[([^\]]*)\]")
_HOST_GROUP = {}  # {"group": a gloo group} beside an NCCL default group (init), for agree_max


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def _expand_one(name: str) -> list[str]:
    m = _BRACKET.search(name)
    if m is None:
        return [name]
    head, tail, values = name[:m.start()], name[m.end():], []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"hostlist {name!r}: bad range {part!r}")
        width = len(lo)  # zero padding comes from the range's first number, as in Slurm
        values += [f"{i:0{width}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return [head + v + rest for v in values for rest in _expand_one(tail)]


def expand_hostnames(nodelist: str) -> list[str]:
    """Slurm's compact host list as `scontrol show hostnames` expands it, in order.

    "node[01-03,07],gpu5" -> ["node01", "node02", "node03", "node07", "gpu5"]; several
    bracket groups in one name expand as a product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
    """
    if nodelist.count("[") != nodelist.count("]"):
        raise UserError(f"hostlist {nodelist!r}: unbalanced brackets")
    return [h for item in _split_top(nodelist.strip()) if item for h in _expand_one(item)]


def _int(environ, key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise UserError(f"environment variable {key}={environ[key]!r}: expected an integer") from None


def launch_env(environ) -> dict:
    """Who this process is, from a launcher's variables (a mapping such as os.environ).

    {"launcher": "torchrun" | "slurm" | "none", "rank", "world", "local_rank",
    "master_addr", "master_port", "restart", "agent_store", "missing"}; "none" is one
    process; "missing" names the variables torchrun would have set that are not (init() fails).
    """
    get = lambda k, default=0: _int(environ, k) if k in environ else default
    one = {"launcher": "none", "rank": 0, "world": 1, "local_rank": 0, "master_addr": "", "master_port": 0,
           "restart": 0, "agent_store": False, "missing": []}
    if "WORLD_SIZE" in environ or "RANK" in environ:  # torchrun (or a hand-set env://): it wins
        world = get("WORLD_SIZE", 1)
        return one if world <= 1 else {
            "launcher": "torchrun", "rank": get("RANK"), "world": world, "local_rank": get("LOCAL_RANK"),
            "master_addr": environ.get("MASTER_ADDR", ""), "master_port": get("MASTER_PORT"),
            "restart": get("TORCHELASTIC_RESTART_COUNT"),
            "agent_store": environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            "missing": [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in environ]}
    world = get("SLURM_NTASKS", 1) if "SLURM_STEP_ID" in environ else 1  # a batch script is not a task
    if world <= 1:
        return one
    hosts = expand_hostnames(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", ""))
    if not hosts:
        raise UserError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is empty")
    return {"launcher": "slurm", "rank": get("SLURM_PROCID"), "world": world, "local_rank": get("SLURM_LOCALID"),
            "master_addr": environ.get("MASTER_ADDR", hosts[0]),
            "master_port": get("MASTER_PORT", _PORT_BASE + get("SLURM_JOB_ID") % _PORT_SPAN),
            "restart": get("SLURM_RESTART_COUNT"), "agent_store": False, "missing": []}


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun, srun) set it, before any process group exists."""
    return launch_env(os.environ)["rank"]


def launch_world_size() -> int:
    """The number of processes the launcher started (1 without one), before init()."""
    return launch_env(os.environ)["world"]


def slurm_job_id() -> str | None:
    """The Slurm job this process runs in (a batch script, srun or srun torchrun), or None."""
    return os.environ.get("SLURM_JOB_ID") or None


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _store(env: dict, timeout: datetime.timedelta):
    """The group's store: torchrun's agent store (or rank 0's own), prefixed by the restart round."""
    host = env["rank"] == 0 and not env["agent_store"]
    store = dist.TCPStore(env["master_addr"], env["master_port"], world_size=env["world"] if host else None,
                          is_master=host, timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(f"sd_func/round{env['restart']}", store)


def init(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Start the process group from the launcher's env vars; returns (rank, world, device).

    Already initialised: returns the current group's values. One process: (0, 1,
    cuda:0 or cpu) and no group.
    """
    cuda = torch.cuda.is_available()
    env = launch_env(os.environ)
    if _active():
        device = torch.device("cuda", env["local_rank"]) if cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    if env["world"] <= 1:
        return 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu")
    if env["missing"]:
        raise UserError(f"WORLD_SIZE={env['world']} but {', '.join(env['missing'])} unset; start with torchrun or srun")
    if cuda:
        torch.cuda.set_device(env["local_rank"])
        device = torch.device("cuda", env["local_rank"])
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if cuda else "gloo", store=_store(env, timeout), rank=env["rank"],
                            world_size=env["world"], timeout=timeout, **({"device_id": device} if cuda else {}))
    if cuda:  # host-side flags (agree_max) on the CPU: every rank makes it, in the same order
        _HOST_GROUP["group"] = dist.new_group(backend="gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    if _active() and world_size() > 1:
        dist.barrier()


def all_reduce_mean(values):
    """Mean over ranks of every tensor leaf of a pytree (new tensors; inputs untouched).

    Leaves are reduced in one flat float32 buffer; each result keeps its leaf's dtype.
    """
    if not _active() or world_size() == 1:
        return values
    leaves, spec = pytree.tree_flatten(values)
    idx = [i for i, x in enumerate(leaves) if torch.is_tensor(x)]
    if not idx:
        return values
    flat = torch.cat([leaves[i].detach().float().reshape(-1) for i in idx])
    if dist.get_backend() == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    out, o = list(leaves), 0
    for i in idx:
        n = leaves[i].numel()
        out[i] = flat[o:o + n].view(leaves[i].shape).to(leaves[i].device, leaves[i].dtype)
        o += n
    return pytree.tree_unflatten(out, spec)


def agree_max(value: int) -> int:
    """The largest of every rank's value (the value itself in one process): a collective.

    A CPU all-reduce (gloo; with NCCL on a gloo side group made in init()), so that asking
    after every step never waits for the GPU."""
    if not _active() or world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP.get("group"))
    return int(t.item())


def shutdown() -> None:
    _HOST_GROUP.clear()
    if _active():
        dist.destroy_process_group()
