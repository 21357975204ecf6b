"""Training: the train state, functional AdamW, LR schedules, the compiled step, data parallel.

`state.init_state` builds the state dict; `step.make_train_step` returns the pure
`train_step(state, frozen, batch) -> (state, metrics)`; `step.step_inputs` draws a
step's per-example randomness on the host; `distributed` sets up torch.distributed.
"""
