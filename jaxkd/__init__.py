"""jaxkd: knowledge distillation in JAX/Flax.

`jaxkd.losses` is importable with only jax, numpy and optax installed; everything else
(models, data, training) pulls in flax, orbax, grain and tfds.
"""

__version__ = "0.1.0"
