"""Training logs: `<workdir>/metrics.jsonl` (one JSON row per log step) and TensorBoard.

Rows are `{"step": n, "loss": ..., "lr": ..., ...}`, plain floats. On resume from
step s the rows and events past s (written after the checkpoint the run resumes
from) are dropped, so the log reads as one uninterrupted run. Only rank 0 logs.
"""

import json
import math
import os

import torch

METRICS = "metrics.jsonl"


def _float(v) -> float:
    if torch.is_tensor(v):
        v = v.detach().float().cpu().item()
    return float(v)


def truncate_jsonl(path: str, after_step: int) -> None:
    """Drop the rows of path whose step is > after_step (atomically)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row half-written when the process was killed
                continue
            if row.get("step", 0) <= after_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


class Writer:
    """metrics.jsonl + TensorBoard event files in workdir."""

    def __init__(self, workdir: str, start_step: int = 0, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS)
        truncate_jsonl(self.path, start_step)
        self._fh = open(self.path, "a")  # noqa: SIM115 - held for the run, closed by close()
        self._tb = None
        if tensorboard:
            # Imported here: it loads tensorboard, which only rank 0 needs.
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, metrics: dict) -> dict:
        """Log scalar metrics at step; returns the row as plain floats."""
        row = {"step": int(step)}
        row.update({k: _float(v) for k, v in metrics.items()})
        self._fh.write(json.dumps({k: (v if math.isfinite(v) else str(v)) for k, v in row.items()}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        return row

    def image(self, step: int, tag: str, image_hwc_uint8: torch.Tensor) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_hwc_uint8, step, dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
