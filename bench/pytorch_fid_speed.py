"""pytorch-fid's InceptionV3 forward time, run in the reference venv by bench/eval.py (imports nothing of sd_func).

  python pytorch_fid_speed.py DIR BATCH ITERS THREADS     # DIR/weights.pth: a FIDInceptionV3 state dict
"""

import json
import os
import sys
import time

import torch
from pytorch_fid import inception as pf_inception


def main(d, batch, iters, threads):
    torch.set_num_threads(threads)
    sd = torch.load(os.path.join(d, "weights.pth"), map_location="cpu", weights_only=True)
    pf_inception.load_state_dict_from_url = lambda url, progress=True: sd  # no download: the given weights
    model = pf_inception.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    x = torch.randn(batch, 3, 299, 299, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            t = time.perf_counter()
            model(x)
            if i:
                times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"impl": "pytorch-fid 0.3.0 InceptionV3", "torch": torch.__version__, "s_per_batch": med,
                      "img_s": batch / med}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
