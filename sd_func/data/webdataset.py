"""WebDataset tar shards, streamed with the standard library's tarfile.

The shards are given by a brace pattern ("data/shard-{000000..000099}.tar";
comma lists "{a,b}" too). A sample is the run of consecutive tar members that
share a key (the member path up to the first dot of its file name): an image
(`key.jpg|jpeg|png|webp`) and a caption (`key.txt`, or `key.json` with
"caption" or "text"). Shards are split by rank (shards[rank::world]) and then
into `num_workers` streams (each on its own prefetch thread); a rank takes one
sample from each stream in turn. Each stream visits its shards in an order
re-drawn every epoch from the seed. A corrupt sample (no image, no caption, an
undecodable image, a truncated tar) is skipped, counted in "skipped" and logged
with its shard and key. The position of every stream (epoch, shard, sample
offset in the shard, examples consumed) is the source's state(), so a resumed
run continues exactly where it stopped.

With config.data.buckets (sd_func.data.buckets) the bucket of global step n is drawn
from a key of (seed, n) with probabilities `bucket_weights` ("" = the shares of the
buckets among the first `bucket_estimate` samples of the shard list, which every rank
reads alike; "uniform"; or one weight per bucket, tallest first), so all ranks agree
without a collective. Each rank decodes its stream into per-bucket FIFO buffers (every
image resized/cropped into the bucket nearest its aspect ratio) until the step's bucket
holds its micro-batch b, and takes the oldest b. A buffer holds at most
max(b, `bucket_buffer`) examples; a sample arriving at a full buffer drops that
buffer's oldest (counted in state()["dropped"], warned at 1, 2, 4, ... drops). The
buffers' contents (shard, epoch, offset of each example) are part of state(): a resume
decodes them again and continues exactly.
"""

import json
import logging
import os
import queue
import re
import tarfile
import threading
import zlib

import torch
from PIL import Image

from sd_func import random
from sd_func.data import buckets, loader, transforms
from sd_func.errors import MissingFileError, UserError

log = logging.getLogger("sd_func.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """'s-{000..002}.tar' -> ['s-000.tar', 's-001.tar', 's-002.tar']; '{a,b}' lists too."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m[1]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng[1]), int(rng[2])
        width = len(rng[1]) if rng[1].startswith("0") or len(rng[1]) == len(rng[2]) else 0
        if hi < lo:
            raise UserError(f"webdataset: empty range {{{body}}} in {pattern!r}")
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [s for item in items for s in expand_braces(head + item + tail)]


def sample_key(seed: int, shard: str, epoch: int, offset: int) -> int:
    """The augmentation key of sample `offset` of `shard` in `epoch`: independent of rank and world."""
    k = loader.example_key(seed, zlib.crc32(os.path.basename(shard).encode()))
    return random.fold_in(random.fold_in(k, epoch), offset)


def _split_key(name: str) -> tuple[str, str]:
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem), ext.lower()


def _caption(files: dict, tf: tarfile.TarFile):
    for ext in TEXT_EXTS:
        if ext in files:
            return tf.extractfile(files[ext]).read().decode("utf-8").strip()
    if "json" in files:
        meta = json.loads(tf.extractfile(files["json"]).read().decode("utf-8"))
        for k in ("caption", "text"):
            if isinstance(meta, dict) and k in meta:
                return str(meta[k])
    return None


def decode_sample(files: dict, tf: tarfile.TarFile, where: str, resolution: int, key: int, cfg_data,
                  table=None):
    """The example of one tar sample, or None (logged) when it is corrupt.

    With a bucket table the image goes into the bucket nearest its aspect ratio, whose
    index the example carries as "bucket"."""
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    if image_ext is None:
        log.warning("data: skipping %s: no image member (%s)", where, "/".join(IMAGE_EXTS))
        return None
    try:
        text = _caption(files, tf)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError, tarfile.TarError) as e:
        log.warning("data: skipping %s: unreadable caption (%s)", where, e)
        return None
    if text is None:
        log.warning("data: skipping %s: no caption member (txt or json with caption/text)", where)
        return None
    try:
        data = tf.extractfile(files[image_ext]).read()
    except (OSError, tarfile.TarError) as e:
        log.warning("data: skipping %s: unreadable image member (%s)", where, e)
        return None
    img = transforms.try_decode(data, f"{where}.{image_ext}")
    if img is None:
        return None
    b = buckets.nearest(*img.size, table) if table else None
    x = transforms.preprocess(img, resolution if b is None else table[b], key, cfg_data.get("center_crop", True),
                              cfg_data.get("random_flip", False))
    return {"images": x, "captions": text} if b is None else {"images": x, "captions": text, "bucket": b}


def read_shard(path: str, start: int, decode_fn):
    """Yield (sample offset, example | None) for the samples of a shard from offset `start` on.

    Samples before `start` are only counted (their data is never read);
    decode_fn(offset, files, tarfile, name) makes the example. A truncated or
    unreadable tar ends the shard with one corrupt sample.
    """
    index = 0
    try:
        with tarfile.open(path, "r:") as tf:
            size, current, files = os.path.getsize(path), None, {}
            while True:
                info = tf.next()
                # tarfile ends quietly at a cut header: then the end-of-archive blocks are missing
                truncated = info is None and size - tf.offset < tarfile.BLOCKSIZE
                k = _split_key(info.name) if info is not None else None
                if truncated and index >= start:
                    log.warning("data: shard %s is truncated after %d samples; skipping its rest", path, index)
                    yield index, None
                    return
                if current is not None and (info is None or k[0] != current):
                    if index >= start:
                        yield index, decode_fn(index, files, tf, f"{path}:{current}")
                    index += 1
                    current, files = None, {}
                if info is None:
                    return
                if info.isfile():
                    current = k[0]
                    files[k[1]] = info
    except (tarfile.TarError, OSError, EOFError) as e:
        if index >= start:
            log.warning("data: shard %s is corrupt after %d samples (%s: %s); skipping its rest",
                        path, index, type(e).__name__, e)
            yield index, None


class _Stream:
    """One worker's infinite stream over its shards, with an exact position."""

    def __init__(self, shards, seed, stream_id, resolution, cfg_data, table=None):
        self.shards, self.seed, self.stream_id = list(shards), seed, stream_id
        self.resolution, self.cfg_data, self.table = resolution, cfg_data, table
        self.pos = {"epoch": 0, "shard_pos": 0, "shard": self.order(0)[0], "member": 0, "consumed": 0}

    def order(self, epoch: int) -> list[str]:
        k = random.fold_in(loader.epoch_key(self.seed, epoch), self.stream_id)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=random.generator(k))]

    def set_position(self, pos: dict):
        expected = self.order(pos["epoch"])[pos["shard_pos"]] if pos["shard_pos"] < len(self.shards) else None
        if expected is not None and os.path.basename(expected) != os.path.basename(pos["shard"]):
            raise UserError(f"webdataset: the stored position names shard {pos['shard']!r} but this "
                             f"configuration reads {expected!r} there; the shard list or seed changed")
        self.pos = dict(pos)

    def decoder(self, shard: str, epoch: int, wanted=None):
        """decode_fn of read_shard for `shard` in `epoch` (only the offsets in `wanted`, if given)."""
        def decode(offset, files, tf, where):
            if wanted is not None and offset not in wanted:
                return None
            k = sample_key(self.seed, shard, epoch, offset)
            return decode_sample(files, tf, where, self.resolution, k, self.cfg_data, self.table)
        return decode

    def items(self):
        """Yield (example | None, position after it), forever."""
        p = dict(self.pos)
        epoch, shard_pos, member, consumed = p["epoch"], p["shard_pos"], p["member"], p["consumed"]
        while True:
            order = self.order(epoch)
            found, full_pass = consumed, shard_pos == 0 and member == 0
            while shard_pos < len(order):
                shard = order[shard_pos]

                decode = self.decoder(shard, epoch)

                for offset, ex in read_shard(shard, member, decode):
                    member = offset + 1
                    consumed += ex is not None
                    yield ex, {"epoch": epoch, "shard_pos": shard_pos, "shard": shard,
                               "member": member, "consumed": consumed}
                shard_pos, member = shard_pos + 1, 0
            if full_pass and consumed == found:
                raise RuntimeError(f"webdataset: an epoch over {len(order)} shards gave no readable sample")
            epoch, shard_pos = epoch + 1, 0


class _Prefetch(threading.Thread):
    """Runs a stream's generator on a thread, `depth` items ahead."""

    def __init__(self, stream: _Stream, depth: int = 32):
        super().__init__(daemon=True, name=f"sd_func-wds-{stream.stream_id}")
        self.stream, self.q, self.stop = stream, queue.Queue(depth), threading.Event()
        self.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run(self):
        gen = self.stream.items()
        try:
            for item in gen:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)
        finally:
            gen.close()

    def get(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"webdataset: stream {self.stream.stream_id} failed") from item
        return item


class WebDatasetSource:
    kind = "webdataset"
    num_examples = None

    def __init__(self, cfg_data, seed: int, rank: int = 0, world: int = 1):
        shards = expand_braces(cfg_data.path)
        missing = [s for s in shards if not os.path.exists(s)]
        if missing:
            raise MissingFileError(f"webdataset: {len(missing)} shards of {cfg_data.path!r} do not exist, "
                                    f"e.g. {missing[0]!r}")
        if len(shards) < world:
            raise UserError(f"webdataset: {len(shards)} shards cannot be split over {world} ranks")
        mine = shards[rank::world]
        self.num_streams = max(1, min(int(cfg_data.get("num_workers", 0)), len(mine)))
        self.threaded = int(cfg_data.get("num_workers", 0)) > 0
        self.seed, self.rank, self.world = int(seed), rank, world
        self.buckets = buckets.resolve(cfg_data)
        self.streams = [_Stream(mine[w::self.num_streams], self.seed, rank * 1024 + w,
                                cfg_data.resolution, cfg_data, self.buckets) for w in range(self.num_streams)]
        self.next_stream, self.next_step = 0, None
        self._iters = None
        if self.buckets:
            self.weights = bucket_weights(cfg_data, shards, self.buckets)
            self.buffer_size = int(cfg_data.get("bucket_buffer", 32))
            self.buffers, self.dropped = [[] for _ in self.buckets], 0  # [(ref, example)] per bucket, oldest first

    def _start(self):
        if self.threaded:
            self._iters = [_Prefetch(s) for s in self.streams]
        else:
            self._iters = [s.items() for s in self.streams]

    def _next(self, w: int):
        it = self._iters[w]
        ex, pos = it.get() if isinstance(it, _Prefetch) else next(it)
        self.streams[w].pos = pos
        return ex

    def batch(self, step: int, global_batch: int) -> dict:
        """The next b = global_batch / world examples of this rank's stream."""
        if self.next_step is not None and step != self.next_step:
            raise ValueError(f"webdataset: a stream must be read in step order; expected step "
                             f"{self.next_step}, got {step} (restore() a saved state() to jump)")
        indices = loader.rank_indices(step, global_batch, self.rank, self.world)
        if self._iters is None:
            self._start()
        if self.buckets:
            out = self._bucket_batch(step, indices)
        else:
            examples, skipped = [], 0
            while len(examples) < len(indices):
                ex = self._next(self.next_stream)
                self.next_stream = (self.next_stream + 1) % self.num_streams
                if ex is None:
                    skipped += 1
                else:
                    examples.append(ex)
            out = loader.collate(examples, indices, skipped)
        self.next_step = step + 1
        return out

    def _bucket_batch(self, step: int, indices: range) -> dict:
        """This rank's micro-batch of step's bucket, read through the per-bucket buffers."""
        k, b = buckets.draw(self.seed, step, self.weights), len(indices)
        cap, skipped, reads = max(b, self.buffer_size), 0, 0
        while len(self.buffers[k]) < b:
            w = self.next_stream
            ex = self._next(w)
            self.next_stream, reads = (w + 1) % self.num_streams, reads + 1
            if ex is None:
                skipped += 1
                continue
            pos = self.streams[w].pos
            j = ex.pop("bucket")
            if len(self.buffers[j]) >= cap:
                self.buffers[j].pop(0)
                self.dropped += 1
                if self.dropped & (self.dropped - 1) == 0:
                    log.warning("data: webdataset bucket buffers full: dropped %d samples so far (bucket %s "
                                "holds %d; set config.data.bucket_weights or bucket_buffer)",
                                self.dropped, buckets.name(self.buckets[j]), cap)
            self.buffers[j].append(([pos["shard"], pos["epoch"], pos["member"] - 1], ex))
            if reads > 100 * cap * len(self.buckets):
                raise UserError(f"webdataset: bucket {buckets.name(self.buckets[k])} of step {step} got "
                                f"{len(self.buffers[k])} of {b} examples in {reads} samples; it is too rare "
                                f"for its weight (config.data.bucket_weights)")
        taken, self.buffers[k] = self.buffers[k][:b], self.buffers[k][b:]
        out = loader.collate([ex for _, ex in taken], indices, skipped)
        out["bucket"] = self.buckets[k]
        return out

    def _refill(self, refs: list[list]) -> None:
        """The buffers of a state(): every [shard, epoch, offset] decoded again."""
        stream = self.streams[0]
        want: dict[tuple, set] = {}
        for shard, epoch, offset in (r for bucket in refs for r in bucket):
            want.setdefault((shard, epoch), set()).add(offset)
        got = {}
        for (shard, epoch), offsets in want.items():
            for offset, ex in read_shard(shard, min(offsets), stream.decoder(shard, epoch, offsets)):
                if ex is not None:
                    got[(shard, epoch, offset)] = ex
        missing = [r for bucket in refs for r in bucket if tuple(r) not in got]
        if missing:
            raise UserError(f"webdataset: the stored bucket buffers name {missing[0]} which no longer decodes")
        self.buffers = [[(r, dict(got[tuple(r)])) for r in bucket] for bucket in refs]
        for bucket in self.buffers:
            for _, ex in bucket:
                ex.pop("bucket")

    def state(self) -> dict:
        """This rank's stream positions (JSON). Gather all ranks' into {"ranks": [...]} to store."""
        out = {"kind": self.kind, "rank": self.rank, "world": self.world, "step": self.next_step,
               "next_stream": self.next_stream, "streams": [dict(s.pos) for s in self.streams]}
        if self.buckets:
            out.update(buffers=[[list(r) for r, _ in b] for b in self.buffers], dropped=self.dropped)
        return out

    def restore(self, state: dict) -> None:
        """Continue from a state() of this rank, or from {"ranks": [state of rank 0, ...]}."""
        if "ranks" in state:
            if len(state["ranks"]) != self.world:
                raise UserError(f"webdataset: the stored position has {len(state['ranks'])} ranks but the run "
                                 f"has {self.world}; a stream cannot be resumed with another world size")
            state = state["ranks"][self.rank]
        if state.get("kind") != self.kind:
            raise UserError(f"webdataset: cannot restore a {state.get('kind')!r} position")
        if (state["rank"], state["world"], len(state["streams"])) != (self.rank, self.world, self.num_streams):
            raise UserError(f"webdataset: stored position is for rank {state['rank']} of {state['world']} with "
                             f"{len(state['streams'])} streams; this source is rank {self.rank} of {self.world} "
                             f"with {self.num_streams} (keep config.data.num_workers and the world size)")
        self.close()
        for s, pos in zip(self.streams, state["streams"]):
            s.set_position(pos)
        self.next_stream, self.next_step = state["next_stream"], state["step"]
        if self.buckets:
            refs = state.get("buffers") or [[] for _ in self.buckets]
            if len(refs) != len(self.buckets):
                raise UserError(f"webdataset: the stored position has {len(refs)} bucket buffers but "
                                f"config.data.buckets gives {len(self.buckets)}")
            self._refill(refs)
            self.dropped = int(state.get("dropped", 0))

    def close(self) -> None:
        for it in self._iters or ():
            if isinstance(it, _Prefetch):
                it.stop.set()
                it.join(timeout=5)
            else:
                it.close()
        self._iters = None


def bucket_weights(cfg_data, shards: list[str], table: list) -> list[float]:
    """The draw weights of the buckets: config.data.bucket_weights, or estimated (module doc)."""
    spec = str(cfg_data.get("bucket_weights", "") or "").strip()
    if spec == "uniform":
        return [1.0] * len(table)
    if spec:
        try:
            w = [float(v) for v in spec.split(",")]
        except ValueError:
            w = []
        if len(w) != len(table) or min(w) < 0 or sum(w) <= 0:
            raise UserError(f"config.data.bucket_weights={spec!r}: expected 'uniform' or {len(table)} weights >= 0 "
                            f"(buckets {','.join(map(buckets.name, table))})")
        return w
    n, counts = int(cfg_data.get("bucket_estimate", 256)), [0] * len(table)

    def size(offset, files, tf, where):
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            return None
        try:
            with Image.open(tf.extractfile(files[ext])) as im:
                return im.size
        except Exception:  # PIL raises many types; a corrupt sample counts for no bucket
            return None
    seen = 0
    for shard in shards:
        for _, wh in read_shard(shard, 0, size):
            seen += 1
            if wh is not None:
                counts[buckets.nearest(*wh, table)] += 1
            if seen >= n:
                break
        if seen >= n:
            break
    if not sum(counts):
        raise UserError(f"webdataset: no readable image in the first {seen} samples of {cfg_data.path!r} "
                        f"to estimate config.data.bucket_weights from")
    return [float(c) for c in counts]


def make_source(cfg_data, seed: int, rank: int = 0, world: int = 1) -> WebDatasetSource:
    return WebDatasetSource(cfg_data, seed, rank, world)
