"""Optimiser and schedules: the learning rate from `config.optimizer`, and scalar schedules of steps.

SGD follows PyTorch's `torch.optim.SGD(momentum, weight_decay)`, the optimiser of every CIFAR KD
reference (RepDistiller, mdistiller): weight decay is an L2 term added to the gradient *before*
the momentum buffer (`g ← g + λθ; b ← μb + g; θ ← θ − η b`), on every parameter, BatchNorm
scales and biases included. `optax.add_decayed_weights` followed by `optax.sgd` is exactly that.
AdamW decouples the decay (Loshchilov & Hutter 2019), as `torch.optim.AdamW`.

`scalar_schedule` gives the same shapes for any scalar, e.g. the α of language-model distillation
`(1 − α)·LM + α·KD`: constant, linear (increase or decrease) or warmup-stable-decay (Peng et al.
2024, arXiv:2410.16215, whose best pre-training-distillation setting pairs a WSD α with a WSD
learning rate).
"""

import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant", "wsd")
SCALAR_SCHEDULES = ("constant", "linear", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exponential")


def wsd_schedule(
  peak_value: float,
  total_steps: int,
  *,
  warmup_steps: int = 0,
  decay_steps: int,
  init_value: float = 0.0,
  end_value: float = 0.0,
  decay_shape: str = "linear",
) -> optax.Schedule:
  r"""Warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv:2404.06395), as a function of the step s.

  With warm-up W = `warmup_steps`, decay D = `decay_steps`, total T = `total_steps`, peak η,
  start η₀ = `init_value` and end η₁ = `end_value`:

  .. math::
    \eta(s) = \begin{cases}
      \eta_0 + (\eta - \eta_0)\, s / W & s < W \\
      \eta & W \le s \le T - D \\
      \eta_1 + (\eta - \eta_1)\, f\big((s - T + D) / D\big) & T - D < s < T \\
      \eta_1 & s \ge T
    \end{cases}

  with the decay shape f(u) (f(0) = 1, f(1) = 0): 'linear' 1 − u; 'cosine' ½(1 + cos πu);
  '1-sqrt' 1 − √u (Hägele et al. 2024, arXiv:2405.18392); 'exponential' interpolates in log space,
  :math:`\eta\,(\eta_1/\eta)^u` (MiniCPM's exponential annealing; needs η, η₁ > 0). MiniCPM spends
  about 10% of the steps in the decay.

  Returns:
    An optax schedule (step → float32 value).
  """
  if decay_shape not in DECAY_SHAPES:
    raise ValueError(f"unknown decay shape {decay_shape!r}; known: {', '.join(DECAY_SHAPES)}")
  if min(warmup_steps, decay_steps) < 0 or warmup_steps + decay_steps > total_steps:
    raise ValueError(
      f"WSD needs 0 <= warmup_steps ({warmup_steps}) and 0 <= decay_steps ({decay_steps}) with "
      f"warmup_steps + decay_steps <= total_steps ({total_steps})"
    )
  if decay_shape == "exponential" and not (peak_value > 0 and end_value > 0):
    raise ValueError(
      f"an exponential decay needs positive peak and end values, got {peak_value} and {end_value}"
    )
  decay_start = total_steps - decay_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = init_value + (peak_value - init_value) * step / max(warmup_steps, 1)
    progress = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    if decay_shape == "exponential":
      decay = peak_value * (end_value / peak_value) ** progress
    else:
      remaining = {
        "linear": lambda u: 1.0 - u,
        "cosine": lambda u: 0.5 * (1.0 + jnp.cos(jnp.pi * u)),
        "1-sqrt": lambda u: 1.0 - jnp.sqrt(u),
      }[decay_shape](progress)
      decay = end_value + (peak_value - end_value) * remaining
    return jnp.where(step < warmup_steps, warmup, jnp.where(step <= decay_start, peak_value, decay))

  return schedule


def scalar_schedule(
  kind: str,
  *,
  total_steps: int = 0,
  peak_value: float = 1.0,
  init_value: float = 0.0,
  end_value: float = 0.0,
  warmup_steps: int = 0,
  decay_steps: int = 0,
  decay_shape: str = "linear",
) -> optax.Schedule:
  """A scalar as a function of the optimiser step (an optax schedule), e.g. a loss weight α.

  * 'constant': `peak_value` at every step.
  * 'linear': `init_value` at step 0 to `end_value` at `total_steps`, then `end_value` (a linear
    increase with init 0 and end 1, a decrease with init 1 and end 0).
  * 'wsd': `wsd_schedule`: `init_value` → `peak_value` over `warmup_steps`, `peak_value`, then
    `decay_shape` down to `end_value` over the last `decay_steps` of `total_steps`.

  Peng et al. 2024 (pre-training distillation, `(1 − α)·LM + α·KD`) compare constant α (0.9 best of
  0.1…1), linear increase and decrease of α, and WSD α (best when the learning rate is WSD too).
  """
  if kind == "constant":
    return optax.constant_schedule(peak_value)
  if kind == "linear":
    if total_steps < 1:
      raise ValueError(f"a linear schedule needs total_steps >= 1, got {total_steps}")
    return optax.linear_schedule(init_value, end_value, total_steps)
  if kind == "wsd":
    return wsd_schedule(
      peak_value,
      total_steps,
      warmup_steps=warmup_steps,
      decay_steps=decay_steps,
      init_value=init_value,
      end_value=end_value,
      decay_shape=decay_shape,
    )
  raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCALAR_SCHEDULES)}")


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """`config.schedule`:

  * 'step': `lr · decay_factor^k` after the k-th of `decay_epochs` (RepDistiller's
    `adjust_learning_rate`: ×0.1 at epochs 150, 180, 210 of 240);
  * 'cosine': `lr · ½(1 + cos(π t / T))` over the run;
  * 'constant';
  * 'wsd': warmup-stable-decay (`wsd_schedule`): `lr` until the last `decay_fraction` of all steps,
    then `decay_shape` down to `lr · end_lr_factor`.

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
  elif config.schedule == "wsd":
    main = wsd_schedule(
      config.lr,
      total_steps - warmup_steps,
      decay_steps=round(config.decay_fraction * total_steps),
      end_value=config.lr * config.end_lr_factor,
      decay_shape=config.decay_shape,
    )
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
