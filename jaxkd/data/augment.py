"""Augmentations as pure JAX functions `augment(rng, images) -> images`, run inside the jitted step.

The step applies the augmentation once to the global batch, so the teacher and the student see
the same view (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent"), and the view is a pure function of (seed, step): resuming reproduces it.
Images arrive normalised (pipeline.normalize).

`mixup` and `cutmix` blend images only, not labels: they serve function matching (Beyer et al.
2022), whose loss is the KL to the teacher on the same blended view and reads no label. A
cross-entropy term would score a blended image against one of its two classes.
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


def mixup(
  rng: jax.Array, images: jax.Array, *, concentration: float = 1.0, num_images: int = 2
) -> jax.Array:
  """mixup (Zhang et al. 2018) as big_vision's `utils.mixup(p, n)`, one draw for the batch.

  x'_b = Σ_{i<n} α_i · x_{(b − i) mod B}, with α ~ Dirichlet(p·1_n) sorted in decreasing order
  (so that the image b keeps the largest weight). p = 1, n = 2: α_0 = max(u, 1 − u), u ~ U(0, 1),
  the mixing of big_vision's distillation configs (`config.mixup = dict(p=1.0, n=2)`).
  """
  alpha = jax.random.dirichlet(rng, jnp.full((num_images,), concentration, jnp.float32))
  alpha = -jnp.sort(-alpha)
  return sum(alpha[i] * jnp.roll(images, i, axis=0) for i in range(num_images)).astype(images.dtype)


def cutmix_box(
  height: int, width: int, lam: jax.Array, center_y: jax.Array, center_x: jax.Array
) -> jax.Array:
  """Boolean [H, W] mask of CutMix's box: the reference `rand_bbox` (clovaai/CutMix-PyTorch).

  Cut sides ⌊H·√(1 − λ)⌋ × ⌊W·√(1 − λ)⌋ around (center_y, center_x), each bound clipped to the
  image: rows [clip(c_y − ⌊h/2⌋), clip(c_y + ⌊h/2⌋)), the same for columns.
  """
  cut = jnp.sqrt(1.0 - lam)
  half_h = jnp.floor(height * cut).astype(jnp.int32) // 2
  half_w = jnp.floor(width * cut).astype(jnp.int32) // 2
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside_rows = (rows >= jnp.clip(center_y - half_h, 0, height)) & (
    rows < jnp.clip(center_y + half_h, 0, height)
  )
  inside_cols = (cols >= jnp.clip(center_x - half_w, 0, width)) & (
    cols < jnp.clip(center_x + half_w, 0, width)
  )
  return inside_rows & inside_cols


def cutmix(rng: jax.Array, images: jax.Array, *, concentration: float = 1.0) -> jax.Array:
  """CutMix (Yun et al. 2019), one box for the batch: λ ~ Beta(α, α), a uniform centre, and the
  box (`cutmix_box`) filled from the neighbouring image x_{(b − 1) mod B}.

  The reference pastes from a random permutation of the batch; the batch order is already a
  random permutation, so the neighbour is as random, and never the image itself. α = 1 is the
  reference's ImageNet setting (`--beta 1.0 --cutmix_prob 1.0`).
  """
  _, height, width, _ = images.shape
  lam_rng, y_rng, x_rng = jax.random.split(rng, 3)
  lam = jax.random.beta(lam_rng, concentration, concentration)
  box = cutmix_box(
    height,
    width,
    lam,
    jax.random.randint(y_rng, (), 0, height),
    jax.random.randint(x_rng, (), 0, width),
  )
  return jnp.where(box[None, :, :, None], jnp.roll(images, 1, axis=0), images)


AUGMENTATIONS = ("none", "crop_flip", "mixup", "cutmix")
# Views that mix two images: they have no single label.
MIXING_AUGMENTATIONS = ("mixup", "cutmix")


def build(name: str, spec: DatasetSpec) -> Augment | None:
  """The augmentation `name` for dataset `spec`; None for 'none'."""
  if name == "none":
    return None
  if name == "crop_flip":
    # torchvision pads the uint8 image with black (0) before ToTensor + Normalize.
    black = -np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)
    return functools.partial(crop_flip, padding=4, pad_value=jnp.asarray(black))
  if name == "mixup":
    return mixup
  if name == "cutmix":
    return cutmix
  raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")
