"""CLIP score of images against their prompts, from a local Hugging Face CLIP folder.

Hessel et al. 2021, "CLIPScore". The folder is what `CLIPModel.save_pretrained` /
`huggingface-cli download openai/clip-vit-large-patch14` leaves: config.json, the weights
(model.safetensors or pytorch_model.bin), the tokenizer (vocab.json + merges.txt) and
preprocessor_config.json. The networks run as sd_func's pure functions
(sd_func.models.clip); the image preprocessing (resize, center crop, normalisation) is the
folder's own CLIPImageProcessor and the tokenizer its CLIPTokenizer, as torchmetrics uses
them. Two conventions are reported from the per-image cosines cos_i between image and
prompt embeddings:

- `clip_score`: torchmetrics' `CLIPScore` (1.9.0): max(100 * mean_i cos_i, 0). Its docs
  write the clamp per image; its code clamps the mean, and this follows the code.
- `clip_score_nemo`: NeMo's: mean_i cos_i, unscaled and unclamped.
"""

import os

import numpy as np
import torch
import transformers

from sd_func import fileio, tree
from sd_func.checkpoint import files
from sd_func.errors import MissingFileError, UserError
from sd_func.models import clip
from sd_func.models import tokenizer as tokenizers

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HOW_TO_GET = ("a local Hugging Face CLIP folder, e.g. `huggingface-cli download openai/clip-vit-large-patch14 "
              "--local-dir clip-vit-large-patch14` on a machine with network, then --clip=clip-vit-large-patch14")


def load(folder: str | None, device=None) -> dict:
    """{"params", "cfg", "tokenizer", "processor"} of a CLIP folder; a one-line UserError otherwise."""
    if not folder:
        raise UserError(f"CLIP score needs --clip=PATH: {HOW_TO_GET} (or --clip=none: FID only)")
    if not os.path.isdir(folder):
        raise MissingFileError(f"--clip={folder}: no such folder ({HOW_TO_GET})")
    weights = [os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    missing = [f for f in ("config.json", "preprocessor_config.json") if not os.path.isfile(os.path.join(folder, f))]
    if missing or not weights:
        raise MissingFileError(f"--clip={folder}: not a CLIP folder: missing {missing or []}"
                                f"{'' if weights else f' and one of {list(WEIGHT_FILES)}'}")
    cfg = clip.from_config_dict(fileio.read_json(os.path.join(folder, "config.json")))
    sd, _ = files.read_tensors(weights[0])
    params = clip.from_state_dict(sd)
    for need in ("vision_model", "text_model", "visual_projection", "text_projection"):
        if need not in params:
            raise UserError(f"--clip={folder}: {os.path.basename(weights[0])} has no {need} weights "
                             "(a CLIPModel with both towers is needed)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {"params": tree.to(tree.cast(params, torch.float32), device=device), "cfg": cfg,
            "tokenizer": tokenizers.load(os.path.abspath(folder)),
            "processor": transformers.CLIPImageProcessor.from_pretrained(folder)}


def cosines(model: dict, images, prompts, batch_size: int = 32) -> np.ndarray:
    """cos(image embedding, prompt embedding) per image, float64 [N]; images uint8 [N, H, W, 3]."""
    u = torch.as_tensor(np.asarray(images))
    prompts = list(prompts)
    if u.dtype != torch.uint8 or u.ndim != 4 or u.shape[-1] != 3 or len(u) != len(prompts):
        raise UserError(f"clip score: expected uint8 images [N, H, W, 3] and N prompts, got {u.dtype} "
                         f"{tuple(u.shape)} and {len(prompts)} prompts")
    p, cfg, device = model["params"], model["cfg"], model["params"]["visual_projection"]["weight"].device
    n_tok = tokenizers.max_length(model["tokenizer"], cfg.text)
    out = []
    with torch.no_grad():
        for i in range(0, len(u), batch_size):
            chunk = u[i:i + batch_size]
            pixels = model["processor"](images=[im.permute(2, 0, 1) for im in chunk], return_tensors="pt")
            img = clip.image_features(p, pixels["pixel_values"].to(device), cfg)
            ids = tokenizers.encode(model["tokenizer"], prompts[i:i + batch_size], max_length=n_tok)
            txt = clip.text_features(p, ids.to(device), cfg)
            out.append(torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1, eps=0.0).cpu())
    return torch.cat(out).numpy()


def scores(cos: np.ndarray) -> dict:
    """Both conventions from the per-image cosines (see the module docstring)."""
    cos = np.asarray(cos, np.float64)
    return {"clip_score": float(max(100.0 * cos.mean(), 0.0)), "clip_score_nemo": float(cos.mean())}
