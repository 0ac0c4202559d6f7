"""Device mesh, sharding rules, multi-host start-up and host-local → global batches.

One mesh with two axes serves every run:

* ``'data'``: data parallelism. The batch is split over it; parameters are replicated.
* ``'fsdp'``: fully sharded data parallelism (ZeRO-3). The batch is split over it too, and every
  large enough array of the train state (parameters, optimiser moments, memory banks) is split
  along one of its dimensions; XLA all-gathers a weight where a layer needs it and
  reduce-scatters its gradient.

So the batch is sharded over both axes (``P(('data', 'fsdp'))``) and a global batch must be a
multiple of the device count; with ``fsdp=1`` the state is fully replicated.

Axis types are ``Auto``, named explicitly. ``Explicit`` axes ("sharding in types") require every
op whose operands disagree on sharding to name its ``out_sharding``: a convolution of a
batch-sharded image with an fsdp-sharded kernel fails with "Please specify the output sharding via
`out_sharding` of `conv_general_dilated`" (checked with jax 0.10.2). The model zoo carries no
sharding annotations and should not need to, so the step pins shardings at the `jax.jit`
boundary (``in_shardings``/``out_shardings``) and lets the partitioner place the inside.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS_NAMES = ("data", "fsdp")
# The batch dimension is split over every device: both axes.
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under FSDP: biases, BN scales and scalars cost more
# in collective latency than they save in memory.
FSDP_MIN_SIZE = 2**10


def mesh_shape(mesh_config: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """``{'data': d, 'fsdp': f}`` of `mesh_config` over `num_devices`, the -1 resolved.

  One entry may be ``-1`` (= all remaining devices); ``None`` means ``{'data': -1, 'fsdp': 1}``.
  ValueError when the shape does not fit the devices.
  """
  mesh_config = dict(mesh_config or {"data": -1, "fsdp": 1})
  unknown = set(mesh_config) - set(AXIS_NAMES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {AXIS_NAMES}")
  shape = [int(mesh_config.get(name, 1)) for name in AXIS_NAMES]
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {mesh_config}")
  if -1 in shape:
    known = math.prod(size for size in shape if size != -1)
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into mesh {mesh_config}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(AXIS_NAMES, shape))} needs {math.prod(shape)} devices, "
      f"{num_devices} are available"
    )
  return dict(zip(AXIS_NAMES, shape))


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """Builds the ``('data', 'fsdp')`` mesh of `mesh_shape(mesh_config)` over `devices`.

  Args:
    mesh_config: ``{'data': d, 'fsdp': f}``, see `mesh_shape`.
    devices: devices to use (default: ``jax.devices()``, every device of every process).

  Returns:
    A `jax.sharding.Mesh` with ``Auto`` axis types (see the module docstring for why).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
    tuple(shape[name] for name in AXIS_NAMES),
    AXIS_NAMES,
    axis_types=(AxisType.Auto,) * len(AXIS_NAMES),
    devices=devices,
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array every device holds whole."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch array: leading (example) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, leading_axes: int = 0) -> P:
  """Partition spec of one state array under the FSDP rule.

  The largest dimension divisible by ``fsdp_size`` is split over ``'fsdp'``; arrays with fewer
  than `FSDP_MIN_SIZE` elements, or no divisible dimension, are replicated. The rule depends on
  the shape alone, so a parameter and its optimiser moments always get the same sharding.

  Args:
    shape: the array's shape.
    fsdp_size: size of the ``'fsdp'`` mesh axis.
    leading_axes: number of leading stacking axes (population members, ensemble teachers) that
      are never split: the rule applies to the per-member shape.
  """
  member_shape = shape[leading_axes:]
  if fsdp_size == 1 or math.prod(member_shape) < FSDP_MIN_SIZE:
    return P()
  candidates = [axis for axis, size in enumerate(member_shape) if size % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda a: (member_shape[a], -a))
  spec = [None] * len(shape)
  spec[leading_axes + axis] = "fsdp"
  return P(*spec)


def state_shardings(mesh: Mesh, tree: Any, leading_axes: int = 0) -> Any:
  """`NamedSharding` for every array leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp_size, leading_axes)), tree
  )


def shard_state(mesh: Mesh, tree: Any, leading_axes: int = 0) -> Any:
  """A copy of `tree` placed on `mesh` following `state_shardings`.

  Never aliases the input buffers: the train step donates its state, which must not delete the
  arrays of the model the state was taken from. (``device_put(..., may_alias=False)`` still
  aliases the device-0 shard on CPU in jax 0.10.2, so local arrays go through a host copy; every
  process holds the same values, as `jax.device_put` of host data to a global sharding requires.)
  """

  def host_copy(leaf):
    return np.array(leaf) if getattr(leaf, "is_fully_addressable", True) else leaf

  return jax.device_put(jax.tree.map(host_copy, tree), state_shardings(mesh, tree, leading_axes))


def place_state(mesh: Mesh, tree: Any, leading_axes: int = 0) -> Any:
  """`tree` placed on `mesh` following `state_shardings`, without a host copy: for arrays that
  are never donated (a teacher's weights), which may then share buffers with `tree`."""
  return jax.device_put(tree, state_shardings(mesh, tree, leading_axes))


def host_to_global(mesh: Mesh, host_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Assembles global batch arrays from each process's local slice.

  Every process passes its own rows (``global_batch / process_count`` of them); the result is a
  global `jax.Array` per key, split over all devices along the example axis. On a single process
  this is a sharded `device_put`.
  """
  sharding = batch_sharding(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for key, value in host_batch.items()
  }


def _setting(config: Any, key: str) -> Any:
  if config is None:
    return None
  getter = getattr(config, "get", None)
  return getter(key) if getter is not None else getattr(config, key, None)


def maybe_initialize_distributed(config: Any = None) -> bool:
  """Calls `jax.distributed.initialize` when a multi-process run is asked for.

  Sources, first match wins:

  1. ``config.distributed``: a mapping with ``coordinator_address``, ``num_processes``,
     ``process_id`` and optionally ``local_device_ids``; or the string ``'auto'`` to let JAX detect
     the cluster (SLURM, Open MPI, Cloud TPU, GKE).
  2. Environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
     optionally ``JAX_LOCAL_DEVICE_IDS`` (comma separated).

  On CPU, cross-process collectives go through gloo (the default CPU runtime has none). Must run
  before anything touches a JAX backend. Returns whether the runtime is (now) distributed.
  """
  if jax.distributed.is_initialized():
    return True
  settings = _setting(config, "distributed")
  if settings == "auto":
    jax.distributed.initialize()
    return True
  if settings:
    settings = dict(settings)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    settings = {
      "coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
      "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
      "process_id": int(os.environ["JAX_PROCESS_ID"]),
    }
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
      settings["local_device_ids"] = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
  else:
    return False
  # Only the CPU backend reads this; accelerator backends keep their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=settings["coordinator_address"],
    num_processes=int(settings["num_processes"]),
    process_id=int(settings["process_id"]),
    local_device_ids=settings.get("local_device_ids"),
  )
  return True
