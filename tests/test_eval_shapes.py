"""The shapes analyzer reads back what the dataset drew, survives blur and noise, rejects wrong prompts."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd_func.data import shapes
from sd_func.eval import shapes as ev


@pytest.fixture(scope="module")
def drawn():
    images, prompts = zip(*(shapes.example(7, i) for i in range(150)))
    return np.stack(images), list(prompts)


def blur(images, radius):
    return np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius))) for x in images])


def noise(images, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


def test_dataset_images_read_back_exactly(drawn):
    images, prompts = drawn
    r = ev.score(images, prompts)
    assert (r["accuracy"], r["color"], r["shape"], r["background"], r["n"]) == (1.0, 1.0, 1.0, 1.0, 150)
    assert ev.describe(images[0]) == prompts[0]
    big, text = shapes.example(7, 1000, resolution=256)   # other resolutions are resized to 64
    assert ev.describe(big) == text


@pytest.mark.parametrize("name", ["blur1", "blur2", "noise25", "blur1+noise12"])
def test_degraded_images(drawn, name):
    images, prompts = drawn
    degraded = {"blur1": lambda: blur(images, 1), "blur2": lambda: blur(images, 2),
                "noise25": lambda: noise(images, 25),
                "blur1+noise12": lambda: noise(blur(images, 1), 12)}[name]()
    assert ev.score(degraded, prompts)["accuracy"] >= 0.98


def test_wrong_prompts_fail(drawn):
    images, prompts = drawn[0][:90], drawn[1][:90]
    assert ev.score(images, prompts[1:] + prompts[:1])["accuracy"] < 0.1
    parsed = [shapes.parse(p) for p in prompts]
    names = list(shapes.COLORS)
    swap = lambda c, avoid: next(n for n in names if n not in (c, avoid))
    wrong_color = [shapes.caption(swap(c, b), s, b) for c, s, b in parsed]
    wrong_shape = [shapes.caption(c, shapes.SHAPES[(shapes.SHAPES.index(s) + 1) % 3], b) for c, s, b in parsed]
    wrong_bg = [shapes.caption(c, s, swap(b, c)) for c, s, b in parsed]
    r = ev.score(images, wrong_color)
    assert (r["accuracy"], r["color"], r["shape"], r["background"]) == (0.0, 0.0, 1.0, 1.0)
    r = ev.score(images, wrong_shape)
    assert (r["accuracy"], r["color"], r["shape"], r["background"]) == (0.0, 1.0, 0.0, 1.0)
    r = ev.score(images, wrong_bg)
    assert (r["accuracy"], r["color"], r["shape"], r["background"]) == (0.0, 1.0, 1.0, 0.0)


def test_blank_and_bad_inputs():
    blank = np.full((1, 64, 64, 3), shapes.COLORS["blue"], np.uint8)
    r = ev.score(blank, ["a red circle on a blue background"])
    assert r["background"] == 1.0 and r["accuracy"] == 0.0 and r["predictions"][0]["shape"] is None
    with pytest.raises(ValueError, match="not 'a"):
        ev.score(blank, ["a cat"])
    with pytest.raises(ValueError, match="uint8"):
        ev.score(blank.astype(np.float32), ["a red circle on a blue background"])
    with pytest.raises(ValueError, match="N prompts"):
        ev.score(blank, [])
