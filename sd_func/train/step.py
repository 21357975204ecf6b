"""The one train step factory: `make_step(loss_fn, tx, lay, tcfg) -> step(state, frozen, batch)`.

Both stages use it and differ only in `loss_fn(params, frozen, batch) -> (loss, aux)`
(the autoencoder's reconstruction + KL in train.vae_stage, the diffusion loss in
train.unet_stage). The step is one pure function (big_vision's update_fn): forward
under the precision's autocast, backward (train.autodiff: torch.func.grad_and_value
when compiled, the same through torch.autograd.grad in eager mode, which is faster on
a CPU), the gradient mean over data-parallel ranks, then the optimizer transform `tx`
(train.optim: clipping, AdamW, the fp16 loss scale) and the EMA. With tcfg.compile
`torch.compile(fullgraph=True)` compiles it whole; a compile failure raises (no eager
fallback). It never mutates its inputs, never syncs with the host, and sets no
process-wide switch (the loop calls sd_func.backend.set_matmul_precision once).

The optimizer works on one flat float32 vector per tree (params, AdamW's moments, EMA;
see optim.Layout): the gradients are concatenated once, and the optimizer is a few
elementwise kernels whatever the parameter count. The state the caller sees stays a
plain dict of per-path trees (train.state); after the first step its leaves are views
into those vectors, so the next step flattens them for free.

Data parallelism: when `world` > 1 the flat gradient vector (with the loss and the aux
metrics appended) is summed across ranks with ONE
`torch.distributed._functional_collectives.all_reduce` INSIDE the step and divided by
the world size (gloo has no AVG). This traces under fullgraph on CPU/gloo (and is the
collective inductor schedules for NCCL), keeps the step one graph, and gives every rank
the same update. Each rank's loss is the mean over its local batch, so equal local
batches give exactly the mean over the global batch.

fp16: the loss is multiplied by the optimizer's loss scale (optim.loss_scale), the
gradient divided by it before `tx`, whose dynamic_loss_scale wrapper skips a non-finite
step. A skipped step changes nothing but `step` and the loss scale: params, AdamW's
moments and count, and the EMA too (the EMA averages the updates that were applied;
moving it towards unchanged params would weight one point of the trajectory twice).
"""

import torch
from torch.distributed import _functional_collectives as funcol

from sd_func import tree
from sd_func.backend import PRECISIONS
from sd_func.errors import UserError
from sd_func.train import autodiff, distributed, optim
from sd_func.train import lr as lr_lib

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _core(loss_fn, tx, lay: optim.Layout, hp: dict, flat: dict, frozen: dict, batch: dict):
    """The pure step over flat vectors.

    flat: {"params": vector, "opt": tx's state (flat), "step": i64 0-d, ["ema": vector]};
    loss_fn, tx, lay and hp (precision, world, lr_fn, ema_decay) are static (trace time).
    Returns (the same dict of new tensors, metrics).
    """
    p, opt, step = flat["params"], flat["opt"], flat["step"]
    precision = hp["precision"]
    amp = torch.autocast(step.device.type, dtype=_AUTOCAST.get(precision, torch.float32),
                         enabled=precision in _AUTOCAST)
    scale = optim.loss_scale(opt)

    def objective(trainable):
        with amp:
            loss, aux = loss_fn(trainable, frozen, batch)
        loss = loss.float()
        return (loss * scale if scale is not None else loss), (loss.detach(), aux)

    grads, (_, (loss, aux)) = autodiff.grad_and_value(objective, optim.unflatten(p, lay))
    flat_g = tree.flatten(grads)
    names = sorted(aux)
    g = torch.cat([flat_g[k].reshape(-1).to(torch.float32) for k in lay.paths]
                  + [loss.reshape(1)] + [aux[k].detach().float().reshape(1) for k in names])
    if hp["world"] > 1:  # one all-reduce of the gradient vector, the loss and the aux metrics
        g = funcol.all_reduce(g, "sum", torch.distributed.group.WORLD) / hp["world"]
    g, values = g[:lay.numel], g[lay.numel:]
    if scale is not None:
        g = g / scale

    grad_norm = optim.global_norm(g)
    updates, new_opt = tx.update(g, opt, p, step)
    new_p = optim.apply_updates(p, updates)
    out = {"params": new_p, "opt": new_opt, "step": step + 1}
    skipped = optim.skipped_steps(new_opt)
    if "ema" in flat:
        new_ema = optim.ema(flat["ema"], new_p, hp["ema_decay"])
        if skipped is not None:  # a skipped fp16 step leaves the EMA as it was too
            new_ema = torch.where(skipped == optim.skipped_steps(opt), new_ema, flat["ema"])
        out["ema"] = new_ema
    metrics = {
        "loss": values[0],
        "grad_norm": grad_norm,
        "param_norm": optim.global_norm(new_p),
        "update_norm": optim.global_norm(updates),
        "lr": hp["lr_fn"](step),
        "skipped": skipped if skipped is not None else torch.zeros_like(step),
        "loss_scale": optim.loss_scale(new_opt) if scale is not None else torch.ones((), device=step.device),
    }
    metrics.update({k: values[1 + i] for i, k in enumerate(names)})
    return out, metrics


def make_step(loss_fn, tx: optim.Transform, lay: optim.Layout, tcfg, *, world: int | None = None,
              backend: str = "inductor", section: str = "config.train"):
    """`step(state, frozen, batch) -> (state, metrics)` for the params layout `lay`.

    loss_fn(params, frozen, batch) -> (loss 0-d, aux {name: 0-d tensor}): params is the
    trained tree (views into the flat vector); aux values join the metrics (averaged
    over ranks). tx: the optimizer (optim.from_config(tcfg, lay)). tcfg: the train config
    section (cfg.train or cfg.vae_train: precision, compile, and ema_decay when the state
    has "ema"). world: the data-parallel world size (default: torch.distributed's, or 1).
    backend: torch.compile's backend when tcfg.compile ("inductor"; the tests use
    "aot_eager", which traces the same single graph with AOTAutograd but skips codegen).
    Metrics: loss, grad_norm, param_norm, update_norm, lr, skipped (fp16 steps skipped so
    far), loss_scale (1 unless fp16), and the aux values.
    """
    precision = tcfg.precision
    if precision not in PRECISIONS:
        raise UserError(f"{section}.precision={precision!r}: expected one of {PRECISIONS}")
    world = distributed.world_size() if world is None else int(world)
    ema_decay = tcfg.get("ema_decay", None)
    hp = dict(precision=str(precision), world=world, lr_fn=lr_lib.schedule_fn(tcfg, section),
              ema_decay=None if ema_decay is None else float(ema_decay))
    compiled = bool(tcfg.compile)
    core = lambda flat, frozen, batch: _core(loss_fn, tx, lay, hp, flat, frozen, batch)
    if compiled:
        core = torch.compile(core, fullgraph=True, dynamic=False, backend=backend)
    opt_template = optim.template(tx, lay)

    def step(state: dict, frozen: dict, batch: dict):
        paths = tuple(tree.flatten(state["params"]))
        if paths != lay.tree_paths:
            raise ValueError(f"train step: state['params'] has {len(paths)} leaves that are not the "
                             f"{len(lay.tree_paths)} of the step's layout (build both from the same params)")
        if "ema" in state and hp["ema_decay"] is None:
            raise UserError(f"{section}.ema_decay is not set but the train state has an EMA")
        flat = {"params": optim.flatten(state["params"], lay),
                "opt": optim.state_to_flat(state["opt"], opt_template, lay), "step": state["step"]}
        if "ema" in state:
            flat["ema"] = optim.flatten(state["ema"], lay)
        if compiled:
            # A compile error must surface, and a recompile storm must not fall back to eager.
            with torch._dynamo.config.patch(suppress_errors=False, fail_on_recompile_limit_hit=True):
                out, metrics = core(flat, frozen, batch)
        else:
            out, metrics = core(flat, frozen, batch)
        new = {"params": optim.unflatten(out["params"], lay), "opt": optim.state_to_trees(out["opt"], lay),
               "step": out["step"]}
        if "ema" in out:
            new["ema"] = optim.unflatten(out["ema"], lay)
        return new, metrics

    step.world = world
    return step
