#!/usr/bin/env bash
# All of bench/ on one CUDA GPU in under 8 minutes, with a table next to published figures.
#
#   bash bench/gpu.sh                      # on a CUDA machine (results: $OUT or bench/results/gpu)
#   bash bench/gpu.sh --device cpu --tiny  # a smoke run of the same stages on a CPU (minutes)
#   bash bench/gpu.sh --vendor             # copy ml_collections, absl, yaml from this Python into
#                                          # bench/vendor/ for a machine that lacks them (no pip)
#
# Stages (each under its own `timeout`, so one slow stage cannot sink the rest; every
# script writes its JSON after each row, so a cut stage keeps what it measured):
#   1. bench/unet.py   SD 1.5 UNet call, batch 2 (one CFG step), 64x64 latents (512 px):
#                      fp16 eager + compiled and bf16 eager, NCHW and channels_last,
#                      sd_func vs diffusers, same weights; it/s = calls/s.
#   2. bench/sample.py whole 25-step dpmpp_2m txt2img at 512 px, SD 1.5 shapes, fp16,
#                      sd_func vs StableDiffusionPipeline (eager).
#   3. bench/train.py  SD 1.5 UNet training step on precached latents (512 px), bf16 autocast,
#                      batch 8: sd_func vs diffusers + AdamW(foreach), eager.
#   4. bench/tensorrt.py  NOT RUN YET (written without a GPU): SD 1.5 UNet call, batch 2,
#                      64x64 latents, fp16: a TensorRT engine built from sd_func's ONNX export
#                      (run_export.py's exporter) vs sd_func eager / compiled vs diffusers,
#                      checked against sd_func's fp16 output. Needs `pip install tensorrt onnx`;
#                      skipped when tensorrt is missing.
#   4. bench/train_scale.py  the same step at global batch 8, 16, 32, 64 (the largest that fits shows),
#                      bf16: eager, compiled, remat=all (eager), grad_accum=2; with 2+ GPUs also
#                      2-process data parallel unsharded and ZeRO-1 (shard_optimizer): img/s per GPU
#                      and peak memory per rank. (Not yet run on a GPU: see BENCHMARKS.md.)
# Needs torch with CUDA, diffusers, transformers, safetensors, tqdm and ml_collections
# (+ absl, yaml); nothing is installed or downloaded (weights are random).
set -u
cd "$(dirname "$0")/.."

DEVICE=cuda
TINY=0
VENDOR_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs cpu or cuda}"; shift ;;
    --device=*) DEVICE="${1#--device=}" ;;
    --tiny) TINY=1 ;;
    --vendor) VENDOR_ONLY=1 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (--device cpu|cuda, --tiny, --vendor)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$VENDOR_ONLY" = 1 ]; then
  python - <<'EOF'
import importlib, os, shutil
dst = os.path.join("bench", "vendor")
os.makedirs(dst, exist_ok=True)
for name in ("ml_collections", "absl", "yaml"):
    src = os.path.dirname(importlib.import_module(name).__file__)
    shutil.copytree(src, os.path.join(dst, name), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # pure Python only
    print("copied", src, "->", os.path.join(dst, name))
EOF
  exit $?
fi

OUTDIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUTDIR"
[ -d bench/vendor ] && export PYTHONPATH="$PWD/bench/vendor:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

python - "$DEVICE" <<'EOF' || exit 3
import importlib, sys
missing = []
for m in ("torch", "diffusers", "transformers", "safetensors", "tqdm", "ml_collections"):
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({type(e).__name__}: {e})")
if missing:
    print("bench/gpu.sh: missing Python packages: " + "; ".join(missing), file=sys.stderr)
    print("  on a machine that has them: bash bench/gpu.sh --vendor, then carry bench/vendor", file=sys.stderr)
    sys.exit(1)
import torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    print("bench/gpu.sh: torch sees no CUDA device (use --device cpu --tiny for a smoke run)", file=sys.stderr)
    sys.exit(1)
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU)")
EOF
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader

if [ "$TINY" = 1 ]; then
  export OMP_NUM_THREADS=1  # tiny ops on a shared CPU: a second thread only spins
  UNET=(--tiny --sizes 8 --iters 2 --warmup 1 --dtypes fp32,bf16 --layouts nchw,cl --modes eager)
  SAMPLE=(--preset tiny --steps 3 --iters 1 --warmup 1 --dtype fp32 --modes sd_func_eager,diffusers_eager)
  TRAIN=(--preset tiny --batch 2 --steps 2 --warmup 1 --modes sd_func_eager,diffusers_eager)
  TRT=(--tiny --size 8 --iters 2 --warmup 1)
  SCALE=(--preset tiny --batch 4 --steps 2 --warmup 1 --precision fp32 --rows base,remat_all,accum2)
  T_UNET=600; T_SAMPLE=300; T_TRAIN=300; T_TRT=300; T_SCALE=300
else
  # fp16: eager both layouts, compiled channels_last only; bf16: eager only (compiles cost ~1 min each)
  # fp32: diffusers eager channels_last only, the reference the others' errors are measured from
  UNET=(--sizes 64 --iters 20 --warmup 3 --dtypes fp32,fp16,bf16 --layouts nchw,cl
        --skip "*/*/compiled/nchw,bf16/*/compiled/*,fp32/sd_func/*/*,fp32/*/compiled/*,fp32/*/*/nchw")
  SAMPLE=(--preset sd15 --steps 25 --iters 3 --warmup 1 --dtype fp16 --modes sd_func_eager,diffusers_eager)
  TRAIN=(--preset sd15 --batch 8 --steps 8 --warmup 2 --precision bf16 --inputs latents
         --modes sd_func_eager,diffusers_eager)
  TRT=(--size 64 --batch 2 --iters 20 --warmup 3)
  ROWS=base,remat_all,accum2
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "${NGPU:-0}" -ge 2 ] && ROWS=$ROWS,dp2,zero2
  SCALE=(--preset sd15 --batch 8,16,32,64 --steps 4 --warmup 2 --precision bf16 --rows "$ROWS")
  T_UNET=270; T_SAMPLE=100; T_TRAIN=110; T_TRT=240; T_SCALE=420
fi

START=$(date +%s)
stage() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo; echo "=== $name (limit ${secs}s): $*"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$secs" "$@" 2>&1 | grep -v "^USDT" | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
}
stage unet "$T_UNET" python bench/unet.py --device "$DEVICE" "${UNET[@]}" --out "$OUTDIR/unet.json"
stage sample "$T_SAMPLE" python bench/sample.py --device "$DEVICE" "${SAMPLE[@]}" --out "$OUTDIR/sample.json"
stage train "$T_TRAIN" python bench/train.py --device "$DEVICE" "${TRAIN[@]}" --out "$OUTDIR/train.json"
if [ "$DEVICE" = cuda ] && python -c "import tensorrt, onnx" 2>/dev/null; then
  stage tensorrt "$T_TRT" python bench/tensorrt.py "${TRT[@]}" --workdir "$OUTDIR/trt" --out "$OUTDIR/tensorrt.json"
else
  echo; echo "=== tensorrt: skipped (needs CUDA and pip install tensorrt onnx)"
fi
stage scale "$T_SCALE" python bench/train_scale.py "${SCALE[@]}" --out "$OUTDIR/train_scale.json"
[ "$TINY" = 1 ] || stage scale_compiled "$T_SCALE" python bench/train_scale.py "${SCALE[@]}" --rows base --compile \
  --out "$OUTDIR/train_scale_compiled.json"

python - "$OUTDIR" <<'EOF'
"""One table: what this run measured, next to published figures (other machines, other code)."""
import json, os, sys
out = sys.argv[1]

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

rows = []
u = load("unet.json")
if u:
    dev = u["info"].get("gpu", u["info"].get("host_cpu"))
    for r in u["results"]:
        rows.append((f"UNet call B=2 {r['size']}x{r['size']} {r['dtype']} {r['row']}", f"{r['it_per_s']:.1f} it/s",
                     f"{r['ms']:.2f} ms, {r['gflops'] / 1e3:.1f} TFLOP/s = {r['of_gemm_dtype']:.0%} of GEMM, "
                     f"x{r.get('vs_diffusers_interleaved') or float('nan'):.2f} of diffusers' fastest, "
                     f"{r.get('peak_mem_gib', float('nan')):.1f} GiB", dev))
s = load("sample.json")
if s:
    for r in s["results"]:
        rows.append((f"txt2img {s['info']['image_size']} px {s['info']['args']['steps']} steps "
                     f"{s['info']['args']['dtype']} {r['mode']}", f"{r['it_per_s']:.1f} it/s",
                     f"{r['s_per_call']:.2f} s/image, err {r['mean_err_u8']:.3f} u8", ""))
t = load("train.json")
if t:
    for r in t["results"]:
        rows.append((f"train step {t['info']['preset']} B={t['info']['batch']} {t['info']['precision']} {r['mode']}",
                     f"{r['images_per_s']:.1f} img/s",
                     f"{r['ms_per_step']:.0f} ms/step, {r.get('tflop_per_s', float('nan')):.1f} TFLOP/s, "
                     f"{r.get('peak_mem_gib', float('nan')):.1f} GiB", ""))
r = load("tensorrt.json")
if r:
    for x in r["results"]:
        rows.append((f"UNet call B={r['info']['batch']} {r['info']['size']}x{r['info']['size']} {x['impl']}",
                     f"{1e3 / x['ms']:.1f} it/s", f"{x['ms']:.2f} ms, max rel err {x['rel_err']:.1e}", ""))
for name in ("train_scale.json", "train_scale_compiled.json"):
    sc = load(name)
    for r in (sc or {}).get("results", []):
        how = f"{sc['info']['precision']} {'compiled' if r.get('compiled') else 'eager'}"
        if r.get("failed"):
            rows.append((f"scale {r['row']} B={r['batch']} {how}", "-", r["failed"], ""))
            continue
        rows.append((f"scale {r['row']} B={r['batch']} x{r['world']} {how}", f"{r['images_per_s'] / r['world']:.1f} img/s/GPU",
                     f"{r.get('peak_mem_gib', float('nan')):.1f} GiB peak/rank, opt+EMA {r['opt_ema_mib']:.0f} MiB/rank", ""))
published = [
    ("published: A100 diffusers + torch.compile, SD 1.5 512 px fp16", "~50 it/s", "", "A100"),
    ("published: A100 TensorRT, SD 1.5 512 px fp16", "~61 it/s", "", "A100"),
    ("published: H100 stable-fast, SD 1.5 512 px fp16", "~105 it/s", "", "H100"),
    ("published: NeMo SD training, encoders online, per H100", "~63 img/s", "", "H100"),
    ("published: MLPerf SD training, precached latents, per H100", "~137 img/s", "", "H100"),
]
w = max(len(r[0]) for r in rows + published)
print("\n" + "what".ljust(w), "rate".rjust(12), " details")
for r in rows + [("", "", "", "")] + published:
    print(r[0].ljust(w), r[1].rjust(12), "", r[2], f"[{r[3]}]" if r[3] else "")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"measured": rows, "published": published}, f, indent=1)
EOF
echo "total $(( $(date +%s) - START ))s; JSON and logs in $OUTDIR"
