"""Augmentations as pure JAX functions `augment(rng, images) -> images`, run inside the jitted step.

The step applies the augmentation once to the global batch, so the teacher and the student see
the same view (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent"), and the view is a pure function of (seed, step): resuming reproduces it.
Images arrive normalised (pipeline.normalize).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.data.sources import DatasetSpec

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def crop_flip(
  rng: jax.Array, images: jax.Array, *, padding: int, pad_value: jax.Array
) -> jax.Array:
  """torchvision `RandomCrop(size, padding)` then `RandomHorizontalFlip()`, per example.

  Each image is padded by `padding` pixels of `pad_value` (per channel) on every side, then an
  H×W window at a uniformly random offset in [0, 2·padding]² is kept, then the image is
  mirrored left–right with probability 1/2.
  """
  batch_size, height, width, _ = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  # Pad the difference to the pad value with zeros: constant padding with a per-channel value.
  padded = jnp.pad(images - pad_value, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(crop_rng, (batch_size, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))

  cropped = jax.vmap(crop)(padded, offsets) + pad_value
  flip = jax.random.bernoulli(flip_rng, 0.5, (batch_size, 1, 1, 1))
  return jnp.where(flip, cropped[:, :, ::-1], cropped)


AUGMENTATIONS = ("none", "crop_flip")


def build(name: str, spec: DatasetSpec) -> Augment | None:
  """The augmentation `name` for dataset `spec`; None for 'none'."""
  if name == "none":
    return None
  if name == "crop_flip":
    # torchvision pads the uint8 image with black (0) before ToTensor + Normalize.
    black = -np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)
    return functools.partial(crop_flip, padding=4, pad_value=jnp.asarray(black))
  raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")
