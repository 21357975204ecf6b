"""Training: the one step factory, optimizer transforms, the train state, the stages' losses, the loop.

`optim` holds the optimizer as pure transforms over one flat float32 vector (clip,
AdamW, the fp16 loss scale; EMA); `step.make_step(loss_fn, tx, lay, tcfg)` returns the
pure `step(state, frozen, batch) -> (state, metrics)` that both stages use, with
`unet_stage.loss_fn` (diffusion loss; `step_inputs` draws a step's per-example
randomness on the host) or `vae_stage.loss_fn` (autoencoder); `state` is the train
state dict and its checkpoint trees; `checks.validate(cfg)` runs before anything
expensive; `loop.train` runs the UNet stage; `distributed` sets up torch.distributed.
"""
