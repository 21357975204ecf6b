"""A whole txt2img call (25 steps, classifier-free guidance) with sd_func vs diffusers'
StableDiffusionPipeline on the same weights, side by side.

  python bench/sample.py [--preset tiny|small|sd15] [--steps 25] [--sampler dpmpp_2m]
      [--images 1] [--dtype fp32|bf16|fp16] [--modes sd_func_eager,sd_func_compiled,
      diffusers_eager,diffusers_compiled] [--layout nchw|cl] [--iters 1] [--warmup 1]
      [--threads N] [--device cpu|cuda] [--out bench/results/sample.json]

The UNet, VAE and CLIP text encoder are built once as diffusers / transformers modules
(fixed seed, norms and biases moved off 1/0); sd_func's params are their state-dict
tensors, so both pipelines run the same weights. Both start from the same initial
latents, prompt and empty negative prompt, use the same scheduler (sd_func's sampler
name -> the diffusers scheduler of bench/sampler_overhead.py) and decode to float images;
their mean difference (u8 levels) is reported as a check. Presets: tiny (32 px, tests'
model), small (SD 1.5's layout at a fifth of its width, 256 px, shapes tokenizer) and
sd15 (the full SD 1.5 shapes, 512 px, shapes tokenizer: for GPUs). Compiled modes:
sd_func's pipelines.make_unet_fn(cfg.unet, True) (one fullgraph UNet graph, built once per
mode and passed as unet_fn=), diffusers' pipe.unet = torch.compile(unet).
--layout cl puts diffusers' UNet and VAE in channels_last (its best CPU eager layout).
Time per call (prompt encoding, the sampler loop, VAE decode), median over --iters after
--warmup calls; it/s = steps / time. Prints a table; writes JSON after every mode.
"""

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # puts the repo root on sys.path
from sampler_overhead import DIFFUSERS as SCHEDULERS

from configs import tiny, txt2img
from sd_func import pipelines, tree
from sd_func.models import autoencoder, text_encoder, unet

MODES = ("sd_func_eager", "sd_func_compiled", "diffusers_eager", "diffusers_compiled")
PROMPTS = ["a red circle on a blue background", "a green triangle", "a yellow square at the top left"]
COLUMNS = [("mode", "mode", "s"), ("s_per_call", "s/call", ".2f"), ("first_s", "first s", ".1f"),
           ("it_per_s", "it/s", ".2f"), ("vs_diffusers_best", "/diffusers best", ".2f"),
           ("peak_over_start_gib", "peak+ GiB", ".2f"), ("peak_mem_gib", "peak GiB", ".2f"),
           ("mean_err_u8", "err u8", ".3f")]


def get_config(preset: str):
    if preset == "tiny":
        return tiny.get_config()
    cfg = txt2img.get_config()
    te = dict(tokenizer="builtin:shapes", vocab_size=1000)
    if preset == "small":  # SD 1.5's layout at a fifth of its width: ~40M UNet params
        cfg.unet = unet.config(block_out_channels=(64, 128, 256, 256), cross_attention_dim=256)
        cfg.vae = autoencoder.config(block_out_channels=(32, 64, 128, 128))
        cfg.text_encoder = text_encoder.config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                               num_attention_heads=4, **te)
        cfg.sample.update(height=256, width=256)
    elif preset == "sd15":
        cfg.text_encoder = text_encoder.config(**te)
    else:
        raise ValueError(f"--preset={preset!r}: expected tiny, small or sd15")
    return cfg


def build(cfg, device):
    """(diffusers modules, sd_func params sharing their tensors)."""
    import diffusers
    import transformers
    from diffusers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    mods = {"unet": diffusers.UNet2DConditionModel(**unet.to_diffusers_config(cfg.unet)),
            "vae": diffusers.AutoencoderKL.from_config(autoencoder.to_diffusers_config(cfg.vae)),
            "text_encoder": transformers.CLIPTextModel(
                transformers.CLIPTextConfig(**text_encoder.to_diffusers_config(cfg.text_encoder)))}
    with torch.no_grad():
        for m in mods.values():
            m.eval().requires_grad_(False)
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
            m.to(device)
    return mods


def diffusers_pipe(mods, cfg, sampler, compiled, layout):
    import diffusers

    from sd_func.models import tokenizer
    cls, extra = SCHEDULERS[sampler]
    sched = getattr(diffusers, cls).from_config({**cfg.diffusion.to_dict(), **extra})
    pipe = diffusers.StableDiffusionPipeline(
        vae=mods["vae"], text_encoder=mods["text_encoder"], tokenizer=tokenizer.load(cfg.text_encoder.tokenizer),
        unet=mods["unet"], scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if layout == "cl":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compiled:
        pipe.unet = torch.compile(pipe.unet, dynamic=False)
    return pipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SCHEDULERS))
    ap.add_argument("--images", type=int, default=1, help="images per call (prompts cycle)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--layout", default="nchw", choices=("nchw", "cl"), help="diffusers' UNet/VAE memory format")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "sample.json"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = common.DTYPES[a.dtype]
    cfg = get_config(a.preset)
    mods = build(cfg, device)
    for m in mods.values():
        m.to(dtype)
    params = {k: tree.from_state_dict(m.state_dict()) for k, m in mods.items() if k != "text_encoder"}
    params["text_encoder"] = text_encoder.from_state_dict(mods["text_encoder"].state_dict())  # shared tensors
    f = pipelines.vae_scale_factor(cfg)
    h, w = cfg.sample.height // f, cfg.sample.width // f
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.images)]
    latents = torch.randn(a.images, cfg.vae.latent_channels, h, w, generator=torch.Generator().manual_seed(5))
    info = common.machine_info(device)
    info.update(preset=a.preset, args=vars(a), image_size=cfg.sample.height,
                unet_params_m=tree.num_params(params["unet"]) / 1e6,
                unet_gmac_per_step=common.unet_macs(cfg.unet, 2 * a.images, h, w)["total"] / 1e9)
    print(" ".join(f"{k}={v}" for k, v in info.items() if k != "args"), flush=True)
    results, reference = [], None
    for mode in a.modes.split(","):
        if mode not in MODES:
            raise ValueError(f"--modes: unknown {mode!r}; expected {MODES}")
        torch._dynamo.reset()
        gc.collect()
        compiled = mode.endswith("compiled")
        if mode.startswith("sd_func"):
            o = pipelines.resolve_options(cfg, steps=a.steps, sampler=a.sampler, guidance_scale=a.guidance,
                                          dtype=dtype, batch_size=a.images, output_type="float",
                                          unet_fn=pipelines.make_unet_fn(cfg.unet, compiled))

            def call(o=o):
                return pipelines.txt2img(params, cfg, prompts, seeds=list(range(a.images)), latents=latents,
                                         options=o)
        else:
            pipe = diffusers_pipe(mods, cfg, a.sampler, compiled, a.layout)

            def call(pipe=pipe):
                with torch.no_grad():
                    out = pipe(prompts, negative_prompt=[""] * a.images, num_inference_steps=a.steps,
                               guidance_scale=a.guidance, latents=latents.to(device, dtype),
                               output_type="np").images
                return torch.as_tensor(out)
        out = {}

        def fn(call=call, out=out):
            out["images"] = call()

        first = common.time_calls(fn, device, iters=max(a.warmup, 1), warmup=0)
        with common.PeakMemory(device) as mem:
            r = common.time_calls(fn, device, iters=a.iters, warmup=0)
        images = out["images"].float().cpu()
        if mode.startswith("diffusers") and a.layout == "cl":  # back to the shared default layout
            mods["unet"].to(memory_format=torch.contiguous_format)
            mods["vae"].to(memory_format=torch.contiguous_format)
        if reference is None:
            reference = images
        row = {"mode": mode, "s_per_call": r["median_s"], "times_s": r["times_s"], "first_s": first["first_s"],
               "it_per_s": a.steps / r["median_s"], "mean_err_u8": (images - reference).abs().mean().item() * 255,
               **mem.result()}
        results.append(row)
        df = [q["s_per_call"] for q in results if q["mode"].startswith("diffusers")]
        for q in results:
            q["vs_diffusers_best"] = q["s_per_call"] / min(df) if df else None
        print(f"  {mode}: {row['s_per_call']:.2f} s/call ({row['it_per_s']:.2f} it/s), first {row['first_s']:.1f} s",
              flush=True)
        common.write_json(a.out, {"info": info, "results": results})
    print(f"\ntxt2img {a.preset} ({info['unet_params_m']:.0f}M UNet params, {cfg.sample.height} px, "
          f"{a.images} image(s), {a.steps} {a.sampler} steps, CFG), {a.dtype}, diffusers layout {a.layout}; "
          f"{info.get('gpu', info['host_cpu'])}, threads {info['threads']}, load {info.get('load_avg_1m')}")
    print("err u8: mean abs difference from the first mode's images")
    common.print_table(results, COLUMNS)
    return results


if __name__ == "__main__":
    main()
