"""Test helpers for the Triton servers: free ports, a server process started and always
stopped, tritonclient requests over HTTP and gRPC, the Prometheus counters."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytriton
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from pytriton.utils import distribution
from tritonclient.utils import np_to_triton_dtype

from sd_func.deploy import serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
CHILD_EXIT_S = 10
REQUEST_TIMEOUT_S = 120


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def children(pid: int) -> list[int]:
    """All descendants of pid (from /proc)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return kids + [g for k in kids for g in children(k)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_ready(http_port: int, proc: subprocess.Popen, log: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/txt2img/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout}s:\n{tail(log)}")


def tail(log: str, n: int = 4000) -> str:
    with open(log, errors="replace") as fh:
        return fh.read()[-n:]


@contextlib.contextmanager
def server(cmd: list[str], http_port: int, log: str, env: dict | None = None):
    """Start cmd (a server), wait until txt2img is ready, yield the Popen; always stop it
    with SIGTERM (SIGKILL of the whole tree after STOP_TIMEOUT_S)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        wait_ready(http_port, proc, log)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> list[int]:
    """Signal proc, wait for it; returns the descendants still alive afterwards (killed)."""
    tree = children(proc.pid)
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.time() + CHILD_EXIT_S  # helpers (multiprocessing's tracker) exit just after
    while any(alive(p) for p in tree) and time.time() < deadline:
        time.sleep(0.2)
    left = [p for p in tree if alive(p)]
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    return left


def request(prompt="a red circle on a blue background", **values) -> dict:
    """Inputs of one single-image request: {name: array [1, 1]} (None values are left out)."""
    out = {"prompt": np.array([[prompt.encode() if isinstance(prompt, str) else prompt]], dtype=object)}
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, np.ndarray):
            out[k] = v
        elif isinstance(v, (str, bytes)):
            out[k] = np.array([[v.encode() if isinstance(v, str) else v]], dtype=object)
        else:
            out[k] = np.array([[v]], dtype={"seed": np.int64, "guidance_scale": np.float32}.get(k, np.int32))
    return out


def infer(port: int, inputs: dict, protocol: str = "http") -> np.ndarray:
    """The `image` output of one txt2img request (raises InferenceServerException on error)."""
    mod = httpclient if protocol == "http" else grpcclient
    url = f"127.0.0.1:{port}"
    kw = {"network_timeout": REQUEST_TIMEOUT_S, "connection_timeout": REQUEST_TIMEOUT_S} if protocol == "http" else {}
    with mod.InferenceServerClient(url, **kw) as client:
        tensors = []
        for name, x in inputs.items():
            t = mod.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
            t.set_data_from_numpy(x)
            tensors.append(t)
        kw = {} if protocol == "http" else {"client_timeout": REQUEST_TIMEOUT_S}
        result = client.infer("txt2img", tensors, outputs=[mod.InferRequestedOutput("image")], **kw)
        return result.as_numpy("image")


def metric(port: int, name: str, model: str = "txt2img") -> float:
    """A Prometheus counter of the model from Triton's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} for {model} not in the metrics")


def tritonserver(workdir: str) -> tuple[list[str], dict]:
    """(command, env) of the real `tritonserver` binary nvidia-pytriton ships, with its python
    backend and the stub built for this interpreter's version, set up in workdir as PyTriton
    sets it up (backends copied, the stub added, this LIBDIR first on LD_LIBRARY_PATH)."""
    dist = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
    home = os.path.join(workdir, "tritonserver")
    shutil.copytree(dist, home, ignore=shutil.ignore_patterns("python_backend_stubs"))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(os.path.join(dist, "python_backend_stubs", version, "triton_python_backend_stub"),
                os.path.join(home, "backends", "python", "triton_python_backend_stub"))
    env = serve.library_path_first(dict(os.environ))
    env["LD_LIBRARY_PATH"] += ":" + str(distribution.get_libs_path())
    env["PATH"] = os.path.dirname(sys.executable) + ":" + env.get("PATH", "")
    cmd = [os.path.join(home, "bin", "tritonserver"), f"--backend-directory={home}/backends",
           f"--cache-directory={home}/caches"]
    return cmd, env


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
