"""ONNX export of a Stable Diffusion checkpoint: text encoder, UNet, VAE decoder and encoder.

What NeMo's export script wrote for its Triton / TensorRT deployment, from any checkpoint
`checkpoint.load` reads. The exporter needs a torch.nn.Module, so each model gets a thin
shell here, built at the edge from the same params (DESIGN.md principle 2): the params
are the shell's buffers and `forward` calls the model's pure `apply` / `encode` /
`decode`; no model code is written twice. While the exporter traces, `nn.exporting()`
turns off the CPU eager fast paths (GEMM convolutions, fp32 upcasts), so the graph holds
plain Conv / MatMul / LayerNorm nodes in the export dtype.

Files (batch, sequence and spatial axes dynamic):
  text_encoder.onnx  input_ids int64 [B, L]                  -> last_hidden_state [B, L, D]
  unet.onnx          sample [B, C, h, w], timestep [B],
                     encoder_hidden_states [B, L, D]          -> out_sample [B, C, h, w]
  vae_decoder.onnx   latent [B, C, h, w] (unscaled)           -> image [B, 3, 8h, 8w] in ~[-1, 1]
  vae_encoder.onnx   image [B, 3, H, W] in [-1, 1]             -> mean, logvar [B, C, H/8, W/8]
  tokenizer/         the CLIP tokenizer (save_pretrained)
  pipeline.json      the noise schedule, prediction type, scaling factor, default sizes and
                     sampling options, clip_skip, and each file's inputs and outputs

The exporter is torch's TorchScript-based one (`dynamo=False`, `dynamic_axes`): it needs
no package beyond onnx, traces a tiny model in seconds, and its graphs ran in onnxruntime
within float32 rounding of `apply` at every batch and latent size the tests try. The
timestep keeps the dtype the UNet expects (float32); the text encoder's hidden states
and the sample carry the export dtype.
"""

import dataclasses
import os

import torch

from sd_func import fileio, tree
from sd_func.diffusion import schedules
from sd_func.errors import UserError
from sd_func.models import autoencoder, text_encoder, tokenizer, unet
from sd_func.pipelines import options as pipeline_options
from sd_func.pipelines.generate import vae_scale_factor

DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_OPSET = 17  # LayerNormalization (17) and SDPA's decomposition; TensorRT 8.6+ reads it
PIPELINE_FORMAT = "sd_func.onnx/1"
SIGNATURES = {  # file: (input names, output names)
    "text_encoder.onnx": (("input_ids",), ("last_hidden_state",)),
    "unet.onnx": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    "vae_decoder.onnx": (("latent",), ("image",)),
    "vae_encoder.onnx": (("image",), ("mean", "logvar")),
}


class Shell(torch.nn.Module):
    """A torch.nn.Module around a pure function fn(params, *inputs): params become buffers
    (named by their tree paths) so that the exporter stores them as initializers."""

    def __init__(self, params: dict, fn):
        super().__init__()
        self._names = {}
        for path, leaf in tree.flatten(params).items():
            name = path.replace(tree.SEP, "__").replace(".", "_")
            self.register_buffer(name, leaf, persistent=False)
            self._names[path] = name
        self._fn = fn

    def params(self) -> dict:
        return tree.unflatten({path: getattr(self, name) for path, name in self._names.items()})

    def forward(self, *inputs):
        return self._fn(self.params(), *inputs)


@dataclasses.dataclass(frozen=True)
class Graph:
    """One ONNX file: its shell, example inputs for the trace and dynamic axes (names: SIGNATURES)."""
    file: str
    module: torch.nn.Module
    inputs: tuple
    dynamic_axes: dict

    @property
    def input_names(self) -> tuple:
        return SIGNATURES[self.file][0]

    @property
    def output_names(self) -> tuple:
        return SIGNATURES[self.file][1]


def graphs(params: dict, cfg, dtype=torch.float32, batch: int = 2) -> list[Graph]:
    """The four shells of a checkpoint with example inputs (batch rows, the default size)."""
    check_exportable(cfg)
    p = tree.cast(params, dtype)
    o = pipeline_options.resolve(cfg)
    f, c = vae_scale_factor(cfg), cfg.vae.latent_channels
    h, w = o.height // f, o.width // f
    tok = tokenizer.load(cfg.text_encoder.tokenizer)
    length = tokenizer.max_length(tok, cfg.text_encoder)
    clip_skip = int(o.clip_skip) or None
    ids = torch.randint(0, cfg.text_encoder.vocab_size, (batch, length))
    image = torch.rand(batch, 3, h * f, w * f, dtype=dtype) * 2 - 1
    spatial = {0: "batch", 2: "height", 3: "width"}
    return [
        Graph("text_encoder.onnx",
              Shell(p["text_encoder"], lambda q, i: text_encoder.apply(q, i, cfg.text_encoder, clip_skip)),
              (ids,),
              {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"}}),
        Graph("unet.onnx", Shell(p["unet"], lambda q, x, t, e: unet.apply(q, x, t, e, cfg.unet)),
              (torch.randn(batch, cfg.unet.in_channels, h, w, dtype=dtype),
               torch.linspace(1, cfg.diffusion.num_train_timesteps - 1, batch),
               torch.randn(batch, length, cfg.unet.cross_attention_dim, dtype=dtype)),
              {"sample": spatial, "timestep": {0: "batch"},
               "encoder_hidden_states": {0: "batch", 1: "sequence"}, "out_sample": spatial}),
        Graph("vae_decoder.onnx", Shell(p["vae"], lambda q, z: autoencoder.decode(q, z, cfg.vae)),
              (torch.randn(batch, c, h, w, dtype=dtype),),
              {"latent": spatial, "image": spatial}),
        Graph("vae_encoder.onnx", Shell(p["vae"], lambda q, x: autoencoder.encode(q, x, cfg.vae)),
              (image,),
              {"image": spatial, "mean": spatial, "logvar": spatial}),
    ]


def check_exportable(cfg) -> None:
    """UserError for a checkpoint whose model the exported txt2img pipeline cannot describe."""
    if cfg.unet.in_channels != cfg.vae.latent_channels:
        raise UserError(f"unet.in_channels={cfg.unet.in_channels}: an inpainting UNet; the ONNX export "
                        f"covers txt2img models (unet.in_channels == vae.latent_channels="
                        f"{cfg.vae.latent_channels})")
    if not cfg.text_encoder.get("tokenizer", ""):
        raise UserError("text_encoder.tokenizer is empty: the export writes the tokenizer files; "
                        "pass --config.text_encoder.tokenizer=PATH")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"--dtype={name}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def export(params: dict, cfg, out_dir: str, dtype: str = "float32", opset: int = DEFAULT_OPSET) -> list[str]:
    """Write the four ONNX files, tokenizer/ and pipeline.json into out_dir; returns the paths."""
    td = torch_dtype(dtype)
    if not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise UserError(f"--opset={opset}: expected an integer >= {DEFAULT_OPSET} (LayerNormalization)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out={out_dir}: exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for g in graphs(params, cfg, td):
        paths.append(os.path.join(out_dir, g.file))
        export_graph(g, paths[-1], opset)
    tok_dir = os.path.join(out_dir, "tokenizer")
    tokenizer.load(cfg.text_encoder.tokenizer).save_pretrained(tok_dir)
    paths.append(tok_dir)
    paths.append(os.path.join(out_dir, "pipeline.json"))
    fileio.write_json(pipeline_json(cfg, dtype, opset), paths[-1])
    return paths


def export_graph(g: Graph, path: str, opset: int) -> None:
    """One shell to one ONNX file (atomically); an exporter failure is a UserError naming it."""
    def write(tmp):
        with torch.no_grad():
            torch.onnx.export(g.module, g.inputs, tmp, dynamo=False, opset_version=opset,
                              input_names=list(g.input_names), output_names=list(g.output_names),
                              dynamic_axes=g.dynamic_axes, do_constant_folding=True)
    try:
        fileio.atomic_write(write, path, ".onnx")
    except torch.onnx.errors.OnnxExporterError as e:
        raise UserError(f"{g.file}: the ONNX exporter failed (opset {opset}): {str(e).splitlines()[0]}") from e


def pipeline_json(cfg, dtype: str, opset: int) -> dict:
    """What a runtime needs beside the graphs to run txt2img as sd_func does."""
    o = pipeline_options.resolve(cfg)
    tok = tokenizer.load(cfg.text_encoder.tokenizer)
    return {
        "format": PIPELINE_FORMAT,
        "dtype": dtype,
        "opset": opset,
        "diffusion": fileio.config_to_json(cfg.diffusion),
        "prediction_type": schedules.field(cfg.diffusion, "prediction_type"),
        "alphas_cumprod": schedules.alphas_cumprod(cfg.diffusion).tolist(),
        "scaling_factor": float(cfg.vae.scaling_factor),
        "vae_scale_factor": vae_scale_factor(cfg),
        "latent_channels": int(cfg.vae.latent_channels),
        "max_length": tokenizer.max_length(tok, cfg.text_encoder),
        "clip_skip": int(o.clip_skip),
        "defaults": {"height": o.height, "width": o.width, "sampler": o.sampler, "steps": o.steps,
                     "guidance_scale": o.guidance_scale, "guidance_rescale": o.guidance_rescale},
        "models": {f: {"inputs": list(i), "outputs": list(o)} for f, (i, o) in SIGNATURES.items()},
    }
