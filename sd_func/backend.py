"""Process-wide PyTorch switches, all set here and nowhere else.

PyTorch has no per-graph or per-call setting for TF32: `torch.backends.cuda.matmul`
(through `torch.set_float32_matmul_precision`) and `torch.backends.cudnn.allow_tf32`
hold for the whole process. sd_func changes them in exactly one function,
`set_matmul_precision`, which the training loop calls once at start-up with
`config.train.precision` (sd_func.train.loop). Sampling and the model functions never
touch them: a notebook's own setting stays in force there.

  "fp32"         float32 matmuls and convolutions (TF32 off): "highest", cudnn TF32 off
  "tf32"         TF32 tensor cores on Ampere and newer: "high", cudnn TF32 on
  "bf16", "fp16" autocast picks the matmul dtype; the switches are left as they are
"""

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def set_matmul_precision(precision: str) -> None:
    """Set TF32 on or off for the whole process, as `precision` (config.train.precision) says."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if precision == "tf32":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    elif precision == "fp32":
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
