"""Deterministic batching for index-addressed ("map-style") datasets.

A training batch is a pure function of (seed, step, global example index): the
global indices of step n are n*B .. n*B+B-1, rank r of `world` takes the
contiguous slice [r*B/world, (r+1)*B/world), and global index g reads position
g mod N of epoch g // N, whose order is a permutation drawn from
fold_in(data_key(seed), epoch). So the same run gives the same examples on 1 or
N processes and after a resume, with no data state to store. A corrupt example
is skipped by reading the next position of the same permutation: counted in the
batch's "skipped", logged with its file name, and still deterministic.
Optional threads (cfg.data.num_workers) load examples in parallel and build the
next step's batch ahead of time; they change speed, never content.
"""

import concurrent.futures
import logging
import threading
from typing import Any

import torch

from sd_func import random
from sd_func.errors import UserError

log = logging.getLogger("sd_func.data")

_DATA_TAG = 0xDA7A      # keeps data keys apart from the training-noise keys of the same seed
_AUGMENT_TAG = 0xA06


def data_key(seed: int) -> int:
    """The root key of everything the data pipeline draws for a run seed."""
    return random.fold_in(random.key(seed), _DATA_TAG)


def epoch_key(seed: int, epoch: int) -> int:
    """The key of epoch `epoch`'s example order."""
    return random.fold_in(data_key(seed), epoch)


def example_key(seed: int, index: int) -> int:
    """The key of the augmentations (crop, flip) of global example `index`."""
    return random.fold_in(random.fold_in(data_key(seed), _AUGMENT_TAG), index)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits the n examples: a LongTensor permutation."""
    return torch.randperm(n, generator=random.generator(epoch_key(seed, epoch)))


def rank_indices(step: int, global_batch: int, rank: int = 0, world: int = 1) -> range:
    """The global example indices of `step` that belong to `rank`."""
    if global_batch % world:
        raise UserError(f"data: global batch {global_batch} is not divisible by world size {world}")
    if not 0 <= rank < world:
        raise UserError(f"data: rank {rank} outside world of size {world}")
    b = global_batch // world
    start = step * global_batch + rank * b
    return range(start, start + b)


def collate(examples: list[dict], indices, skipped: int) -> dict:
    """Stack a list of examples ({"images": tensor, "captions": str, ...}) into a batch."""
    batch: dict[str, Any] = {"index": torch.tensor(list(indices), dtype=torch.long)}
    for name in examples[0]:
        values = [e[name] for e in examples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch["skipped"] = int(skipped)
    return batch


class MapSource:
    """A batch source over a dataset with `load(i, key) -> example | None` and `num_examples`.

    `num_examples is None` means an infinite dataset addressed by global index
    directly (the synthetic shapes); otherwise epochs are permutations. `load`
    returns None for an unreadable example (after logging a warning that names it).
    """

    def __init__(self, kind: str, dataset, seed: int, rank: int = 0, world: int = 1,
                 num_workers: int = 0, shuffle: bool = True):
        self.kind, self.dataset, self.seed = kind, dataset, int(seed)
        self.rank, self.world, self.shuffle = int(rank), int(world), shuffle
        self.num_workers = int(num_workers)
        self._perms: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._pool = self._ahead = None
        self._pending: tuple | None = None
        if self.num_workers > 0:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, "sd_func-data")
            self._ahead = concurrent.futures.ThreadPoolExecutor(1, "sd_func-data-ahead")

    @property
    def num_examples(self) -> int | None:
        return self.dataset.num_examples

    def _order(self, epoch: int) -> torch.Tensor:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                n = self.num_examples
                perm = epoch_permutation(self.seed, epoch, n) if self.shuffle else torch.arange(n)
                if len(self._perms) >= 2:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def example(self, g: int) -> tuple[dict, int]:
        """The example at global index g and the number of corrupt ones skipped to find it."""
        k = example_key(self.seed, g)
        n = self.num_examples
        if n is None:
            ex = self.dataset.load(g, k)
            if ex is None:
                raise RuntimeError(f"data[{self.kind}]: example {g} of an infinite dataset failed")
            return ex, 0
        if n == 0:
            raise UserError(f"data[{self.kind}]: the dataset is empty")
        epoch, pos = divmod(g, n)
        order = self._order(epoch)
        for tries in range(n):
            ex = self.dataset.load(int(order[(pos + tries) % n]), k)
            if ex is not None:
                return ex, tries
        raise RuntimeError(f"data[{self.kind}]: all {n} examples are unreadable")

    def _build(self, step: int, global_batch: int) -> dict:
        indices = rank_indices(step, global_batch, self.rank, self.world)
        if self._pool is not None:
            results = list(self._pool.map(self.example, indices))
        else:
            results = [self.example(g) for g in indices]
        return collate([r[0] for r in results], indices, sum(r[1] for r in results))

    def batch(self, step: int, global_batch: int) -> dict:
        """This rank's part of global batch `step`: a pure function of (seed, step)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[:2] == (step, global_batch):
            out = pending[2].result()
        else:
            if pending is not None:
                pending[2].cancel()
            out = self._build(step, global_batch)
        if self._ahead is not None:
            self._pending = (step + 1, global_batch, self._ahead.submit(self._build, step + 1, global_batch))
        return out

    def state(self) -> dict:
        """Map-style batches depend only on (seed, step): there is no position to store."""
        return {"kind": self.kind}

    def restore(self, state: dict) -> None:
        """Check the kind; any world size may resume (a state or {"ranks": [state, ...]})."""
        if state and "ranks" in state:
            state = state["ranks"][0] if state["ranks"] else {}
        if state and state.get("kind", self.kind) != self.kind:
            raise UserError(f"data: cannot restore a {state.get('kind')!r} position into a {self.kind!r} source")

    def close(self) -> None:
        for ex in (self._ahead, self._pool):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        self._pool = self._ahead = self._pending = None

