"""The Triton python-backend model of a model repository (repository.py): txt2img.

Triton's python backend imports `<repo>/txt2img/1/model.py`, which run_export.py writes as
a shim that puts this sd_func checkout on sys.path and imports TritonPythonModel from
here; `triton_python_backend_utils` exists only inside the backend's stub process.
initialize() loads `1/model.safetensors` with `1/config.json` (the serving config, its
tokenizer in `1/tokenizer/`) as run_serve.py does, and the Limits from the model
config's `limits` parameter; execute() runs requests.Model and answers every request on
its own: a bad request gets its error, the others of the same execution their images.
"""

import json
import os

import triton_python_backend_utils as pb_utils

from sd_func import fileio
from sd_func.deploy import requests
from sd_func.deploy.repository import CONFIG, TOKENIZER, WEIGHTS
from sd_func.pipelines import job


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        parameters = json.loads(args["model_config"]).get("parameters", {})
        limits = requests.Limits(**json.loads(parameters["limits"]["string_value"]))
        cfg = fileio.config_from_json(fileio.read_json(os.path.join(folder, CONFIG)), CONFIG)
        cfg.text_encoder.tokenizer = os.path.join(folder, TOKENIZER)
        params, cfg = job.load_model(os.path.join(folder, WEIGHTS), cfg)
        self.model = requests.Model(params, cfg, limits)

    def execute(self, reqs):
        inputs = []
        for r in reqs:
            tensors = {n: pb_utils.get_input_tensor_by_name(r, n) for n in requests.INPUTS}
            inputs.append({n: t.as_numpy() for n, t in tensors.items() if t is not None})
        out = []
        for o in self.model.execute(inputs):
            if isinstance(o, requests.RequestError):
                out.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(o))))
            else:
                out.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(requests.OUTPUT[0], o[requests.OUTPUT[0]])]))
        return out
