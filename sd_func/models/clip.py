"""CLIP's image tower and the image/text projections, as pure functions: what CLIP score needs.

Radford et al. 2021. The vision tower is a ViT (Dosovitskiy et al. 2021): a patch
convolution without bias, a learned class token and position embeddings, a LayerNorm
before the transformer (transformers' `pre_layrnorm`), the same pre-LayerNorm layers as the
text encoder but without the causal mask (text_encoder.encoder_layer), and `post_layernorm`
on the class token. The text side is sd_func.models.text_encoder; its pooled output is the
final hidden state at the end-of-text token. Both pooled outputs go through a bias-free
projection into the joint space (`visual_projection`, `text_projection`). Parameter paths
are transformers' CLIPModel checkpoint names ("vision_model/encoder/layers/0/mlp/fc1/weight").
"""

import ml_collections
import torch
import torch.nn.functional as F
import transformers

from sd_func import nn, tree
from sd_func.errors import UserError
from sd_func.models import text_encoder

_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "num_channels", "hidden_act", "layer_norm_eps")


def from_config_dict(d: dict) -> ml_collections.ConfigDict:
    """cfg {text, vision, projection_dim, eos_token_id} from a CLIPModel's config.json dict."""
    if d.get("model_type") != "clip":
        raise UserError(f"clip config: model_type {d.get('model_type')!r}; expected 'clip' (a CLIPModel folder)")
    vd, vdef = dict(d.get("vision_config") or {}), transformers.CLIPVisionConfig()
    vision = {k: vd.get(k, getattr(vdef, k)) for k in _VISION_KEYS}
    if vision["hidden_act"] not in nn.ACTIVATIONS:
        raise UserError(f"clip vision_config: hidden_act {vision['hidden_act']!r} is not supported")
    td = dict(d.get("text_config") or {})
    return ml_collections.ConfigDict(dict(
        text=text_encoder.from_diffusers_config({"model_type": "clip", "text_config": td}),
        vision=vision, projection_dim=int(d.get("projection_dim", transformers.CLIPConfig().projection_dim)),
        eos_token_id=int(td.get("eos_token_id", transformers.CLIPTextConfig().eos_token_id))))


def from_state_dict(sd: dict) -> dict:
    """A CLIPModel state dict -> params {text_model, vision_model, visual_projection, text_projection}."""
    drop = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids", "logit_scale")
    return tree.from_state_dict({k: v for k, v in sd.items() if k not in drop})


def vision_apply(p: dict, pixel_values: torch.Tensor, cfg) -> torch.Tensor:
    """pixel_values [B, 3, S, S] (CLIPImageProcessor's output) -> pooled, post-LayerNorm [B, hidden]."""
    c = cfg.vision
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
        raise ValueError(f"clip.vision_apply: expected [B, {c.num_channels}, {c.image_size}, {c.image_size}], "
                         f"got {tuple(pixel_values.shape)}")
    v = p["vision_model"]
    emb = v["embeddings"]
    w = emb["patch_embedding"]["weight"]
    x = F.conv2d(pixel_values.to(w.dtype), w, stride=c.patch_size).flatten(2).transpose(1, 2)
    cls = emb["class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + emb["position_embedding"]["weight"]
    x = nn.layer_norm(v["pre_layrnorm"], x, c.layer_norm_eps)
    act = nn.ACTIVATIONS[c.hidden_act]
    for i in range(c.num_hidden_layers):
        x = text_encoder.encoder_layer(v["encoder"]["layers"][str(i)], x, c, act, is_causal=False)
    return nn.layer_norm(v["post_layernorm"], x[:, 0], c.layer_norm_eps)


def image_features(p: dict, pixel_values: torch.Tensor, cfg) -> torch.Tensor:
    """CLIPModel.get_image_features: [B, 3, S, S] -> [B, projection_dim] (not normalised)."""
    return nn.linear(p["visual_projection"], vision_apply(p, pixel_values, cfg))


def text_features(p: dict, input_ids: torch.Tensor, cfg) -> torch.Tensor:
    """CLIPModel.get_text_features: token ids [B, L] -> [B, projection_dim] (not normalised).

    The pooled state is the final hidden state at the first end-of-text token (at the
    largest id for configs with the old eos_token_id 2, as transformers does).
    """
    h = text_encoder.apply({"text_model": p["text_model"]}, input_ids, cfg.text)
    if cfg.eos_token_id == 2:
        pos = input_ids.argmax(dim=-1)
    else:
        pos = (input_ids == cfg.eos_token_id).int().argmax(dim=-1)
    pooled = h[torch.arange(h.shape[0], device=h.device), pos]
    return nn.linear(p["text_projection"], pooled)
