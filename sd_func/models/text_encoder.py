"""The CLIP text transformer that conditions Stable Diffusion, as pure functions.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision": token + learned position embeddings, pre-LayerNorm transformer layers with
causal self-attention, a final LayerNorm. SD 1.x uses OpenAI's ViT-L/14 text tower
(quick_gelu, 768 wide, 12 layers); SD 2.x uses OpenCLIP ViT-H/14 (gelu, 1024 wide), stored
by diffusers with 23 of its 24 layers because SD 2 conditions on the penultimate layer.
`clip_skip=k` returns the output of the layer k from the end through the final LayerNorm,
exactly as diffusers' StableDiffusionPipeline does. Parameter paths are the
transformers CLIPTextModel checkpoint names ("text_model/encoder/layers/0/self_attn/q_proj/weight").
"""

import ml_collections
import torch
import transformers

from sd_func import nn, random, tree
from sd_func.errors import UserError

PREFIX = "text_model"
_ACTS = ("quick_gelu", "gelu")

_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    tokenizer="",  # local tokenizer folder, hub id, or "builtin:shapes"; see models/tokenizer.py
)
_ARCH_KEYS = tuple(k for k in _DEFAULTS if k != "tokenizer")


def config(**overrides) -> ml_collections.ConfigDict:
    """SD 1.x's CLIP ViT-L/14 text tower; field names are transformers' CLIPTextConfig names."""
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise UserError(f"text_encoder.config: unknown field(s) {unknown}; known: {sorted(_DEFAULTS)}")
    c = ml_collections.ConfigDict(dict(_DEFAULTS))
    c.update(overrides)
    if c.hidden_act not in _ACTS:
        raise UserError(f"text_encoder.hidden_act: {c.hidden_act!r} is not supported; one of {_ACTS}")
    if c.hidden_size % c.num_attention_heads:
        raise UserError(f"text_encoder: hidden_size {c.hidden_size} is not divisible by "
                         f"num_attention_heads {c.num_attention_heads}")
    return c


def from_diffusers_config(d: dict, tokenizer: str = "") -> ml_collections.ConfigDict:
    """cfg from a transformers CLIPTextConfig dict (the config.json of a `text_encoder` folder).

    A full CLIPConfig (model_type "clip") is read through its text_config. Keys that do not
    shape the forward pass (dropout, initializer_*, token ids, dtype, ...) are ignored.
    """
    d = dict(d)
    if d.get("model_type") == "clip":
        d = dict(d.get("text_config") or {})
    model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise UserError(f"text_encoder config: model_type {model_type!r} is not supported "
                         "(clip_text_model only)")
    if d.get("hidden_act", "quick_gelu") not in _ACTS:
        raise UserError(f"text_encoder config: hidden_act {d['hidden_act']!r} is not supported; one of {_ACTS}")
    defaults = transformers.CLIPTextConfig()  # transformers' own defaults for absent keys
    out = {k: d.get(k, getattr(defaults, k)) for k in _ARCH_KEYS}
    return config(**out, tokenizer=tokenizer)


def to_diffusers_config(cfg) -> dict:
    """A CLIPTextConfig dict for cfg: `CLIPTextModel(CLIPTextConfig(**d))` rebuilds the module.

    Token ids follow CLIP's vocabulary layout (<|startoftext|>, <|endoftext|> are the last
    two ids); only transformers' pooler_output reads them, SD does not.
    """
    d = {k: cfg[k] for k in _ARCH_KEYS}
    d.update(model_type="clip_text_model", architectures=["CLIPTextModel"],
             bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1, pad_token_id=1,
             attention_dropout=0.0)
    return d


def from_state_dict(state_dict: dict) -> dict:
    """A CLIPTextModel state dict -> params, with keys prefixed "text_model." or not.

    transformers < 5 and hub files use "text_model.encoder..."; transformers >= 5 saves
    "encoder...". The position_ids buffer (persistent in old checkpoints) is dropped.
    """
    out = {}
    for k, v in state_dict.items():
        k = k if k.startswith(PREFIX + ".") else f"{PREFIX}.{k}"
        if k != f"{PREFIX}.embeddings.position_ids":
            out[k] = v
    return tree.from_state_dict(out)


def to_state_dict(params: dict, prefixed: bool = True) -> dict:
    """params -> state dict; prefixed=False gives transformers >= 5's CLIPTextModel keys."""
    sd = tree.to_state_dict(params)
    if prefixed:
        return sd
    return {k[len(PREFIX) + 1:]: v for k, v in sd.items()}


def init(key, cfg) -> dict:
    """Random params: embeddings N(0, 0.02), linears torch.nn's default, LayerNorms (1, 0)."""
    k_tok, k_pos, k_layers = random.split(key, 3)
    d, d_ff = cfg.hidden_size, cfg.intermediate_size
    layers = {}
    for i in range(cfg.num_hidden_layers):
        kq, kk, kv, ko, k1, k2 = random.split(random.fold_in(k_layers, i), 6)
        layers[str(i)] = {
            "self_attn": {"q_proj": nn.init_linear(kq, d, d), "k_proj": nn.init_linear(kk, d, d),
                          "v_proj": nn.init_linear(kv, d, d), "out_proj": nn.init_linear(ko, d, d)},
            "layer_norm1": nn.init_norm(d),
            "mlp": {"fc1": nn.init_linear(k1, d, d_ff), "fc2": nn.init_linear(k2, d_ff, d)},
            "layer_norm2": nn.init_norm(d),
        }
    return {PREFIX: {
        "embeddings": {"token_embedding": nn.init_embedding(k_tok, cfg.vocab_size, d),
                       "position_embedding": nn.init_embedding(k_pos, cfg.max_position_embeddings, d)},
        "encoder": {"layers": layers},
        "final_layer_norm": nn.init_norm(d),
    }}


def encoder_layer(p: dict, x: torch.Tensor, cfg, act, is_causal: bool = True) -> torch.Tensor:
    """One pre-LayerNorm CLIP transformer layer; causal for text, not for the vision tower (models/clip.py)."""
    a = p["self_attn"]
    h = nn.layer_norm(p["layer_norm1"], x, cfg.layer_norm_eps)
    h = nn.attention(nn.linear(a["q_proj"], h), nn.linear(a["k_proj"], h), nn.linear(a["v_proj"], h),
                     heads=cfg.num_attention_heads, is_causal=is_causal)
    x = x + nn.linear(a["out_proj"], h)
    h = nn.layer_norm(p["layer_norm2"], x, cfg.layer_norm_eps)
    return x + nn.linear(p["mlp"]["fc2"], act(nn.linear(p["mlp"]["fc1"], h)))


def apply(p: dict, input_ids: torch.Tensor, cfg, clip_skip: int | None = None) -> torch.Tensor:
    """input_ids [B, L] (L <= max_position_embeddings) -> hidden states [B, L, hidden_size].

    clip_skip None or 0: the last layer's output through final_layer_norm (CLIPTextModel's
    last_hidden_state). clip_skip=k >= 1: the output of layer num_hidden_layers - k (the
    layer k from the end; 1 = penultimate) through final_layer_norm; later layers are not run.
    """
    t = p[PREFIX]
    if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"text_encoder.apply: input_ids must be [B, L<={cfg.max_position_embeddings}], "
                         f"got {tuple(input_ids.shape)}")
    skip = int(clip_skip or 0)
    if not 0 <= skip <= cfg.num_hidden_layers:
        raise ValueError(f"text_encoder.apply: clip_skip={clip_skip} outside [0, {cfg.num_hidden_layers}]")
    emb = t["embeddings"]
    x = nn.embedding(emb["token_embedding"], input_ids)
    x = x + emb["position_embedding"]["weight"][: input_ids.shape[1]]
    act = nn.ACTIVATIONS[cfg.hidden_act]
    for i in range(cfg.num_hidden_layers - skip):
        x = encoder_layer(t["encoder"]["layers"][str(i)], x, cfg, act)
    return nn.layer_norm(t["final_layer_norm"], x, cfg.layer_norm_eps)
