"""The pure train step on configs/tiny.py: compiled == eager, the loss falls, fp16 skips,
functional AdamW == torch.optim.AdamW, LR schedules vs diffusers', min-SNR vs its formula.

The compiled-step test traces the whole step once per session with the "aot_eager"
backend (Dynamo fullgraph + AOTAutograd: the same single graph inductor gets, without
C++ codegen, which costs minutes on 2 cores); the inductor run is the `slow` test.
"""

import math

import pytest
import torch

from configs import tiny
from sd_func import random, tree
from sd_func.diffusion import losses, schedules
from sd_func.models import autoencoder, text_encoder, unet
from sd_func.train import lr as lr_lib
from sd_func.train import optim
from sd_func.train import state as train_state
from sd_func.train import step as train_step

B = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the CI machine has 2 shared cores, and oversubscription is slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**train):
    cfg = tiny.get_config()
    cfg.train.update(compile=False, **train)
    return cfg


@pytest.fixture(scope="module")
def models():
    cfg = tiny.get_config()
    g = torch.Generator().manual_seed(0)
    return {
        "unet": unet.init(random.key(0), cfg.unet),
        "frozen": {"vae": autoencoder.init(random.key(1), cfg.vae),
                   "text_encoder": text_encoder.init(random.key(2), cfg.text_encoder),
                   "uncond_ids": torch.tensor([0, 1] + [1] * 75)},
        "images": torch.rand(B, 3, 32, 32, generator=g) * 2 - 1,
        "input_ids": torch.randint(2, 1000, (B, 77), generator=g),
    }


def _batch(cfg, models, step, key=0):
    inputs = train_step.step_inputs(cfg, random.key(key), step, range(B), train_step.latent_shape(cfg))
    return {"images": models["images"], "input_ids": models["input_ids"], **inputs}


def _run(cfg, models, steps, **kw):
    fn = train_step.make_train_step(cfg, **kw)
    state = train_state.init_state(cfg, models["unet"])
    history = []
    for s in range(steps):
        state, metrics = fn(state, models["frozen"], _batch(cfg, models, s))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def _max_diff(a, b):
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    return max(float((fa[k] - fb[k]).abs().max()) for k in fa)


# v-prediction, min-SNR, noise offset and cond drop: every branch of the loss in the trace.
_TRACED = dict(min_snr_gamma=5.0, noise_offset=0.1, cond_drop=0.5, grad_clip=0.5, warmup=3)


@pytest.fixture(scope="module")
def compiled_and_eager(models):
    def cfg(compile_):
        c = _cfg(**_TRACED)
        c.diffusion.prediction_type = "v_prediction"
        c.train.compile = compile_
        return c
    return _run(cfg(True), models, 2, backend="aot_eager"), _run(cfg(False), models, 2)


def test_compiled_step_equals_eager(compiled_and_eager):
    (s_c, h_c), (s_e, h_e) = compiled_and_eager
    assert _max_diff(s_c["params"], s_e["params"]) < 1e-5
    assert _max_diff(s_c["ema"], s_e["ema"]) < 1e-5
    assert _max_diff(s_c["opt"], s_e["opt"]) < 1e-5
    assert int(s_c["step"]) == int(s_e["step"]) == 2
    for mc, me in zip(h_c, h_e):
        for k in me:
            assert mc[k] == pytest.approx(me[k], rel=1e-4, abs=1e-6), k
    assert h_e[1]["lr"] == pytest.approx(2 / 4 * 1e-3)  # NeMo warmup (s+1)/(warmup+1)


@pytest.mark.slow
def test_inductor_step_equals_eager(models):
    cfg = _cfg(**_TRACED)
    s_e, _ = _run(cfg, models, 2)
    cfg.train.compile = True
    s_c, _ = _run(cfg, models, 2)
    assert _max_diff(s_c["params"], s_e["params"]) < 1e-5


def test_loss_falls_and_ema(models):
    cfg = _cfg(cond_drop=0.0, warmup=0, ema_decay=0.9)
    state0 = train_state.init_state(cfg, models["unet"])
    state, h = _run(cfg, models, 30)
    first, last = sum(m["loss"] for m in h[:5]) / 5, sum(m["loss"] for m in h[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(m["grad_norm"]) and m["update_norm"] > 0 for m in h)
    assert int(state["step"]) == 30 and h[-1]["skipped"] == 0
    # The EMA moved from the init towards the params, and lags them.
    d_ema = _max_diff(state["ema"], state0["ema"])
    assert 0 < d_ema < _max_diff(state["params"], state0["params"])


def test_fp16_inf_gradients_skip_the_update(models):
    cfg = _cfg(precision="fp16", loss_scale_window=1)
    fn = train_step.make_train_step(cfg)
    state = train_state.init_state(cfg, models["unet"])
    state["loss_scale"]["scale"] = torch.tensor(2.0**100)  # overflows fp16 activation grads
    new, m = fn(state, models["frozen"], _batch(cfg, models, 0))
    assert not math.isfinite(float(m["grad_norm"]))
    for name in ("params", "opt", "ema"):
        assert _max_diff(new[name], state[name]) == 0.0, name
    assert int(new["step"]) == 1 and int(new["loss_scale"]["skipped"]) == 1 and float(m["skipped"]) == 1
    assert float(new["loss_scale"]["scale"]) == 2.0**99 == float(m["loss_scale"])
    # A finite step at a sane scale updates and (window 1) doubles the scale.
    new["loss_scale"]["scale"] = torch.tensor(2.0**10)
    newer, m = fn(new, models["frozen"], _batch(cfg, models, 1))
    assert math.isfinite(float(m["grad_norm"])) and float(m["update_norm"]) > 0
    assert float(newer["loss_scale"]["scale"]) == 2.0**11 and int(newer["loss_scale"]["skipped"]) == 1


def test_step_inputs_depend_on_global_index_only():
    cfg = _cfg(noise_offset=0.1)
    shape = train_step.latent_shape(cfg)
    assert shape == (4, 16, 16)
    whole = train_step.step_inputs(cfg, 7, 3, range(4), shape)
    half = train_step.step_inputs(cfg, 7, 3, range(2, 4), shape)
    for k in whole:
        assert torch.equal(whole[k][2:], half[k]), k
    other = train_step.step_inputs(cfg, 7, 4, range(4), shape)
    assert not torch.equal(whole["noise"], other["noise"])
    assert whole["timesteps"].dtype == torch.int64 and whole["drop"].dtype == torch.bool


def test_functional_adamw_matches_torch():
    g = torch.Generator().manual_seed(0)
    params = {"conv/weight": torch.randn(6, 3, generator=g), "conv/bias": torch.randn(6, generator=g),
              "norm1/weight": torch.randn(6, generator=g)}
    grads_seq = [{k: torch.randn(v.shape, generator=g) * 3 for k, v in params.items()} for _ in range(5)]
    lr, wd, max_norm = 1e-2, 0.1, 1.0
    # Reference: torch.optim.AdamW with two parameter groups + clip_grad_norm_.
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch_opt = torch.optim.AdamW([{"params": [ref["conv/weight"]], "weight_decay": wd},
                                   {"params": [ref["conv/bias"], ref["norm1/weight"]], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.99), eps=1e-8, foreach=False)
    for grads in grads_seq:
        for k, v in ref.items():
            v.grad = grads[k].clone()
        torch.nn.utils.clip_grad_norm_(list(ref.values()), max_norm)
        torch_opt.step()

    tree_params = tree.unflatten(params)
    mask = tree.flatten(optim.decay_mask(tree_params, r".*(bias|norm.*)$"))
    assert mask == {"conv/weight": True, "conv/bias": False, "norm1/weight": False}
    keys, st = list(params), optim.init(tree_params)
    p = [params[k] for k in keys]
    mu, nu = [tree.flatten(st["mu"])[k] for k in keys], [tree.flatten(st["nu"])[k] for k in keys]
    for i, grads in enumerate(grads_seq):
        gl = [grads[k] for k in keys]
        norm = optim.global_norm(gl)
        assert float(norm) == pytest.approx(float(torch.cat([x.flatten() for x in gl]).norm()), rel=1e-6)
        gl = optim.clip_by_global_norm(gl, norm, max_norm)
        p, mu, nu = optim.adamw(p, gl, mu, nu, [mask[k] for k in keys], torch.tensor(i + 1),
                                torch.tensor(lr), b1=0.9, b2=0.99, eps=1e-8, weight_decay=wd)
    for i, k in enumerate(keys):
        assert torch.allclose(p[i], ref[k].detach(), atol=1e-6, rtol=0), k
        assert torch.allclose(mu[i], torch_opt.state[ref[k]]["exp_avg"], atol=1e-7, rtol=0), k
        assert torch.allclose(nu[i], torch_opt.state[ref[k]]["exp_avg_sq"], atol=1e-7, rtol=0), k

    # The flat-vector form the train step uses (decayed leaves first in the layout).
    lay = optim.layout(tree_params, r".*(bias|norm.*)$")
    assert lay.paths[0] == "conv/weight" and lay.n_decay == 18 and lay.numel == 30
    fp = optim.flatten(tree_params, lay)
    fmu, fnu = torch.zeros_like(fp), torch.zeros_like(fp)
    for i, grads in enumerate(grads_seq):
        fg = optim.flatten(tree.unflatten(grads), lay)
        fg = fg * torch.clamp(max_norm / (fg.norm() + 1e-6), max=1.0)
        fp, fmu, fnu = optim.adamw_flat(fp, fg, fmu, fnu, torch.tensor(i + 1), torch.tensor(lr), b1=0.9, b2=0.99,
                                        eps=1e-8, weight_decay=wd, n_decay=lay.n_decay)
    got = tree.flatten(optim.unflatten(fp, lay))
    assert list(got) == keys  # the tree's own order back
    for k in keys:
        assert torch.allclose(got[k], ref[k].detach(), atol=1e-6, rtol=0), k
    # Views of one vector flatten for free (same storage), anything else is copied.
    assert optim.flatten(optim.unflatten(fp, lay), lay).data_ptr() == fp.data_ptr()
    assert optim.flatten(tree_params, lay).data_ptr() != fp.data_ptr()


def test_lr_schedules():
    c = _cfg(lr=1.0, warmup=4, steps=20, lr_schedule="constant").train
    assert [float(lr_lib.schedule(c, s)) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    c = _cfg(lr=1.0, warmup=2, steps=12, lr_schedule="linear").train
    assert [float(lr_lib.schedule(c, s)) for s in (0, 2, 7, 12, 30)] == pytest.approx([1 / 3, 1, 0.5, 0, 0], abs=1e-6)
    # No warmup: the same curves as diffusers' schedulers (LambdaLR multipliers).
    from diffusers.optimization import (
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )
    for kind, ref_fn in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        c = _cfg(lr=1.0, warmup=0, steps=10, lr_schedule=kind).train
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        ref = ref_fn(opt, 0, 10)
        want = [fn(s) for s in range(11) for fn in ref.lr_lambdas]
        assert [float(lr_lib.schedule(c, s)) for s in range(11)] == pytest.approx(want, abs=1e-6), kind
        assert float(lr_lib.schedule(c, 15)) == 0.0  # held at lr_min after `steps`
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lib.schedule(_cfg(lr_schedule="exp").train, 0)


def test_min_snr_weights_and_loss_formula():
    dcfg = schedules.config()
    ac = schedules.alphas_cumprod(dcfg)
    t = torch.tensor([0, 10, 250, 500, 999])
    ab = ac[t]
    snr = ab / (1 - ab)
    gamma = 5.0
    want = {"epsilon": torch.minimum(snr, torch.tensor(gamma)) / snr,
            "v_prediction": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1),
            "sample": torch.minimum(snr, torch.tensor(gamma))}
    for kind, w in want.items():
        assert torch.allclose(losses.min_snr_weight(losses.snr(ab), gamma, kind), w, rtol=1e-6), kind
    # With a model that predicts 0 the loss is the weighted mean square of the target.
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    zero = lambda x, tt: torch.zeros_like(x)
    for kind in want:
        a = ab[:, None, None, None]
        tgt = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[kind]
        expect = (want[kind] * tgt.pow(2).mean(dim=(1, 2, 3))).mean()
        got = losses.diffusion_loss(zero, x0, eps, t, ac, kind, min_snr_gamma=gamma)
        assert float(got) == pytest.approx(float(expect), rel=1e-5), kind
    # Noise offset: the target eps gains offset * offset_noise per (example, channel).
    off = torch.randn(5, 4, generator=g)
    got = losses.diffusion_loss(zero, x0, eps, t, ac, "epsilon", noise_offset=0.1, offset_noise=off)
    assert float(got) == pytest.approx(float((eps + 0.1 * off[:, :, None, None]).pow(2).mean()), rel=1e-5)


def test_precached_batch_equals_image_batch(models):
    """Moments + context computed on the host give the step the same update as images + ids."""
    cfg = _cfg(cond_drop=0.5)
    fn = train_step.make_train_step(cfg)
    state = train_state.init_state(cfg, models["unet"])
    batch = _batch(cfg, models, 0)
    assert batch["drop"].any() and not batch["drop"].all()
    fz = models["frozen"]
    mean, logvar = autoencoder.encode(fz["vae"], batch["images"], cfg.vae)
    precached = {k: v for k, v in batch.items() if k not in ("images", "input_ids")}
    precached["moments"] = torch.cat([mean, logvar], dim=1)
    precached["context"] = text_encoder.apply(fz["text_encoder"], batch["input_ids"], cfg.text_encoder)
    empty = text_encoder.apply(fz["text_encoder"], fz["uncond_ids"][None], cfg.text_encoder)
    s_img, m_img = fn(state, fz, batch)
    s_pre, m_pre = fn(state, {"uncond_context": empty}, precached)
    assert float(m_pre["loss"]) == pytest.approx(float(m_img["loss"]), rel=1e-5)
    assert _max_diff(s_pre["params"], s_img["params"]) < 1e-6


def test_trained_text_encoder(models):
    cfg = _cfg(train_text_encoder=True)
    fz = dict(models["frozen"])
    te = fz.pop("text_encoder")
    state = train_state.init_state(cfg, models["unet"], te)
    new, _ = train_step.make_train_step(cfg)(state, fz, _batch(cfg, models, 0))
    assert set(new["params"]) == set(new["ema"]) == set(new["opt"]["mu"]) == {"unet", "text_encoder"}
    assert _max_diff(new["params"]["text_encoder"], state["params"]["text_encoder"]) > 0


def test_bad_inputs_raise_clear_errors(models):
    cfg = _cfg()
    fn = train_step.make_train_step(cfg)
    state = train_state.init_state(cfg, models["unet"])
    batch = _batch(cfg, models, 0)
    with pytest.raises(ValueError, match="uncond"):
        fn(state, {k: v for k, v in models["frozen"].items() if k != "uncond_ids"}, batch)
    with pytest.raises(ValueError, match="lacks"):
        fn(state, models["frozen"], {k: v for k, v in batch.items() if k != "noise"})
    with pytest.raises(ValueError, match="precision"):
        train_step.make_train_step(_cfg(precision="fp8"))
    with pytest.raises(ValueError, match="train_text_encoder"):
        train_state.init_state(cfg, models["unet"], models["frozen"]["text_encoder"])


def test_eager_grad_and_value_equals_torch_func():
    """train.autodiff (autograd on detached leaves) == torch.func.grad_and_value, inputs untouched."""
    from sd_func.nn import group_norm
    from sd_func.train import autodiff

    g = torch.Generator().manual_seed(0)
    params = {"a": {"weight": torch.rand(8, generator=g) + 0.5, "bias": torch.randn(8, generator=g)},
              "w": torch.randn(8, 8, generator=g), "unused": torch.randn(3, generator=g)}
    x = torch.randn(2, 8, 4, 4, generator=g)

    def fn(p):
        h = group_norm(p["a"], x, 4)
        v = torch.einsum("bchw,cd->bdhw", h, p["w"]).square().mean()
        return v, {"half": v / 2}

    ours, (value, aux) = autodiff.grad_and_value(fn, params)
    ref, (ref_value, ref_aux) = torch.func.grad_and_value(fn, has_aux=True)(params)
    for k, v in tree.flatten(ref).items():
        torch.testing.assert_close(tree.flatten(ours)[k], v, rtol=1e-6, atol=1e-7)
    assert torch.equal(tree.flatten(ours)["unused"], torch.zeros(3))
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(aux["half"], ref_aux["half"])
    assert not value.requires_grad and not aux["half"].requires_grad
    assert not any(v.requires_grad for v in tree.leaves(params))
