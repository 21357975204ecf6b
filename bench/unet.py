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
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path)
from sd_func import tree  # noqa: E402
from sd_func.models import unet  # noqa: E402

TINY = dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64)
COLUMNS = [("dtype", "dtype", "s"), ("size", "latent", "d"), ("row", "row", "s"),
           ("ms", "ms/call", ".1f"), ("first_s", "first s", ".1f"), ("gflops", "GFLOP/s", ".1f"),
           ("gemm", "GEMM GFLOP/s", ".1f"), ("of_gemm_fp32", "/fp32 GEMM", ".2f"),
           ("of_gemm_dtype", "/dtype GEMM", ".2f"),
           ("vs_diffusers_best", "/diffusers best", ".2f"), ("peak_over_start_gib", "peak+ GiB", ".2f"),
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
    dtypes = a.dtypes.split(",")
    rates = {"fp32": common.gemm_rate(torch.float32, device)}
    for d in dtypes:
        if d != "fp32":
            rates[d] = common.gemm_rate(common.DTYPES[d], device)
            if device.type == "cpu":
                rates[d + "_via_fp32"] = common.gemm_rate(common.DTYPES[d], device, via_fp32=True)
    info["gemm_gflops"] = rates
    print(" ".join(f"{k}={v}" for k, v in info.items() if k != "args"))
    results = []
    sizes = [int(s) for s in a.sizes.split(",")]
    skip = [p for p in a.skip.split(",") if p]
    ctx_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    g = torch.Generator().manual_seed(1)
    inputs = {s: (torch.randn(2, 4, s, s, generator=g), torch.tensor([500.0, 500.0]),
                  torch.randn(2, 77, ctx_dim, generator=g)) for s in sizes}
    reference = {}  # size -> diffusers fp32 eager output
    model = build_reference(cfg, device)
    for d in dtypes:
        dtype = common.DTYPES[d]
        model.to(dtype)
        for layout in a.layouts.split(","):
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            model.to(memory_format=fmt)
            params = tree.from_state_dict(model.state_dict())  # the model's own tensors
            for s in sizes:
                x, t, c = (v.to(device) for v in inputs[s])
                x = x.to(dtype).contiguous(memory_format=fmt)
                c = c.to(dtype)
                macs = common.unet_macs(cfg, 2, s, s)["total"]
                for impl in a.impls.split(","):
                    for mode in a.modes.split(","):
                        if _skipped(skip, (d, impl, mode, layout)):
                            continue
                        before = _row_gemm_rates(d, device)
                        row = run_row(a, impl, mode, model, params, cfg, (x, t, c), device)
                        after = _row_gemm_rates(d, device)
                        row["gemm_gflops"] = {k: (before[k] + after[k]) / 2 for k in before}
                        row.update(dtype=d, size=s, layout=layout, impl=impl, mode=mode,
                                   row=f"{impl} {mode} {layout}", gmacs=macs / 1e9)
                        row["gflops"] = 2 * macs / row["median_s"] / 1e9
                        row["gemm"] = row["gemm_gflops"]["fp32"]
                        row["ms"] = 1e3 * row["median_s"]
                        row["it_per_s"] = 1 / row["median_s"]
                        row["of_gemm_fp32"] = row["gflops"] / row["gemm_gflops"]["fp32"]
                        gr = row["gemm_gflops"]
                        row["of_gemm_dtype"] = row["gflops"] / max(gr[d], gr.get(d + "_via_fp32", 0.0))
                        out = row.pop("output")
                        if d == "fp32" and impl == "diffusers" and mode == "eager" and s not in reference:
                            reference[s] = out.float()
                        if s in reference:
                            row["max_abs_err"] = (out.float() - reference[s]).abs().max().item()
                        results.append(row)
                        _ratios(results)
                        print(f"  {d} {s} {row['row']}: {row['ms']:.1f} ms/call (first {row['first_s']:.1f} s), "
                              f"{row['gflops']:.1f} GFLOP/s", flush=True)
                        common.write_json(a.out, {"info": info, "results": results})
            del params
            gc.collect()
    print()
    print(f"{info['device']} {info.get('gpu', info['host_cpu'])}, threads {info['threads']}, load "
          f"{info.get('load_avg_1m')}, torch {info['torch']}, diffusers {info.get('diffusers')}; "
          f"GEMM GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    common.print_table(results, COLUMNS)
    _summary(results)
    common.write_json(a.out, {"info": info, "results": results})
    return results


def _row_gemm_rates(d, device) -> dict:
    """GEMM GFLOP/s right next to a row (a shared machine's speed drifts): fp32, d, d via fp32."""
    r = {"fp32": common.gemm_rate(torch.float32, device, iters=3)}
    if d != "fp32":
        r[d] = common.gemm_rate(common.DTYPES[d], device, n=512, iters=1) if device.type == "cpu" and \
            not torch.ops.mkldnn._is_mkldnn_bf16_supported() else common.gemm_rate(common.DTYPES[d], device, iters=3)
        if device.type == "cpu":
            r[d + "_via_fp32"] = common.gemm_rate(common.DTYPES[d], device, iters=3, via_fp32=True)
    return r


def run_row(a, impl, mode, model, params, cfg, args, device):
    torch._dynamo.reset()
    gc.collect()
    call = make_call(impl, mode, model, params, cfg, a.compile_mode)
    out = {}

    def fn():
        out["y"] = call(*args)

    with torch.no_grad():
        first = common.time_calls(fn, device, iters=max(a.warmup, 1), warmup=0)  # compile included
        with common.PeakMemory(device) as mem:
            r = common.time_calls(fn, device, iters=a.iters, warmup=0)
        profile = profile_call(call, args, device) if a.profile else None
    row = {**r, **mem.result(), "output": out["y"].detach().cpu(), "first_s": first["first_s"]}
    if profile is not None:
        row["profile"] = profile
    return row


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
    for s in sorted({r["size"] for r in results}):
        for d in sorted({r["dtype"] for r in results if r["size"] == s}):
            ours = [r for r in results if r["size"] == s and r["dtype"] == d and r["impl"] == "sd_func"]
            theirs = df_rows(results, s, d)
            if ours and theirs:
                o = min(ours, key=lambda r: r["median_s"])
                t = min(theirs, key=lambda r: r["median_s"])
                print(f"latent {s} {d}: sd_func best ({o['row']}) {o['ms']:.0f} ms = {o['median_s'] / t['median_s']:.2f}x "
                      f"diffusers best ({t['row']}) {t['ms']:.0f} ms; {o['of_gemm_dtype']:.0%} of the {d} GEMM rate")


if __name__ == "__main__":
    main()
