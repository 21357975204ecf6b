"""run_export.py --triton_repo: a standard Triton model repository served by the real
`tritonserver` binary nvidia-pytriton ships (python backend), with tritonclient: the same
request gives the same image as the pipeline in-process (and so as run_serve.py and
run_sample.py, test_deploy_serve.py), a bad request batched with good ones fails alone,
and SIGINT stops the server."""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import serving
from deploy_models import SAMPLE, TINY_CONFIG, max_diff, reference_image, tiny_checkpoint, tiny_model
from tritonclient.utils import InferenceServerException

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"), seed=6)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    r = subprocess.run([sys.executable, "run_export.py", f"--config={TINY_CONFIG}", f"--ckpt={ckpt}",
                        f"--triton_repo={d / 'models'}", "--max_steps=8", *SAMPLE],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    http, grpc, metrics = serving.free_ports(3)
    cmd, env = serving.tritonserver(str(d))
    cmd += [f"--model-repository={d / 'models'}", "--http-address=127.0.0.1", f"--http-port={http}",
            "--grpc-address=127.0.0.1", f"--grpc-port={grpc}", "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics}", "--allow-gpu-metrics=false", "--exit-timeout-secs=10"]
    with serving.server(cmd, http, str(d / "tritonserver.log"), env=env) as proc:
        yield dict(proc=proc, http=http, grpc=grpc, metrics=metrics, log=str(d / "tritonserver.log"))


@pytest.fixture(scope="module")
def model(ckpt):
    return tiny_model(ckpt)


def test_repository_files(server):
    folder = os.path.dirname(server["log"])
    names = {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}
    for f in ("models/txt2img/config.pbtxt", "models/txt2img/1/model.py", "models/txt2img/1/model.safetensors",
              "models/txt2img/1/config.json"):
        assert f in names, sorted(names)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_same_request_same_image(server, model, protocol):
    params, cfg = model
    values = dict(prompt="a blue triangle", negative_prompt="red", seed=21, steps=4, sampler="dpmpp_2m",
                  guidance_scale=2.5, height=24, width=32)
    image = serving.infer(server[protocol], serving.request(**values), protocol)
    want = reference_image(params, cfg, values.pop("prompt"), values.pop("seed"), values.pop("negative_prompt"),
                           **values)
    d = max_diff(image[0], want)
    print(f"\nmodel repository, {protocol}: max |server - pipeline| = {d} u8 levels")
    assert d <= 1


def test_bad_request_fails_alone(server, model):
    """Concurrent good and bad requests: each bad one gets its own error naming the input."""
    params, cfg = model
    reqs = [serving.request("a red circle", seed=s) for s in range(4)] + \
        [serving.request(steps=9), serving.request(sampler="nonsense")]
    out = [None] * len(reqs)

    def call(i):
        try:
            out[i] = serving.infer(server["http"], reqs[i])
        except InferenceServerException as e:
            out[i] = e.message()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(serving.REQUEST_TIMEOUT_S)
    for s in range(4):
        assert isinstance(out[s], np.ndarray), out[s]
        assert max_diff(out[s][0], reference_image(params, cfg, "a red circle", s)) <= 1
    assert out[4] == "steps: 9, expected 1 to 8 (--max_steps)", out[4]
    assert out[5].startswith("sampler: unknown sampler 'nonsense'"), out[5]


def test_sigint_stops_cleanly(server):
    """Last in the module."""
    proc = server["proc"]
    left = serving.stop(proc, signal.SIGINT)
    assert proc.returncode == 0 and not left, (proc.returncode, left, serving.tail(server["log"]))
