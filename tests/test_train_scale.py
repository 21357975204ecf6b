"""Gradient accumulation and activation checkpointing on configs/tiny.py (one process).

- config.train.grad_accum: a step over k micro-batches equals the step over the whole batch
  (params, EMA and AdamW state after 3 steps within 1e-5), eager and compiled (aot_eager).
- config.train.remat / unet.apply(..., remat=): gradients equal remat="none" (to 1e-6; the
  recomputation runs the same kernels), the saved activations shrink, a compiled UNet call
  (autograd backward) remats too (`slow`); the compiled train step refuses it in one line.
(ZeRO-1 on 2 and 4 processes: tests/test_sharding.py.)
"""

import pytest
import test_train_step as base
import torch

from configs import tiny
from sd_func import random, tree
from sd_func.errors import UserError
from sd_func.models import unet
from sd_func.train import checks, unet_stage

B, _max_diff = base.B, base._max_diff
models, _one_thread = base.models, base._one_thread  # the same tiny models (fixture), one thread


def _cfg(**train):
    cfg = tiny.get_config()
    # lr 1e-4: AdamW magnifies the rounding of gradients below eps (see tests/test_distributed.py);
    # noise offset, min-SNR and cond drop put every per-example input through the micro-batch split.
    cfg.train.update(compile=False, cond_drop=0.5, grad_clip=0.5, lr=1e-4, noise_offset=0.1, min_snr_gamma=5.0)
    cfg.train.update(**train)
    return cfg


def _run(cfg, models, steps):
    state, tx, lay = unet_stage.init(cfg, models["unet"])
    fn = unet_stage.make_train_step(cfg, tx, lay, backend="aot_eager")
    history = []
    for s in range(steps):
        batch = {"images": models["images"], "input_ids": models["input_ids"],
                 **unet_stage.step_inputs(cfg, random.key(3), s, range(B), unet_stage.latent_shape(cfg))}
        state, m = fn(state, models["frozen"], batch)
        history.append({k: float(v) for k, v in m.items()})
    return state, history


@pytest.fixture(scope="module")
def whole_batch(models):
    return _run(_cfg(), models, 3)


@pytest.mark.parametrize("accum,compiled", [(2, False), (4, False), (2, True)])
def test_grad_accum_equals_whole_batch(models, whole_batch, accum, compiled):
    want, h_want = whole_batch
    got, h_got = _run(_cfg(grad_accum=accum, compile=compiled), models, 2 if compiled else 3)
    n = len(h_got)
    for name in ("params", "ema", "opt"):
        # after 3 steps (2 compiled: one trace of k unrolled micro-steps): measured 2.6e-6 / 4.2e-6
        ref = want[name] if n == 3 else _run(_cfg(), models, n)[0][name]
        assert _max_diff(got[name], ref) < 1e-5, name
    for m, ref in zip(h_got, h_want):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5)   # the mean of the micro-batch means
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)


def test_grad_accum_bad_split_is_one_line(models):
    with pytest.raises(UserError, match="grad_accum=3"):
        _run(_cfg(grad_accum=3), models, 1)
    bad = _cfg(grad_accum=3)
    bad.train.batch_size = 8
    with pytest.raises(UserError, match=r"batch_size=8 is not divisible by config.train.grad_accum=3"):
        checks.validate(bad)


def _unet_grads(models, remat, compiled=False):
    """(grads of a UNet loss by autograd, bytes autograd saved for backward outside the remat regions)."""
    cfg = tiny.get_config()
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    fn = lambda p: unet.apply(p, x, torch.tensor([10, 500]), c, cfg.unet, remat=remat).square().mean()
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = {k: v.detach().requires_grad_(True) for k, v in tree.flatten(models["unet"]).items()}
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(tree.unflatten(leaves))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads)), saved[0]


# saved bytes / remat="none", measured on the tiny UNet: attention 0.64, resnets 0.49, all 0.13
_SAVED = {"attention": 0.8, "resnets": 0.6, "all": 0.2}


@pytest.mark.parametrize("remat", ["attention", "resnets", "all"])
def test_remat_gradients_equal_and_fewer_saved_activations(models, remat):
    g0, n0 = _unet_grads(models, "none")
    g, n = _unet_grads(models, remat)
    assert max(float((g[k] - g0[k]).abs().max()) for k in g) < 1e-6
    assert n < _SAVED[remat] * n0, (remat, n / n0)


@pytest.mark.slow  # one Dynamo + AOTAutograd compile of the UNet with remat (~40 s on 2 busy cores)
def test_remat_in_a_compiled_unet_call(models):
    g0, _ = _unet_grads(models, "none")
    g, _ = _unet_grads(models, "all", compiled=True)
    assert max(float((g[k] - g0[k]).abs().max()) for k in g) < 1e-6


def test_remat_train_step_equals_plain_and_refuses_compile(models):
    want, _ = _run(_cfg(grad_accum=2), models, 1)
    got, _ = _run(_cfg(remat="all", grad_accum=2), models, 1)   # each micro-batch recomputes
    assert _max_diff(got["params"], want["params"]) < 1e-6
    with pytest.raises(UserError, match=r"remat='all' needs config.train.compile=False"):
        _run(_cfg(remat="all", compile=True), models, 1)
    with pytest.raises(UserError, match="remat='some'"):
        unet.apply(models["unet"], torch.zeros(1, 4, 16, 16), 1, torch.zeros(1, 77, 32), tiny.get_config().unet,
                   remat="some")
