"""train.checks.validate: every shipped config passes; each bad cfg.train / cfg.vae_train /
cfg.data value is a one-line UserError naming its key, raised before anything is built."""

import pytest

from configs import sd2, shapes, tiny, txt2img
from sd_func import recipe
from sd_func.errors import UserError
from sd_func.train import checks, loop, vae_stage


@pytest.mark.parametrize("get", [lambda: tiny.get_config(), lambda: txt2img.get_config(), lambda: sd2.get_config(),
                                 lambda: shapes.get_config(), lambda: shapes.get_config("smoke")])
def test_shipped_configs_are_valid(get):
    checks.validate(get())


BAD = [
    ("train", "lr", 0.0, "expected a number > 0"),
    ("train", "lr", -1.0, "expected a number > 0"),
    ("train", "steps", -5, "expected an integer >= 0"),
    ("train", "batch_size", 0, "expected an integer >= 1"),
    ("train", "warmup", -1, "expected an integer >= 0"),
    ("train", "grad_clip", -0.5, "expected a number >= 0"),
    ("train", "ema_decay", 1.5, "in [0, 1]"),
    ("train", "adam_b1", 1.0, "in [0, 1)"),
    ("train", "adam_b2", -0.1, "in [0, 1)"),
    ("train", "adam_eps", 0.0, "expected a number > 0"),
    ("train", "weight_decay", -1e-2, "expected a number >= 0"),
    ("train", "weight_decay_exclude", "(bias", "not a regular expression"),
    ("train", "precision", "fp8", "expected one of"),
    ("train", "lr_schedule", "exp", "expected one of"),
    ("train", "cond_drop", 2.0, "in [0, 1]"),
    ("train", "log_every", -1, "expected an integer >= 0"),
    ("train", "checkpoint_every", -1, "expected an integer >= 0"),
    ("train", "sample_every", -1, "expected an integer >= 0"),
    ("train", "keep_checkpoints", -2, "expected an integer >= 0"),
    ("vae_train", "lr", 0.0, "expected a number > 0"),
    ("vae_train", "adam_b2", 1.0, "in [0, 1)"),
    ("vae_train", "grad_clip", -1.0, "expected a number >= 0"),
    ("vae_train", "steps", -1, "expected an integer >= 0"),
    ("vae_train", "kl_weight", -1.0, "expected a number >= 0"),
    ("data", "kind", "parquet", "expected one of"),
    ("data", "resolution", 62, "multiple of the VAE's downsampling factor"),
]


@pytest.mark.parametrize("section, key, value, expected", BAD, ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD])
def test_bad_values_name_their_key(section, key, value, expected):
    cfg = shapes.get_config("smoke")
    cfg[section][key] = value
    with pytest.raises(UserError) as e:
        checks.validate(cfg)
    msg = str(e.value)
    assert msg.startswith(f"config.{section}.{key}={value!r}: ") and expected in msg and "\n" not in msg, msg


def test_fp16_needs_its_loss_scale_fields():
    cfg = tiny.get_config()
    cfg.train.precision = "fp16"
    cfg.train.loss_scale_window = 0
    with pytest.raises(UserError, match=r"config.train.loss_scale_window=0: expected an integer >= 1"):
        checks.validate(cfg)
    cfg = shapes.get_config("smoke")
    del cfg.vae_train["adam_eps"]
    with pytest.raises(UserError, match=r"config.vae_train.adam_eps is missing"):
        checks.validate(cfg)


def test_entry_points_validate_first(tmp_path, monkeypatch):
    """recipe.run, loop.train and the VAE stage stop before any model is built or data read."""
    def fail(*a, **k):
        raise AssertionError("built a model before validating the config")
    monkeypatch.setattr(loop, "init_params", fail)
    monkeypatch.setattr(loop.data, "make_source", fail)
    cfg = shapes.get_config("smoke")
    cfg.train.lr = 0.0
    for run in (lambda: recipe.run(cfg, str(tmp_path / "w")), lambda: loop.train(cfg, str(tmp_path / "w")),
                lambda: vae_stage.run(cfg, str(tmp_path / "w"), {})):
        with pytest.raises(UserError, match="config.train.lr=0.0"):
            run()
    assert not (tmp_path / "w").exists()
