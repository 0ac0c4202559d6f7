"""The task axis: what a batch holds and how a model reads it, for images and for tokens.

The step, the loss registry, the teacher sources and the populations are written once against
this interface, so image classification and language modelling share all of them:

* `Classification`: ``batch = {'image': [B, H, W, C] float32, 'label': [B] int32,
  'index': [B]}`` (+ a boolean ``'mask'`` [B] on padded evaluation batches). The view is the
  image, augmented inside the step when the task has an augmentation; the targets are the labels.
* `CausalLM`: ``batch = {'inputs', 'targets', 'loss_mask', 'positions', 'segment_ids',
  'target_bytes'}``, all ``[B, S]`` (`jaxkd.data.text`). The causal shift happened once, when
  the batch was built: ``targets[:, t]`` is the token after ``inputs[:, t]``, so the logits of
  position t are scored against ``targets[:, t]`` where ``loss_mask[:, t]`` is True, and nothing
  downstream shifts. The view is the input tokens (no augmentation).

Either way a model returns one distribution per scored unit, ``[B, C]`` or ``[B, S, V]``, and
``targets(batch)`` gives the labels and the boolean mask of the same leading shape, so every
per-example loss is a per-token loss for language models (`jaxkd.losses.token_mean`).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jaxkd.losses.chunked import LMHead, soft_cap

Batch = Mapping[str, jax.Array]
Augment = Callable[[jax.Array, jax.Array], jax.Array]


class Task(Protocol):
  """How the step reads a batch (see the module docstring)."""

  name: str

  def view(self, batch: Batch, rng: jax.Array | None) -> jax.Array:
    """The model input both models see; ``rng=None`` for evaluation (no augmentation)."""

  def apply(self, model, view: jax.Array, batch: Batch, *, train: bool, return_features: bool):
    """``model``'s ``(logits, features)`` on `view`."""

  def targets(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """``(labels, mask)``: int32 labels and the boolean mask of the scored units."""

  def example_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays of a batch, for checking models and probing feature shapes."""


@dataclasses.dataclass(frozen=True)
class Classification:
  """Images and labels; `augment` (``augment(rng, images)``) runs inside the training step."""

  image_shape: tuple[int, int, int]
  augment: Augment | None = None
  name: str = "classification"

  def view(self, batch: Batch, rng: jax.Array | None) -> jax.Array:
    if rng is None or self.augment is None:
      return batch["image"]
    return self.augment(rng, batch["image"])

  def apply(self, model, view, batch, *, train, return_features):
    del batch  # an image model reads the view alone
    return model(view, train=train, return_features=return_features)

  def targets(self, batch):
    labels = batch["label"]
    mask = batch["mask"] if "mask" in batch else jnp.ones(labels.shape, bool)
    return labels, _boolean(mask, "mask")

  def example_batch(self, batch_size):
    return {
      "image": jax.ShapeDtypeStruct((batch_size, *self.image_shape), jnp.float32),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }


# The batch entries a language model reads besides its input tokens.
_LM_MODEL_INPUTS = ("positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """Next-token prediction over packed token sequences of length `seq_len`.

  With `lm_head`, a model returns its `jaxkd.losses.LMHead` (final hidden states, unembedding,
  soft-cap) in place of ``[B, S, V]`` logits, for terms that compute the loss chunk by chunk
  and never hold the logits (`chunked_lm`).
  """

  seq_len: int
  lm_head: bool = False
  name: str = "causal_lm"

  def view(self, batch, rng):
    del rng  # tokens are not augmented
    return batch["inputs"]

  def apply(self, model, view, batch, *, train, return_features):
    extras = {key: batch[key] for key in _LM_MODEL_INPUTS if key in batch}
    outputs, features = model(
      view, train=train, return_features=return_features, return_hidden=self.lm_head, **extras
    )
    if self.lm_head:
      outputs = LMHead(outputs, model.unembedding(), model.final_logit_softcap)
    return outputs, features

  def targets(self, batch):
    return batch["targets"], _boolean(batch["loss_mask"], "loss_mask")

  def example_batch(self, batch_size):
    tokens = jax.ShapeDtypeStruct((batch_size, self.seq_len), jnp.int32)
    return {
      "inputs": tokens,
      "targets": tokens,
      "loss_mask": jax.ShapeDtypeStruct((batch_size, self.seq_len), bool),
      "positions": tokens,
      "segment_ids": tokens,
    }


def dense_logits(outputs: jax.Array | LMHead) -> jax.Array:
  """Logits of a model's outputs: the array itself, or an `LMHead`'s logits (materialised:
  for evaluation, where a step's memory is not the limit)."""
  if isinstance(outputs, LMHead):
    logits = jnp.einsum(
      "bsd,dv->bsv", outputs.hidden, outputs.unembed, preferred_element_type=jnp.float32
    )
    return soft_cap(logits, outputs.softcap)
  return outputs


def num_classes(outputs) -> int:
  """Classes (vocabulary entries) of a model's (abstract) outputs: logits or an `LMHead`."""
  return outputs.unembed.shape[-1] if isinstance(outputs, LMHead) else outputs.shape[-1]


def _boolean(mask: jax.Array, name: str) -> jax.Array:
  """`mask` itself; an integer array here is a label array passed by mistake (TRL's -100)."""
  if mask.dtype != bool:
    raise TypeError(
      f"batch[{name!r}] has dtype {mask.dtype}; it must be boolean (True = scored). An integer "
      "array is usually a label array: pass `labels != -100`."
    )
  return mask


def probe(task: Task, model, batch_size: int = 2) -> tuple[jax.ShapeDtypeStruct, dict[str, Any]]:
  """The abstract ``(logits, features)`` of `model` on a batch of `task` (no FLOPs run).

  Raises whatever the model raises when the batch does not fit it (wrong image shape, ...).
  """
  graphdef, state = nnx.split(model)
  batch = task.example_batch(batch_size)

  def forward(state, batch):
    model = nnx.merge(graphdef, state)
    return task.apply(model, task.view(batch, None), batch, train=False, return_features=True)

  logits, features = jax.eval_shape(forward, state, batch)
  return logits, dict(features)
