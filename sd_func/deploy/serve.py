"""A Triton Inference Server for txt2img through PyTriton: what run_serve.py starts.

PyTriton runs NVIDIA's real `tritonserver` binary (shipped in the nvidia-pytriton wheel)
with a python-backend proxy that calls `infer` in this process. Triton does the rest:
HTTP and gRPC endpoints, dynamic batching (max_batch_size images, a short queue delay
so that concurrent requests meet), the queue's per-request timeout, health
(`/v2/health/ready`) and Prometheus metrics. Before the server starts, the running
interpreter's library folder goes first on LD_LIBRARY_PATH (otherwise the backend stub
loads another libpython and model init fails), and the workspace is a fresh folder.
SIGTERM and SIGINT stop the server and its tritonserver process, then the workspace is
removed.

PyTriton answers one error per execution: when a request of a batch fails validation,
the other requests of that execution get the same error (message naming the input of
the bad request). The model repository's python backend (repository.py) answers each
request on its own.
"""

import dataclasses
import os
import shutil
import signal
import sysconfig
import tempfile

from pytriton.exceptions import PyTritonError
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
from pytriton.triton import Triton, TritonConfig

from sd_func.deploy import requests
from sd_func.errors import UserError


@dataclasses.dataclass(frozen=True)
class Ports:
    host: str = "127.0.0.1"
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def library_path_first(env: dict) -> dict:
    """env with this interpreter's LIBDIR first on LD_LIBRARY_PATH (the backend stub's libpython)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    return {**env, "LD_LIBRARY_PATH": ":".join([libdir, *rest])}


def infer_fn(model: requests.Model):
    """PyTriton's callable: the requests of one execution -> one response dict each."""
    def infer(reqs):
        out = model.execute([dict(r.items()) for r in reqs])
        bad = [(i, r) for i, r in enumerate(out) if isinstance(r, requests.RequestError)]
        if bad:
            i, e = bad[0]
            prefix = f"request {i + 1} of {len(reqs)} in this batch: " if len(reqs) > 1 else ""
            raise requests.RequestError(prefix + str(e))
        return out
    return infer


def triton_inputs() -> list[Tensor]:
    return [Tensor(name=n, dtype=dt, shape=(1,), optional=not required)
            for n, (dt, _, required) in requests.INPUTS.items()]


def model_config(limits: requests.Limits) -> ModelConfig:
    policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True,
                         default_timeout_microseconds=int(limits.request_timeout_s * 1e6))
    return ModelConfig(batching=True, max_batch_size=limits.max_batch_size,
                       batcher=DynamicBatcher(max_queue_delay_microseconds=requests.QUEUE_DELAY_US,
                                              default_queue_policy=policy))


def start(model: requests.Model, ports: Ports, workspace: str) -> Triton:
    """A started Triton serving `txt2img` from model (call .stop() to end it)."""
    os.environ.update(library_path_first(dict(os.environ)))
    config = TritonConfig(http_address=ports.host, http_port=ports.http, grpc_address=ports.host,
                          grpc_port=ports.grpc, metrics_address=ports.host, metrics_port=ports.metrics,
                          allow_metrics=True, allow_gpu_metrics=False, exit_timeout_secs=5)
    triton = Triton(config=config, workspace=workspace)
    name, dtype, _, shape = requests.OUTPUT
    triton.bind(model_name=requests.MODEL_NAME, infer_func=infer_fn(model), inputs=triton_inputs(),
                outputs=[Tensor(name=name, dtype=dtype, shape=shape)], config=model_config(model.limits),
                strict=True)
    triton.run()
    return triton


def serve(model: requests.Model, ports: Ports) -> None:
    """Serve until SIGTERM / SIGINT (or until Triton dies), then stop and clean up."""
    root = tempfile.mkdtemp(prefix="sd_func-triton-")

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    triton = None
    try:
        triton = start(model, ports, os.path.join(root, "workspace"))
        print(f"serving {requests.MODEL_NAME} on http://{ports.host}:{ports.http} (gRPC {ports.grpc}, "
              f"metrics {ports.metrics})", flush=True)
        triton.serve()
    except KeyboardInterrupt:
        pass
    except PyTritonError as e:  # a port in use, a server that did not come up
        raise UserError(f"the Triton server failed: {e}") from e
    finally:
        if triton is not None:
            triton.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        shutil.rmtree(root, ignore_errors=True)
        print("stopped", flush=True)
