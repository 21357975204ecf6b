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

Gradient accumulation (tcfg.grad_accum = k): the step reshapes this rank's batch to
[k, b / k, ...] and loops over the k micro-batches inside the same function (unrolled in
the trace): each one's forward and backward, then the mean of their gradients and values
before the one collective and the one optimizer update, so peak activation memory follows
the micro-batch. ZeRO-1 (`shard`, train.sharding): the gradient vector is reduce-scattered
instead of all-reduced (the loss and aux values get their own small all-reduce), each rank
runs tx on its slice of params, moments and EMA (its norms over all slices), and the new
params are all-gathered: three collectives, all in the graph.

fp16: the loss is multiplied by the optimizer's loss scale (optim.loss_scale), the
gradient divided by it before `tx`, whose dynamic_loss_scale wrapper skips a non-finite
step. A skipped step changes nothing but `step` and the loss scale: params, AdamW's
moments and count, and the EMA too (the EMA averages the updates that were applied;
moving it towards unchanged params would weight one point of the trajectory twice).
"""

import types

import torch
from torch.distributed import _functional_collectives as funcol

from sd_func import tree
from sd_func.backend import PRECISIONS
from sd_func.errors import UserError
from sd_func.train import autodiff, distributed, optim, sharding
from sd_func.train import lr as lr_lib

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _grads(loss_fn, lay: optim.Layout, hp: dict, p, scale, frozen: dict, batch: dict):
    """(flat gradient, [loss, aux values in sorted-name order]) of this rank's batch.

    With hp["accum"] = k > 1 the batch leaves are [k, micro, ...]: a loop (unrolled in the
    trace) over the k micro-batches, each a forward and backward whose activations are
    dead before the next starts, and the mean of their gradients and values."""
    precision = hp["precision"]
    amp = torch.autocast(p.device.type, dtype=_AUTOCAST.get(precision, torch.float32),
                         enabled=precision in _AUTOCAST)
    params = optim.unflatten(p, lay)

    def objective(trainable, micro):
        with amp:
            loss, aux = loss_fn(trainable, frozen, micro)
        loss = loss.float()
        return (loss * scale if scale is not None else loss), (loss.detach(), aux)

    k = hp["accum"]
    g = values = names = None
    for i in range(k):
        micro = batch if k == 1 else {name: v[i] for name, v in batch.items()}
        grads, (_, (loss, aux)) = autodiff.grad_and_value(lambda t, m=micro: objective(t, m), params)
        flat_g = tree.flatten(grads)
        names = sorted(aux)
        gi = torch.cat([flat_g[key].reshape(-1).to(torch.float32) for key in lay.paths])
        vi = torch.stack([loss.reshape(())] + [aux[key].detach().float().reshape(()) for key in names])
        g, values = (gi, vi) if g is None else (g + gi, values + vi)
    if k > 1:
        g, values = g / k, values / k
    return g, values, names


def _core(loss_fn, tx, lay: optim.Layout, hp: dict, flat: dict, frozen: dict, batch: dict):
    """The pure step over flat vectors.

    flat: {"params": vector, "opt": tx's state (flat), "step": i64 0-d, ["ema": vector]};
    loss_fn, tx, lay and hp (precision, world, accum, shard, lr_fn, ema_decay) are static
    (trace time). With hp["shard"] (ZeRO-1) opt and ema hold this rank's slice only.
    Returns (the same dict of new tensors, metrics).
    """
    p, opt, step, shard = flat["params"], flat["opt"], flat["step"], hp["shard"]
    scale = optim.loss_scale(opt)
    g, values, names = _grads(loss_fn, lay, hp, p, scale, frozen, batch)
    if shard is not None:  # ZeRO-1: reduce-scatter the gradient, all-reduce the few values
        g = sharding.reduce_scatter_mean(g, shard)
        values = funcol.all_reduce(values, "sum", torch.distributed.group.WORLD) / hp["world"]
        p_mine, norm_fn = sharding.local(p, shard), (lambda x: sharding.norm(x, shard))
    else:
        if hp["world"] > 1:  # one all-reduce of the gradient vector, the loss and the aux metrics
            both = funcol.all_reduce(torch.cat([g, values]), "sum", torch.distributed.group.WORLD) / hp["world"]
            g, values = both[:lay.numel], both[lay.numel:]
        p_mine, norm_fn = p, optim.global_norm
    if scale is not None:
        g = g / scale

    grad_norm = norm_fn(g)
    updates, new_opt = tx.update(g, opt, p_mine, step)
    new_mine = optim.apply_updates(p_mine, updates)
    new_p = new_mine if shard is None else sharding.gather(new_mine, shard, lay.numel)
    out = {"params": new_p, "opt": new_opt, "step": step + 1}
    skipped = optim.skipped_steps(new_opt)
    if "ema" in flat:
        new_ema = optim.ema(flat["ema"], new_mine, hp["ema_decay"])
        if skipped is not None:  # a skipped fp16 step leaves the EMA as it was too
            new_ema = torch.where(skipped == optim.skipped_steps(opt), new_ema, flat["ema"])
        out["ema"] = new_ema
    metrics = {
        "loss": values[0],
        "grad_norm": grad_norm,
        "param_norm": optim.global_norm(new_p),
        "update_norm": norm_fn(updates),
        "lr": hp["lr_fn"](step),
        "skipped": skipped if skipped is not None else torch.zeros_like(step),
        "loss_scale": optim.loss_scale(new_opt) if scale is not None else torch.ones((), device=step.device),
    }
    metrics.update({k: values[1 + i] for i, k in enumerate(names)})
    return out, metrics


def make_step(loss_fn, tx: optim.Transform, lay: optim.Layout, tcfg, *, world: int | None = None,
              backend: str = "inductor", section: str = "config.train", shard: sharding.Shard | None = None,
              num_shapes: int = 1):
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

    tcfg.grad_accum = k (default 1): the step splits this rank's batch (every tensor of
    `batch` is per example, leading dim b, b % k == 0) into k micro-batches of b / k and
    averages their gradients before the one collective and the one update.
    shard: ZeRO-1 (train.sharding.from_config); the state and tx must be built with the same
    shard (train.state.init_state, optim.from_config). num_shapes: how many batch shapes the
    compiled step may see (aspect-ratio buckets): one graph each, and as the recompile limit.
    """
    precision = tcfg.precision
    if precision not in PRECISIONS:
        raise UserError(f"{section}.precision={precision!r}: expected one of {PRECISIONS}")
    world = distributed.world_size() if world is None else int(world)
    ema_decay = tcfg.get("ema_decay", None)
    accum = int(tcfg.get("grad_accum", 1) or 1)
    if accum < 1:
        raise UserError(f"{section}.grad_accum={accum}: expected an integer >= 1")
    if shard is not None and shard.world != world:
        raise ValueError(f"train step: shard {shard} is not for the world size {world}")
    hp = dict(precision=str(precision), world=world, accum=accum, shard=shard,
              lr_fn=lr_lib.schedule_fn(tcfg, section), ema_decay=None if ema_decay is None else float(ema_decay))
    compiled = bool(tcfg.compile)
    core = lambda flat, frozen, batch: _core(loss_fn, tx, lay, hp, flat, frozen, batch)
    if compiled:
        core = torch.compile(_own_code(core), fullgraph=True, dynamic=False, backend=backend)
    n_mine = lay.numel if shard is None else sharding.size(shard, lay.numel)
    opt_template = optim.template(tx, lay, n_mine)
    recompiles = max(8, int(num_shapes))  # dynamo's default, or one graph per bucket shape

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
            flat["ema"] = optim.flatten(state["ema"], lay) if shard is None else state["ema"]
        if accum > 1:
            batch = _micro_batches(batch, accum)
        if compiled:
            # A compile error must surface, and a recompile storm must not fall back to eager.
            with torch._dynamo.config.patch(suppress_errors=False, fail_on_recompile_limit_hit=True,
                                            recompile_limit=recompiles):
                out, metrics = core(flat, frozen, batch)
        else:
            out, metrics = core(flat, frozen, batch)
        new = {"params": optim.unflatten(out["params"], lay), "opt": optim.state_to_trees(out["opt"], lay),
               "step": out["step"]}
        if "ema" in out:
            new["ema"] = optim.unflatten(out["ema"], lay) if shard is None else out["ema"]
        return new, metrics

    step.world, step.shard = world, shard
    return step


def _own_code(fn):
    """fn with a code object of its own. Dynamo keeps its graphs and counts recompiles per
    code object, so without this every step a process builds (a notebook, a test run, the
    VAE and UNet stages) would share one cache and one recompile limit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _micro_batches(batch: dict, k: int) -> dict:
    """Every per-example tensor [b, ...] as a view [k, b / k, ...] (gradient accumulation)."""
    out = {}
    for name, v in batch.items():
        if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] % k:
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise UserError(f"config.train.grad_accum={k}: batch[{name!r}] is {got}; every batch tensor "
                            f"needs a leading batch dimension divisible by {k}")
        out[name] = v.reshape(k, v.shape[0] // k, *v.shape[1:])
    return out
