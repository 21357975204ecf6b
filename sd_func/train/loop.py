"""The training loop: init or resume, run the compiled step, log, sample, checkpoint.

`train(cfg, workdir)` is what run_train.py calls (big_vision / flax-examples style:
the script holds only flags). Parameters come from `cfg.init_from` (any checkpoint
`sd_func.checkpoint.load` reads: a diffusers folder, a CompVis or native file) or
from a random init keyed by cfg.seed. The UNet (and, with
cfg.train.train_text_encoder, the text encoder) trains; the VAE and text encoder
are frozen. Each step's batch is this rank's slice of the global batch, plus the
per-example noise, timesteps and dropout flags of `unet_stage.step_inputs`, which depend
only on (seed, step, global example index): so 1 or N processes, and a run resumed
from a checkpoint, compute the same updates. Rank 0 alone writes checkpoints,
metrics and samples. A workdir that already holds a checkpoint is resumed from its
newest complete one: the run logs "resumed from step N" and runs the remaining steps only.
On SIGTERM or SIGUSR1 (preemption, a time limit) the ranks finish the step, agree on it,
write its checkpoint and exit for a requeue (train.preemption); a rank that fails logs
its rank and error before the exception ends the process (the launcher stops the rest).

Process-wide switches are set here, once: `sd_func.backend.set_matmul_precision(
config.train.precision)` at start (the step factory has no process-wide side effect).
Bad config values stop the run before anything is built (train.checks.validate), and a
loss or parameter norm that stops being finite raises train.checks.TrainingDiverged.
"""

import json
import math
import os
import sys
import time

import ml_collections
import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from tqdm import tqdm

from sd_func import backend, checkpoint, data, lora, pipelines, random, tree
from sd_func.checkpoint import training as checkpoints
from sd_func.errors import UserError
from sd_func.models import autoencoder, text_encoder, tokenizer, unet
from sd_func.train import checks, distributed, dreambooth, preemption, sharding, unet_stage
from sd_func.train import logging as train_logging
from sd_func.train import state as train_state

_INIT_TAG = 0x1A17   # init keys: apart from the step noise and the data keys of the same seed
_STEP_TAG = 0x57E9
_LORA_TAG = 0x10A  # a LoRA's init key, within the init key
_MODELS = ("unet", "vae", "text_encoder")


def root_keys(seed: int) -> tuple[int, int]:
    """(init key, step key) of a run seed."""
    root = random.key(seed)
    return random.fold_in(root, _INIT_TAG), random.fold_in(root, _STEP_TAG)


def init_params(cfg) -> tuple[dict, ml_collections.ConfigDict]:
    """(params {"unet", "vae", "text_encoder"}, cfg): from cfg.init_from, or random from cfg.seed.

    With init_from the model sections of the returned cfg are the checkpoint's.
    """
    init_from = cfg.get("init_from", "") or ""
    if init_from:
        params, cfg = checkpoint.load(init_from, cfg=cfg, ema=None)
        return tree.cast(params, torch.float32), cfg
    k_unet, k_vae, k_te = random.split(root_keys(cfg.seed)[0], 3)
    params = {"unet": unet.init(k_unet, cfg.unet), "vae": autoencoder.init(k_vae, cfg.vae),
              "text_encoder": text_encoder.init(k_te, cfg.text_encoder)}
    return params, cfg


def _with_models(cfg, stored: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """cfg with the model and diffusion sections of a stored config."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        for k in (*_MODELS, "diffusion"):
            if k in stored:
                cfg[k] = stored[k]
    return cfg


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _save(workdir, step, state, frozen_models, source, cfg, world, main):
    positions = _gather(source.state(), world)  # every rank's data position (streams differ)
    if main:
        trees = train_state.checkpoint_trees(state)
        trees["frozen"] = frozen_models
        meta = {"data": {"ranks": positions}, "world": world, "config": checkpoints.config_json(cfg)}
        checkpoints.save(workdir, step, trees, meta, keep=int(cfg.train.keep_checkpoints))
        unet_stage.export_lora(workdir, state, frozen_models, cfg)
    distributed.barrier()


def sample_grid(state: dict, frozen_models: dict, cfg, workdir: str, step: int, unet_fn=None) -> str:
    """A grid of cfg.sample.prompts with the EMA weights, to <workdir>/samples/<step>.png.

    unet_fn: the UNet call to sample with (pipelines.make_unet_fn; the loop builds one per
    run from cfg.sample.compile and holds it), default eager."""
    image_lib = pipelines.images
    trained = state["ema"] if cfg.sample.get("ema", True) else state["params"]
    params = lora.merge_trained(dict(frozen_models, **trained))
    prompts = list(cfg.sample.prompts)
    with torch.no_grad():
        out = pipelines.txt2img(params, cfg, prompts, seeds=list(range(len(prompts))), steps=int(cfg.sample.steps),
                                sampler=cfg.sample.sampler, guidance_scale=float(cfg.sample.guidance_scale),
                                unet_fn=unet_fn)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"{step}.png")
    image_lib.save_png(path, image_lib.grid(out.cpu()), {"step": step, "prompts": json.dumps(prompts),
                                                         "sampler": cfg.sample.sampler, "steps": cfg.sample.steps})
    return path


def _prepare(batch: dict, step: int, key: int, cfg, tok, device) -> tuple[dict, int]:
    """The step's inputs: tensors on device, token ids for captions, step_inputs' noise."""
    skipped = int(batch.pop("skipped", 0))
    captions = batch.pop("captions", None)
    out = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v) and k != "index"}
    if "images" in out:
        max_length = tokenizer.max_length(tok, cfg.text_encoder)
        out["input_ids"] = tokenizer.encode(tok, captions, max_length=max_length).to(device)
    shape = unet_stage.batch_latent_shape(cfg, out)
    out.update(unet_stage.step_inputs(cfg, key, step, batch["index"].tolist(), shape, device=device))
    return out, skipped


def _with_bucket(metrics: dict, bucket) -> dict:
    """Aspect-ratio buckets: the step's (height, width) joins its metrics, to be logged."""
    if bucket is None:
        return metrics
    return dict(metrics, bucket_height=torch.tensor(float(bucket[0])), bucket_width=torch.tensor(float(bucket[1])))


def _frozen_inputs(cfg, frozen_models: dict, source, tok, device) -> dict:
    """What the step takes besides the state: frozen nets, the empty prompt for cond_drop."""
    frozen = dict(frozen_models)
    if tok is not None:
        frozen["uncond_ids"] = tokenizer.encode(tok, [""], max_length=tokenizer.max_length(tok, cfg.text_encoder))[0]
    empty = getattr(source, "empty_context", None)
    if empty is not None:
        frozen["uncond_context"] = empty[None].float()
    return tree.to(frozen, device=device)


def _host_metrics(history: list[dict], skipped_data: int, world: int, images: int, seconds: float,
                  precision: str) -> dict:
    """Interval metrics on the host: the mean loss, the last values of the others."""
    last = {k: v.detach().float().cpu().item() for k, v in history[-1].items()}
    last["loss"] = torch.stack([m["loss"].detach().float() for m in history]).mean().cpu().item()
    if world > 1:  # data skips are per rank: sum them
        s = distributed.all_reduce_mean({"s": torch.tensor(float(skipped_data))})["s"]
        skipped_data = round(float(s) * world)
    last["skipped_steps"] = last.pop("skipped", 0.0)
    if precision != "fp16":
        last.pop("loss_scale", None)
    last["skipped_samples"] = float(skipped_data)
    last["images_per_s"] = images / max(seconds, 1e-9)
    return last


def _check_finite(row: dict, step: int, cfg, workdir: str) -> None:
    bad = [k for k in ("loss", "param_norm") if k in row and not math.isfinite(row[k])]
    if cfg.train.precision == "fp16" and bad == ["loss"]:
        return  # fp16: a non-finite step is skipped and counted by the loss scaler
    if bad:
        last = checkpoints.latest(workdir)
        raise checks.TrainingDiverged(
            f"training diverged at step {step}: {', '.join(f'{k}={row[k]}' for k in bad)} "
            f"(lr={row.get('lr')}, grad_norm={row.get('grad_norm')}); last checkpoint: {last}. "
            "Lower config.train.lr, raise warmup or use precision=fp32 and resume.")


def _check_batch(tcfg, world: int) -> None:
    """The global batch splits into world x grad_accum equal micro-batches."""
    accum = int(tcfg.get("grad_accum", 1))
    if int(tcfg.batch_size) % (world * accum):
        raise UserError(f"config.train.batch_size={tcfg.batch_size} is not divisible by the world size {world}"
                        + (f" x config.train.grad_accum={accum}" if accum > 1 else ""))


def train(cfg, workdir: str, *, compile_backend: str = "inductor") -> dict:
    """Train cfg in workdir (resuming its newest checkpoint); returns this rank's final state.

    compile_backend: torch.compile's backend when cfg.train.compile (tests use "aot_eager":
    the same single Dynamo/AOTAutograd graph without inductor's minutes of C++ codegen).
    """
    checks.validate(cfg)
    world = distributed.launch_world_size()  # checked before a rendezvous could hang
    _check_batch(cfg.train, world)
    backend.set_matmul_precision(cfg.train.precision)
    rank, world, device = distributed.init()
    try:
        with preemption.catch_stop_signals() as caught:
            return _train(cfg, workdir, rank, world, device, compile_backend, caught)
    except preemption.Preempted:
        raise
    except BaseException as e:
        if world > 1:  # the launcher's summary may not show which rank failed, or why
            print(f"sd_func train: rank {rank} of {world} failed: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
        raise
    finally:
        distributed.shutdown()


def _train(cfg, workdir, rank, world, device, compile_backend, caught) -> dict:
    main = rank == 0
    tcfg = cfg.train
    global_batch, total = int(tcfg.batch_size), int(tcfg.steps)
    _check_batch(tcfg, world)
    workdir = os.path.abspath(workdir)
    if main:
        os.makedirs(workdir, exist_ok=True)
        checkpoints.clean_partial(workdir)
    distributed.barrier()

    cfg = dreambooth.prepare(cfg, workdir, main)  # DreamBooth's class images, generated once
    source = data.make_source(cfg.data, cfg.seed, rank, world)  # first: a bad data path fails fast
    ckpt = checkpoints.latest(workdir)
    if ckpt is not None:
        meta = checkpoints.read_meta(ckpt)
        stored_cfg = checkpoints.config_from_json(meta["config"])
        if cfg.get("init_from", ""):
            cfg = _with_models(cfg, stored_cfg)  # the pretrained architecture, as first resolved
        else:
            checkpoints.check_architecture(meta["config"], cfg, ckpt)
        start = int(meta["step"])
        trained = checkpoints.load_tree(ckpt, "params")
        frozen_models = checkpoints.load_tree(ckpt, "frozen")
        params = dict(frozen_models, **trained)
    else:
        meta, start = None, 0
        params, cfg = init_params(cfg)
    cfg = cfg.copy_and_resolve_references()
    tcfg = cfg.train
    params = tree.to(params, device=device)

    shard = sharding.from_config(tcfg, rank, world)  # ZeRO-1: opt + EMA of this rank's slice
    state, tx, lay, frozen_models = unet_stage.setup(cfg, params, random.fold_in(root_keys(cfg.seed)[0], _LORA_TAG),
                                                     shard=shard)
    full_state = lambda: train_state.gather(state, lay, shard)  # a collective when sharded
    if ckpt is not None:  # checkpoints hold the unsharded state, whatever the world size that wrote them
        state = train_state.scatter(train_state.restore(ckpt, full_state()), state, lay, shard)

    if meta is not None and meta.get("data"):
        source.restore(meta["data"])
    # Token ids for captions, and the empty prompt for cond_drop unless the source has its context.
    precached = getattr(source, "empty_context", None) is not None
    tok = None if precached else tokenizer.load(cfg.text_encoder.tokenizer)
    frozen = _frozen_inputs(cfg, frozen_models, source, tok, device)
    step_key = root_keys(cfg.seed)[1]
    step_fn = unet_stage.make_train_step(cfg, tx, lay, world=world, backend=compile_backend, shard=shard,
                                         num_shapes=len(getattr(source, "buckets", None) or ()) or 1)

    writer = None
    if main:
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            fh.write(cfg.to_json_best_effort(indent=1, sort_keys=True))
        writer = train_logging.Writer(workdir, start_step=start)
        what = f"resumed from step {start} ({ckpt})" if ckpt else "starting from " + (
            cfg.get("init_from") or "random init")
        tqdm.write(f"sd_func train: {what}; {tree.num_params(state['params']) / 1e6:.2f}M trained params, "
                   f"global batch {global_batch} over {world} process(es), device {device}")

    bar = tqdm(total=total, initial=start, disable=not main, dynamic_ncols=True, desc="train")
    history, skipped_data, t0, n0, executed = [], 0, time.perf_counter(), start, 0
    saved = start if ckpt is not None else -1
    log_every, ckpt_every = int(tcfg.log_every or 0), int(tcfg.checkpoint_every or 0)
    sample_every = int(tcfg.sample_every or 0)
    sample_unet = None
    try:
        for s in range(start, total):
            raw = source.batch(s, global_batch)
            bucket = raw.pop("bucket", None)  # aspect-ratio buckets: this step's (height, width)
            batch, skipped = _prepare(raw, s, step_key, cfg, tok, device)
            skipped_data += skipped
            state, metrics = step_fn(state, frozen, batch)
            metrics = _with_bucket(metrics, bucket)
            executed += 1
            history.append(metrics)
            done = s + 1
            bar.update(1)
            if (log_every and done % log_every == 0) or done == total:
                row = _host_metrics(history, skipped_data, world, (done - n0) * global_batch,
                                    time.perf_counter() - t0, tcfg.precision)
                _check_finite(row, done, cfg, workdir)
                if main:
                    writer.write(done, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
                    if row["skipped_samples"]:
                        tqdm.write(f"step {done}: {int(row['skipped_samples'])} unreadable data sample(s) "
                                   "skipped since the last log step (see the data warnings above)")
                history, skipped_data, t0, n0 = [], 0, time.perf_counter(), done
            if ckpt_every and done % ckpt_every == 0:
                _save(workdir, done, full_state(), frozen_models, source, cfg, world, main)
                saved = done
            signum = preemption.agreed_signal(caught) if done < total else 0
            if signum:  # every rank stops after this same step
                if saved != done:
                    _save(workdir, done, full_state(), frozen_models, source, cfg, world, main)
                    saved = done
                preemption.stop(signum, done, checkpoints.step_dir(workdir, done), main)
            if sample_every and done % sample_every == 0 and (main or shard is not None):
                grid_state = full_state()
                if main:
                    if sample_unet is None:  # built once, at the first grid, and held for the run
                        sample_unet = pipelines.make_unet_fn(cfg.unet, cfg.sample.get("compile", False))
                    path = sample_grid(grid_state, frozen_models, cfg, workdir, done, sample_unet)
                    writer.image(done, "samples", _read_png(path))
        if saved != total and total > start:
            _save(workdir, total, full_state(), frozen_models, source, cfg, world, main)
        state = full_state()
        if main:
            tqdm.write(f"sd_func train: ran {executed} steps, {start} -> {start + executed}")
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return state


def _read_png(path: str) -> torch.Tensor:
    with PIL.Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB")))
