"""A standard Triton model repository for txt2img, for `tritonserver --model-repository=DIR`.

As NeMo's deployment did, the model is a python-backend model that runs the sampler;
here it runs sd_func's own pipeline (backend_model.py), so that it serves the same
inputs, outputs, validation and images as run_serve.py:

  DIR/txt2img/config.pbtxt          inputs, outputs, max_batch_size, dynamic batching with
                                    the queue timeout, the Limits as a parameter
  DIR/txt2img/1/model.py            a shim: this checkout on sys.path, then backend_model
  DIR/txt2img/1/model.safetensors   the weights (sd_func native, config embedded)
  DIR/txt2img/1/config.json         the serving config (cfg.sample gives the defaults)
  DIR/txt2img/1/tokenizer/          the tokenizer files

The server's Python must be able to import torch and sd_func's requirements (Triton's
python backend runs the interpreter version its stub was built for; nvidia-pytriton
ships stubs for Python 3.8-3.13). The folder is written next to DIR and swapped in.
"""

import dataclasses
import json
import os
import tempfile

from sd_func import checkpoint, fileio
from sd_func.deploy import requests
from sd_func.errors import UserError
from sd_func.models import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer"  # in DIR/txt2img/1/
BACKEND_MODEL = "sd_func.deploy.backend_model"
INSTANCE_KIND = "KIND_CPU"  # the python model picks its torch device itself (CUDA when present)


def _tensor(name: str, dtype: str, dims, optional: bool = False) -> str:
    opt = "\n    optional: true" if optional else ""
    return (f"  {{\n    name: \"{name}\"\n    data_type: {dtype}\n    dims: [ {', '.join(map(str, dims))} ]"
            f"{opt}\n  }}")


def config_pbtxt(limits: requests.Limits) -> str:
    """The model configuration (protobuf text format) of txt2img."""
    inputs = ",\n".join(_tensor(n, t, [1], not required) for n, (_, t, required) in requests.INPUTS.items())
    name, _, dtype, shape = requests.OUTPUT
    limits_json = json.dumps(dataclasses.asdict(limits)).replace('"', '\\"')
    return f"""name: "{requests.MODEL_NAME}"
backend: "python"
max_batch_size: {limits.max_batch_size}
input [
{inputs}
]
output [
{_tensor(name, dtype, shape)}
]
dynamic_batching {{
  max_queue_delay_microseconds: {requests.QUEUE_DELAY_US}
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {int(limits.request_timeout_s * 1e6)}
    allow_timeout_override: true
  }}
}}
instance_group [ {{ count: 1 kind: {INSTANCE_KIND} }} ]
parameters {{
  key: "limits"
  value: {{ string_value: "{limits_json}" }}
}}
"""


def model_py() -> str:
    return (f'"""txt2img for Triton\'s python backend, written by sd_func\'s run_export.py --triton_repo."""\n\n'
            f"import sys\n\nsys.path.insert(0, {ROOT!r})\n\n"
            f"from {BACKEND_MODEL} import TritonPythonModel  # noqa: E402,F401\n")


def write(params: dict, cfg, out_dir: str, limits: requests.Limits) -> str:
    """Write the model repository into out_dir (atomically); returns the model folder."""
    limits.check()
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--triton_repo={out_dir}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-repo-", dir=parent)
    version = os.path.join(tmp, requests.MODEL_NAME, "1")
    os.makedirs(version)
    with open(os.path.join(tmp, requests.MODEL_NAME, "config.pbtxt"), "w") as fh:
        fh.write(config_pbtxt(limits))
    with open(os.path.join(version, "model.py"), "w") as fh:
        fh.write(model_py())
    checkpoint.save(params, cfg, os.path.join(version, WEIGHTS))
    tokenizer.load(cfg.text_encoder.tokenizer).save_pretrained(os.path.join(version, TOKENIZER))
    fileio.write_json(fileio.config_to_json(cfg), os.path.join(version, CONFIG))
    fileio.replace_folder(tmp, out_dir)
    return os.path.join(out_dir, requests.MODEL_NAME)
