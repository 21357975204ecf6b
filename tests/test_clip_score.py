"""CLIP score: image and text embeddings against transformers' CLIPModel, the score against
torchmetrics' CLIPScore, on one tiny random CLIP folder written with save_pretrained."""

import numpy as np
import pytest
import torch
import transformers
from torchmetrics.multimodal.clip_score import CLIPScore

from sd_func import random
from sd_func.data import shapes
from sd_func.errors import UserError
from sd_func.eval import clip_score
from sd_func.models import clip, tokenizer

TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=998, eos_token_id=999, pad_token_id=999)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="quick_gelu")


def tiny_clip_folder(d) -> str:
    """A tiny random CLIPModel + tokenizer + image processor saved in folder d."""
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                         projection_dim=24)).eval()
    with torch.no_grad():
        for name, t in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                t.add_(0.2 * torch.randn_like(t))
        # This seed's random towers share a direction that makes every cosine about -0.35;
        # flipped, the mean is positive and torchmetrics' clamp at 0 does not hide the comparison.
        ref.text_projection.weight.neg_()
    ref.save_pretrained(d)
    tokenizer.build(tokenizer.SHAPES_WORDS, str(d))
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # "openai" in the name makes torchmetrics' own loader accept it as a CLIP folder.
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "openai-clip-tiny")


class _Features4(transformers.CLIPModel):
    """CLIPModel whose get_*_features return the tensor, as in transformers 4: torchmetrics
    1.9.0 calls .norm() on the result, and transformers 5 returns an output object there."""

    def get_image_features(self, *args, **kwargs):
        out = super().get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs):
        out = super().get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def _data(n=6, seed=0):
    images = random.randint(random.key(seed), (n, 40, 48, 3), 0, 256).to(torch.uint8)
    prompts = [shapes.prompts()[i * 7] for i in range(n)]
    return images, prompts


def test_embeddings_match_transformers(folder):
    model = clip_score.load(folder, device="cpu")
    ref = transformers.CLIPModel.from_pretrained(folder).eval()
    images, prompts = _data()
    pixels = model["processor"](images=[im.permute(2, 0, 1) for im in images], return_tensors="pt")["pixel_values"]
    ids = tokenizer.encode(model["tokenizer"], prompts, max_length=16)
    with torch.no_grad():
        ours_img = clip.image_features(model["params"], pixels, model["cfg"])
        ours_txt = clip.text_features(model["params"], ids, model["cfg"])
        ref_img = ref.get_image_features(pixel_values=pixels)
        ref_txt = ref.get_text_features(input_ids=ids)
    ref_img = getattr(ref_img, "pooler_output", ref_img)  # transformers 5 returns an output object
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
    errs = {"image": (ours_img - ref_img).abs().max().item(), "text": (ours_txt - ref_txt).abs().max().item()}
    print("CLIP embeddings max abs err", errs)
    assert ref_img.std() > 1e-2 and ref_txt.std() > 1e-2 and max(errs.values()) < 1e-5


def test_score_matches_torchmetrics(folder):
    model = clip_score.load(folder, device="cpu")
    images, prompts = _data(8, seed=1)
    cos = clip_score.cosines(model, images, prompts, batch_size=3)
    ours = clip_score.scores(cos)
    # torchmetrics' own loader for a folder is CLIPModel/CLIPProcessor.from_pretrained(path);
    # the callable form does the same with the transformers-5 adapter above.
    metric = CLIPScore(model_name_or_path=lambda: (_Features4.from_pretrained(folder).eval(),
                                                   transformers.CLIPProcessor.from_pretrained(folder)))
    metric.update([im.permute(2, 0, 1) for im in images[:5]], prompts[:5])  # two updates, as a user would
    metric.update([im.permute(2, 0, 1) for im in images[5:]], prompts[5:])
    ref = float(metric.compute())
    print(f"CLIP score ours {ours['clip_score']:.6f} torchmetrics {ref:.6f}; NeMo's mean cos "
          f"{ours['clip_score_nemo']:.6f}; cosines {np.round(cos, 3)}")
    assert abs(ours["clip_score"] - ref) < 1e-4 * max(1.0, abs(ref))
    assert ours["clip_score_nemo"] == pytest.approx(cos.mean()) and abs(ours["clip_score"]) > 1e-3
    # Against an unrelated prompt order the score changes: the text really enters.
    assert clip_score.cosines(model, images, prompts[::-1])[0] != pytest.approx(cos[0])


def test_missing_clip_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="needs --clip=PATH.*openai/clip-vit-large-patch14"):
        clip_score.load(None)
    with pytest.raises(UserError, match="no such folder"):
        clip_score.load(str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"not a CLIP folder.*config\.json"):
        clip_score.load(str(tmp_path))
