"""Training-step throughput: sd_func's pure step vs diffusers + torch.optim.AdamW, side by side.

  python bench/train.py [--preset tiny|shapes|mid|sd15] [--batch 8] [--steps 10] [--warmup 2]
      [--precision bf16|fp16|fp32|tf32] [--inputs latents|images]
      [--modes sd_func_compiled,sd_func_eager,diffusers_eager,diffusers_compiled] [--out train_bench.json]
  python bench/train.py --lora 32 [--preset ...]     # LoRA step vs full fine-tune step, same model

Every mode does the same training step on the same config and the same UNet weights:
(images: frozen VAE encode + CLIP text encoder; latents: precached VAE moments + text
context, NeMo's fast path) -> posterior sample * scaling_factor -> q(x_t|x0) at uniform
timesteps -> UNet -> eps MSE -> backward -> global-norm clip 1.0 -> AdamW -> EMA, with
cond dropout 0.1 and the same autocast precision (fp32 master weights).

- sd_func_compiled / sd_func_eager: train.unet_stage.make_train_step (train.step.make_step with
  the UNet stage's loss) with cfg.train.compile on/off.
- diffusers_eager: UNet2DConditionModel + loss.backward() + clip_grad_norm_(foreach) +
  torch.optim.AdamW(foreach=True) + an in-place foreach EMA (what diffusers'
  train_text_to_image.py does); diffusers_compiled: the same with torch.compile(unet).
- --lora R: sd_func_lora_eager / sd_func_lora_compiled: the same step training a rank-R LoRA
  (alpha R) on the UNet's attention projections, the base frozen (configs/lora.py); the
  default modes become sd_func_eager,sd_func_lora_eager (+ the compiled pair on CUDA).
  peak_mem_gib: CUDA max allocated, or on a CPU the process's peak RSS during the timed
  steps (bench.common.PeakMemory); peak_over_start_gib: above what was held before them.

Images/s = batch * steps / time after `--warmup` steps (the first includes compilation,
reported as compile_s). TFLOP/s counts the step's matmul/conv/attention FLOPs
(torch.utils.flop_counter, forward + backward). Not a test; prints a table, writes JSON.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # puts the repo root on sys.path

from configs import lora, shapes, tiny, txt2img
from sd_func import backend, random, tree
from sd_func.models import autoencoder, text_encoder, unet
from sd_func.train import unet_stage

MODES = ("sd_func_compiled", "sd_func_eager", "diffusers_eager", "diffusers_compiled")
LORA_MODES = ("sd_func_lora_compiled", "sd_func_lora_eager")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def get_config(preset: str):
    if preset == "tiny":
        return tiny.get_config()
    if preset == "shapes":  # the main job's UNet (16x16x4 latents, 16-token context), UNet only
        cfg = shapes.get_config()
        cfg.train.train_text_encoder = False
        return cfg
    cfg = txt2img.get_config()
    if preset == "mid":  # SD 1.5's layout at a third of its width and 3 levels: ~120M params
        cfg.unet = unet.config(block_out_channels=(128, 256, 512), layers_per_block=2,
                               down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
                               attention_head_dim=8, cross_attention_dim=768)
        cfg.data.resolution = 256
    elif preset != "sd15":
        raise ValueError(f"--preset={preset!r}: expected tiny, shapes, mid or sd15")
    return cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_length(cfg) -> int:
    """Token positions per prompt: CLIP's 77, or fewer where the text encoder has fewer (shapes: 16)."""
    return min(77, int(cfg.text_encoder.max_position_embeddings))


def make_batches(cfg, args, device, frozen):
    """`steps + warmup` batches: fixed images/ids or moments/context plus step_inputs."""
    b, r = args.batch, cfg.data.resolution
    g = torch.Generator().manual_seed(0)
    shape, n_tok = unet_stage.latent_shape(cfg), context_length(cfg)
    if args.inputs == "images":
        data = {"images": torch.rand(b, 3, r, r, generator=g) * 2 - 1,
                "input_ids": torch.randint(0, cfg.text_encoder.vocab_size - 2, (b, n_tok), generator=g)}
    else:
        data = {"moments": torch.cat([torch.randn(b, *shape, generator=g), torch.full((b, *shape), -4.0)], 1),
                "context": torch.randn(b, n_tok, cfg.text_encoder.hidden_size, generator=g)}
    data = tree.to(data, device=device)
    out = []
    for s in range(args.steps + args.warmup):
        out.append({**data, **unet_stage.step_inputs(cfg, random.key(0), s, range(b), shape, device=device)})
    return out


def sd_func_mode(cfg, params, frozen, batches, compiled: bool, backend: str = "inductor", lora_rank: int = 0):
    cfg = cfg.copy_and_resolve_references()
    cfg.train.compile = compiled
    if lora_rank:  # the LoRA alone trains; the base UNet and the alphas join the frozen inputs
        cfg.lora = lora.lora_config(rank=lora_rank, alpha=float(lora_rank), target="attn")
        init, tx, lay, frozen_models = unet_stage.setup(cfg, {"unet": params["unet"]}, random.key(3))
        frozen = dict(frozen, **frozen_models)
    else:
        init, tx, lay = unet_stage.init(cfg, params["unet"])
    fn = unet_stage.make_train_step(cfg, tx, lay, world=1, backend=backend)
    state = {"s": init}

    def step(batch):
        state["s"], metrics = fn(state["s"], frozen, batch)
        return metrics["loss"]
    return step


def diffusers_mode(cfg, params, frozen, batches, compiled: bool, device, backend: str = "inductor"):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    model = UNet2DConditionModel(**unet.to_diffusers_config(cfg.unet)).to(device)
    model.load_state_dict(tree.to_state_dict(tree.to(params["unet"], device=device)), strict=True)
    model.train()
    vae = te = None
    if "vae" in frozen:
        vae = AutoencoderKL.from_config(autoencoder.to_diffusers_config(cfg.vae)).to(device).eval()
        import transformers
        te_config = transformers.CLIPTextConfig(**text_encoder.to_diffusers_config(cfg.text_encoder))
        te = transformers.CLIPTextModel(te_config)
        te = te.to(device).eval()
    sched = DDPMScheduler(**{k: v for k, v in cfg.diffusion.to_dict().items()
                             if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                      "prediction_type")})
    weights = list(model.parameters())
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n]
    t = cfg.train
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps, foreach=True)
    ema = [p.detach().clone() for p in weights]
    forward = torch.compile(model, backend=backend) if compiled else model
    amp = AMP.get(t.precision)
    uncond = frozen.get("uncond_context")

    def step(batch):
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if vae is not None:
                latents = vae.encode(batch["images"]).latent_dist.mean  # same work as a sample
                ids = torch.where(batch["drop"][:, None], frozen["uncond_ids"][None], batch["input_ids"])
                context = te(ids)[0]
            else:
                mean, logvar = batch["moments"].chunk(2, dim=1)
                latents = mean + torch.exp(0.5 * logvar) * batch["latent_noise"]
                context = torch.where(batch["drop"][:, None, None], uncond, batch["context"])
            latents = latents.float() * cfg.vae.scaling_factor
            noisy = sched.add_noise(latents, batch["noise"], batch["timesteps"])
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = forward(noisy, batch["timesteps"], context).sample
        loss = F.mse_loss(pred.float(), batch["noise"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, t.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, weights, 1.0 - t.ema_decay)
        return loss.detach()
    return step


def count_flops(step, batch):
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            step(batch)
        return counter.get_total_flops()
    except Exception as e:  # a counting failure must not lose the timings
        print(f"flop count failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def run_mode(name, cfg, params, frozen, batches, args, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    compiled = name.endswith("compiled")
    if name.startswith("sd_func"):
        step = sd_func_mode(cfg, params, frozen, batches, compiled, args.backend,
                            args.lora if name in LORA_MODES else 0)
    else:
        step = diffusers_mode(cfg, params, frozen, batches, compiled, device, args.backend)
    t0 = time.perf_counter()
    loss = step(batches[0])
    sync(device)
    compile_s = time.perf_counter() - t0
    for b in batches[1:args.warmup]:
        step(b)
    sync(device)
    with common.PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for b in batches[args.warmup:]:
            loss = step(b)
        sync(device)
        dt = time.perf_counter() - t0
    res = {"mode": name, "images_per_s": args.batch * args.steps / dt, "ms_per_step": 1e3 * dt / args.steps,
           "compile_s": compile_s, "final_loss": float(loss), **mem.result()}
    torch._dynamo.reset()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--inputs", default="latents", choices=("latents", "images"))
    ap.add_argument("--modes", default=None, help=f"default: {','.join(MODES)}")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank: compare a LoRA step with a full one")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="train_bench.json")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick smoke run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.modes is None:
        pairs = (("sd_func_compiled", "sd_func_lora_compiled"),) if device.type == "cuda" else ()
        args.modes = ",".join(MODES) if not args.lora else ",".join(
            [m for pair in pairs for m in pair] + ["sd_func_eager", "sd_func_lora_eager"])
    cfg = get_config(args.preset)
    cfg.train.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    cfg.train.update(warmup=0, grad_clip=1.0, cond_drop=0.1)
    backend.set_matmul_precision(cfg.train.precision)  # as the training loop does, for every mode
    params = {"unet": tree.to(unet.init(random.key(0), cfg.unet), device=device)}
    te = tree.to(text_encoder.init(random.key(2), cfg.text_encoder), device=device)
    bos, eos = cfg.text_encoder.vocab_size - 2, cfg.text_encoder.vocab_size - 1  # CLIP: eos pads
    uncond_ids = torch.tensor([bos] + [eos] * (context_length(cfg) - 1), device=device)
    if args.inputs == "images":
        frozen = {"vae": tree.to(autoencoder.init(random.key(1), cfg.vae), device=device),
                  "text_encoder": te, "uncond_ids": uncond_ids}
    else:
        frozen = {"uncond_context": text_encoder.apply(te, uncond_ids[None], cfg.text_encoder)}
    batches = make_batches(cfg, args, device, frozen)
    info = {**common.machine_info(device),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "preset": args.preset, "batch": args.batch, "steps": args.steps,
            "precision": cfg.train.precision, "inputs": args.inputs, "resolution": cfg.data.resolution,
            "unet_params": tree.num_params(params["unet"]), "threads": torch.get_num_threads(),
            "lora_rank": args.lora}
    flops = count_flops(diffusers_mode(cfg, params, frozen, batches, False, device), batches[0])
    info["gflop_per_step"] = flops / 1e9 if flops else None
    print(json.dumps(info))
    results = []
    for name in args.modes.split(","):
        if name not in MODES + (LORA_MODES if args.lora else ()):
            raise ValueError(f"--modes: unknown {name!r}; expected {MODES} (or {LORA_MODES} with --lora)")
        res = run_mode(name, cfg, params, frozen, batches, args, device)
        if flops:
            res["tflop_per_s"] = flops / (res["ms_per_step"] / 1e3) / 1e12
        results.append(res)
        print(json.dumps(res), flush=True)
        with open(args.out, "w") as f:  # after every mode: a cut-off run keeps what it measured
            json.dump({"info": info, "results": results}, f, indent=1)
    print(f"\n{info['device']}, torch {info['torch']}, preset {args.preset} ({info['unet_params'] / 1e6:.1f}M "
          f"UNet params), batch {args.batch}, {cfg.train.precision}, {args.inputs}")
    print(f"{'mode':<22}{'images/s':>10}{'ms/step':>10}{'compile s':>11}{'TFLOP/s':>9}{'peak GiB':>10}")
    for r in results:
        print(f"{r['mode']:<22}{r['images_per_s']:>10.2f}{r['ms_per_step']:>10.1f}{r['compile_s']:>11.1f}"
              f"{r.get('tflop_per_s', float('nan')):>9.2f}{r.get('peak_mem_gib', float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
