"""The train step: one pure function `train_step(state, frozen, batch) -> (state, metrics)`.

Forward (frozen VAE encode -> latents * scaling_factor; text encoder; the diffusion
loss of sd_func.diffusion.losses), backward (train.autodiff: torch.func.grad_and_value when
compiled, the same through torch.autograd.grad in eager mode),
gradient mean over data-parallel ranks, global-norm clipping, functional AdamW, EMA
and the fp16 loss scale: all in one function that `torch.compile(fullgraph=True)`
compiles whole when cfg.train.compile (a compile failure raises; there is no eager
fallback). The step never mutates its inputs; it returns a new state.

The optimizer works on one flat float32 vector per tree (params, mu, nu, ema; see
optim.Layout): the gradients are concatenated once, and AdamW, clipping, EMA and the
loss-scale skip are a few elementwise kernels whatever the parameter count. The state
the caller sees stays a dict of per-path tensors; after the first step they are views
into those vectors, so the next step flattens them for free.

Data parallelism: when torch.distributed is initialised with world > 1 the flat
gradient vector (with the loss appended) is summed across ranks with ONE
`torch.distributed._functional_collectives.all_reduce` INSIDE the compiled graph and
divided by the world size (gloo has no AVG). This traces under fullgraph on CPU/gloo
(and is the collective inductor schedules for NCCL), keeps the step one graph, and
gives every rank the same update. Each rank's loss is the mean over its local batch,
so equal local batches give exactly the mean over the global batch.

Randomness is prepared on the host by `step_inputs`: example i of step n draws its
noise, posterior noise, timestep and drop flag from fold_in(fold_in(root, n), i), with
i the GLOBAL example index, so a run gives the same numbers on 1 or N processes and
after a resume.
"""

import torch

from sd_func import random, tree
from sd_func.diffusion import losses, schedules
from sd_func.models import autoencoder, text_encoder, unet
from sd_func.train import autodiff, distributed, optim
from sd_func.train import lr as lr_lib

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def latent_shape(cfg, resolution: int | None = None) -> tuple[int, int, int]:
    """(C, h, w) of one example's VAE latent at cfg.data.resolution (or `resolution`)."""
    r = int(resolution or cfg.data.resolution)
    f = 2 ** (len(cfg.vae.block_out_channels) - 1)
    if r % f:
        raise ValueError(f"latent_shape: resolution {r} is not a multiple of the VAE factor {f}")
    return (int(cfg.vae.latent_channels), r // f, r // f)


def step_inputs(cfg, root_key: int, step: int, index, latent_shape, device=None) -> dict:
    """The random inputs of one step for the examples with global indices `index`.

    index: a sequence (list, range, 1-d tensor) of global example indices, e.g.
    range(rank * b, (rank + 1) * b) for this process's rows of a global batch.
    Returns {"noise", "latent_noise": [b, C, h, w] float32, "timesteps": [b] int64,
    "drop": [b] bool (cond dropout), and "offset_noise": [b, C] when
    cfg.train.noise_offset > 0}. Row j depends only on (root_key, step, index[j]).
    """
    if isinstance(index, int):
        raise TypeError("step_inputs: index must be a sequence of global example indices, not an int")
    index = [int(i) for i in index]
    if not index:
        raise ValueError("step_inputs: empty index")
    shape = tuple(int(s) for s in latent_shape)
    T, p_drop = int(cfg.diffusion.num_train_timesteps), float(cfg.train.cond_drop)
    offset = float(cfg.train.get("noise_offset", 0.0) or 0.0)
    k_step = random.fold_in(root_key, int(step))
    noise, latent_noise, t, u, off = [], [], [], [], []
    for i in index:
        k_noise, k_latent, k_t, k_drop, k_off = random.split(random.fold_in(k_step, i), 5)
        noise.append(random.normal(k_noise, shape))
        latent_noise.append(random.normal(k_latent, shape))
        t.append(random.randint(k_t, (), 0, T))
        u.append(random.uniform(k_drop, ()))
        if offset:
            off.append(random.normal(k_off, shape[:1]))
    out = {"noise": torch.stack(noise), "latent_noise": torch.stack(latent_noise),
           "timesteps": torch.stack(t).to(torch.int64), "drop": torch.stack(u) < p_drop}
    if offset:
        out["offset_noise"] = torch.stack(off)
    return tree.to(out, device=device)


def _set_matmul_precision(precision: str) -> None:
    # Process-wide switches (torch has no per-graph one); the legacy API keeps
    # torch.get_float32_matmul_precision() readable for everyone else.
    if precision == "tf32":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    elif precision == "fp32":
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False


def _uncond(frozen: dict, batch: dict, name: str):
    if name in frozen:
        return frozen[name]
    return batch.get(name)


def _hyperparameters(cfg) -> dict:
    """The step's static settings as plain Python values (ConfigDict stays out of the trace)."""
    t = cfg.train
    return dict(
        precision=t.precision, cond_drop=float(t.cond_drop),
        min_snr_gamma=float(t.get("min_snr_gamma", 0.0) or 0.0),
        noise_offset=float(t.get("noise_offset", 0.0) or 0.0),
        grad_clip=float(t.get("grad_clip", 0.0) or 0.0), b1=float(t.adam_b1), b2=float(t.adam_b2),
        eps=float(t.adam_eps), weight_decay=float(t.weight_decay),
        weight_decay_exclude=t.get("weight_decay_exclude") or None, ema_decay=float(t.ema_decay),
        loss_scale_window=int(t.get("loss_scale_window", 1000)), lr_fn=lr_lib.schedule_fn(t),
        prediction_type=str(cfg.diffusion.prediction_type), scaling_factor=float(cfg.vae.scaling_factor),
        unet=cfg.unet, vae=cfg.vae, text_encoder=cfg.text_encoder)


def _text_context(hp, params_te, frozen: dict, batch: dict) -> torch.Tensor:
    """The (cond-dropped) text context [b, 77, D] from input_ids or precached context."""
    drop = hp["cond_drop"] > 0
    if "input_ids" in batch:
        ids = batch["input_ids"]
        if drop:
            empty = _uncond(frozen, batch, "uncond_ids").reshape(1, -1).to(ids.dtype)
            ids = torch.where(batch["drop"][:, None], empty, ids)
        return text_encoder.apply(params_te, ids, hp["text_encoder"])
    context = batch["context"]
    if drop:
        empty = _uncond(frozen, batch, "uncond_context")
        if empty is None:  # the empty prompt through the frozen text encoder
            ids = _uncond(frozen, batch, "uncond_ids").reshape(1, -1)
            empty = text_encoder.apply(params_te, ids, hp["text_encoder"])
        context = torch.where(batch["drop"][:, None, None], empty.to(context.dtype), context)
    return context


def _clean_latents(hp, frozen: dict, batch: dict) -> torch.Tensor:
    """x0 = a draw of the VAE posterior times scaling_factor, from images or precached moments."""
    if "images" in batch:
        mean, logvar = autoencoder.encode(frozen["vae"], batch["images"], hp["vae"])
    else:
        mean, logvar = batch["moments"].chunk(2, dim=1)
        logvar = logvar.clamp(autoencoder.LOGVAR_MIN, autoencoder.LOGVAR_MAX)
    z = autoencoder.sample_latent(mean, logvar, batch["latent_noise"])
    return z.float() * hp["scaling_factor"]


def _train_step(hp: dict, world: int, lay: optim.Layout, flat: dict, frozen: dict, batch: dict,
                alphas_cumprod: torch.Tensor):
    """The pure step over flat vectors.

    flat: {"params", "mu", "nu", "ema": 1-d float32 vectors in `lay`'s order, "step",
    ["loss_scale"]}. hp (see _hyperparameters), world and lay are static (trace time).
    Returns (the same dict, new tensors; metrics).
    """
    precision = hp["precision"]
    step = flat["step"]
    amp = torch.autocast(step.device.type, dtype=_AUTOCAST.get(precision, torch.float32),
                         enabled=precision in _AUTOCAST)
    fp16 = precision == "fp16"
    scale = flat["loss_scale"]["scale"] if fp16 else None
    params = optim.unflatten(flat["params"], lay)  # views: no copies
    train_te = "text_encoder" in params

    with amp:
        x0 = _clean_latents(hp, frozen, batch)
        context = None if train_te else _text_context(hp, frozen.get("text_encoder"), frozen, batch)

    def loss_fn(trainable):
        with amp:
            ctx = context if context is not None else _text_context(hp, trainable["text_encoder"], frozen, batch)
            model_fn = lambda x, t: unet.apply(trainable["unet"], x, t, ctx, hp["unet"])
            loss = losses.diffusion_loss(
                model_fn, x0, batch["noise"], batch["timesteps"], alphas_cumprod,
                hp["prediction_type"], hp["min_snr_gamma"], hp["noise_offset"], batch.get("offset_noise"))
        return (loss * scale if fp16 else loss), loss.detach()

    grads, (_, loss) = autodiff.grad_and_value(loss_fn, params)
    flat_g = tree.flatten(grads)
    g = torch.cat([flat_g[k].reshape(-1).to(torch.float32) for k in lay.paths] + [loss.reshape(1).float()])
    if world > 1:  # one all-reduce of the gradient vector and the loss
        from torch.distributed import _functional_collectives as funcol
        g = funcol.all_reduce(g, "sum", torch.distributed.group.WORLD) / world
    g, loss = g[:-1], g[-1]
    if fp16:
        g = g / scale

    grad_norm = torch.linalg.vector_norm(g)
    if hp["grad_clip"] > 0:
        g = g * torch.clamp(hp["grad_clip"] / (grad_norm + 1e-6), max=1.0)
    skipped = flat["loss_scale"]["skipped"] if fp16 else torch.zeros_like(step)
    lr = hp["lr_fn"](step)
    p, mu, nu, ema = flat["params"], flat["mu"], flat["nu"], flat["ema"]
    new_p, new_mu, new_nu = optim.adamw_flat(
        p, g, mu, nu, step + 1 - skipped, lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
        weight_decay=hp["weight_decay"], n_decay=lay.n_decay)
    new_ema = torch.lerp(ema, new_p, 1.0 - hp["ema_decay"])

    out = {"step": step + 1}
    if fp16:  # dynamic loss scaling: skip non-finite steps inside the graph (no host sync)
        finite = torch.isfinite(grad_norm)
        new_p, new_mu, new_nu, new_ema = (torch.where(finite, n, o) for n, o in
                                          ((new_p, p), (new_mu, mu), (new_nu, nu), (new_ema, ema)))
        ls = flat["loss_scale"]
        good = torch.where(finite, ls["good_steps"] + 1, torch.zeros_like(ls["good_steps"]))
        grow = good >= hp["loss_scale_window"]
        new_scale = torch.where(finite, torch.where(grow, scale * 2.0, scale), scale * 0.5)
        skipped = ls["skipped"] + (~finite).to(ls["skipped"].dtype)
        out["loss_scale"] = {"scale": new_scale, "good_steps": torch.where(grow, torch.zeros_like(good), good),
                             "skipped": skipped}
    out.update(params=new_p, mu=new_mu, nu=new_nu, ema=new_ema)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": torch.linalg.vector_norm(new_p),
        "update_norm": torch.linalg.vector_norm(new_p - p),
        "lr": lr,
        "skipped": skipped,
        "loss_scale": out["loss_scale"]["scale"] if fp16 else torch.ones((), device=step.device),
    }
    return out, metrics


def _check_inputs(cfg, state: dict, frozen: dict, batch: dict) -> None:
    """Clear host-side errors for a malformed call (before tracing)."""
    need = ["noise", "latent_noise", "timesteps", "drop"]
    if "images" in batch:
        need.append("input_ids")
        if "vae" not in frozen:
            raise ValueError("train_step: batch has 'images' but frozen has no 'vae'")
    elif "moments" in batch:
        need.append("context")
    else:
        raise ValueError(f"train_step: batch needs 'images'+'input_ids' or 'moments'+'context', got {sorted(batch)}")
    missing = [k for k in need if k not in batch]
    if missing:
        raise ValueError(f"train_step: batch lacks {missing} (see train.step.step_inputs)")
    if float(cfg.train.get("noise_offset", 0.0) or 0.0) and "offset_noise" not in batch:
        raise ValueError("train_step: cfg.train.noise_offset > 0 needs batch['offset_noise'] (step_inputs)")
    train_te = "text_encoder" in state["params"]
    if "input_ids" in batch and not train_te and "text_encoder" not in frozen:
        raise ValueError("train_step: batch has 'input_ids' but no text encoder in frozen or state['params']")
    if cfg.train.cond_drop > 0:
        if "input_ids" in batch:
            ok = _uncond(frozen, batch, "uncond_ids") is not None
            what = "'uncond_ids' (the empty prompt's token ids, [77])"
        else:
            ok = _uncond(frozen, batch, "uncond_context") is not None or (
                _uncond(frozen, batch, "uncond_ids") is not None and "text_encoder" in frozen)
            what = "'uncond_context' ([1,77,D]) or 'uncond_ids' + a frozen 'text_encoder'"
        if not ok:
            raise ValueError(f"train_step: cfg.train.cond_drop={cfg.train.cond_drop} needs {what} in frozen")
    if (cfg.train.precision == "fp16") != ("loss_scale" in state):
        raise ValueError(f"train_step: state['loss_scale'] must exist iff precision is fp16 "
                         f"(precision={cfg.train.precision!r}); rebuild the state with init_state")


def make_train_step(cfg, world: int | None = None, *, backend: str = "inductor"):
    """`train_step(state, frozen, batch) -> (state, metrics)`, compiled when cfg.train.compile.

    frozen: {"vae": params (unless the batch holds precached moments), "text_encoder":
    params (unless it trains, or the batch holds precached context), "uncond_ids": the
    empty prompt's ids [77] and/or "uncond_context": its context [1,77,D] (for cond_drop)}.
    world: the data-parallel world size (default: torch.distributed's, or 1).
    backend: torch.compile's backend when cfg.train.compile ("inductor"; the tests use
    "aot_eager", which traces the same single graph with AOTAutograd but skips codegen).
    """
    precision = cfg.train.precision
    if precision not in PRECISIONS:
        raise ValueError(f"cfg.train.precision={precision!r}: expected one of {PRECISIONS}")
    if cfg.diffusion.prediction_type not in losses.PREDICTION_TYPES:
        raise ValueError(f"cfg.diffusion.prediction_type={cfg.diffusion.prediction_type!r}: "
                         f"expected one of {losses.PREDICTION_TYPES}")
    lr_lib.schedule(cfg.train, 0)  # validates cfg.train.lr_schedule now, not inside the trace
    _set_matmul_precision(precision)
    world = distributed.world_size() if world is None else int(world)
    cfg = cfg.copy_and_resolve_references()  # a private copy: later edits by the caller cannot leak in
    hp = _hyperparameters(cfg)
    core = lambda lay, flat, frozen, batch, ac: _train_step(hp, world, lay, flat, frozen, batch, ac)
    if cfg.train.compile:
        core = torch.compile(core, fullgraph=True, dynamic=False, backend=backend)
    tables: dict = {}
    layouts: dict = {}  # params paths -> optim.Layout (regexes stay out of the trace)

    def train_step(state: dict, frozen: dict, batch: dict):
        _check_inputs(cfg, state, frozen, batch)
        device = state["step"].device
        if device not in tables:
            tables[device] = schedules.alphas_cumprod(cfg.diffusion).to(device)
        paths = tuple(tree.flatten(state["params"]))
        if paths not in layouts:
            layouts[paths] = optim.layout(state["params"], hp["weight_decay_exclude"])
        lay = layouts[paths]
        flat = {"params": optim.flatten(state["params"], lay), "mu": optim.flatten(state["opt"]["mu"], lay),
                "nu": optim.flatten(state["opt"]["nu"], lay), "ema": optim.flatten(state["ema"], lay),
                "step": state["step"]}
        if "loss_scale" in state:
            flat["loss_scale"] = state["loss_scale"]
        if cfg.train.compile:
            # A compile error must surface, and a recompile storm must not fall back to eager.
            with torch._dynamo.config.patch(suppress_errors=False, fail_on_recompile_limit_hit=True):
                out, metrics = core(lay, flat, frozen, batch, tables[device])
        else:
            out, metrics = core(lay, flat, frozen, batch, tables[device])
        new = {"params": optim.unflatten(out["params"], lay),
               "opt": {"mu": optim.unflatten(out["mu"], lay), "nu": optim.unflatten(out["nu"], lay)},
               "ema": optim.unflatten(out["ema"], lay), "step": out["step"]}
        if "loss_scale" in out:
            new["loss_scale"] = out["loss_scale"]
        return new, metrics

    train_step.world = world
    return train_step
