"""Stage 1 of a from-scratch latent diffusion run: train the AutoencoderKL.

Rombach et al. 2022 (LDM), Sec. 3 and App. G: an autoencoder trained with a
reconstruction loss and a small KL pull of the posterior towards N(0, I), so that
its latents are smooth; then the latent scaling factor is 1 / std of the latents
(how SD's 0.18215 was found), making them unit-variance for the diffusion model.
We drop the perceptual and adversarial terms: on synthetic flat-colour images a
pixel loss reconstructs sharply. The step is pure (train.autodiff.grad_and_value,
the functional AdamW of train.optim) like the UNet's.

The stage lives in <workdir>/vae/ with its own atomic checkpoints, so the one
command of a run resumes inside this stage or skips it when it is done.
"""

import os
import time

import ml_collections
import torch

from sd_func import data, random, tree
from sd_func.models import autoencoder
from sd_func.checkpoint import training as checkpoints
from sd_func.train import autodiff, optim
from sd_func.train import lr as lr_lib

_TAG = 0x7AE0


def vae_loss(p: dict, images: torch.Tensor, noise: torch.Tensor, cfg_vae, kl_weight: float):
    """(loss, (recon_l1, kl)): L1 + L2 reconstruction of a posterior sample, plus weighted KL."""
    mean, logvar = autoencoder.encode(p, images, cfg_vae)
    recon = autoencoder.decode(p, autoencoder.sample_latent(mean, logvar, noise), cfg_vae)
    l1 = (recon - images).abs().mean()
    l2 = (recon - images).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return l1 + l2 + kl_weight * kl, (l1.detach(), kl.detach())


def make_step(cfg):
    """`step(state, images, noise) -> (state, metrics)`; state = {"params", "opt", "step"}."""
    vc, tc = cfg.vae, cfg.vae_train
    schedule = lr_lib.schedule_fn(_schedule_cfg(tc))

    def step(state, images, noise):
        fn = lambda p: vae_loss(p, images, noise, vc, tc.kl_weight)  # noqa: E731
        grads, (loss, (l1, kl)) = autodiff.grad_and_value(fn, state["params"])
        flat = tree.flatten(state["params"])
        paths = list(flat)
        p = [flat[k] for k in paths]
        g, mu, nu = ([tree.flatten(t)[k] for k in paths]
                     for t in (grads, state["opt"]["mu"], state["opt"]["nu"]))
        norm = optim.global_norm(g)
        g = optim.clip_by_global_norm(g, norm, 1.0)
        count = state["step"] + 1
        p, mu, nu = optim.adamw(p, g, mu, nu, [False] * len(p), count, schedule(state["step"]),
                                b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
        unflat = lambda leaves: tree.unflatten(dict(zip(paths, leaves)))  # noqa: E731
        new = {"params": unflat(p), "opt": {"mu": unflat(mu), "nu": unflat(nu)}, "step": count}
        return new, {"loss": loss.detach(), "l1": l1, "kl": kl, "grad_norm": norm}

    return torch.compile(step, fullgraph=True, dynamic=False) if tc.compile else step


def _schedule_cfg(tc) -> ml_collections.ConfigDict:
    """vae_train's lr fields in train.lr's form (lr_schedule defaults to "constant")."""
    return ml_collections.ConfigDict({"lr": tc.lr, "warmup": tc.warmup, "steps": tc.steps,
                                      "lr_schedule": tc.get("lr_schedule", "constant"),
                                      "lr_min": tc.get("lr_min", 0.0)})


@torch.no_grad()
def scaling_factor(p: dict, cfg, source, num: int = 256) -> float:
    """1 / std of the posterior means over `num` training images (LDM's latent rescaling)."""
    imgs = source.batch(10**6, num)["images"].to(tree.leaves(p)[0].device)  # a batch never trained on
    mean, _ = autoencoder.encode(p, imgs, cfg.vae)
    return float(1.0 / mean.float().std())


def run(cfg, workdir: str, params_vae: dict, log=print) -> tuple[dict, float]:
    """Train (or resume, or load the finished) VAE stage; returns (vae params, scaling factor)."""
    tc = cfg.vae_train
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    params_vae = tree.to(params_vae, device=device)
    vdir = os.path.join(workdir, "vae")
    checkpoints.clean_partial(vdir)
    last = checkpoints.latest(vdir)
    state = {"params": params_vae, "opt": optim.init(params_vae), "step": torch.zeros((), dtype=torch.int64)}
    if last is not None:
        state = {"params": checkpoints.restore_like(last, "params", state["params"]),
                 "opt": checkpoints.restore_like(last, "opt", state["opt"]),
                 "step": torch.tensor(checkpoints.read_meta(last)["step"], dtype=torch.int64)}
        state = tree.to(state, device=device)
        meta = checkpoints.read_meta(last)
        if meta.get("done"):
            return tree.to(state["params"], device="cpu"), float(meta["scaling_factor"])
        log(f"vae stage: resuming at step {int(state['step'])}")
    source = data.make_source(cfg.data, cfg.seed)
    step_fn = make_step(cfg)
    root = random.fold_in(random.key(cfg.seed), _TAG)
    shape = (int(cfg.vae.latent_channels),)
    t0, start = time.time(), int(state["step"])
    for s in range(start, int(tc.steps)):
        batch = source.batch(s, int(tc.batch_size))
        imgs = batch["images"].to(device)
        f = 2 ** (len(cfg.vae.block_out_channels) - 1)
        noise = random.normal(random.fold_in(root, s), (imgs.shape[0], *shape, imgs.shape[2] // f, imgs.shape[3] // f),
                              device=device)
        state, m = step_fn(state, imgs, noise)
        done = s + 1
        if done % int(tc.log_every) == 0 or done == int(tc.steps):
            rate = (done - start) * imgs.shape[0] / (time.time() - t0)
            log(f"vae stage: step {done}/{tc.steps} loss {float(m['loss']):.4f} l1 {float(m['l1']):.4f} "
                f"kl {float(m['kl']):.3f} ({rate:.1f} img/s)")
            if not torch.isfinite(m["loss"]):
                raise FloatingPointError(f"vae stage: non-finite loss at step {done} (lower vae_train.lr)")
        if done % int(tc.checkpoint_every) == 0 and done < int(tc.steps):
            checkpoints.save(vdir, done, {"params": state["params"], "opt": state["opt"]}, {}, keep=1)
    sf = scaling_factor(state["params"], cfg, source)
    checkpoints.save(vdir, int(tc.steps), {"params": state["params"], "opt": state["opt"]},
                       {"done": True, "scaling_factor": sf}, keep=1)
    log(f"vae stage: done, latent scaling factor {sf:.4f}")
    return tree.to(state["params"], device="cpu"), sf
