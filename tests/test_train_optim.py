"""The optimizer transforms (sd_func.train.optim) against torch.optim.AdamW + clip_grad_norm_,
the fp16 loss-scale wrapper's rule, the flat layout and its state trees, and the VAE stage's
step (the same make_step, its optimizer numbers from cfg.vae_train) against autograd +
torch.optim.AdamW on the same loss.
"""

import re

import pytest
import torch

from configs import shapes
from sd_func import random, tree
from sd_func.errors import UserError
from sd_func.models import autoencoder
from sd_func.train import optim, vae_stage

EXCLUDE = r".*(bias|norm.*)$"


def _params():
    g = torch.Generator().manual_seed(0)
    return {"conv": {"weight": torch.randn(6, 3, generator=g), "bias": torch.randn(6, generator=g)},
            "norm1": {"weight": torch.randn(6, generator=g)}, "proj": {"weight": torch.randn(2, 6, generator=g)}}


def _torch_adamw(params: dict, grads_seq: list, *, lr, b1, b2, eps, wd, max_norm):
    """torch.optim.AdamW (decay / no-decay groups by EXCLUDE) + clip_grad_norm_, as a user writes it."""
    ref = {k: v.clone().requires_grad_(True) for k, v in tree.flatten(params).items()}
    decay = [v for k, v in ref.items() if not re.fullmatch(EXCLUDE, k)]
    rest = [v for k, v in ref.items() if re.fullmatch(EXCLUDE, k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(b1, b2), eps=eps, foreach=False)
    for grads in grads_seq:
        for k, v in ref.items():
            v.grad = grads[k].clone()
        torch.nn.utils.clip_grad_norm_(list(ref.values()), max_norm)
        opt.step()
    return ref, opt


def test_chain_clip_adamw_matches_torch():
    params = _params()
    g = torch.Generator().manual_seed(1)
    grads_seq = [{k: torch.randn(v.shape, generator=g) * 3 for k, v in tree.flatten(params).items()}
                 for _ in range(5)]
    hp = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, max_norm=1.0)
    ref, torch_opt = _torch_adamw(params, grads_seq, **hp)

    lay = optim.layout(params, EXCLUDE)
    assert lay.paths[:2] == ("conv/weight", "proj/weight") and lay.n_decay == 18 + 12 and lay.numel == 42
    tx = optim.chain(optim.clip_by_global_norm(hp["max_norm"]),
                     optim.adamw(lambda step: torch.tensor(hp["lr"]), b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
                                 weight_decay=hp["wd"], n_decay=lay.n_decay))
    p = optim.flatten(params, lay)
    state = tx.init(p)
    assert set(state) == {"adamw"}  # clipping keeps no state
    for i, grads in enumerate(grads_seq):
        updates, state = tx.update(optim.flatten(tree.unflatten(grads), lay), state, p, torch.tensor(i))
        p = optim.apply_updates(p, updates)
    got = tree.flatten(optim.unflatten(p, lay))
    trees = optim.state_to_trees(state, lay)
    mu, nu = tree.flatten(trees["adamw"]["mu"]), tree.flatten(trees["adamw"]["nu"])
    assert list(got) == list(tree.flatten(params))  # the tree's own order back
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(mu[k], torch_opt.state[v]["exp_avg"], atol=1e-7, rtol=0)
        torch.testing.assert_close(nu[k], torch_opt.state[v]["exp_avg_sq"], atol=1e-7, rtol=0)
        assert int(trees["adamw"]["count"]) == int(torch_opt.state[v]["step"]) == 5


def test_loss_scale_skips_halves_and_grows():
    p = torch.ones(4)
    sgd = optim.Transform("sgd", lambda p: {"n": torch.zeros((), dtype=torch.int64)},
                          lambda g, s, p, step: (-0.5 * g, {"n": s["n"] + 1}))
    tx = optim.dynamic_loss_scale(sgd, init_scale=8.0, window=2)
    state = tx.init(p)
    assert float(optim.loss_scale(state)) == 8.0 and int(optim.skipped_steps(state)) == 0
    u, state = tx.update(torch.ones(4), state, p, torch.tensor(0))
    assert torch.equal(u, torch.full((4,), -0.5)) and int(state["n"]) == 1
    assert float(optim.loss_scale(state)) == 8.0 and int(state["loss_scale"]["good_steps"]) == 1
    u, state = tx.update(torch.ones(4), state, p, torch.tensor(1))  # window 2: the scale doubles
    assert float(optim.loss_scale(state)) == 16.0 and int(state["loss_scale"]["good_steps"]) == 0
    bad = torch.tensor([1.0, float("inf"), 0.0, float("nan")])
    u, state = tx.update(bad, state, p, torch.tensor(2))
    assert torch.equal(u, torch.zeros(4)) and int(state["n"]) == 2  # inner state kept
    assert float(optim.loss_scale(state)) == 8.0 and int(optim.skipped_steps(state)) == 1
    assert optim.loss_scale(sgd.init(p)) is None and optim.skipped_steps(sgd.init(p)) is None


def test_layout_views_and_state_trees():
    params = _params()
    lay = optim.layout(params, EXCLUDE)
    flat = optim.flatten(params, lay)
    views = optim.unflatten(flat, lay)
    # Views of one vector flatten for free (same storage); anything else is copied.
    assert optim.flatten(views, lay).data_ptr() == flat.data_ptr()
    assert optim.flatten(params, lay).data_ptr() != flat.data_ptr()
    tx = optim.from_config(shapes.get_config().vae_train, lay)
    template = optim.template(tx, lay)
    assert tree.leaves(template)[0].device.type == "meta"
    state = optim.state_to_trees(tx.init(flat), lay)
    assert sorted(tree.flatten(state)) == sorted(
        ["adamw/count"] + [f"adamw/{m}/{k}" for m in ("mu", "nu") for k in tree.flatten(params)])
    back = optim.state_to_flat(state, template, lay)
    assert back["adamw"]["mu"].shape == (lay.numel,) and back["adamw"]["count"].shape == ()
    with pytest.raises(ValueError, match="expects"):
        optim.state_to_flat({"adam": state["adamw"]}, template, lay)
    with pytest.raises(UserError, match="weight_decay_exclude"):
        optim.layout(params, "(unclosed")


def _vae_cfg():
    cfg = shapes.get_config("smoke")
    # Values unlike the defaults: each must reach the optimizer from cfg.vae_train.
    cfg.vae_train.update(lr=3e-3, warmup=0, adam_b1=0.8, adam_b2=0.95, adam_eps=1e-6, weight_decay=0.1,
                         weight_decay_exclude=EXCLUDE, grad_clip=0.05)
    return cfg


def test_vae_stage_step_matches_torch_adamw():
    cfg = _vae_cfg()
    tc, steps = cfg.vae_train, 3
    params = autoencoder.init(random.key(1), cfg.vae)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(2, 3, 64, 64, generator=g) * 2 - 1 for _ in range(steps)]
    noise = [torch.randn(2, 4, 16, 16, generator=g) for _ in range(steps)]

    state, tx, lay = vae_stage.init(cfg, params)
    step_fn = vae_stage.make_step(cfg, tx, lay)
    for s in range(steps):
        state, m = step_fn(state, {}, {"images": images[s], "noise": noise[s]})
    assert set(m) >= {"loss", "l1", "kl", "grad_norm", "lr"} and float(m["lr"]) == pytest.approx(tc.lr)

    ref = {k: v.clone().requires_grad_(True) for k, v in tree.flatten(params).items()}
    decay = [v for k, v in ref.items() if not re.fullmatch(EXCLUDE, k)]
    rest = [v for k, v in ref.items() if re.fullmatch(EXCLUDE, k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.adam_b1, tc.adam_b2), eps=tc.adam_eps, foreach=False)
    for s in range(steps):
        opt.zero_grad()
        loss, _ = vae_stage.vae_loss(tree.unflatten(ref), images[s], noise[s], cfg.vae, tc.kl_weight)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), tc.grad_clip)
        assert float(norm) > 5 * tc.grad_clip  # clipping is active
        opt.step()
    got = tree.flatten(state["params"])
    err = max(float((got[k] - v.detach()).abs().max()) for k, v in ref.items())
    assert err < 1e-6, err
