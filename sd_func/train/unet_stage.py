"""The UNet stage's pieces for the one step factory: its loss_fn, state, optimizer and inputs.

Latent diffusion training (Rombach et al. 2022; SD's recipe as NeMo runs it): the frozen
VAE encodes the images, a posterior sample times scaling_factor is noised at a uniform
timestep, and the UNet (with the text encoder's context, cond-dropped for classifier-
free guidance, Ho & Salimans 2022) regresses eps, v or x0 (sd_func.diffusion.losses:
min-SNR weighting, noise offset). Precached VAE moments and text context
(kind "latents") replace the two frozen encoders. `make_train_step` is
train.step.make_step with this loss_fn, plus host-side input checks and the
alphas_cumprod table.

Randomness is prepared on the host by `step_inputs`: example i of step n draws its
noise, posterior noise, timestep and drop flag from fold_in(fold_in(root, n), i), with
i the GLOBAL example index, so a run gives the same numbers on 1 or N processes and
after a resume.

LoRA (config.lora.rank > 0; sd_func.lora): `setup` puts only the LoRA's A and B in the
train state ({"lora": {"unet", ["text_encoder"]}}), so gradients, AdamW's moments and
the EMA exist for them alone; the base UNet and text encoder, and the LoRA's alphas
("lora_alpha"), are frozen inputs of the step, and the loss runs the models on
lora.apply(base, lora). DreamBooth's prior preservation (Ruiz et al. 2023) comes as a
batch flag "prior" (sd_func.data.dreambooth: instance and class examples alternate):
the loss is mean(instance) + config.train.prior_loss_weight * mean(prior), diffusers'
train_dreambooth.py formula, through per-example weights (`prior_weights`).
"""

import os

import torch

from sd_func import lora, random, tree
from sd_func.checkpoint import lora_files
from sd_func.diffusion import losses, schedules
from sd_func.errors import UserError
from sd_func.models import autoencoder, text_encoder, unet
from sd_func.train import checks, optim, sharding
from sd_func.train import state as train_state
from sd_func.train import step as train_step


def latent_shape(cfg, resolution: int | None = None) -> tuple[int, int, int]:
    """(C, h, w) of one example's VAE latent at cfg.data.resolution (or `resolution`)."""
    r = int(resolution or cfg.data.resolution)
    f = 2 ** (len(cfg.vae.block_out_channels) - 1)
    if r % f:
        raise UserError(f"config.data.resolution={r}: expected a multiple of the VAE's downsampling factor {f}")
    return (int(cfg.vae.latent_channels), r // f, r // f)


def batch_latent_shape(cfg, batch: dict) -> tuple[int, int, int]:
    """(C, h, w) of the latents of a batch: of its images [b, 3, H, W] through the VAE, or of its
    precached moments [b, 2C, h, w] (so each aspect-ratio bucket gets noise of its own shape)."""
    if "moments" in batch:
        c2, h, w = batch["moments"].shape[-3:]
        return (int(c2) // 2, int(h), int(w))
    hgt, wid = batch["images"].shape[-2:]
    f = 2 ** (len(cfg.vae.block_out_channels) - 1)
    if hgt % f or wid % f:
        raise UserError(f"train: images of {hgt}x{wid} px: expected multiples of the VAE's downsampling factor {f}")
    return (int(cfg.vae.latent_channels), int(hgt) // f, int(wid) // f)


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


def trainable_params(cfg, params_unet: dict, params_te: dict | None = None) -> dict:
    """{"unet", ["text_encoder"]}: what this stage trains (the text encoder with cfg.train.train_text_encoder)."""
    train_te = bool(cfg.train.get("train_text_encoder", False))
    if train_te and params_te is None:
        raise ValueError("unet_stage: cfg.train.train_text_encoder=True needs params_te")
    if params_te is not None and not train_te:
        raise ValueError("unet_stage: params_te given but cfg.train.train_text_encoder=False; "
                         "pass a frozen text encoder in `frozen` instead")
    params = {"unet": params_unet}
    if params_te is not None:
        params["text_encoder"] = params_te
    return params


def init(cfg, params_unet: dict, params_te: dict | None = None, *, shard: sharding.Shard | None = None):
    """(state, tx, lay): a fresh train state with EMA, the optimizer of cfg.train and its layout.

    shard: ZeRO-1 (train.sharding.from_config(cfg.train, rank, world)): opt and EMA of this
    rank's slice; pass the same shard to make_train_step."""
    return _init_trained(cfg, trainable_params(cfg, params_unet, params_te), shard)


def _init_trained(cfg, params: dict, shard=None):
    lay = optim.layout(params, cfg.train.get("weight_decay_exclude") or None)
    tx = optim.from_config(cfg.train, lay, shard=shard)
    return train_state.init_state(params, tx, lay, ema=True, shard=shard), tx, lay


def lora_config(cfg):
    """cfg.lora when it asks for LoRA training (rank > 0), else None."""
    lcfg = cfg.get("lora", None)
    return lcfg if lcfg is not None and int(lcfg.get("rank", 0) or 0) > 0 else None


def setup(cfg, params: dict, key: int, *, shard: sharding.Shard | None = None):
    """(state, tx, lay, frozen models): what trains and what stays frozen, from the models' params.

    params: {"unet", "vae", "text_encoder"} (other entries, e.g. a resumed run's, are
    ignored: its state is restored over this fresh one). Full fine-tuning: the UNet (and
    with cfg.train.train_text_encoder the text encoder) trains. With cfg.lora (rank,
    alpha, target, train_text_encoder): a fresh LoRA keyed by `key` trains, and the
    frozen models also hold the base UNet and text encoder and the LoRA's alphas. shard:
    ZeRO-1, as for init.
    """
    lcfg = lora_config(cfg)
    models = {k: params[k] for k in ("unet", "vae", "text_encoder") if k in params}
    if lcfg is None:
        train_te = bool(cfg.train.get("train_text_encoder", False))
        state, tx, lay = init(cfg, models["unet"], models["text_encoder"] if train_te else None, shard=shard)
        return state, tx, lay, {k: v for k, v in models.items() if k not in state["params"]}
    if cfg.train.get("train_text_encoder", False):
        raise UserError("config.train.train_text_encoder=True with config.lora.rank > 0: the LoRA trains the "
                        "text encoder with config.lora.train_text_encoder=True instead")
    adapted = ("unet", "text_encoder") if lcfg.get("train_text_encoder", False) else ("unet",)
    try:
        lp = lora.init(key, {k: models[k] for k in adapted}, int(lcfg.rank), lcfg.get("alpha", None),
                       lcfg.get("target", "attn"))
    except lora.LoRAError as e:
        raise UserError(f"config.lora: {e}") from None
    weights, alphas = lora.split(lp)
    state, tx, lay = _init_trained(cfg, {lora.TREE: weights}, shard)
    return state, tx, lay, dict(models, **{lora.ALPHA_TREE: alphas})


def export_lora(workdir: str, state: dict, frozen_models: dict, cfg) -> str | None:
    """A LoRA run's LoRA as <workdir>/pytorch_lora_weights.safetensors (config.lora.format:
    diffusers or kohya), the weights samples use (EMA with cfg.sample.ema); None otherwise."""
    if lora.TREE not in state["params"]:
        return None
    trees = state["ema"] if cfg.sample.get("ema", True) and "ema" in state else state["params"]
    path = os.path.join(workdir, lora_files.DIFFUSERS_NAME)
    lora_files.save(lora.join(trees[lora.TREE], frozen_models[lora.ALPHA_TREE]), path,
                    format=cfg.lora.get("format", "diffusers"))
    return path


def _nets(params: dict, frozen: dict) -> tuple[dict, dict | None]:
    """(UNet params, text encoder params) the loss runs: trained, frozen, or frozen + LoRA."""
    if lora.TREE in params:
        base = {k: frozen[k] for k in ("unet", "text_encoder") if k in frozen}
        nets = lora.apply(base, lora.join(params[lora.TREE], frozen[lora.ALPHA_TREE]))
        return nets["unet"], nets.get("text_encoder")
    te = params["text_encoder"] if "text_encoder" in params else frozen.get("text_encoder")
    return params["unet"], te


def prior_weights(prior: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """Per-example weights [b] that make the batch mean mean(instance) + w * mean(prior)
    for a global batch of equal halves (diffusers' train_dreambooth.py)."""
    return torch.where(prior, 2.0 * float(prior_loss_weight), 2.0).to(torch.float32)


def _uncond(frozen: dict, batch: dict, name: str):
    return frozen[name] if name in frozen else batch.get(name)


def _text_context(cfg, params_te, frozen: dict, batch: dict) -> torch.Tensor:
    """The (cond-dropped) text context [b, 77, D] from input_ids or precached context."""
    drop = float(cfg.train.cond_drop) > 0
    if "input_ids" in batch:
        ids = batch["input_ids"]
        if drop:
            empty = _uncond(frozen, batch, "uncond_ids").reshape(1, -1).to(ids.dtype)
            ids = torch.where(batch["drop"][:, None], empty, ids)
        return text_encoder.apply(params_te, ids, cfg.text_encoder)
    context = batch["context"]
    if drop:
        empty = _uncond(frozen, batch, "uncond_context")
        if empty is None:  # the empty prompt through the frozen text encoder
            ids = _uncond(frozen, batch, "uncond_ids").reshape(1, -1)
            empty = text_encoder.apply(params_te, ids, cfg.text_encoder)
        context = torch.where(batch["drop"][:, None, None], empty.to(context.dtype), context)
    return context


def _clean_latents(cfg, frozen: dict, batch: dict) -> torch.Tensor:
    """x0 = a draw of the VAE posterior times scaling_factor, from images or precached moments."""
    if "images" in batch:
        mean, logvar = autoencoder.encode(frozen["vae"], batch["images"], cfg.vae)
    else:
        mean, logvar = batch["moments"].chunk(2, dim=1)
        logvar = logvar.clamp(autoencoder.LOGVAR_MIN, autoencoder.LOGVAR_MAX)
    z = autoencoder.sample_latent(mean, logvar, batch["latent_noise"])
    return z.float() * float(cfg.vae.scaling_factor)


def loss_fn(cfg):
    """`loss_fn(params, frozen, batch) -> (loss, {})`: the diffusion loss of the UNet (+ text encoder).

    frozen: {"alphas_cumprod": [T], "vae" (unless the batch holds "moments"),
    "text_encoder" (unless it trains or the batch holds "context"), "uncond_ids" and/or
    "uncond_context" (for cond_drop)}. The frozen encoders run inside the differentiated
    function but on tensors that need no gradient, so no backward is built for them.
    """
    cfg = cfg.copy_and_resolve_references()  # a private copy: later edits by the caller cannot leak in
    prediction = str(cfg.diffusion.prediction_type)
    gamma = float(cfg.train.get("min_snr_gamma", 0.0) or 0.0)
    offset = float(cfg.train.get("noise_offset", 0.0) or 0.0)
    prior_w = float(cfg.train.get("prior_loss_weight", 1.0))
    remat = str(cfg.train.get("remat", "none") or "none")

    def fn(params: dict, frozen: dict, batch: dict):
        x0 = _clean_latents(cfg, frozen, batch)
        unet_p, te = _nets(params, frozen)
        context = _text_context(cfg, te, frozen, batch)
        model_fn = lambda x, t: unet.apply(unet_p, x, t, context, cfg.unet, remat=remat)
        weights = prior_weights(batch["prior"], prior_w) if "prior" in batch else None
        loss = losses.diffusion_loss(model_fn, x0, batch["noise"], batch["timesteps"], frozen["alphas_cumprod"],
                                     prediction, gamma, offset, batch.get("offset_noise"), weights)
        return loss, {}

    return fn


def check_inputs(cfg, state: dict, frozen: dict, batch: dict) -> None:
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
        raise ValueError(f"train_step: batch lacks {missing} (see train.unet_stage.step_inputs)")
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


def make_train_step(cfg, tx: optim.Transform, lay: optim.Layout, *, world: int | None = None,
                    backend: str = "inductor", shard: sharding.Shard | None = None, num_shapes: int = 1):
    """`train_step(state, frozen, batch) -> (state, metrics)`: make_step with this stage's loss_fn.

    frozen: {"vae": params (unless the batch holds precached moments), "text_encoder":
    params (unless it trains, or the batch holds precached context), "uncond_ids": the
    empty prompt's ids [77] and/or "uncond_context": its context [1,77,D] (for cond_drop)};
    the alphas_cumprod table is added here. world, backend, shard, num_shapes: as
    train.step.make_step. cfg.train.remat (unet.REMAT) recomputes UNet blocks in backward.
    """
    if cfg.diffusion.prediction_type not in losses.PREDICTION_TYPES:
        raise UserError(f"config.diffusion.prediction_type={cfg.diffusion.prediction_type!r}: "
                        f"expected one of {losses.PREDICTION_TYPES}")
    checks.check_remat(cfg.train)
    cfg = cfg.copy_and_resolve_references()
    inner = train_step.make_step(loss_fn(cfg), tx, lay, cfg.train, world=world, backend=backend, shard=shard,
                                 num_shapes=num_shapes)
    tables: dict = {}

    def train_step_fn(state: dict, frozen: dict, batch: dict):
        check_inputs(cfg, state, frozen, batch)
        device = state["step"].device
        if device not in tables:
            tables[device] = schedules.alphas_cumprod(cfg.diffusion).to(device)
        return inner(state, dict(frozen, alphas_cumprod=tables[device]), batch)

    train_step_fn.world, train_step_fn.shard = inner.world, inner.shard
    return train_step_fn
