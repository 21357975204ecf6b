"""run_serve.py under load: requests/s and p50/p95 latency at concurrency 1, 4 and 16
against the pipeline called in-process with the same batch, on this machine.

  python bench/serve.py [--preset tiny|shapes] [--ckpt PATH] [--steps N]
      [--concurrency 1,4,16] [--requests 16] [--max_batch_size 8] [--protocol http|grpc]
      [--out bench/results/serve.json]

Presets: tiny (configs/tiny.py's models, random weights, 32x32, ddim 10 steps, guidance
7.5) and shapes (configs/shapes.py, 64x64, euler_ancestral, guidance 3; --ckpt a trained
shapes workdir, else random weights). One server (run_serve.py, HTTP and gRPC on free
local ports) runs for the whole benchmark; each level sends --requests single-image
requests (distinct prompts and seeds, the same settings) from `concurrency` client
threads after a warm-up round (up to 4 requests). In-process: pipelines.txt2img in this process on the
same checkpoint, one call of b = min(concurrency, max_batch_size) images (median of 3
after a warm-up, measured right before that level's requests while the server idles),
i.e. images/s with the batch Triton can form at best. Overhead at
concurrency 1 = server p50 latency / in-process batch-1 time - 1. Prints a table and
writes JSON. Takes ~2 min (tiny) to ~6 min (shapes, 20 steps) on a 2-core CPU.
"""

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # puts the repo root on sys.path

sys.path.insert(0, os.path.join(common.ROOT, "tests"))
import serving  # the tests' server and client helpers
from deploy_models import tiny_checkpoint

from configs import shapes, tiny
from sd_func import pipelines
from sd_func.pipelines import job

PRESETS = {"tiny": (tiny, "configs/tiny.py"), "shapes": (shapes, "configs/shapes.py")}
PROMPTS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")
           for b in ("white", "black", "yellow")]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(server, n: int, concurrency: int, protocol: str, seed0: int) -> dict:
    lat, errors = [None] * n, []
    port = server["http"] if protocol == "http" else server["grpc"]

    def client(w):
        for k in range(w, n, concurrency):
            t0 = time.perf_counter()
            try:
                serving.infer(port, serving.request(PROMPTS[k % len(PROMPTS)], seed=seed0 + k), protocol)
            except Exception as e:  # counted, reported
                errors.append(repr(e))
            lat[k] = time.perf_counter() - t0
    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": n, "errors": len(errors), "wall_s": wall, "req_per_s": n / wall,
            "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95)}


def in_process(params, cfg, batch: int) -> float:
    """Seconds of one txt2img call of `batch` images (median of 3 after a warm-up)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    r = common.time_calls(lambda: pipelines.txt2img(params, cfg, prompts, seeds=list(range(batch)),
                                                    batch_size=batch), "cpu", iters=3, warmup=1)
    return r["median_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max_batch_size", type=int, default=8)
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "serve.json"))
    args = ap.parse_args()
    module, config_file = PRESETS[args.preset]
    work = tempfile.mkdtemp(prefix="bench-serve-")
    ckpt = args.ckpt or tiny_checkpoint(os.path.join(work, "tiny.safetensors"), config=module.get_config())
    overrides = [f"--config.sample.steps={args.steps}"] if args.steps else []
    cfg = module.get_config()
    if args.steps:
        cfg.sample.steps = args.steps
    params, cfg = job.load_model(ckpt, cfg, device="cpu")
    o = pipelines.resolve_options(cfg)
    info = {"preset": args.preset, "ckpt": ckpt, "sampler": o.sampler, "steps": o.steps,
            "guidance_scale": o.guidance_scale, "size": f"{o.height}x{o.width}", "protocol": args.protocol,
            "max_batch_size": args.max_batch_size, **common.machine_info("cpu")}
    levels = [int(c) for c in args.concurrency.split(",")]

    http, grpc, metrics = serving.free_ports(3)
    cmd = [sys.executable, "run_serve.py", f"--ckpt={ckpt}", f"--config={config_file}", f"--http_port={http}",
           f"--grpc_port={grpc}", f"--metrics_port={metrics}", f"--max_batch_size={args.max_batch_size}", *overrides]
    rows = []
    with serving.server(cmd, http, os.path.join(work, "serve.log")):
        server = {"http": http, "grpc": grpc}
        for c in levels:
            b = min(c, args.max_batch_size)
            base = in_process(params, cfg, b)  # right before the server's turn: the same machine load
            load(server, min(c, 4), min(c, 4), args.protocol, 10_000)  # warm-up round
            execs0 = serving.metric(metrics, "nv_inference_exec_count")
            r = load(server, max(args.requests, c), c, args.protocol, 0)
            r.update(concurrency=c, executions=serving.metric(metrics, "nv_inference_exec_count") - execs0,
                     in_process_batch=b, in_process_s=base, in_process_img_per_s=b / base)
            rows.append(r)
            print(f"concurrency {c}: {r['req_per_s']:.2f} req/s, p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s, "
                  f"{r['errors']} errors, {int(r['executions'])} executions; in-process batch {b}: "
                  f"{r['in_process_img_per_s']:.2f} img/s", flush=True)
    one = next((r for r in rows if r["concurrency"] == 1), None)
    summary = {}
    if one:
        summary["overhead_at_1"] = one["p50_s"] / one["in_process_s"] - 1
        summary["throughput_vs_1"] = {r["concurrency"]: r["req_per_s"] / one["req_per_s"] for r in rows}
    print(f"\n{args.preset}, {info['size']}, {o.sampler} {o.steps} steps, guidance {o.guidance_scale}; "
          f"{info['host_cpu']} ({info['cpu_capability']}), {info['threads']} threads, load {info.get('load_avg_1m')}")
    print("| concurrency | server req/s | p50 latency | p95 latency | executions | in-process img/s (batch) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['req_per_s']:.2f} | {r['p50_s']:.3f} s | {r['p95_s']:.3f} s | "
              f"{int(r['executions'])} / {r['requests']} | {r['in_process_img_per_s']:.2f} ({r['in_process_batch']}) |")
    if one:
        print(f"overhead at concurrency 1: {summary['overhead_at_1']:+.1%} of the in-process image time; "
              f"throughput vs concurrency 1: " + ", ".join(f"{c}: {x:.2f}x" for c, x in
                                                          summary["throughput_vs_1"].items()))
    common.write_json(args.out, {"info": info, "results": rows, "summary": summary})


if __name__ == "__main__":
    main()
