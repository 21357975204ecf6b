"""Stage 1 of a from-scratch latent diffusion run: train the AutoencoderKL.

Rombach et al. 2022 (LDM), Sec. 3 and App. G: an autoencoder trained with a
reconstruction loss and a small KL pull of the posterior towards N(0, I), so that
its latents are smooth; then the latent scaling factor is 1 / std of the latents
(how SD's 0.18215 was found), making them unit-variance for the diffusion model.
We drop the perceptual and adversarial terms: on synthetic flat-colour images a
pixel loss reconstructs sharply. The step is the UNet stage's (train.step.make_step)
with this stage's `vae_loss`; its optimizer comes from cfg.vae_train like the UNet's
from cfg.train (optim.from_config: clipping, AdamW; no EMA).

The stage lives in <workdir>/vae/ with its own atomic checkpoints, so the one
command of a run resumes inside this stage or skips it when it is done.
"""

import os
import time

import torch

from sd_func import backend, data, random, tree
from sd_func.checkpoint import training as checkpoints
from sd_func.models import autoencoder
from sd_func.train import checks, optim
from sd_func.train import state as train_state
from sd_func.train import step as train_step

_TAG = 0x7AE0
SECTION = "config.vae_train"


def vae_loss(p: dict, images: torch.Tensor, noise: torch.Tensor, cfg_vae, kl_weight: float):
    """(loss, (recon_l1, kl)): L1 + L2 reconstruction of a posterior sample, plus weighted KL."""
    mean, logvar = autoencoder.encode(p, images, cfg_vae)
    recon = autoencoder.decode(p, autoencoder.sample_latent(mean, logvar, noise), cfg_vae)
    l1 = (recon - images).abs().mean()
    l2 = (recon - images).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return l1 + l2 + kl_weight * kl, (l1.detach(), kl.detach())


def loss_fn(cfg):
    """`loss_fn(params, frozen, batch) -> (loss, {"l1", "kl"})` over batch {"images", "noise"}."""
    vc, kl_weight = cfg.vae.copy_and_resolve_references(), float(cfg.vae_train.kl_weight)

    def fn(params, frozen, batch):
        loss, (l1, kl) = vae_loss(params, batch["images"], batch["noise"], vc, kl_weight)
        return loss, {"l1": l1, "kl": kl}

    return fn


def init(cfg, params_vae: dict):
    """(state, tx, lay) of the stage: {"params", "opt", "step"}, the optimizer of cfg.vae_train."""
    tc = cfg.vae_train
    lay = optim.layout(params_vae, tc.get("weight_decay_exclude") or None)
    tx = optim.from_config(tc, lay, SECTION)
    return train_state.init_state(params_vae, tx, lay, ema=False), tx, lay


def make_step(cfg, tx, lay, backend_name: str = "inductor"):
    """`step(state, frozen, batch) -> (state, metrics)` of the stage (one process: rank 0 runs it)."""
    return train_step.make_step(loss_fn(cfg), tx, lay, cfg.vae_train, world=1, backend=backend_name,
                                section=SECTION)


@torch.no_grad()
def scaling_factor(p: dict, cfg, source, num: int = 256) -> float:
    """1 / std of the posterior means over `num` training images (LDM's latent rescaling)."""
    imgs = source.batch(10**6, num)["images"].to(tree.leaves(p)[0].device)  # a batch never trained on
    mean, _ = autoencoder.encode(p, imgs, cfg.vae)
    return float(1.0 / mean.float().std())


def _save(vdir: str, state: dict, meta: dict) -> None:
    trees = train_state.checkpoint_trees(state)
    checkpoints.save(vdir, int(state["step"]), trees, meta, keep=1)


def run(cfg, workdir: str, params_vae: dict, log=print, compile_backend: str = "inductor") -> tuple[dict, float]:
    """Train (or resume, or load the finished) VAE stage; returns (vae params, scaling factor)."""
    checks.validate(cfg)
    tc = cfg.vae_train
    backend.set_matmul_precision(tc.precision)  # process-wide; the UNet stage's loop sets its own
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    state, tx, lay = init(cfg, tree.to(params_vae, device=device))
    vdir = os.path.join(workdir, "vae")
    checkpoints.clean_partial(vdir)
    last = checkpoints.latest(vdir)
    if last is not None:
        meta = checkpoints.read_meta(last)
        if meta.get("done"):
            params = checkpoints.restore_like(last, "params", state["params"])
            return tree.to(params, device="cpu"), float(meta["scaling_factor"])
        state = train_state.restore(last, state)
        log(f"vae stage: resumed from step {int(state['step'])}")
    source = data.make_source(cfg.data, cfg.seed)
    step_fn = make_step(cfg, tx, lay, compile_backend)
    root = random.fold_in(random.key(cfg.seed), _TAG)
    shape = (int(cfg.vae.latent_channels),)
    f = 2 ** (len(cfg.vae.block_out_channels) - 1)
    t0, start, total = time.time(), int(state["step"]), int(tc.steps)
    log_every, ckpt_every = int(tc.log_every or 0), int(tc.checkpoint_every or 0)
    for s in range(start, total):
        imgs = source.batch(s, int(tc.batch_size))["images"].to(device)
        noise = random.normal(random.fold_in(root, s), (imgs.shape[0], *shape, imgs.shape[2] // f, imgs.shape[3] // f),
                              device=device)
        state, m = step_fn(state, {}, {"images": imgs, "noise": noise})
        done = s + 1
        if (log_every and done % log_every == 0) or done == total:
            rate = (done - start) * imgs.shape[0] / (time.time() - t0)
            log(f"vae stage: step {done}/{total} loss {float(m['loss']):.4f} l1 {float(m['l1']):.4f} "
                f"kl {float(m['kl']):.3f} ({rate:.1f} img/s)")
            if not torch.isfinite(m["loss"]):
                raise checks.TrainingDiverged(f"vae stage: non-finite loss at step {done} (lower {SECTION}.lr)")
        if ckpt_every and done % ckpt_every == 0 and done < total:
            _save(vdir, state, {})
    sf = scaling_factor(state["params"], cfg, source)
    _save(vdir, state, {"done": True, "scaling_factor": sf})
    log(f"vae stage: done, latent scaling factor {sf:.4f}")
    return tree.to(state["params"], device="cpu"), sf
