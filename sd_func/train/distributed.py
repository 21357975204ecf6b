"""Data parallelism with torch.distributed: process-group set-up and host-side reductions.

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and starts the default process group: NCCL when CUDA is available,
gloo on CPU. A single process (no WORLD_SIZE, or WORLD_SIZE=1) needs no group and
`init()` is a no-op. The gradient all-reduce of the train step itself does not
live here: it is traced into the compiled step with functional collectives (see
sd_func/train/step.py). These helpers are for the host side: metrics, barriers,
rank-0-only work. This is the only module that reads the launcher's environment
variables: everyone else asks `launch_rank()`, `launch_world_size()` or `rank()`.
"""

import datetime
import os

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun) set it, before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """The number of processes the launcher started (1 without one), before init()."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Start the process group from torchrun's env vars; returns (rank, world, device).

    Already initialised: returns the current group's values. One process: (0, 1,
    cuda:0 or cpu) and no group.
    """
    cuda = torch.cuda.is_available()
    if _active():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    world = launch_world_size()
    if world <= 1:
        return 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed.init: WORLD_SIZE={world} but {missing} unset; start with torchrun")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": device} if cuda else {}))
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


def shutdown() -> None:
    if _active():
        dist.destroy_process_group()
