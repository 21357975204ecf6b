"""pytorch-fid's own code on files a test wrote: runs in the reference venv (.ci/ref-venv), not in sd_func's.

  python pytorch_fid_ref.py DIR

DIR/weights.pth: a FIDInceptionV3 state dict (random weights written by the test), loaded
into pytorch-fid's `InceptionV3([3], use_fid_inception=True)` in place of the download
(`load_state_dict_from_url` is pointed at the file; nothing is fetched). DIR/images.npy:
float32 [N, 3, H, W] in [0, 1], fed to its forward (which resizes to 299 bilinearly and
scales to [-1, 1]). DIR/stats_a.npz, DIR/stats_b.npz: statistics files read the way
pytorch-fid reads .npz files; DIR/feats_a.npy, DIR/feats_b.npy: features whose statistics
pytorch-fid computes itself (np.mean, np.cov). Writes DIR/ref_features.npy and
DIR/ref_fid.json. Imports nothing of sd_func.
"""

import json
import os
import sys

import numpy as np
import torch
from pytorch_fid import fid_score
from pytorch_fid import inception as pf_inception


def main(d):
    out = {"torch": torch.__version__}
    if os.path.exists(os.path.join(d, "weights.pth")):
        sd = torch.load(os.path.join(d, "weights.pth"), map_location="cpu", weights_only=True)
        pf_inception.load_state_dict_from_url = lambda url, progress=True: sd
        model = pf_inception.InceptionV3([3], use_fid_inception=True).eval()
        x = torch.from_numpy(np.load(os.path.join(d, "images.npy")))
        with torch.no_grad():
            feats = model(x)[0].squeeze(-1).squeeze(-1)
        np.save(os.path.join(d, "ref_features.npy"), feats.numpy())
    if os.path.exists(os.path.join(d, "feats_a.npy")):
        fa, fb = (np.load(os.path.join(d, f"feats_{k}.npy")).astype(np.float64) for k in "ab")
        mu_a, s_a = np.mean(fa, axis=0), np.cov(fa, rowvar=False)
        mu_b, s_b = np.mean(fb, axis=0), np.cov(fb, rowvar=False)
        out["fid_features"] = float(fid_score.calculate_frechet_distance(mu_a, s_a, mu_b, s_b))
        m1, s1 = fid_score.compute_statistics_of_path(os.path.join(d, "stats_a.npz"), None, 1, 0, "cpu")
        m2, s2 = fid_score.compute_statistics_of_path(os.path.join(d, "stats_b.npz"), None, 1, 0, "cpu")
        out["fid_npz"] = float(fid_score.calculate_frechet_distance(m1, s1, m2, s2))
    with open(os.path.join(d, "ref_fid.json"), "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main(sys.argv[1])
