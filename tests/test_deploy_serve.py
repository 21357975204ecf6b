"""run_serve.py: a real Triton server (PyTriton) on free local ports, real tritonclient
requests over HTTP and gRPC, compared with run_sample.py's PNGs; 16 requests from 8
threads batched by Triton; every bad request answered with an error naming the input,
then a good request; SIGTERM stops the server and its tritonserver. One server for the
module (start-up ~7 s on 2 cores)."""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import PIL.Image
import pytest
import serving
from deploy_models import SAMPLE, TINY_CONFIG, max_diff, reference_image, tiny_checkpoint, tiny_model
from tritonclient.utils import InferenceServerException

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = ["--max_steps=12", "--max_pixels=2304", "--max_prompt_chars=60", "--max_batch_size=8"]
# The server's defaults and run_sample.py's options: few steps, small images, no guidance
# (the "settings" case asks for guidance), so that the module's ~40 images stay cheap.
# (request inputs, run_sample.py flags) that must give the same image
CASES = {
    "defaults": (dict(prompt="a red circle on a blue background", seed=5),
                 ["--prompt=a red circle on a blue background", "--seed=5"]),
    "settings": (dict(prompt="a green square", negative_prompt="blue", seed=11, steps=4,
                      sampler="euler_ancestral", guidance_scale=3.0, height=40, width=48),
                 ["--prompt=a green square", "--negative_prompt=blue", "--seed=11", "--config.sample.steps=4",
                  "--config.sample.sampler=euler_ancestral", "--config.sample.guidance_scale=3.0",
                  "--config.sample.height=40", "--config.sample.width=48"]),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"), seed=4)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    http, grpc, metrics = serving.free_ports(3)
    cmd = [sys.executable, "run_serve.py", f"--ckpt={ckpt}", f"--config={TINY_CONFIG}", f"--http_port={http}",
           f"--grpc_port={grpc}", f"--metrics_port={metrics}", *LIMITS, *SAMPLE]
    with serving.server(cmd, http, str(d / "serve.log")) as proc:
        yield dict(proc=proc, http=http, grpc=grpc, metrics=metrics, log=str(d / "serve.log"))


@pytest.fixture(scope="module")
def pngs(ckpt, tmp_path_factory):
    out = {}
    for name, (_, flags) in CASES.items():
        outdir = tmp_path_factory.mktemp(f"png_{name}")
        r = subprocess.run([sys.executable, "run_sample.py", f"--config={TINY_CONFIG}", f"--ckpt={ckpt}",
                            f"--outdir={outdir}", *SAMPLE, *flags],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = np.array(PIL.Image.open(outdir / "00000.png"))
    return out


@pytest.fixture(scope="module")
def model(ckpt):
    return tiny_model(ckpt)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_image_equals_run_sample(server, pngs, protocol):
    for name, (values, _) in CASES.items():
        image = serving.infer(server[protocol], serving.request(**values), protocol)
        assert image.dtype == np.uint8 and image.shape[0] == 1
        d = max_diff(image[0], pngs[name])
        print(f"\n{protocol} {name}: max |server - run_sample.py| = {d} u8 levels")
        assert d <= 1, (name, d)


def test_concurrent_requests_are_batched_and_right(server, model):
    """Every fourth request asks for other settings: one execution then holds two groups."""
    params, cfg = model
    other = dict(steps=2, sampler="euler", guidance_scale=2.0)
    jobs = [(f"a {c} {s} on a {b} background", 100 + i, other if i % 4 == 3 else {}) for i, (c, s, b) in
            enumerate((c, s, b) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")
                      for b in ("white", "black"))]
    execs0 = serving.metric(server["metrics"], "nv_inference_exec_count")
    ok0 = serving.metric(server["metrics"], "nv_inference_request_success")
    results, errors = {}, []

    def client(worker):
        try:
            for k in (worker, worker + 8):
                prompt, seed, settings = jobs[k]
                results[k] = serving.infer(server["http"], serving.request(prompt, seed=seed, **settings))
        except Exception as e:  # reported below with the others
            errors.append(repr(e))
    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(serving.REQUEST_TIMEOUT_S)
    assert not errors and len(results) == 16, errors
    executions = serving.metric(server["metrics"], "nv_inference_exec_count") - execs0
    succeeded = serving.metric(server["metrics"], "nv_inference_request_success") - ok0
    worst = max(max_diff(results[k][0], reference_image(params, cfg, p, s, **o)) for k, (p, s, o) in enumerate(jobs))
    print(f"\n16 requests from 8 threads: {int(executions)} executions, max |batched - alone| = {worst} u8 levels")
    assert succeeded == 16 and executions < 16
    assert worst <= 1


BAD = {  # name: (request inputs, what the error message must say)
    "missing prompt": ({"seed": np.array([[1]], dtype=np.int64)}, "prompt"),
    "steps 0": (serving.request(steps=0), "steps: 0, expected 1 to 12"),
    "steps over the limit": (serving.request(steps=13), "steps: 13, expected 1 to 12 (--max_steps)"),
    "height not a multiple of 8": (serving.request(height=36), "height: 36, expected a positive multiple of 8"),
    "width not a multiple of 8": (serving.request(width=44), "width: 44, expected a positive multiple of 8"),
    "size over the limit": (serving.request(height=64, width=64), "over the limit of 2304 (--max_pixels)"),
    "unknown sampler": (serving.request(sampler="nonsense"), "sampler: unknown sampler 'nonsense'"),
    "wrong dtype": ({**serving.request(), "steps": np.array([[5]], dtype=np.int64)}, "steps"),
    "wrong shape": (serving.request(prompt=np.array([[b"a", b"b"]], dtype=object)), "prompt"),
    "prompt over the limit": (serving.request("a red circle " * 5), "prompt: 65 characters, over the limit of 60"),
    "non-UTF-8 prompt": (serving.request(b"a red \xff circle"), "prompt: not valid UTF-8"),
    "non-UTF-8 negative prompt": (serving.request(negative_prompt=b"\xc3"), "negative_prompt: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_is_an_error_then_the_server_serves(server, pngs, case):
    inputs, want = BAD[case]
    if case == "wrong shape":
        inputs = {"prompt": np.array([[b"a", b"b"]], dtype=object)}
    with pytest.raises(InferenceServerException) as e:
        serving.infer(server["http"], inputs)
    assert want in e.value.message(), e.value.message()[-1500:]
    values, _ = CASES["defaults"]
    assert max_diff(serving.infer(server["http"], serving.request(**values))[0], pngs["defaults"]) <= 1


def test_sigterm_stops_cleanly(server):
    """Last in the module: SIGTERM ends run_serve.py with status 0 and no tritonserver left."""
    proc = server["proc"]
    assert any("tritonserver" in serving.cmdline(p) for p in serving.children(proc.pid))
    left = serving.stop(proc, signal.SIGTERM)
    assert proc.returncode == 0 and not left, (proc.returncode, left, serving.tail(server["log"]))


@pytest.mark.parametrize("args, want", [
    (["--max_steps=0"], "--max_steps=0: expected an integer >= 1"),
    ([], "--ckpt is required"),
    (["--config.sample.sampler=nonsense"], "unknown sampler 'nonsense'"),
])
def test_bad_flags_are_one_line(ckpt, args, want):
    flags = [f"--ckpt={ckpt}"] if args != [] else []
    r = subprocess.run([sys.executable, "run_serve.py", f"--config={TINY_CONFIG}", *flags, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("run_serve.py: error: ") and want in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
