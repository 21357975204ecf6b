"""The training run's checks of user input: `validate(cfg)` before anything expensive, and divergence.

`validate` reads only the config: it runs before a model is built, data is read or a step
is compiled (sd_func.recipe.run and train.loop.train call it first), and raises
sd_func.errors.UserError with one line naming the key, as the user would type it
(`config.train.lr=0.0: expected a number > 0`). Divergence found during the run raises
`TrainingDiverged`, also a UserError: the run_*.py entry points print it as one line
(the remedy is a config change), while every other exception stays a bug with its
traceback.
"""

import re

from sd_func import backend, data, lora
from sd_func.checkpoint import lora_files
from sd_func.diffusion import losses
from sd_func.errors import UserError
from sd_func.models.unet import REMAT
from sd_func.train import lr as lr_lib


class TrainingDiverged(UserError):
    """The loss or the parameters stopped being finite; the message says where and what to change."""


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get(section, key: str, where: str):
    if key not in section:
        raise UserError(f"{where}.{key} is missing from the config")
    return section[key]


def _check(section, where: str, key: str, ok, expected: str, *, integer: bool = False, optional: bool = False):
    if optional and key not in section:
        return
    v = _get(section, key, where)
    if not _number(v) or (integer and float(v) != int(v)) or not ok(v):
        raise UserError(f"{where}.{key}={v!r}: expected {expected}")


def _choice(section, where: str, key: str, choices) -> None:
    v = _get(section, key, where)
    if v not in choices:
        raise UserError(f"{where}.{key}={v!r}: expected one of {tuple(choices)}")


def _optimizer(s, where: str) -> None:
    """The fields every stage's step and optimizer (train.optim.from_config) read."""
    _check(s, where, "steps", lambda v: v >= 0, "an integer >= 0", integer=True)
    _check(s, where, "batch_size", lambda v: v >= 1, "an integer >= 1", integer=True)
    _check(s, where, "lr", lambda v: v > 0, "a number > 0")
    _check(s, where, "warmup", lambda v: v >= 0, "an integer >= 0", integer=True)
    _choice(s, where, "lr_schedule", lr_lib.SCHEDULES)
    _check(s, where, "lr_min", lambda v: v >= 0, "a number >= 0", optional=True)
    _check(s, where, "adam_b1", lambda v: 0 <= v < 1, "a number in [0, 1)")
    _check(s, where, "adam_b2", lambda v: 0 <= v < 1, "a number in [0, 1)")
    _check(s, where, "adam_eps", lambda v: v > 0, "a number > 0")
    _check(s, where, "weight_decay", lambda v: v >= 0, "a number >= 0")
    _check(s, where, "grad_clip", lambda v: v >= 0, "a number >= 0 (0: no clipping)")
    exclude = s.get("weight_decay_exclude", "") or ""
    try:
        re.compile(exclude)
    except (re.error, TypeError) as e:
        raise UserError(f"{where}.weight_decay_exclude={exclude!r}: not a regular expression ({e})") from None
    _choice(s, where, "precision", backend.PRECISIONS)
    if s.precision == "fp16":
        _check(s, where, "loss_scale_init", lambda v: v > 0, "a number > 0")
        _check(s, where, "loss_scale_window", lambda v: v >= 1, "an integer >= 1", integer=True)
    if not isinstance(_get(s, "compile", where), bool):
        raise UserError(f"{where}.compile={s.compile!r}: expected True or False")
    for key in ("log_every", "checkpoint_every"):
        _check(s, where, key, lambda v: v >= 0, "an integer >= 0 (0: never)", integer=True)


def _lora(s, where: str = "config.lora") -> None:
    _check(s, where, "rank", lambda v: v >= 0, "an integer >= 0 (0: no LoRA, a full fine-tune)", integer=True)
    if s.rank:
        _check(s, where, "alpha", lambda v: v > 0, "a number > 0", optional=True)
        target = s.get("target", "attn")
        try:
            re.compile(lora.target_regex(target))
        except (re.error, TypeError) as e:
            raise UserError(f"{where}.target={target!r}: not target names ({', '.join(lora.TARGETS)}) nor a "
                            f"regular expression ({e})") from None
        if s.get("format", "diffusers") not in lora_files.FORMATS:
            raise UserError(f"{where}.format={s.format!r}: expected one of {lora_files.FORMATS}")


def check_remat(t, where: str = "config.train") -> None:
    """remat is one of unet.REMAT, and only with an eager step: the compiled step differentiates
    with torch.func, whose transforms refuse the saved-tensor hooks of torch.utils.checkpoint."""
    remat = t.get("remat", "none")
    if remat not in REMAT:
        raise UserError(f"{where}.remat={remat!r}: expected one of {REMAT}")
    if remat != "none" and t.compile:
        raise UserError(f"{where}.remat={remat!r} needs {where}.compile=False (torch.func, the compiled "
                        "step's autodiff, does not support activation checkpointing)")


def validate(cfg) -> None:
    """Raise a one-line UserError for the first bad value in cfg.train, cfg.vae_train or cfg.data."""
    t, where = _get(cfg, "train", "config"), "config.train"
    _optimizer(t, where)
    _check(t, where, "ema_decay", lambda v: 0 <= v <= 1, "a number in [0, 1]")
    _check(t, where, "cond_drop", lambda v: 0 <= v <= 1, "a probability in [0, 1]")
    _check(t, where, "min_snr_gamma", lambda v: v >= 0, "a number >= 0 (0: off)", optional=True)
    _check(t, where, "noise_offset", lambda v: v >= 0, "a number >= 0 (0: off)", optional=True)
    _check(t, where, "sample_every", lambda v: v >= 0, "an integer >= 0 (0: never)", integer=True)
    _check(t, where, "keep_checkpoints", lambda v: v >= 0, "an integer >= 0 (0: keep all)", integer=True)
    _check(t, where, "prior_loss_weight", lambda v: v >= 0, "a number >= 0", optional=True)
    if "lora" in cfg:
        _lora(cfg.lora)
    _check(t, where, "grad_accum", lambda v: v >= 1, "an integer >= 1", integer=True, optional=True)
    check_remat(t, where)
    if not isinstance(t.get("shard_optimizer", False), bool):
        raise UserError(f"{where}.shard_optimizer={t.shard_optimizer!r}: expected True or False")
    if int(t.batch_size) % int(t.get("grad_accum", 1)):
        raise UserError(f"{where}.batch_size={t.batch_size} is not divisible by {where}.grad_accum={t.grad_accum}")
    if "vae_train" in cfg:
        v, where = cfg.vae_train, "config.vae_train"
        _optimizer(v, where)
        _check(v, where, "kl_weight", lambda x: x >= 0, "a number >= 0")
    d = _get(cfg, "data", "config")
    _choice(d, "config.data", "kind", sorted(data.KINDS))
    if d.kind != "latents" and "vae" in cfg:  # precached latents carry their own shape
        r, f = d.get("resolution"), 2 ** (len(cfg.vae.block_out_channels) - 1)
        if not _number(r) or r < 1 or int(r) != r or r % f:
            raise UserError(f"config.data.resolution={r!r}: expected a positive multiple of the VAE's "
                            f"downsampling factor {f}")
        table = data.buckets.resolve(d) or []
        if table and d.kind not in ("folder", "webdataset"):
            raise UserError(f"config.data.buckets={d.buckets!r}: aspect-ratio buckets work with kind 'folder', "
                            f"'webdataset' (and 'latents' precached from a folder), not {d.kind!r}")
        bad = [hw for hw in table if hw[0] % f or hw[1] % f]
        if bad:
            raise UserError(f"config.data.buckets: {bad[0][0]}x{bad[0][1]} is not a multiple of the VAE's "
                            f"downsampling factor {f}")
    if "diffusion" in cfg:
        _choice(cfg.diffusion, "config.diffusion", "prediction_type", losses.PREDICTION_TYPES)
