"""Shared helpers of the bench/ scripts: timing, the machine's GEMM rate, analytic UNet
FLOPs, peak memory, machine facts and JSON/table output.

Timing takes the median of several calls after warm-up calls (CUDA synchronised).
The GEMM rate is a square matmul's FLOP/s measured in the same process, so achieved
FLOP/s can be read as a fraction of what this machine does on a plain matmul right now
(on a shared CPU the load moves both numbers together). UNet FLOPs are counted from the
config (multiply-accumulates of every conv, linear and attention product; 1 MAC = 2 FLOPs),
which matches torch.utils.flop_counter on SD 1.5 (90.05 GMAC per image at 32x32 latents,
401.6 at 64x64). Peak memory: CUDA's max_memory_allocated, or on Linux CPUs the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs).
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- timing


def sync(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, iters: int = 3, warmup: int = 1) -> dict:
    """Seconds per call of fn() over `iters` calls after `warmup` untimed calls: every timed
    call, their median and min, and the very first call's time (compilation included)."""
    times, first = [], None
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        if i >= warmup:
            times.append(dt)
    return {"first_s": first, "times_s": times, "median_s": statistics.median(times), "min_s": min(times)}


def gemm_rate(dtype, device, n: int | None = None, iters: int = 5, via_fp32: bool = False) -> float:
    """GFLOP/s of an [n,n] @ [n,n] matmul in dtype (median of iters). via_fp32: the operands
    are dtype values computed in fp32 (upcast, matmul, round back), the best a CPU without
    native bf16/fp16 arithmetic can do; the casts are timed too."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    if via_fp32:
        def fn():
            return (a.float() @ b.float()).to(dtype)
    else:
        def fn():
            return F.linear(a, b)  # the path F.linear takes (oneDNN where it has a kernel)
    r = time_calls(fn, device, iters=iters, warmup=1)
    return 2 * n ** 3 / r["median_s"] / 1e9


# ----------------------------------------------------------------------------- FLOPs


def unet_macs(cfg, batch: int, height: int, width: int, context_len: int = 77) -> dict:
    """Multiply-accumulates of one unet.apply call, by kind: conv, linear, attention (QK^T and PV)."""
    from sd_func.models import unet
    plan = unet._plan(cfg)  # resolved per-block layers, transformer depth, context widths
    ch, n = plan["channels"], len(plan["channels"])
    temb = 4 * ch[0]
    macs = {"conv": 0, "linear": 0, "attention": 0}

    def conv(c_in, c_out, hw, k=3):
        macs["conv"] += batch * hw * c_in * c_out * k * k

    def resnet(c_in, c_out, hw):
        conv(c_in, c_out, hw)
        conv(c_out, c_out, hw)
        macs["linear"] += batch * temb * c_out
        if c_in != c_out:
            conv(c_in, c_out, hw, k=1)

    def transformer(c, hw, i):
        d_ctx, m = plan["context_dims"][i], context_len
        macs["linear"] += 2 * batch * hw * c * c  # proj_in, proj_out (1x1 conv or linear)
        for _ in range(plan["tlayers"][i]):
            macs["linear"] += batch * (hw * 4 * c * c + hw * 2 * c * c + 2 * m * d_ctx * c + hw * 12 * c * c)
            macs["attention"] += batch * (2 * hw * hw * c + 2 * hw * m * c)

    hw = height * width
    macs["linear"] += batch * (ch[0] * temb + temb * temb)
    conv(cfg.in_channels, ch[0], hw)
    skips = [ch[0]]
    c_prev, sizes = ch[0], [(height, width)]
    h, w = height, width
    for i in range(n):
        for _ in range(plan["layers"][i]):
            resnet(c_prev, ch[i], h * w)
            c_prev = ch[i]
            if plan["down_attn"][i]:
                transformer(ch[i], h * w, i)
            skips.append(ch[i])
        if i < n - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            conv(ch[i], ch[i], h * w)
            sizes.append((h, w))
            skips.append(ch[i])
    resnet(ch[-1], ch[-1], h * w)
    transformer(ch[-1], h * w, n - 1)
    resnet(ch[-1], ch[-1], h * w)
    for i in range(n):
        r = n - 1 - i
        for _ in range(plan["layers"][r] + 1):
            resnet(c_prev + skips.pop(), ch[r], h * w)
            c_prev = ch[r]
            if plan["up_attn"][i]:
                transformer(ch[r], h * w, r)
        if i < n - 1:
            sizes.pop()
            h, w = sizes[-1]
            conv(ch[r], ch[r], h * w)
    conv(ch[0], cfg.out_channels, height * width)
    macs["total"] = sum(macs.values())
    return macs


def counted_macs(fn) -> float:
    """MACs that torch.utils.flop_counter sees in fn() (run it on meta tensors to make it free)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory inside a `with` block: CUDA allocated bytes, or the process's peak RSS."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = None
        self.start_bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            try:  # Linux: writing 5 resets VmHWM to the current RSS
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.start_bytes = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = _proc_status("VmHWM")
        return False

    def result(self) -> dict:
        gib = 2 ** 30
        if self.peak_bytes is None:
            return {}
        kind = "cuda_allocated" if self.device.type == "cuda" else "rss"
        return {"peak_mem_gib": self.peak_bytes / gib, "peak_mem_kind": kind,
                "peak_over_start_gib": (self.peak_bytes - (self.start_bytes or 0)) / gib}


def _proc_status(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- machine, output


def machine_info(device) -> dict:
    device = torch.device(device)
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host_cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["native_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return info


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def write_json(path: str, obj) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); missing values print as '-'."""
    widths = [max(len(h), 8) for _, h, _ in columns]
    cells = []
    for r in rows:
        line = []
        for k, _, fmt in columns:
            v = r.get(k)
            line.append("-" if v is None else format(v, fmt))
        cells.append(line)
    widths = [max([wd] + [len(c[i]) for c in cells]) for i, wd in enumerate(widths)]
    print("  ".join(h.rjust(wd) if i else h.ljust(wd) for i, ((_, h, _), wd) in enumerate(zip(columns, widths))))
    for line in cells:
        print("  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(line, widths))))
