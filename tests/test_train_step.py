"""The UNet stage's pure train step on configs/tiny.py: compiled == eager, the loss falls,
fp16 skips, bf16 / fp16 within tolerance of fp32, no process-wide side effect, LR schedules
vs diffusers', min-SNR vs its formula. (The optimizer transforms against torch.optim.AdamW:
tests/test_train_optim.py; a whole step against diffusers: tests/test_train_reference.py.)

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
from sd_func.errors import UserError
from sd_func.models import autoencoder, text_encoder, unet
from sd_func.train import lr as lr_lib
from sd_func.train import unet_stage

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
    inputs = unet_stage.step_inputs(cfg, random.key(key), step, range(B), unet_stage.latent_shape(cfg))
    return {"images": models["images"], "input_ids": models["input_ids"], **inputs}


def _init(cfg, models, **kw):
    """(state, step fn) of the UNet stage for cfg."""
    state, tx, lay = unet_stage.init(cfg, models["unet"], **kw)
    return state, unet_stage.make_train_step(cfg, tx, lay)


def _run(cfg, models, steps, **kw):
    state, tx, lay = unet_stage.init(cfg, models["unet"])
    fn = unet_stage.make_train_step(cfg, tx, lay, **kw)
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
    """Inductor's fused kernels round the gradient differently from eager ATen. The moments
    (running averages of the gradient) agree to 1e-4 of their largest entry; the params to what AdamW
    allows: it moves an entry by lr * m/(sqrt(v) + eps), up to lr/eps times its gradient's
    rounding error, so entries whose gradient is below eps = 1e-8 differ by a fraction of lr
    (measured 1.04e-5 = 0.02 * lr here; see tests/test_train_loop.py::test_two_processes_match_one)."""
    cfg = _cfg(**_TRACED)
    s_e, h_e = _run(cfg, models, 2)
    cfg.train.compile = True
    s_c, h_c = _run(cfg, models, 2)
    lr = max(m["lr"] for m in h_e)
    for name in ("mu", "nu"):
        scale = max(float(v.abs().max()) for v in tree.flatten(s_e["opt"]["adamw"][name]).values())
        # Step 2's gradient is taken at params that already differ (above): measured nu 1.8e-5.
        assert _max_diff(s_c["opt"]["adamw"][name], s_e["opt"]["adamw"][name]) < 1e-4 * scale, name
    for name in ("params", "ema"):
        a, b = tree.flatten(s_c[name]), tree.flatten(s_e[name])
        d = torch.cat([(a[k] - b[k]).reshape(-1) for k in a])
        assert d.abs().max() < lr / 4 and d.square().mean().sqrt() < lr / 100, name
    for mc, me in zip(h_c, h_e):
        assert mc["loss"] == pytest.approx(me["loss"], rel=1e-5)


def test_loss_falls_and_ema(models):
    cfg = _cfg(cond_drop=0.0, warmup=0, ema_decay=0.9)
    state0, _ = _init(cfg, models)
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
    state, fn = _init(cfg, models)
    state["opt"]["loss_scale"]["scale"] = torch.tensor(2.0**100)  # overflows fp16 activation grads
    state["ema"] = tree.tree_map(lambda x: 0.5 * x, state["ema"])  # an EMA apart from the params
    new, m = fn(state, models["frozen"], _batch(cfg, models, 0))
    assert not math.isfinite(float(m["grad_norm"]))
    # A skipped step changes nothing but the step and the scale: params, AdamW (count too), EMA.
    for name in ("params", "ema"):
        assert _max_diff(new[name], state[name]) == 0.0, name
    assert _max_diff(new["opt"]["adamw"], state["opt"]["adamw"]) == 0.0
    ls = new["opt"]["loss_scale"]
    assert int(new["step"]) == 1 and int(ls["skipped"]) == 1 and float(m["skipped"]) == 1
    assert float(ls["scale"]) == 2.0**99 == float(m["loss_scale"])
    # A finite step at a sane scale updates and (window 1) doubles the scale.
    new["opt"]["loss_scale"]["scale"] = torch.tensor(2.0**10)
    newer, m = fn(new, models["frozen"], _batch(cfg, models, 1))
    assert math.isfinite(float(m["grad_norm"])) and float(m["update_norm"]) > 0
    ls = newer["opt"]["loss_scale"]
    assert float(ls["scale"]) == 2.0**11 and int(ls["skipped"]) == 1
    assert int(newer["opt"]["adamw"]["count"]) == 1 and int(newer["step"]) == 2
    assert _max_diff(newer["ema"], new["ema"]) > 0


# Measured on this machine (tiny config, 3 steps at SD's lr 1e-4): bf16 loss 6e-6..1e-4 and
# grad norm 3e-4..2e-3 from fp32, update cosine 0.997, |p - p_fp32| / |p_fp32 - p0| = 0.08;
# fp16 (10 mantissa bits vs bf16's 7) 2e-5..5e-5, 1e-5..3e-4, 0.9997, 0.024. The bounds are
# ~5-10x that: a missing unscale, params kept in half precision (updates of 1e-4 are below
# bf16's resolution of weights ~0.1) or a dropped autocast region break them by orders of
# magnitude, and "differs from fp32 at all" shows the autocast really ran.
_PRECISION_TOL = {"bf16": dict(loss=1e-2, grad_norm=3e-2, cos=0.98, rel=0.3),
                  "fp16": dict(loss=2e-3, grad_norm=1e-2, cos=0.995, rel=0.1)}


@pytest.fixture(scope="module")
def fp32_run(models):
    cfg = _cfg(grad_clip=1.0, cond_drop=0.1, warmup=0, lr=1e-4)
    state0, _ = _init(cfg, models)
    return state0, _run(cfg, models, 3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_steps_stay_near_fp32(models, fp32_run, precision):
    state0, (want, h_want) = fp32_run
    tol = _PRECISION_TOL[precision]
    got, h_got = _run(_cfg(grad_clip=1.0, cond_drop=0.1, warmup=0, lr=1e-4, precision=precision), models, 3)
    for m, ref in zip(h_got, h_want):
        assert m["loss"] != ref["loss"]  # the forward really ran in reduced precision
        assert abs(m["loss"] - ref["loss"]) < tol["loss"] * ref["loss"], (m["loss"], ref["loss"])
        assert abs(m["grad_norm"] - ref["grad_norm"]) < tol["grad_norm"] * ref["grad_norm"]
        assert m["skipped"] == 0
    flat = lambda s: torch.cat([v.reshape(-1) for v in tree.flatten(s["params"]).values()])
    p0, p_want, p_got = flat(state0), flat(want), flat(got)
    cos = torch.nn.functional.cosine_similarity(p_got - p0, p_want - p0, dim=0)
    rel = (p_got - p_want).norm() / (p_want - p0).norm()
    assert cos > tol["cos"] and rel < tol["rel"], (float(cos), float(rel))


def test_step_factory_sets_no_process_wide_switch(models):
    before = torch.get_float32_matmul_precision()
    for precision in ("tf32", "fp32"):
        _, fn = _init(_cfg(precision=precision), models)
        assert torch.get_float32_matmul_precision() == before, precision


def test_step_inputs_depend_on_global_index_only():
    cfg = _cfg(noise_offset=0.1)
    shape = unet_stage.latent_shape(cfg)
    assert shape == (4, 16, 16)
    whole = unet_stage.step_inputs(cfg, 7, 3, range(4), shape)
    half = unet_stage.step_inputs(cfg, 7, 3, range(2, 4), shape)
    for k in whole:
        assert torch.equal(whole[k][2:], half[k]), k
    other = unet_stage.step_inputs(cfg, 7, 4, range(4), shape)
    assert not torch.equal(whole["noise"], other["noise"])
    assert whole["timesteps"].dtype == torch.int64 and whole["drop"].dtype == torch.bool


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
    state, fn = _init(cfg, models)
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
    state, fn = _init(cfg, models, params_te=te)
    new, _ = fn(state, fz, _batch(cfg, models, 0))
    assert set(new["params"]) == set(new["ema"]) == set(new["opt"]["adamw"]["mu"]) == {"unet", "text_encoder"}
    assert _max_diff(new["params"]["text_encoder"], state["params"]["text_encoder"]) > 0


def test_bad_inputs_raise_clear_errors(models):
    cfg = _cfg()
    state, fn = _init(cfg, models)
    batch = _batch(cfg, models, 0)
    with pytest.raises(ValueError, match="uncond"):
        fn(state, {k: v for k, v in models["frozen"].items() if k != "uncond_ids"}, batch)
    with pytest.raises(ValueError, match="lacks"):
        fn(state, models["frozen"], {k: v for k, v in batch.items() if k != "noise"})
    with pytest.raises(UserError, match=r"config.train.precision='fp8'"):
        _init(_cfg(precision="fp8"), models)
    with pytest.raises(ValueError, match="train_text_encoder"):
        unet_stage.init(cfg, models["unet"], models["frozen"]["text_encoder"])
    # A state of other params than the step's layout (here: + a trained text encoder).
    te_cfg = _cfg(train_text_encoder=True)
    other, _ = _init(te_cfg, models, params_te=models["frozen"]["text_encoder"])
    with pytest.raises(ValueError, match="layout"):
        fn(other, models["frozen"], batch)


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
