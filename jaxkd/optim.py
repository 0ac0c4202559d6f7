"""Optimiser and learning-rate schedule from `config.optimizer`, with epochs turned into steps.

SGD follows PyTorch's `torch.optim.SGD(momentum, weight_decay)`, the optimiser of every CIFAR KD
reference (RepDistiller, mdistiller): weight decay is an L2 term added to the gradient *before*
the momentum buffer (`g ← g + λθ; b ← μb + g; θ ← θ − η b`), on every parameter, BatchNorm
scales and biases included. `optax.add_decayed_weights` followed by `optax.sgd` is exactly that.
AdamW decouples the decay (Loshchilov & Hutter 2019), as `torch.optim.AdamW`.
"""

import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """`config.schedule`:

  * 'step': `lr · decay_factor^k` after the k-th of `decay_epochs` (RepDistiller's
    `adjust_learning_rate`: ×0.1 at epochs 150, 180, 210 of 240);
  * 'cosine': `lr · ½(1 + cos(π t / T))` over the run;
  * 'constant'.

  Either is preceded by a linear warm-up from 0 over `warmup_epochs`.
  """
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == "step":
    # Boundaries count from the start of the run, warm-up included.
    boundaries = {
      int(epoch * steps_per_epoch) - warmup_steps: config.decay_factor
      for epoch in config.decay_epochs
    }
    main = optax.piecewise_constant_schedule(config.lr, boundaries)
  elif config.schedule == "cosine":
    main = optax.cosine_decay_schedule(config.lr, max(total_steps - warmup_steps, 1))
  elif config.schedule == "constant":
    main = optax.constant_schedule(config.lr)
  else:
    raise ValueError(f"unknown schedule {config.schedule!r}; known: {', '.join(SCHEDULES)}")
  if not warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, config.lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def build(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimiser `config.name` ('sgd' or 'adamw') following `schedule` (see module docstring)."""
  if config.name == "sgd":
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
  if config.name == "adamw":
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  raise ValueError(f"unknown optimizer {config.name!r}; known: {', '.join(OPTIMIZERS)}")
