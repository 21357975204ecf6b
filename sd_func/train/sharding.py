"""ZeRO-1 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", stage 1): each of N data-parallel ranks keeps the optimizer state and the
EMA of only its 1/N slice of the flat parameter vector.

`Shard(rank, world)` names the slice; the flat vector (optim.Layout order, numel entries) is
padded with zeros to N * size(numel) and rank r owns [r * size, (r + 1) * size). The padding
is harmless: its gradient, moments and updates stay 0. The decayed leaves come first in the
layout, so the decayed part of a slice is again a prefix of it (`n_decay`).

Inside the step (train.step) the gradient vector is reduce-scattered, each rank updates its
slice and the new params are all-gathered, all with functional collectives that trace into
the one compiled graph; `norm` is a global L2 norm over the slices (one scalar all-reduce).
`gather` is the same all-gather, used on the host to turn a sharded train state back into
the unsharded one that checkpoints hold (train.state.gather / scatter).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol


class Shard(NamedTuple):
    rank: int
    world: int


def from_config(tcfg, rank: int, world: int) -> Shard | None:
    """The Shard of this rank when tcfg.shard_optimizer and world > 1, else None (unsharded)."""
    return Shard(int(rank), int(world)) if bool(tcfg.get("shard_optimizer", False)) and world > 1 else None


def size(shard: Shard, numel: int) -> int:
    """Entries per rank: ceil(numel / world)."""
    return -(-int(numel) // shard.world)


def local(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """This rank's slice of a full flat vector (zero-padded at the end)."""
    n = size(shard, x.shape[0])
    mine = x[shard.rank * n:(shard.rank + 1) * n]  # a view; only the last slices need padding
    return mine if mine.shape[0] == n else F.pad(mine, (0, n - mine.shape[0]))


def n_decay(shard: Shard, numel: int, n_decay_full: int) -> int:
    """How many leading entries of this rank's slice get weight decay."""
    n = size(shard, numel)
    return max(0, min(int(n_decay_full), (shard.rank + 1) * n) - shard.rank * n)


def reduce_scatter_mean(g: torch.Tensor, shard: Shard) -> torch.Tensor:
    """This rank's slice of the mean over ranks of the full vector g (one reduce-scatter)."""
    n = size(shard, g.shape[0])
    g = F.pad(g, (0, shard.world * n - g.shape[0]))
    return funcol.reduce_scatter_single(g, "sum", 0, torch.distributed.group.WORLD) / shard.world


def gather(x: torch.Tensor, shard: Shard, numel: int) -> torch.Tensor:
    """The full flat vector (numel entries) from every rank's slice x (one all-gather)."""
    # waited on here: the result is a plain tensor (the state's params are views into it)
    return funcol.wait_tensor(funcol.all_gather_single(x, 0, torch.distributed.group.WORLD))[:numel]


def norm(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The global L2 norm of a vector split into slices, x being this rank's (one scalar all-reduce)."""
    return torch.sqrt(funcol.all_reduce(x.square().sum(), "sum", torch.distributed.group.WORLD))
