"""The train state in checkpoints (train.state): per-path trees out, the same state back
bit for bit; the fp16 loss scale coming and going with the precision; format-1
checkpoints (opt = {"mu", "nu"}, a separate loss_scale tree) read into today's layout."""

import ml_collections
import torch

from sd_func import tree
from sd_func.checkpoint import training as checkpoints
from sd_func.train import optim
from sd_func.train import state as train_state


def _params():
    g = torch.Generator().manual_seed(0)
    return {"unet": {"conv": {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(4, generator=g)}}}


def _tcfg(precision="fp32"):
    return ml_collections.ConfigDict(dict(
        lr=1e-3, lr_schedule="constant", warmup=0, steps=10, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        weight_decay=1e-2, grad_clip=1.0, precision=precision, loss_scale_init=2.0**16, loss_scale_window=4))


def _trained(precision="fp32", steps=3):
    """A state after `steps` updates of random gradients (no model needed)."""
    params = _params()
    lay = optim.layout(params, r".*bias$")
    tx = optim.from_config(_tcfg(precision), lay)
    state = train_state.init_state(params, tx, lay, ema=True)
    p, opt = optim.flatten(state["params"], lay), tx.init(optim.flatten(state["params"], lay))
    g = torch.Generator().manual_seed(1)
    for s in range(steps):
        u, opt = tx.update(torch.randn(lay.numel, generator=g), opt, p, torch.tensor(s))
        p = optim.apply_updates(p, u)
    state.update(params=optim.unflatten(p, lay), opt=optim.state_to_trees(opt, lay), step=torch.tensor(steps),
                 ema=optim.unflatten(p * 0.5, lay))
    return state, tx, lay


def _equal(a: dict, b: dict) -> bool:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return list(fa) == list(fb) and all(torch.equal(fa[k], fb[k]) and fa[k].dtype == fb[k].dtype for k in fa)


def test_checkpoint_round_trip_is_exact(tmp_path):
    for precision in ("fp32", "fp16"):
        state, tx, lay = _trained(precision)
        trees = train_state.checkpoint_trees(state)
        assert sorted(trees) == ["ema", "opt", "params", "state"]
        ckpt = checkpoints.save(str(tmp_path / precision), 3, trees, {})
        stored = tree.flatten(checkpoints.load_tree(ckpt, "opt"))
        assert "adamw/count" in stored and "adamw/mu/unet/conv/weight" in stored
        assert ("loss_scale/scale" in stored) == (precision == "fp16")
        fresh = train_state.init_state(_params(), tx, lay, ema=True)
        assert _equal(train_state.restore(ckpt, fresh), state), precision


def test_loss_scale_comes_and_goes_with_the_precision(tmp_path):
    state, _, _ = _trained("fp32")
    ckpt = checkpoints.save(str(tmp_path / "a"), 3, train_state.checkpoint_trees(state), {})
    _, tx16, lay = _trained("fp16", steps=0)
    fresh = train_state.init_state(_params(), tx16, lay, ema=True)
    got = train_state.restore(ckpt, fresh)  # fp32 -> fp16: AdamW restored, a fresh scale
    assert _equal(got["opt"]["adamw"], state["opt"]["adamw"])
    assert float(got["opt"]["loss_scale"]["scale"]) == 2.0**16
    state16, _, _ = _trained("fp16")
    ckpt = checkpoints.save(str(tmp_path / "b"), 3, train_state.checkpoint_trees(state16), {})
    _, tx32, lay = _trained("fp32", steps=0)
    got = train_state.restore(ckpt, train_state.init_state(_params(), tx32, lay, ema=True))
    assert set(got["opt"]) == {"adamw"} and _equal(got["opt"]["adamw"], state16["opt"]["adamw"])


def test_format_1_checkpoints_are_read(tmp_path, monkeypatch):
    state, tx, lay = _trained("fp16")
    adam, ls = state["opt"]["adamw"], state["opt"]["loss_scale"]
    ls["skipped"] = torch.tensor(1)  # format 1 stored no count: it was step - skipped
    adam["count"] = state["step"] - 1
    old = {"params": state["params"], "ema": state["ema"], "opt": {"mu": adam["mu"], "nu": adam["nu"]},
           "loss_scale": ls, "state": {"step": state["step"]}}
    monkeypatch.setattr(checkpoints, "FORMAT", train_state.FORMAT_1)
    ckpt = checkpoints.save(str(tmp_path), 3, old, {})
    monkeypatch.undo()
    assert checkpoints.read_meta(ckpt)["format"] == "sd_func.train/1"
    got = train_state.restore(ckpt, train_state.init_state(_params(), tx, lay, ema=True))
    assert _equal(got, state)
