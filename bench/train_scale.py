"""The scale features of the train step, each with and without: images/s and peak memory per rank.

  python bench/train_scale.py [--preset tiny|shapes|mid|sd15] [--batch 16[,32,...]] [--steps 6] [--warmup 2]
      [--rows base,accum2,accum4,remat_attention,remat_resnets,remat_all,dp2,zero2,dp4,zero4]
      [--precision fp32|bf16|fp16] [--compile] [--out bench/results/train_scale.json]

Every row is the eager UNet-stage step (train.unet_stage.make_train_step) on precached
latents (bench/train.py's inputs) with the same global batch, run in a fresh process (so
the peak resident set of one row does not carry into the next):
- base: one process, the whole batch; accumK: config.train.grad_accum=K (micro-batch B/K);
- remat_X: config.train.remat=X (attention, resnets, all);
- dpN / zeroN: N gloo processes through torch.distributed.run, unsharded / ZeRO-1
  (config.train.shard_optimizer); the optimizer + EMA bytes per rank are reported too.
Peak memory is the peak RSS over all steps (warm-up included) minus the RSS before the
first one, in a fresh process (bench/common.PeakMemory; on CUDA max_memory_allocated
minus the allocated bytes before), the largest over ranks. (After the first step the
allocator reuses freed memory, so a peak over later steps alone would miss the activations.)
On one process, "saved act." is exact: the bytes autograd saves for backward in one
micro-batch's forward (outside the remat regions), which remat and accumulation reduce.
--batch takes a list: every row runs at each global batch, and a batch that does not fit
(out of memory: the row's process fails) is recorded as such, so the largest batch that
fits shows per row. --compile compiles the step (not the remat rows, which need eager).
Not a test; prints a table, writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # puts the repo root on sys.path
import train as train_bench

from sd_func import random, tree
from sd_func.diffusion import schedules
from sd_func.models import text_encoder, unet
from sd_func.train import distributed, sharding, unet_stage

ROWS = {"base": {}, "accum2": {"grad_accum": 2}, "accum4": {"grad_accum": 4},
        "remat_attention": {"remat": "attention"}, "remat_resnets": {"remat": "resnets"},
        "remat_all": {"remat": "all"}, "dp2": {"nproc": 2}, "zero2": {"nproc": 2, "shard_optimizer": True},
        "dp4": {"nproc": 4}, "zero4": {"nproc": 4, "shard_optimizer": True}}


def worker(args) -> None:
    """One row in this process (or this rank of a torchrun group): writes its JSON."""
    rank, world, device = distributed.init()
    spec = {k: v for k, v in ROWS[args.row].items() if k != "nproc"}
    cfg = train_bench.get_config(args.preset)
    cfg.train.update(precision=args.precision, compile=args.compile and "remat" not in spec, warmup=0,
                     grad_clip=1.0, cond_drop=0.1, **spec)
    shard = sharding.from_config(cfg.train, rank, world)
    params = tree.to(unet.init(random.key(0), cfg.unet), device=device)
    te = tree.to(text_encoder.init(random.key(2), cfg.text_encoder), device=device)
    n_tok = train_bench.context_length(cfg)
    uncond = torch.tensor([cfg.text_encoder.vocab_size - 2] + [cfg.text_encoder.vocab_size - 1] * (n_tok - 1))
    frozen = {"uncond_context": text_encoder.apply(te, uncond[None].to(device), cfg.text_encoder)}
    local = argparse.Namespace(batch=args.batch // world, steps=args.steps, warmup=args.warmup, inputs="latents")
    batches = train_bench.make_batches(cfg, local, device, frozen)
    state, tx, lay = unet_stage.init(cfg, params, shard=shard)
    fn = unet_stage.make_train_step(cfg, tx, lay, world=world, shard=shard)
    with common.PeakMemory(device) as mem:  # from before the first step: a step's whole footprint
        for b in batches[:args.warmup]:
            state, m = fn(state, frozen, b)
            float(m["loss"])
        t0 = time.perf_counter()
        for b in batches[args.warmup:]:
            state, m = fn(state, frozen, b)
        float(m["loss"])
        dt = time.perf_counter() - t0
    saved = saved_activation_bytes(cfg, state, frozen, batches[0], world) if world == 1 else None
    opt_ema = sum(v.numel() * v.element_size() for k in ("opt", "ema") for v in tree.leaves(state[k]))
    res = {"row": args.row, "world": world, "rank": rank, "batch": args.batch, "compiled": bool(cfg.train.compile),
           "images_per_s": args.batch * args.steps / dt,
           "ms_per_step": 1e3 * dt / args.steps, "opt_ema_mib": opt_ema / 2**20,
           "saved_act_mib": None if saved is None else saved / 2**20, **mem.result()}
    with open(os.path.join(args.json, f"{args.row}-{rank}.json"), "w") as f:
        json.dump(res, f)
    distributed.barrier()
    distributed.shutdown()


def saved_activation_bytes(cfg, state, frozen, batch, world) -> int:
    """Bytes autograd keeps for backward in one micro-batch's forward of the loss (outside remat
    regions): the activation memory remat and accumulation act on, exact where RSS is coarse."""
    k = int(cfg.train.grad_accum)
    micro = {n: v[:v.shape[0] // k] for n, v in batch.items()}
    leaves = {n: v.detach().requires_grad_(True) for n, v in tree.flatten(state["params"]).items()}
    frozen = dict(frozen, alphas_cumprod=schedules.alphas_cumprod(cfg.diffusion))
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet_stage.loss_fn(cfg)(tree.unflatten(leaves), frozen, micro)
    return total[0]


def launch(args, row: str, batch: int, tmp: str) -> dict:
    nproc = ROWS[row].get("nproc", 1)
    me = [os.path.abspath(__file__), "--worker", "--row", row, "--json", tmp, "--preset", args.preset,
          "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
          "--precision", args.precision, *(["--compile"] if args.compile else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                             if nproc > 1 else []), *me]
    for r in range(nproc):
        if os.path.exists(os.path.join(tmp, f"{row}-{r}.json")):
            os.remove(os.path.join(tmp, f"{row}-{r}.json"))
    if subprocess.run(cmd, env=env, timeout=3600).returncode != 0:
        return {"row": row, "world": nproc, "batch": batch, "failed": "the row's process failed (out of memory?)"}
    ranks = []
    for r in range(nproc):
        with open(os.path.join(tmp, f"{row}-{r}.json")) as f:
            ranks.append(json.load(f))
    out = dict(ranks[0])
    out["images_per_s"] = min(r["images_per_s"] for r in ranks)  # the slowest rank sets the pace
    for k in ("peak_over_start_gib", "peak_mem_gib", "opt_ema_mib"):
        out[k] = max(r.get(k) or 0.0 for r in ranks)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="shapes")
    ap.add_argument("--batch", default="16", help="global batch, or a list: 8,16,32")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16", "fp16"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default="bench/results/train_scale.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.batch = int(args.batch)
        return worker(args)
    info = dict(common.machine_info("cuda" if torch.cuda.is_available() else "cpu"), preset=args.preset,
                global_batch=args.batch, steps=args.steps, precision=args.precision, compile=args.compile)
    print(json.dumps(info))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in [int(b) for b in str(args.batch).split(",")]:
            for row in args.rows.split(","):
                if row not in ROWS:
                    raise SystemExit(f"--rows: unknown {row!r}; expected {list(ROWS)}")
                rows.append(launch(args, row, batch, tmp))
                print(json.dumps(rows[-1]), flush=True)
                common.write_json(args.out, {"info": info, "results": rows})
    base = {(r["row"], r["batch"]): r for r in rows}
    for r in rows:
        ref = base.get(("base" if r["world"] == 1 else f"dp{r['world']}", r["batch"]))
        if ref is not None and ref.get("peak_over_start_gib"):
            r["mem_vs_ref"] = r["peak_over_start_gib"] / ref["peak_over_start_gib"]
            r["speed_vs_ref"] = r["images_per_s"] / ref["images_per_s"]
    common.write_json(args.out, {"info": info, "results": rows})
    print(f"\n{info.get('gpu', info['host_cpu'])}, torch {info['torch']}, preset {args.preset}, {args.precision}"
          f"{', compiled' if args.compile else ', eager'}")
    common.print_table(rows, [("row", "row", "s"), ("world", "procs", "d"), ("batch", "batch", "d"),
                              ("images_per_s", "img/s", ".1f"),
                              ("speed_vs_ref", "x ref", ".2f"), ("peak_over_start_gib", "peak GiB/rank", ".3f"),
                              ("mem_vs_ref", "mem x ref", ".2f"), ("opt_ema_mib", "opt+EMA MiB/rank", ".1f"),
                              ("saved_act_mib", "saved act. MiB", ".1f"), ("failed", "failed", "s")])


if __name__ == "__main__":
    main()
