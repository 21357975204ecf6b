"""CompVis / Stability single-file checkpoints (the original latent-diffusion layout).

Rombach et al. 2022's LatentDiffusion state dict: the UNet, the autoencoder and the text
encoder under model.diffusion_model.*, first_stage_model.* and cond_stage_model.* (names in
compvis_keys.py), optionally LitEma's flattened model_ema.* copy of the UNet. Read from
.safetensors, or from .ckpt only through torch.load(weights_only=True) (taking ["state_dict"]).

Architecture. The weights alone do not say everything, so `load` takes the model sections
(unet, vae, text_encoder, diffusion) from, in order: the sd_func config that `save` embeds
(`sd_func_config` metadata), exact; `cfg` when given and its unet/vae/text_encoder fit the
file's tensors exactly (then head counts, upcast_attention, sample sizes and cfg.diffusion
are cfg's); otherwise they are inferred from key names and shapes the way diffusers'
single_file_utils does (a warning is logged when a given cfg did not fit): channels, layers
per block, attention levels, transformer depth, context dim (attn2.to_k), linear vs conv
proj_in (its ndim), 4 or 9 (inpainting) input channels, VAE and text encoder widths and
depths. What shapes cannot tell follows the Stable Diffusion releases: SD 1.x (CLIP text
encoder) has 8 UNet heads and CLIP ViT-L's quick_gelu; SD 2.x (OpenCLIP text encoder, or
context dim 1024) has 64-channel heads, gelu, and keeps 23 of OpenCLIP's 24 text layers
(diffusers' convention: SD 2 conditions on the penultimate layer). The diffusion schedule is
SD's (scaled_linear, 1000 steps); the prediction type cannot be seen in weights: epsilon,
except SD 2.x non-inpainting models, which get v_prediction with 768 px sample sizes and
upcast attention (the 768-v release, as diffusers assumes; a .ckpt with global_step 875000,
i.e. 512-base, gets epsilon). For SD 2 512-base pass a cfg whose diffusion.prediction_type
is "epsilon". A CompVis file holds no tokenizer: cfg.text_encoder.tokenizer comes from cfg
or is ""; weights load without one, and sd_func.models.tokenizer.load raises a clear error
("A CompVis checkpoint file carries no tokenizer ...") when it is needed.

`save` writes the original names (SD 1.x CLIP layout for a quick_gelu text encoder,
OpenCLIP layout with fused in_proj for gelu), VAE attention as 1x1 convs, no EMA and no
DDPM buffers (LDM recomputes them; the original code loads with strict=False).
"""

import logging
import re

import ml_collections
import torch

from sd_func import tree
from sd_func.checkpoint import compvis_keys as K
from sd_func.checkpoint import files
from sd_func.diffusion import schedules
from sd_func.models import autoencoder, text_encoder, unet

log = logging.getLogger(__name__)
CONFIG_KEY = "sd_func_config"
SD2_BASE_STEP = 875000  # global_step of the released 512-base SD 2.0 .ckpt (epsilon)


# ------------------------------------------------------------------------- detection


def _num(keys, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def _layout(sd: dict) -> str | None:
    if any(k.startswith(K.OPENCLIP) for k in sd):
        return "openclip"
    if any(k.startswith(K.CLIP) for k in sd):
        return "clip"
    return None


def _uniform(xs: list):
    return xs[0] if len(set(xs)) == 1 else list(xs)


def _detect_unet(sd: dict, sd2: bool, v_model: bool) -> dict:
    u = {k[len(K.UNET):]: v for k, v in sd.items() if k.startswith(K.UNET)}
    levels, boundary = [], True  # one dict per resolution level, split at downsample ops
    for i in _num(u, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in u:
            boundary = True
            continue
        if boundary:
            attn = any(k.startswith(f"input_blocks.{i}.1.") for k in u)
            depth = len(_num(u, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) if attn else 1
            levels.append(dict(channels=u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0],
                               layers=0, attn=attn, depth=depth))
            boundary = False
        levels[-1]["layers"] += 1
    channels = [lv["channels"] for lv in levels]
    layers = [lv["layers"] for lv in levels]
    attn = [lv["attn"] for lv in levels]
    depth = [lv["depth"] for lv in levels]
    n = len(levels)
    up_attn, start = [], 0
    for r in range(n):
        up_attn.append(any(k.startswith(f"output_blocks.{start}.1.transformer_blocks") for k in u))
        start += layers[n - 1 - r] + 1
    ctx = [v.shape[1] for k, v in u.items() if k.endswith("attn2.to_k.weight")]
    proj = [v.ndim for k, v in u.items() if k.endswith(".proj_in.weight")]
    heads = [max(1, c // 64) for c in channels] if sd2 else 8
    attn_depth = [d for d, a in zip(depth, attn) if a] or [1]
    return dict(
        in_channels=u["input_blocks.0.0.weight"].shape[1], out_channels=u["out.2.weight"].shape[0],
        block_out_channels=channels, layers_per_block=_uniform(layers),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        attention_head_dim=heads, cross_attention_dim=ctx[0] if ctx else 768,
        use_linear_projection=bool(proj) and proj[0] == 2,
        transformer_layers_per_block=(_uniform(attn_depth) if len(set(attn_depth)) == 1 else depth),
        sample_size=96 if v_model else 64, upcast_attention=v_model)


def _detect_vae(sd: dict, v_model: bool) -> dict:
    v = {k[len(K.VAE):]: t for k, t in sd.items() if k.startswith(K.VAE)}
    levels = _num(v, r"encoder\.down\.(\d+)\.")
    blocks = _num(v, r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [v[f"encoder.down.{i}.block.{blocks[-1]}.conv2.weight"].shape[0] for i in levels]
    n = len(channels)
    return dict(in_channels=v["encoder.conv_in.weight"].shape[1],
                out_channels=v["decoder.conv_out.weight"].shape[0],
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=channels, layers_per_block=len(blocks),
                latent_channels=v["decoder.conv_in.weight"].shape[1],
                use_quant_conv="quant_conv.weight" in v, use_post_quant_conv="post_quant_conv.weight" in v,
                mid_block_add_attention="encoder.mid.attn_1.q.weight" in v,
                sample_size=768 if v_model else 512, scaling_factor=0.18215)


def _detect_text(sd: dict, layout: str) -> dict:
    if layout == "clip":
        t = {k[len(K.CLIP):].removeprefix("text_model."): v for k, v in sd.items() if k.startswith(K.CLIP)}
        n = len(_num(t, r"encoder\.layers\.(\d+)\."))
        tok, pos = t["embeddings.token_embedding.weight"], t["embeddings.position_embedding.weight"]
        ff, act, proj = t["encoder.layers.0.mlp.fc1.weight"].shape[0], "quick_gelu", 768
    else:
        t = {k[len(K.OPENCLIP):]: v for k, v in sd.items() if k.startswith(K.OPENCLIP)}
        n = K.openclip_layers(sd) - 1  # SD 2.x conditions on the penultimate layer
        tok, pos = t["token_embedding.weight"], t["positional_embedding"]
        ff, act, proj = t["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], "gelu", 512
    d = tok.shape[1]
    return dict(vocab_size=tok.shape[0], hidden_size=d, intermediate_size=ff, num_hidden_layers=n,
                num_attention_heads=max(1, d // 64), max_position_embeddings=pos.shape[0],
                hidden_act=act, layer_norm_eps=1e-5, projection_dim=proj)


def detect_config(sd: dict, meta: dict, where: str) -> ml_collections.ConfigDict:
    """cfg.unet/vae/text_encoder/diffusion inferred from an LDM state dict (see module doc)."""
    layout = _layout(sd)
    missing = [p for p, ok in ((K.UNET, any(k.startswith(K.UNET) for k in sd)),
                               (K.VAE, any(k.startswith(K.VAE) for k in sd)),
                               ("cond_stage_model.", layout is not None)) if not ok]
    if missing:
        raise files.CheckpointError(f"{where}: a CompVis checkpoint needs the UNet, VAE and text "
                                    f"encoder; no keys under {missing}")
    ctx = [v.shape[1] for k, v in sd.items() if k.startswith(K.UNET) and k.endswith("attn2.to_k.weight")]
    sd2 = layout == "openclip" or (bool(ctx) and ctx[0] == 1024)
    inpaint = sd[K.UNET + "input_blocks.0.0.weight"].shape[1] == 9
    v_model = sd2 and not inpaint and meta.get("global_step") != SD2_BASE_STEP
    c = ml_collections.ConfigDict()
    try:
        c.unet = unet.from_diffusers_config(_detect_unet(sd, sd2, v_model))
        c.vae = autoencoder.from_diffusers_config(_detect_vae(sd, v_model))
        c.text_encoder = text_encoder.from_diffusers_config(_detect_text(sd, layout))
    except (KeyError, IndexError, ValueError) as e:
        raise files.CheckpointError(f"{where}: cannot infer the architecture from the weights "
                                    f"({type(e).__name__}: {e}); pass cfg= with the model config") from e
    c.diffusion = schedules.config(prediction_type="v_prediction" if v_model else "epsilon")
    return c


# ------------------------------------------------------------------------- tables


def _dotted(section: str, section_cfg) -> dict[str, tuple]:
    return {k.replace("/", "."): s for k, s in files.expected_shapes(section, section_cfg).items()}


def _tables(cfg, layout: str) -> dict[str, dict[str, K.Entry]]:
    text = _dotted("text_encoder", cfg.text_encoder)
    return {"unet": K.unet_table(_dotted("unet", cfg.unet)), "vae": K.vae_table(_dotted("vae", cfg.vae)),
            "text_encoder": (K.openclip_table if layout == "openclip" else K.clip_table)(text)}


# ---------------------------------------------------------------------------- load


def _lookup(sd: dict, name: str, layout: str) -> str | None:
    if name in sd:
        return name
    if layout == "clip" and name.startswith(K.CLIP + "text_model."):  # no "text_model." level
        alt = K.CLIP + name[len(K.CLIP + "text_model."):]
        return alt if alt in sd else None
    return None


def from_state_dict(sd: dict, cfg, where: str, ema: bool = False) -> dict:
    """params from an LDM state dict for the architecture in cfg; CheckpointError listing
    missing / unexpected / wrongly shaped LDM keys."""
    layout = _layout(sd) or "clip"
    expected = {s: _dotted(s, cfg[s]) for s in files.MODEL_SECTIONS}
    tables = _tables(cfg, layout)
    if ema and not any(k.startswith(K.EMA) for k in sd):
        raise files.CheckpointError(f"{where}: ema=True but the file has no model_ema.* weights")
    used, missing, wrong, params = set(), [], [], {}
    for section, table in tables.items():
        flat = {}
        for key, e in table.items():
            name = K.ema_name(e.ldm) if ema and section == "unet" else e.ldm
            found = _lookup(sd, name, layout)
            if found is None:
                missing.append(name)
                continue
            used.add(found)
            t = sd[found]
            if e.part is not None:
                if t.shape[0] % 3:
                    wrong.append(f"{found}: {tuple(t.shape)} is not 3 fused projections")
                    continue
                t = t.chunk(3, dim=0)[e.part].clone()
            elif e.conv and t.ndim == 4:
                t = t[:, :, 0, 0]
            if tuple(t.shape) != tuple(expected[section][key]):
                wrong.append(f"{found}: expected {expected[section][key]}, got {tuple(t.shape)}")
                continue
            flat[key] = t
        params[section] = tree.from_state_dict(flat)
    text_layers = cfg.text_encoder.num_hidden_layers
    spare = f"{K.OPENCLIP}transformer.resblocks.{text_layers}."  # SD 2.x's unused last layer

    def ignorable(k):
        return (k in used or k in K.DDPM_BUFFERS or k in K.TEXT_EXTRAS or k.startswith(K.EMA)
                or (ema and k.startswith(K.UNET))
                or (k.startswith(spare) and K.openclip_layers(sd) == text_layers + 1))
    unexpected = [k for k in sd if not ignorable(k)]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} ({files.first(v)})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with wrong shapes", wrong)) if v]
        raise files.CheckpointError(f"{where}: does not match the model config: {'; '.join(parts)}")
    return params


def _model_sections(cfg) -> ml_collections.ConfigDict | None:
    if cfg is None or not all(s in cfg for s in files.MODEL_SECTIONS):
        return None
    c = ml_collections.ConfigDict({s: cfg[s].to_dict() for s in files.MODEL_SECTIONS})
    c.diffusion = cfg.diffusion.to_dict() if "diffusion" in cfg else schedules.config().to_dict()
    return c


def load(path: str, cfg=None, ema=False, dtype=None) -> tuple[dict, ml_collections.ConfigDict]:
    sd, meta = files.read_tensors(path)
    if not any(k.startswith((K.UNET, K.VAE, "cond_stage_model.")) for k in sd):
        raise files.CheckpointError(f"{path}: no CompVis keys (model.diffusion_model.*, first_stage_model.*, "
                                    f"cond_stage_model.*); first keys: {files.first(sd)}")
    has_ema = any(k.startswith(K.EMA) for k in sd)
    if ema and not has_ema:
        raise files.CheckpointError(f"{path}: ema=True but the file has no model_ema.* weights")
    ema = has_ema if ema is None else bool(ema)  # None: the EMA weights when the file has them
    if CONFIG_KEY in meta:  # written by sd_func: the exact config travels with the weights
        stored = files.config_from_json(meta[CONFIG_KEY], path)
        return files.cast(from_state_dict(sd, stored, path, ema), dtype), files.merge_config(stored, cfg)
    given, cfg_error = _model_sections(cfg), None
    if given is not None:
        try:
            params = from_state_dict(sd, given, path, ema)
            return files.cast(params, dtype), files.merge_config(given, cfg)
        except files.CheckpointError as e:
            cfg_error = e
    try:
        inferred = detect_config(sd, meta, path)
        params = from_state_dict(sd, inferred, path, ema)
    except files.CheckpointError as e:
        if cfg_error is None:
            raise
        raise files.CheckpointError(f"{cfg_error} (with cfg's architecture); inferring the architecture "
                                    f"from the weights failed too: {e}") from e
    if cfg_error is not None:
        log.warning("%s: cfg's unet/vae/text_encoder do not fit this file, so its architecture and "
                    "diffusion settings are inferred from the weights (%s)", path, str(cfg_error)[:300])
    return files.cast(params, dtype), files.merge_config(inferred, cfg)


# ---------------------------------------------------------------------------- save


def to_state_dict(params: dict, cfg) -> dict[str, torch.Tensor]:
    """params -> LDM state dict: OpenCLIP layout for a gelu text encoder, CLIP otherwise."""
    layout = "openclip" if cfg.text_encoder.hidden_act == "gelu" else "clip"
    tables = _tables(cfg, layout)
    sources = {"unet": tree.to_state_dict(params["unet"]), "vae": tree.to_state_dict(params["vae"]),
               "text_encoder": text_encoder.to_state_dict(params["text_encoder"], prefixed=True)}
    out, fused = {}, {}
    for section, table in tables.items():
        for key, e in table.items():
            t = sources[section][key]
            if e.part is not None:
                fused.setdefault(e.ldm, [None] * 3)[e.part] = t
            else:
                out[e.ldm] = t[:, :, None, None] if e.conv else t
    for name, parts in fused.items():
        out[name] = torch.cat(parts, dim=0)
    return out


def save(params: dict, cfg, path: str) -> None:
    files.check_params(params, cfg, path)
    sd = to_state_dict(params, cfg)
    if path.endswith(".safetensors"):
        files.write_safetensors(sd, path, metadata={"format": "pt", CONFIG_KEY: cfg.to_json()})
    elif path.endswith((".ckpt", ".pt", ".pth")):
        files.write_torch({"state_dict": {k: v.detach().cpu().contiguous() for k, v in sd.items()},
                           CONFIG_KEY: cfg.to_json()}, path)
    else:
        raise files.CheckpointError(f"{path}: a CompVis file ends in .safetensors or .ckpt")
