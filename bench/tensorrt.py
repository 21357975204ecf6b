"""The UNet call through TensorRT: an fp16 engine built from sd_func's ONNX export, checked
against the PyTorch fp16 UNet and timed against sd_func eager / compiled and diffusers.

NOT RUN YET: written without a GPU (2026-12-01); its first run on a CUDA machine is
also its first test. BENCHMARKS.md gets its numbers once it has run.

  python bench/tensorrt.py [--tiny] [--size 64] [--batch 2] [--iters 20] [--warmup 3]
      [--opset 17] [--workdir bench/results/trt] [--out bench/results/tensorrt.json]

The SD 1.5 UNet (random weights, bench/unet.py's build_reference; --tiny: the same
layout at a tenth of the width) in float16 on CUDA; sd_func's params are its state-dict
tensors. unet.onnx comes from sd_func.deploy.onnx_export (the same Shell and exporter as
run_export.py), the engine from the `tensorrt` wheel (ONNX parser, FP16 flag, one
optimization profile at exactly [batch, 4, size, size]). Reports, per implementation,
the median ms per call after warm-up, and for TensorRT and sd_func the max abs error
relative to the largest |output| of sd_func's fp16 eager call.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # puts the repo root on sys.path
from unet import TINY, build_reference

from sd_func import tree
from sd_func.deploy import onnx_export
from sd_func.models import unet
from sd_func.pipelines import make_unet_fn


def build_engine(onnx_path: str, shapes: dict):
    import tensorrt as trt  # only this script needs it
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build the engine (see the log above)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    return engine, engine.create_execution_context()


def trt_call(context, inputs: dict, out: torch.Tensor):
    for name, x in inputs.items():
        context.set_input_shape(name, tuple(x.shape))
        context.set_tensor_address(name, x.data_ptr())
    context.set_tensor_address("out_sample", out.data_ptr())

    def call():
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out
    return call


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--opset", type=int, default=onnx_export.DEFAULT_OPSET)
    ap.add_argument("--workdir", default=os.path.join(common.ROOT, "bench", "results", "trt"))
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results", "tensorrt.json"))
    a = ap.parse_args()
    device = torch.device("cuda")
    cfg = unet.config(**(TINY if a.tiny else {}))
    model = build_reference(cfg, device).half()
    params = tree.from_state_dict(model.state_dict())
    ctx_dim = cfg.cross_attention_dim
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, 4, a.size, a.size, generator=g).to(device, torch.float16)
    t = torch.full((a.batch,), 500.0, device=device)
    c = torch.randn(a.batch, 77, ctx_dim, generator=g).to(device, torch.float16)
    inputs = {"sample": x, "timestep": t, "encoder_hidden_states": c}

    os.makedirs(a.workdir, exist_ok=True)
    path = os.path.join(a.workdir, "unet.onnx")
    shell = onnx_export.Shell(params, lambda q, x_, t_, c_: unet.apply(q, x_, t_, c_, cfg))
    spatial = {0: "batch", 2: "height", 3: "width"}
    graph = onnx_export.Graph("unet.onnx", shell, (x, t, c),
                              {"sample": spatial, "timestep": {0: "batch"},
                               "encoder_hidden_states": {0: "batch", 1: "sequence"}, "out_sample": spatial})
    onnx_export.export_graph(graph, path, a.opset)
    engine, context = build_engine(path, {k: tuple(v.shape) for k, v in inputs.items()})

    with torch.no_grad():
        want = unet.apply(params, x, t, c, cfg).float()
        compiled = make_unet_fn(cfg, compile=True)
        calls = {
            "tensorrt fp16": trt_call(context, inputs, torch.empty_like(x)),
            "sd_func eager fp16": lambda: unet.apply(params, x, t, c, cfg),
            "sd_func compiled fp16": lambda: compiled(params, x, t, c),
            "diffusers eager fp16": lambda: model(x, t, c).sample,
        }
        rows = []
        for name, call in calls.items():
            r = common.time_calls(call, device, iters=a.iters, warmup=a.warmup)
            out = call().float()
            torch.cuda.synchronize()
            rows.append({"impl": name, "ms": r["median_s"] * 1e3, "first_s": r["first_s"],
                         "rel_err": float((out - want).abs().max() / want.abs().max())})
            print(f"{name}: {rows[-1]['ms']:.2f} ms, max rel err {rows[-1]['rel_err']:.2e}", flush=True)
    info = common.machine_info(device)
    info.update(config="tiny" if a.tiny else "sd15", size=a.size, batch=a.batch)
    common.print_table(rows, [("impl", "implementation", "s"), ("ms", "ms/call", ".2f"),
                              ("rel_err", "max rel err", ".2e")])
    common.write_json(a.out, {"info": info, "results": rows})
    del engine


if __name__ == "__main__":
    main()
