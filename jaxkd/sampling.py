"""Sampling as a batch source: sequence-level KD, on-policy GKD and speculative KD.

Before a training step the trainer may replace the data batch of a language model by one whose
continuations were generated, with the jitted KV-cache decoders of `jaxkd.models.generate`. The
step itself does not change: it runs the teacher over the returned batch in one forward (the
teacher scoring the samples) and the loss terms of the registry on its scored positions, so
e.g. `jsd` gives TRL's GKD loss and `kd` the supervised / sequence-level KD loss.

Kinds (`Sampler.kind`); with probability λ (`fraction`) the continuation is
  * ``'seq_kd'``: the teacher's sample (sequence-level KD, Kim & Rush 2016; TRL's ``seq_kd``);
  * ``'on_policy'``: the student's own sample, from the weights passed in (GKD, Agarwal et al.
    2024; TRL's ``lmbda``);
  * ``'speculative'``: student proposals, each outside the teacher's top-k replaced by a teacher
    sample (speculative KD, Xu et al. 2024; `jaxkd.models.generate.speculative_generate`).
With probability 1 − λ the data row is kept and only its continuation is scored. The coin is
drawn from the rng passed in, so a step's choice is deterministic, and only the chosen branch
runs (`jax.lax.cond`).

Batch layout (fixed shapes: one compiled step). A data row is a window w of S + 1 tokens,
inputs = w[:-1], targets = w[1:] (`jaxkd.data.text`). Its first P = `prompt_len` tokens
(``inputs[:, :P]``) are the prompt, taken as one sequence (positions 0..P−1; document boundaries
inside it are ignored). A sampled row is seq = prompt + N = S + 1 − P generated tokens, every
token after the first generated EOS replaced by PAD, and

  inputs = seq[:-1], targets = seq[1:],
  loss_mask[t]    = targets[t] is generated (t >= P − 1) and not after the first EOS (the EOS
                    itself is scored),
  positions[t]    = t, segment_ids[t] = 1; both 0 on PAD inputs (the data path's padding),
  target_bytes[t] = token_bytes[targets[t]] where scored, else 0.

A kept data row keeps everything but ``loss_mask[:, :P−1] = False`` (TRL scores the completion
only). Other batch entries (``'index'``) pass through unchanged. Both branches give arrays of the
same shapes and dtypes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd import parallel
from jaxkd.models import generate as generation

KINDS = ("seq_kd", "on_policy", "speculative")
# (λ, temperature, top_p) when unset: TRL's GKDConfig (lmbda 0.5, temperature 0.9, no top-p;
# with seq_kd every batch is the teacher's) and the speculative KD authors' config (λ = 1,
# student T = 0.5, top-p 0.5).
_KIND_DEFAULTS = {
  "seq_kd": (1.0, 0.9, 1.0),
  "on_policy": (0.5, 0.9, 1.0),
  "speculative": (1.0, 0.5, 0.5),
}
_BASE_METRICS = ("sampled", "generated_tokens", "eos_rate")
_SPECULATIVE_METRICS = ("accept_rate", "replace_rate")


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Sampler:
  """How a training batch is generated (static: one instance per run, hashed by identity).

  Attributes:
    kind: one of `KINDS` (module docstring).
    prompt_len: P, the data tokens kept as the prompt (1 <= P <= S).
    token_bytes: int [V], UTF-8 bytes of each token (`Tokenizer.token_bytes`).
    eos_id: the id that ends a continuation (None: continuations run to the end of the row).
    pad_id: the id written after the first EOS.
    fraction: λ, the probability that a batch is generated. Default per kind: 1 for
      ``'seq_kd'`` and ``'speculative'``, 0.5 for ``'on_policy'`` (TRL's lmbda).
    temperature, top_k, top_p: sampling of the generating model (the teacher for ``'seq_kd'``,
      the student otherwise); temperature 0 is greedy (argmax). Defaults: T = 0.9 and no top-p
      (TRL), T = 0.5 and top-p 0.5 for ``'speculative'``; top_k None (or 0) is no top-k.
    teacher_temperature, teacher_top_p: ``'speculative'``: sampling of the teacher's
      replacements (0.2, 0.5; temperature 0 is greedy).
    speculative_k: ``'speculative'``: a proposal outside the teacher's top-k is replaced (25).
    draft_tokens: ``'speculative'``: proposals per teacher forward (5, the authors'
      `num_assistant_tokens`); the samples' distribution does not depend on it.
  """

  kind: str
  prompt_len: int
  token_bytes: Any
  eos_id: int | None = None
  pad_id: int = 0
  fraction: float | None = None
  temperature: float | None = None
  top_k: int | None = None
  top_p: float | None = None
  teacher_temperature: float = 0.2
  teacher_top_p: float = 0.5
  speculative_k: int = 25
  draft_tokens: int = 5

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"sampling kind {self.kind!r} is not one of {KINDS}")
    defaults = dict(zip(("fraction", "temperature", "top_p"), _KIND_DEFAULTS[self.kind]))
    for field, default in defaults.items():
      if getattr(self, field) is None:
        object.__setattr__(self, field, default)
    token_bytes = np.array(self.token_bytes, np.int32)
    token_bytes.setflags(write=False)
    object.__setattr__(self, "token_bytes", token_bytes)
    object.__setattr__(self, "top_k", self.top_k or None)
    problems = {
      "prompt_len": self.prompt_len >= 1,
      "fraction": 0.0 <= self.fraction <= 1.0,
      "temperature": self.temperature >= 0.0,
      "top_k": self.top_k is None or self.top_k >= 1,
      "top_p": 0.0 < self.top_p <= 1.0,
      "teacher_temperature": self.teacher_temperature >= 0.0,
      "teacher_top_p": 0.0 < self.teacher_top_p <= 1.0,
      "speculative_k": self.speculative_k >= 0,
      "draft_tokens": self.draft_tokens >= 1,
    }
    for field, valid in problems.items():
      if not valid:
        raise ValueError(f"sampling.{field}={getattr(self, field)!r} is out of range")

  @property
  def needs_teacher(self) -> bool:
    """Whether the teacher model generates (every kind but ``'on_policy'``)."""
    return self.kind != "on_policy"

  @property
  def metric_names(self) -> tuple[str, ...]:
    """The metrics `sample` returns."""
    extra = _SPECULATIVE_METRICS if self.kind == "speculative" else ()
    return _BASE_METRICS + extra


def sample(
  sampler: Sampler,
  student_graphdef,
  student_state,
  teacher_graphdef,
  teacher_state,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The batch the step trains on: generated with probability λ, else the prompt-masked data.

  Args:
    sampler: the settings.
    student_graphdef, student_state: the student (`step.Learner.student`, `TrainState.student`).
    teacher_graphdef, teacher_state: the teacher model (`teachers.Teacher.graphdef`,
      `Teachers.state`; one model, not an ensemble); unused, may be None, for ``'on_policy'``.
    batch: a language-model batch [B, S] (module docstring).
    rng: this step's key; draws the λ coin and the samples.

  Returns:
    ``(batch, metrics)``: the batch of the module docstring's layout and float32 scalars:
    ``'sampled'`` (1 if the batch was generated), ``'generated_tokens'`` (scored tokens per row),
    ``'eos_rate'`` (rows whose continuation holds an EOS) and for ``'speculative'``
    ``'accept_rate'`` (proposals inside the teacher's top-k over proposals it judged,
    `SpeculativeGeneration.judged`) and ``'replace_rate'`` (teacher replacements over scored
    generated tokens). All but ``'sampled'`` are 0 on a data batch: their means over sampled
    batches are their logged means divided by the mean of ``'sampled'``.
  """
  if sampler.needs_teacher and teacher_graphdef is None:
    raise ValueError(
      f"sampling kind {sampler.kind!r} generates with the teacher, and there is none"
    )
  seq_len = batch["inputs"].shape[1]
  if sampler.prompt_len > seq_len:
    raise ValueError(
      f"sampling.prompt_len={sampler.prompt_len} exceeds the sequence length {seq_len}"
    )
  coin_rng, generation_rng = jax.random.split(rng)

  def generated():
    prompt = batch["inputs"][:, : sampler.prompt_len]
    num_new = seq_len + 1 - sampler.prompt_len
    student = nnx.merge(student_graphdef, student_state)
    teacher = None if teacher_graphdef is None else nnx.merge(teacher_graphdef, teacher_state)
    continuation, speculation = _continuation(
      sampler, student, teacher, prompt, num_new, generation_rng
    )
    return _sampled_batch(sampler, batch, prompt, continuation, speculation)

  def data():
    loss_mask = batch["loss_mask"].at[:, : sampler.prompt_len - 1].set(False)
    metrics = {name: jnp.zeros((), jnp.float32) for name in sampler.metric_names}
    return {**batch, "loss_mask": loss_mask}, metrics

  return jax.lax.cond(jax.random.uniform(coin_rng) < sampler.fraction, generated, data)


def jit_sample(sampler: Sampler, student_graphdef, teacher_graphdef=None, mesh=None):
  """``jax.jit`` of `sample` as ``compiled(student_state, teacher_state, batch, rng) ->
  (batch, metrics)``; with a `mesh`, the batch split over every device (as the step takes it)
  and the metrics replicated. The states keep their own shardings; nothing is donated."""

  def compiled(student_state, teacher_state, batch, rng):
    return sample(
      sampler, student_graphdef, student_state, teacher_graphdef, teacher_state, batch, rng
    )

  if mesh is None:
    return jax.jit(compiled)
  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  return jax.jit(
    compiled,
    in_shardings=(None, None, batch_sharding, replicated),
    out_shardings=(batch_sharding, replicated),
  )


def _sampling_options(temperature: float, top_p: float) -> dict[str, Any]:
  """`generate`'s options for a temperature (0: greedy) and a top-p (1: no nucleus)."""
  greedy = temperature == 0.0
  return dict(
    temperature=1.0 if greedy else temperature,
    top_p=None if top_p >= 1.0 else top_p,
    greedy=greedy,
  )


def _continuation(sampler, student, teacher, prompt, num_new, rng):
  """``(tokens [B, N], SpeculativeGeneration or None)`` of the sampler's kind."""
  options = _sampling_options(sampler.temperature, sampler.top_p)
  if sampler.kind != "speculative":
    model = teacher if sampler.kind == "seq_kd" else student
    tokens = generation.generate(
      model, prompt, num_new, rng=rng, top_k=sampler.top_k, **options
    ).tokens
    return tokens, None
  teacher_options = _sampling_options(sampler.teacher_temperature, sampler.teacher_top_p)
  speculation = generation.speculative_generate(
    student,
    teacher,
    prompt,
    num_new,
    rng=rng,
    accept_top_k=sampler.speculative_k,
    draft_tokens=sampler.draft_tokens,
    top_k=sampler.top_k,
    **options,
    teacher_temperature=teacher_options["temperature"],
    teacher_top_p=teacher_options["top_p"],
    teacher_greedy=teacher_options["greedy"],
  )
  return speculation.tokens, speculation


def _sampled_batch(sampler, batch, prompt, continuation, speculation):
  """The batch of prompt + continuation (module docstring) and its metrics."""
  batch_size, prompt_len = prompt.shape
  if sampler.eos_id is None:
    is_eos = jnp.zeros(continuation.shape, bool)
  else:
    is_eos = continuation == sampler.eos_id
  after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
  continuation = jnp.where(after_eos, sampler.pad_id, continuation)
  sequence = jnp.concatenate([prompt, continuation.astype(prompt.dtype)], axis=1)  # [B, S + 1]
  real = jnp.concatenate([jnp.ones(prompt.shape, bool), ~after_eos], axis=1)
  is_generated = jnp.arange(sequence.shape[1]) >= prompt_len
  targets = sequence[:, 1:]
  loss_mask = is_generated[1:] & real[:, 1:]
  input_real = real[:, :-1]
  rebuilt = {
    "inputs": sequence[:, :-1],
    "targets": targets,
    "loss_mask": loss_mask,
    "positions": jnp.where(input_real, jnp.arange(targets.shape[1]), 0),
    "segment_ids": input_real,
    "target_bytes": jnp.where(loss_mask, jnp.asarray(sampler.token_bytes)[targets], 0),
  }
  new_batch = dict(batch)
  for key, value in rebuilt.items():
    if key in batch:
      new_batch[key] = value.astype(batch[key].dtype)

  scored = ~after_eos  # [B, N]: the generated tokens the batch scores
  num_scored = jnp.sum(scored)
  metrics = {
    "sampled": jnp.ones((), jnp.float32),
    "generated_tokens": num_scored / batch_size,
    "eos_rate": jnp.mean(jnp.any(is_eos, axis=1)),
  }
  if speculation is not None:
    judged = jnp.sum(jnp.where(scored, speculation.judged, 0))
    accepted = jnp.sum(jnp.where(scored, speculation.accepted, 0))
    metrics["accept_rate"] = accepted / jnp.maximum(judged, 1)
    metrics["replace_rate"] = jnp.sum(speculation.replaced & scored) / num_scored
  return new_batch, {name: value.astype(jnp.float32) for name, value in metrics.items()}
