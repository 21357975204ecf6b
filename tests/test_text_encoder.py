"""CLIP text encoder parity with transformers' CLIPTextModel, and the CLIP tokenizer."""

import json
import os
import zlib

import pytest
import torch
import transformers

from sd_func import random, tree
from sd_func.models import text_encoder, tokenizer

SD1_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                vocab_size=1000, hidden_act="quick_gelu", projection_dim=32)
SD2_TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                vocab_size=1000, hidden_act="gelu", projection_dim=16, layer_norm_eps=1e-5)


def _perturbed(cfg, seed=1):
    """init() params with LayerNorm weights/biases and linear biases moved away from 1 / 0."""
    p = text_encoder.init(random.key(seed), cfg)

    def bump(path, x):
        if path.endswith("bias") or "norm" in path:
            k = random.fold_in(random.key(seed + 100), zlib.crc32(path.encode()))
            return x + 0.3 * random.normal(k, x.shape)
        return x
    return tree.map_with_path(bump, p)


def _reference(cfg, params):
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_encoder.to_diffusers_config(cfg))).eval()
    # transformers >= 5 names CLIPTextModel's weights without the "text_model." prefix that
    # checkpoint files (and our params) carry; to_state_dict(prefixed=False) drops it.
    prefixed = any(k.startswith("text_model.") for k in ref.state_dict())
    ref.load_state_dict(text_encoder.to_state_dict(params, prefixed=prefixed), strict=True)
    return ref


def _ids(cfg, b=2, n=77, seed=7):
    ids = random.randint(random.key(seed), (b, n), 0, cfg.vocab_size - 2)
    ids[:, 0] = cfg.vocab_size - 2
    ids[:, 9:] = cfg.vocab_size - 1  # <|endoftext|> then padding, as SD's tokenizer gives
    return ids


@pytest.mark.parametrize("overrides", [SD1_TINY, SD2_TINY], ids=["sd1_quick_gelu", "sd2_gelu"])
def test_parity_with_transformers(overrides):
    cfg = text_encoder.config(**overrides)
    p = _perturbed(cfg)
    ref = _reference(cfg, p)
    ids = _ids(cfg)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        h = text_encoder.apply(p, ids, cfg)
        h_skip = text_encoder.apply(p, ids, cfg, clip_skip=1)
        h_skip2 = text_encoder.apply(p, ids, cfg, clip_skip=2)
        final_ln = ref.final_layer_norm if hasattr(ref, "final_layer_norm") else ref.text_model.final_layer_norm
        # diffusers' StableDiffusionPipeline: hidden_states[-(clip_skip + 1)] then final_layer_norm.
        ref_skip = final_ln(out.hidden_states[-2])
        ref_skip2 = final_ln(out.hidden_states[-3])
    assert h.shape == (2, 77, cfg.hidden_size)
    errs = {"last": (h - out.last_hidden_state).abs().max().item(),
            "clip_skip=1": (h_skip - ref_skip).abs().max().item(),
            "clip_skip=2": (h_skip2 - ref_skip2).abs().max().item()}
    print(cfg.hidden_act, "max abs err", errs)
    assert max(errs.values()) < 1e-4, errs
    assert (h_skip - h).abs().max() > 1e-2  # the skip really changes the output
    torch.testing.assert_close(text_encoder.apply(p, ids, cfg, clip_skip=0), h)


def test_state_dict_names_and_config_round_trip(tmp_path):
    cfg = text_encoder.config(**SD1_TINY)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_encoder.to_diffusers_config(cfg)))
    sd = ref.state_dict()
    p = text_encoder.from_state_dict(sd)  # unprefixed (transformers 5) or prefixed (4.x) keys
    assert "q_proj" in p["text_model"]["encoder"]["layers"]["0"]["self_attn"]
    assert tree.diff(p, text_encoder.init(random.key(0), cfg)) == ([], [], [])
    # A 4.x-era checkpoint: prefixed names plus a persistent position_ids buffer.
    old = {"text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert tree.diff(text_encoder.from_state_dict(old), p) == ([], [], [])
    # config.json written by transformers reads back to the same cfg.
    ref.config.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert text_encoder.from_diffusers_config(d, tokenizer=cfg.tokenizer).to_dict() == cfg.to_dict()
    # SD 1.5's text_encoder/config.json (transformers 4.22; old token ids).
    sd15 = dict(architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0,
                eos_token_id=2, hidden_act="quick_gelu", hidden_size=768, initializer_factor=1.0,
                initializer_range=0.02, intermediate_size=3072, layer_norm_eps=1e-05,
                max_position_embeddings=77, model_type="clip_text_model", num_attention_heads=12,
                num_hidden_layers=12, pad_token_id=1, projection_dim=768, torch_dtype="float32",
                transformers_version="4.22.0.dev0", vocab_size=49408)
    c15 = text_encoder.from_diffusers_config(sd15)
    assert c15.to_dict() == text_encoder.config().to_dict()
    assert text_encoder.to_diffusers_config(c15)["eos_token_id"] == 49407
    with pytest.raises(ValueError, match="hidden_act"):
        text_encoder.from_diffusers_config({**sd15, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="clip_skip"):
        text_encoder.apply(p, _ids(cfg), cfg, clip_skip=4)


def test_bf16_params_within_bf16_tolerance():
    cfg = text_encoder.config(**SD1_TINY)
    p = _perturbed(cfg)
    ids = _ids(cfg)
    with torch.no_grad():
        h32 = text_encoder.apply(p, ids, cfg)
        h16 = text_encoder.apply(tree.cast(p, torch.bfloat16), ids, cfg)
    assert h16.dtype == torch.bfloat16
    err = ((h16.float() - h32).abs().max() / h32.abs().max()).item()
    print("bf16 relative max err", err)
    assert err < 0.05


def test_compiles_fullgraph():
    cfg = text_encoder.config(**{**SD1_TINY, "num_hidden_layers": 1})
    p = _perturbed(cfg)
    ids = _ids(cfg, b=1)
    fn = torch.compile(lambda p, ids: text_encoder.apply(p, ids, cfg), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(p, ids), text_encoder.apply(p, ids, cfg), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ tokenizer

DEMO = "a red circle on a blue background"


def test_builtin_shapes_tokenizer():
    tok = tokenizer.load("builtin:shapes")
    ids = tokenizer.encode(tok, [DEMO, "A Yellow TRIANGLE in the white square"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    vocab = tok.get_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (bos, eos, len(vocab)) == (998, 999, 1000)  # CLIP layout, fits vocab_size=1000
    words = DEMO.split()
    assert ids[0, :9].tolist() == [bos, *[vocab[w + "</w>"] for w in words], eos]
    assert ids[0, 9:].eq(tok.pad_token_id).all() and tok.pad_token_id == eos
    assert ids[1, 8] == eos and ids[1, 9:].eq(eos).all()
    for w in ("a an the on of in background red green blue yellow white black circle square triangle "
              "small large left right top bottom").split():
        assert tok(w).input_ids == [bos, vocab[w + "</w>"], eos], w
    # Unknown words fall back to byte-level pieces; truncation keeps <|endoftext|> last.
    long = tokenizer.encode(tok, "zebra " * 100, max_length=16)
    assert long.shape == (1, 16) and long[0, -1] == eos and long[0, 0] == bos


def test_shipped_folder_loads_with_transformers_and_regenerates(tmp_path):
    folder = os.path.join(tokenizer.BUILTIN_DIR, "shapes")
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    assert tok(DEMO).input_ids == tokenizer.load("builtin:shapes")(DEMO).input_ids
    # build() is deterministic: regenerating gives the committed files byte for byte.
    tokenizer.build(tokenizer.SHAPES_WORDS, str(tmp_path / "tokenizer"))
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f), "rb") as fh:
            assert (tmp_path / "tokenizer" / f).read_bytes() == fh.read(), f
    # A diffusers pipeline folder (with a tokenizer/ subfolder) loads too.
    assert tokenizer.load(str(tmp_path)).get_vocab() == tok.get_vocab()


def test_unknown_tokenizer_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-such-org/no-such-repo.*CompVis.*--config\.text_encoder\."):
        tokenizer.load("no-such-org/no-such-repo")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tokenizer.load(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        tokenizer.load("")
    with pytest.raises(ValueError, match="builtin"):
        tokenizer.load("builtin:nope")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                               num_attention_heads=16, hidden_act="gelu", projection_dim=512)],
                         ids=["sd1_vit_l", "sd2_openclip_h"])
def test_full_size_parity(overrides):
    cfg = text_encoder.config(**overrides)
    p = _perturbed(cfg)
    ref = _reference(cfg, p)
    ids = _ids(cfg)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        err = (text_encoder.apply(p, ids, cfg) - out.last_hidden_state).abs().max().item()
        final_ln = ref.final_layer_norm if hasattr(ref, "final_layer_norm") else ref.text_model.final_layer_norm
        err_skip = (text_encoder.apply(p, ids, cfg, clip_skip=1) - final_ln(out.hidden_states[-2])).abs().max().item()
    print(cfg.hidden_act, "full-size max abs err (last, clip_skip=1)", err, err_skip)
    assert out.last_hidden_state.std() > 1e-2
    assert max(err, err_skip) < 1e-3
