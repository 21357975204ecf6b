"""One UNet call (batch 2 = one classifier-free-guidance step): sd_func vs diffusers, side by side.

  python bench/unet.py [--sizes 32,64] [--dtypes fp32,bf16] [--impls sd_func,diffusers]
      [--modes eager,compiled] [--layouts nchw,cl] [--iters 3] [--warmup 1] [--threads N]
      [--compile-mode default] [--tiny] [--profile] [--device cpu|cuda] [--out bench/results/unet.json]

The SD 1.5 UNet (random weights; --tiny: the same layout at a tenth of the width, for a
smoke run) is built once per dtype as a diffusers UNet2DConditionModel; sd_func's params
are that model's state-dict tensors (the same storage), so both run the same weights on
the same inputs (latents [2,4,s,s], timesteps [2], text context [2,77,768]) in one process.
Rows: implementation x eager/compiled (torch.compile: fullgraph for sd_func, diffusers'
module as is) x memory layout (nchw, or cl = channels_last inputs and conv weights).
Each row reports the median seconds per call after warm-up (the first call, compile
included, as first_s), achieved GFLOP/s from the config's MACs (bench/common.unet_macs)
over the fp32 and `dtype` GEMM rates measured in this process, the peak memory over the
timed calls, and the output's max abs difference from diffusers' fp32 eager output.
Prints a table; writes JSON after every row (a cut-off run keeps what it measured).
"""

import argparse
import copy
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # puts the repo root on sys.path

from sd_func import tree
from sd_func.models import unet

TINY = dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64)
COLUMNS = [("dtype", "dtype", "s"), ("size", "latent", "d"), ("row", "row", "s"),
           ("ms", "ms/call", ".1f"), ("first_s", "first s", ".1f"), ("gflops", "GFLOP/s", ".1f"),
           ("gemm", "GEMM GFLOP/s", ".1f"), ("of_gemm_fp32", "/fp32 GEMM", ".2f"),
           ("of_gemm_dtype", "/dtype GEMM", ".2f"),
           ("vs_diffusers_interleaved", "/diffusers", ".2f"), ("peak_over_start_gib", "peak+ GiB", ".2f"),
           ("max_abs_err", "err vs fp32", ".1e")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="32,64", help="latent sizes (64 = 512 px images)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--impls", default="sd_func,diffusers")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--layouts", default="nchw,cl")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--tiny", action="store_true", help="a tenth of SD 1.5's width (smoke run)")
    ap.add_argument("--profile", action="store_true", help="print each row's top ops (torch.profiler)")
    ap.add_argument("--skip", default="", help="rows to leave out, e.g. 'bf16/diffusers/eager/nchw' "
                    "(comma-separated dtype/impl/mode/layout patterns, '*' matches anything)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "unet.json"))
    return ap.parse_args(argv)


def _skipped(patterns, key):
    for p in patterns:
        parts = p.split("/")
        if len(parts) == 4 and all(a in ("*", b) for a, b in zip(parts, key)):
            return True
    return False


def build_reference(cfg, device):
    """A diffusers UNet (fixed seed; norms and biases moved off 1/0) on device, eval, no grads."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging
    logging.set_verbosity_error()  # model.to(dtype) warns about from_pretrained's torch_dtype
    torch.manual_seed(0)
    model = UNet2DConditionModel(**unet.to_diffusers_config(cfg)).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device)


def make_call(impl, mode, model, params, cfg, compile_mode):
    """call(x, t, context) -> output, for one row."""
    if impl == "sd_func":
        def fn(p, x, t, c):
            return unet.apply(p, x, t, c, cfg)
        if mode == "compiled":
            fn = torch.compile(fn, fullgraph=True, dynamic=False, mode=compile_mode)
        return lambda x, t, c: fn(params, x, t, c)
    m = torch.compile(model, dynamic=False, mode=compile_mode) if mode == "compiled" else model
    return lambda x, t, c: m(x, t, c).sample


def profile_call(call, args, device, top=15):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        call(*args)
        common.sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    rows = [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "count": e.count}
            for e in events[:top]]
    for r in rows:
        print(f"    {r['op'][:60]:60s} {r['self_ms']:9.1f} ms {100 * r['share']:5.1f}%  x{r['count']}")
    return rows


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = unet.config(**(TINY if a.tiny else {}))
    info = common.machine_info(device)
    info.update(config="tiny" if a.tiny else "sd15", args=vars(a))
    print(" ".join(f"{k}={v}" for k, v in info.items() if k != "args"), flush=True)
    results = []
    sizes = [int(s) for s in a.sizes.split(",")]
    skip = [p for p in a.skip.split(",") if p]
    ctx_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    g = torch.Generator().manual_seed(1)
    inputs = {s: (torch.randn(2, 4, s, s, generator=g), torch.tensor([500.0, 500.0]),
                  torch.randn(2, 77, ctx_dim, generator=g)) for s in sizes}
    reference = {}  # size -> diffusers fp32 eager output
    base = build_reference(cfg, device)
    for d in a.dtypes.split(","):
        base.to(common.DTYPES[d])
        models = {layout: _with_layout(base, layout) for layout in a.layouts.split(",")}
        params = {layout: tree.from_state_dict(m.state_dict()) for layout, m in models.items()}  # shared
        for s in sizes:
            specs = [(impl, mode, layout) for layout in models for impl in a.impls.split(",")
                     for mode in a.modes.split(",") if not _skipped(skip, (d, impl, mode, layout))]
            if specs:
                rows = run_group(a, d, s, specs, models, params, cfg, inputs[s], device)
                for row in rows:
                    out = row.pop("output")
                    if d == "fp32" and row["impl"] == "diffusers" and row["mode"] == "eager" and s not in reference:
                        reference[s] = out.float()
                    if s in reference:
                        row["max_abs_err"] = (out.float() - reference[s]).abs().max().item()
                results.extend(rows)
                _ratios(results)
                common.write_json(a.out, {"info": info, "results": results})
        del models, params
        gc.collect()
    print()
    print(f"{info['device']} {info.get('gpu', info['host_cpu'])}, threads {info['threads']}, load "
          f"{info.get('load_avg_1m')} at start, {os.getloadavg()[0]:.2f} at end, torch {info['torch']}, "
          f"diffusers {info.get('diffusers')}")
    print("GEMM GFLOP/s: measured between the timed calls; /diffusers: median over rounds of the row's time "
          "over the fastest diffusers row of its dtype in that round")
    common.print_table(results, COLUMNS)
    _summary(results)
    common.write_json(a.out, {"info": info, "results": results})
    return results


def _with_layout(base, layout):
    """base itself (nchw), or a channels_last copy whose non-conv tensors share base's storage."""
    if layout == "nchw":
        return base.to(memory_format=torch.contiguous_format)
    model = copy.deepcopy(base)
    shared = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if p.ndim != 4:
            p.data = shared[name].data
    return model.to(memory_format=torch.channels_last)


def _gemm_rates(d, device) -> dict:
    """GEMM GFLOP/s now (a shared machine's speed drifts): fp32, and for half dtypes the
    native kernel's and (CPU) the fp32-computed rate."""
    r = {"fp32": common.gemm_rate(torch.float32, device, iters=2)}
    if d != "fp32":
        slow = device.type == "cpu" and not nn_native(d)
        r[d] = common.gemm_rate(common.DTYPES[d], device, n=256 if slow else None, iters=1 if slow else 2)
        if device.type == "cpu":
            r[d + "_via_fp32"] = common.gemm_rate(common.DTYPES[d], device, iters=2, via_fp32=True)
    return r


def nn_native(d) -> bool:
    from sd_func import nn
    return not nn._cpu_upcast(common.DTYPES[d])


def run_group(a, d, s, specs, models, params, cfg, inp, device):
    """Rows of one dtype and size, timed round-robin (a round times every row once, in a
    rotating order, plus the GEMM rates), so that all rows see the same machine load."""
    torch._dynamo.reset()
    gc.collect()
    dtype = common.DTYPES[d]
    macs = common.unet_macs(cfg, 2, s, s)["total"]
    rows, calls = [], []
    for impl, mode, layout in specs:
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        x, t, c = (v.to(device) for v in inp)
        args = (x.to(dtype).contiguous(memory_format=fmt), t, c.to(dtype))
        call = make_call(impl, mode, models[layout], params[layout], cfg, a.compile_mode)
        with torch.no_grad():
            first = common.time_calls(lambda call=call, args=args: call(*args), device,
                                      iters=max(a.warmup, 1), warmup=0)
        print(f"  {d} {s} {impl} {mode} {layout}: first call {first['first_s']:.1f} s", flush=True)
        rows.append(dict(dtype=d, size=s, layout=layout, impl=impl, mode=mode, row=f"{impl} {mode} {layout}",
                         gmacs=macs / 1e9, first_s=first["first_s"], times_s=[], peaks=[]))
        calls.append((call, args))
    rates, out = [], {}
    for i in range(a.iters):
        rates.append(_gemm_rates(d, device))
        order = list(range(len(rows)))
        order = order[i % len(order):] + order[:i % len(order)]
        for j in order:
            call, args = calls[j]

            def fn(j=j, call=call, args=args):
                out[j] = call(*args)
            with torch.no_grad(), common.PeakMemory(device) as mem:
                rows[j]["times_s"].append(common.time_calls(fn, device, iters=1, warmup=0)["median_s"])
            rows[j]["peaks"].append(mem.result())
        best = min((r["times_s"][-1] for r in rows if r["impl"] == "diffusers"), default=None)
        for r in rows:
            r.setdefault("round_ratios", []).append(r["times_s"][-1] / best if best else None)
    rates.append(_gemm_rates(d, device))
    gemm = {k: statistics.median(r[k] for r in rates) for k in rates[0]}
    for j, r in enumerate(rows):
        peaks = r.pop("peaks")
        r.update(max(peaks, key=lambda p: p.get("peak_over_start_gib", 0)))
        r["median_s"] = statistics.median(r["times_s"])
        r["ms"], r["it_per_s"] = 1e3 * r["median_s"], 1 / r["median_s"]
        r["gflops"] = 2 * macs / r["median_s"] / 1e9
        r["gemm_gflops"], r["gemm"] = gemm, gemm["fp32"]
        r["of_gemm_fp32"] = r["gflops"] / gemm["fp32"]
        r["of_gemm_dtype"] = r["gflops"] / max(gemm[d], gemm.get(d + "_via_fp32", 0.0))
        ratios = [q for q in r.pop("round_ratios") if q is not None]
        r["vs_diffusers_interleaved"] = statistics.median(ratios) if ratios else None
        r["output"] = out[j].detach().float().cpu()
        if a.profile:
            print(f"  profile {d} {s} {r['row']}:")
            with torch.no_grad():
                r["profile"] = profile_call(calls[j][0], calls[j][1], device)
        print(f"  {d} {s} {r['row']}: {r['ms']:.1f} ms/call, {r['gflops']:.1f} GFLOP/s "
              f"({r['of_gemm_dtype']:.0%} of GEMM), x{r['vs_diffusers_interleaved'] or float('nan'):.2f} "
              f"of the fastest diffusers row", flush=True)
    return rows


def _ratios(results):
    """Each row's time over the fastest diffusers row of the same latent size (any dtype/mode),
    and over the fastest diffusers row of its own dtype."""
    for r in results:
        df = [q["median_s"] for q in results if q["impl"] == "diffusers" and q["size"] == r["size"]]
        same = [q["median_s"] for q in df_rows(results, r["size"], r["dtype"])]
        r["vs_diffusers_best"] = r["median_s"] / min(df) if df else None
        r["vs_diffusers_best_same_dtype"] = r["median_s"] / min(same) if same else None


def df_rows(results, size, dtype):
    return [q for q in results if q["impl"] == "diffusers" and q["size"] == size and q["dtype"] == dtype]


def _summary(results):
    """Per latent size: sd_func's fastest row of each dtype against diffusers' fastest (interleaved
    ratio), and against diffusers' fastest row of any dtype (medians, measured apart)."""
    for s in sorted({r["size"] for r in results}):
        for d in sorted({r["dtype"] for r in results if r["size"] == s}):
            ours = [r for r in results if r["size"] == s and r["dtype"] == d and r["impl"] == "sd_func"]
            theirs = df_rows(results, s, d)
            if ours and theirs:
                o = min(ours, key=lambda r: r["vs_diffusers_interleaved"])
                t = min(theirs, key=lambda r: r["median_s"])
                print(f"latent {s} {d}: sd_func best ({o['row']}) {o['ms']:.0f} ms "
                      f"= x{o['vs_diffusers_interleaved']:.2f} "
                      f"of diffusers' best ({t['row']}, {t['ms']:.0f} ms) side by side, x{o['vs_diffusers_best']:.2f} "
                      f"of diffusers' best of any dtype; {o['of_gemm_dtype']:.0%} of the {d} GEMM rate")


if __name__ == "__main__":
    main()
