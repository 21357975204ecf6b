"""The txt2img model both Triton servers run: inputs, limits, validation, batching.

A request carries, per image, `prompt` BYTES [1] (required) and the optional
`negative_prompt` BYTES, `seed` INT64, `steps` INT32, `guidance_scale` FP32, `sampler`
BYTES, `height` INT32, `width` INT32 (each [1]; defaults from cfg.sample, seed 0); the
answer is `image` UINT8 [H, W, 3]. Triton's dynamic batcher puts the batch dimension in
front and hands one execution several requests. `parse` checks one request against the
Limits and turns it into image jobs; `Model.execute` runs the jobs of all valid
requests of an execution, grouped by (steps, sampler, guidance_scale, height, width):
each group is one pipelines.txt2img call (one UNet batch) with a seed per image, so an
image depends on its own (prompt, negative prompt, seed, settings) only, never on the
requests it was batched with (generate.py: rows of a batch never mix). guidance_scale
is in the key because the pipeline takes one guidance weight per call. A bad request
gets a RequestError whose message names the input and the problem; the others run.
"""

import dataclasses
import math

import numpy as np
from absl import flags

from sd_func.diffusion import samplers
from sd_func.errors import UserError
from sd_func.pipelines import generate, options, unet_call

# name: (numpy dtype, Triton dtype, required)
INPUTS = {
    "prompt": (np.bytes_, "TYPE_STRING", True),
    "negative_prompt": (np.bytes_, "TYPE_STRING", False),
    "seed": (np.int64, "TYPE_INT64", False),
    "steps": (np.int32, "TYPE_INT32", False),
    "guidance_scale": (np.float32, "TYPE_FP32", False),
    "sampler": (np.bytes_, "TYPE_STRING", False),
    "height": (np.int32, "TYPE_INT32", False),
    "width": (np.int32, "TYPE_INT32", False),
}
OUTPUT = ("image", np.uint8, "TYPE_UINT8", (-1, -1, 3))
MODEL_NAME = "txt2img"
GROUP_KEY = ("steps", "sampler", "guidance_scale", "height", "width")
QUEUE_DELAY_US = 20_000  # how long Triton's batcher holds a request for others to join it


class RequestError(UserError):
    """A bad request: the message names the input and what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What protects the server from one request (run_serve.py's flags)."""
    max_steps: int = 150
    max_pixels: int = 1024 * 1024  # height * width of one image
    max_prompt_chars: int = 1000
    max_batch_size: int = 8  # images per execution (Triton's max_batch_size)
    request_timeout_s: float = 600.0  # queue time before Triton rejects a request

    def check(self) -> None:
        for k in ("max_steps", "max_pixels", "max_prompt_chars", "max_batch_size"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k}={getattr(self, k)}: expected an integer >= 1")
        if not self.request_timeout_s > 0:
            raise UserError(f"--request_timeout_s={self.request_timeout_s}: expected a number > 0")


LIMIT_FLAGS = {
    "max_steps": "Largest `steps` a request may ask for.",
    "max_pixels": "Largest height * width of one image.",
    "max_prompt_chars": "Longest prompt or negative prompt, in characters.",
    "max_batch_size": "Images per execution: Triton's dynamic batching limit.",
    "request_timeout_s": "Seconds a request may wait in Triton's queue before it is rejected.",
}


def define_limit_flags() -> None:
    """The --max_steps, --max_pixels, ... flags of run_serve.py and run_export.py."""
    for name, help_text in LIMIT_FLAGS.items():
        default = getattr(Limits, name)
        define = flags.DEFINE_float if isinstance(default, float) else flags.DEFINE_integer
        define(name, default, help_text)


def limits_from_flags(values) -> Limits:
    """Limits from the parsed flags (absl's FLAGS)."""
    limits = Limits(**{name: values[name].value for name in LIMIT_FLAGS})
    limits.check()
    return limits


def _rows(inputs: dict) -> int:
    if "prompt" not in inputs:
        raise RequestError("prompt: required input missing")
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown input; the inputs are {', '.join(INPUTS)}")
    n = None
    for name, x in inputs.items():
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != 1 or (n is not None and x.shape[0] != n):
            raise RequestError(f"{name}: shape {list(x.shape)}, expected [{n or 'batch'}, 1] (one value per image)")
        n = x.shape[0]
        want = INPUTS[name][0]
        ok = (x.dtype == object or x.dtype.kind == "S") if want is np.bytes_ else x.dtype == want
        if not ok:
            raise RequestError(f"{name}: dtype {x.dtype}, expected {INPUTS[name][1][5:]}")
    return n


def _text(name: str, v, limits: Limits) -> str:
    if not isinstance(v, (bytes, np.bytes_)):
        raise RequestError(f"{name}: expected BYTES, got {type(v).__name__}")
    try:
        s = bytes(v).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    if name != "sampler" and len(s) > limits.max_prompt_chars:
        raise RequestError(f"{name}: {len(s)} characters, over the limit of {limits.max_prompt_chars} "
                           "(--max_prompt_chars)")
    return s


def check_job(job: dict, limits: Limits) -> dict:
    """The job, or a RequestError naming its first bad setting."""
    if not 1 <= job["steps"] <= limits.max_steps:
        raise RequestError(f"steps: {job['steps']}, expected 1 to {limits.max_steps} (--max_steps)")
    if job["sampler"] not in samplers.NAMES:
        raise RequestError(f"sampler: unknown sampler {job['sampler']!r}, expected one of {', '.join(samplers.NAMES)}")
    if not math.isfinite(job["guidance_scale"]):
        raise RequestError(f"guidance_scale: {job['guidance_scale']}, expected a finite number")
    for k in ("height", "width"):
        if job[k] < 8 or job[k] % 8:
            raise RequestError(f"{k}: {job[k]}, expected a positive multiple of 8")
    if job["height"] * job["width"] > limits.max_pixels:
        raise RequestError(f"height, width: {job['height']}x{job['width']} = {job['height'] * job['width']} "
                           f"pixels, over the limit of {limits.max_pixels} (--max_pixels)")
    return job


def parse(inputs: dict, defaults: options.Options, limits: Limits) -> list[dict]:
    """One request's inputs {name: array [n, 1]} -> n image jobs, or a RequestError."""
    n = _rows(inputs)
    if n > limits.max_batch_size:
        raise RequestError(f"prompt: {n} images in one request, over the limit of {limits.max_batch_size}")
    jobs = []
    for i in range(n):
        def get(name, default, i=i):
            return inputs[name][i, 0] if name in inputs else default
        job = dict(prompt=_text("prompt", get("prompt", b""), limits),
                   negative_prompt=_text("negative_prompt", get("negative_prompt", b""), limits),
                   sampler=_text("sampler", get("sampler", defaults.sampler.encode()), limits),
                   seed=int(get("seed", 0)), steps=int(get("steps", defaults.steps)),
                   guidance_scale=float(get("guidance_scale", defaults.guidance_scale)),
                   height=int(get("height", defaults.height)), width=int(get("width", defaults.width)))
        jobs.append(check_job(job, limits))
    sizes = {(j["height"], j["width"]) for j in jobs}
    if len(sizes) > 1:
        raise RequestError(f"height, width: one request answers one image tensor; its images must share "
                           f"one size, got {sorted(sizes)}")
    return jobs


def groups(jobs: list[dict]) -> dict[tuple, list[int]]:
    """{settings key: indices of the jobs with those settings}, in first-seen order."""
    out: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        out.setdefault(tuple(j[k] for k in GROUP_KEY), []).append(i)
    return out


class Model:
    """The txt2img model of a server: params, cfg, the resolved defaults and the limits.

    execute(list of request inputs) -> a list with, per request, {"image": uint8 [n,H,W,3]}
    or the RequestError that rejected it. `calls` counts pipeline calls (UNet batches).
    """

    def __init__(self, params: dict, cfg, limits: Limits):
        limits.check()
        self.params, self.cfg, self.limits = params, cfg, limits
        compile = cfg.get("sample", {}).get("compile", False)
        self.defaults = options.resolve(cfg, unet_fn=unet_call.make_unet_fn(cfg.unet, compile))
        self.calls = 0

    def execute(self, requests: list[dict]) -> list:
        parsed, jobs, owner = [], [], []
        for r, inputs in enumerate(requests):
            try:
                parsed.append(parse(inputs, self.defaults, self.limits))
            except RequestError as e:
                parsed.append(e)
                continue
            jobs += parsed[-1]
            owner += [r] * len(parsed[-1])
        images = self.run(jobs)
        out = []
        for r, p in enumerate(parsed):
            out.append(p if isinstance(p, RequestError) else
                       {OUTPUT[0]: np.stack([images[i] for i in range(len(jobs)) if owner[i] == r])})
        return out

    def run(self, jobs: list[dict]) -> list[np.ndarray]:
        """uint8 [H, W, 3] per job: one pipelines.txt2img call per settings group."""
        images = [None] * len(jobs)
        for key, idx in groups(jobs).items():
            settings = dict(zip(GROUP_KEY, key))
            out = generate.txt2img(self.params, self.cfg, [jobs[i]["prompt"] for i in idx],
                                   seeds=[jobs[i]["seed"] for i in idx],
                                   negative_prompt=[jobs[i]["negative_prompt"] for i in idx],
                                   options=self.defaults, batch_size=len(idx), **settings)
            self.calls += 1
            for i, image in zip(idx, out.cpu().numpy()):
                images[i] = image
        return images
