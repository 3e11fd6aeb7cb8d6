"""The device mesh and how the train state and the batches are laid out on it.

One 2-D mesh ``('data', 'model')`` spans every device of every process. The batch is split over
*all* devices (both axes), so every device sees different images and the backbone is purely
data-parallel. The head's class axis (the last axis of its ``(N, D/N, C)`` kernel, and of the
optimizer's copies of it) is split over ``'model'``; with ``model_axis_size=1`` that is plain
replication. Everything else is replicated.

Values never depend on the layout: jit computes the same global function whatever the sharding,
so a run on 8 devices equals a run on 1 up to float summation order, and a checkpoint written
under one mesh restores onto any other.
"""
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
MODEL_AXIS = 'model'
# The batch axis is split over the flattened mesh: every device gets distinct examples.
BATCH_AXES = (DATA_AXIS, MODEL_AXIS)
# Name of the head's sub-tree in the train-state params and of its class-sharded parameter.
HEAD_COLLECTION = 'head'
HEAD_KERNEL = 'kernel'
# The train state's momentum of a class-sampled head kernel (laid out like the kernel).
HEAD_MOMENTUM = 'head_momentum'


def create_mesh(model_axis_size: int = 1,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ``('data', 'model')`` mesh over all devices.

  Args:
    model_axis_size: devices across which the head's classes are split; must divide the device
      count. 1 = no class sharding.
    devices: devices to use (default: ``jax.devices()``, every device of every process).

  Returns:
    A mesh of shape ``(num_devices // model_axis_size, model_axis_size)`` with Auto axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  if model_axis_size < 1 or len(devices) % model_axis_size:
    raise ValueError(f'mesh.model_axis_size={model_axis_size} must be >= 1 and divide the '
                     f'{len(devices)} devices.')
  shape = (len(devices) // model_axis_size, model_axis_size)
  # Auto axes: the default Explicit axes make jit reject ordinary, unannotated code.
  return jax.make_mesh(shape, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a value held whole on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _is_head_kernel(path: tuple[Any, ...]) -> bool:
  keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  return (HEAD_COLLECTION in keys and keys[-1] == HEAD_KERNEL) or HEAD_MOMENTUM in keys


def state_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
  """Shardings for a train-state tree: head kernels class-sharded, the rest replicated.

  A leaf is a head kernel when its path passes through a ``'head'`` dict key and ends in
  ``'kernel'``; that also catches the optimizer's momentum/accumulator copies, which mirror the
  params tree, and the state's ``head_momentum`` of a class-sampled head.

  Args:
    mesh: the mesh from :func:`create_mesh`.
    abstract_tree: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).

  Returns:
    A pytree of ``NamedSharding`` with the structure of `abstract_tree`.

  Raises:
    ValueError: when the class count is not a multiple of the model axis size (the head pads
      it to one).
  """
  model_size = mesh.shape[MODEL_AXIS]

  def sharding_of(path, leaf):
    if model_size > 1 and _is_head_kernel(path) and len(leaf.shape) == 3:
      num_classes = leaf.shape[-1]
      if num_classes % model_size:
        divisors = [d for d in range(1, min(num_classes, 64) + 1) if num_classes % d == 0]
        raise ValueError(
            f'The head has {num_classes} classes, which do not split evenly over '
            f'mesh.model_axis_size={model_size} devices; pick a model axis size among '
            f'{divisors} (or 1 for no class sharding).')
      return NamedSharding(mesh, P(None, None, MODEL_AXIS))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_tree)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch against the mesh and the processes.

  Args:
    global_batch_size: images per step, summed over all devices and processes.
    mesh: the training mesh.

  Returns:
    The per-process batch size (what this process's input pipeline must yield).
  """
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    nearest = max(global_batch_size // num_devices, 1) * num_devices
    raise ValueError(f'batch_size={global_batch_size} (global) must be a multiple of the '
                     f'{num_devices} devices; e.g. {nearest}.')
  return global_batch_size // jax.process_count()


def make_global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays sharded over the mesh.

  Works unchanged for one process (the local batch is the global batch) and for several (each
  process passes its own ``global_batch / process_count`` examples).

  Args:
    mesh: the training mesh.
    local_batch: dict of numpy arrays with the per-process batch as leading axis.

  Returns:
    Dict of global ``jax.Array``, leading axis sharded over all devices.
  """
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local_batch.items()}


def tree_all_finite(tree: Any) -> jax.Array:
  """True when every float leaf of `tree` is finite (a scalar bool; run it inside jit)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
