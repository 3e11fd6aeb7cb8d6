"""Checkpoints: the train state with Orbax, restorable onto any mesh.

Layout: ``{workdir}/checkpoints/{step}/state`` (the train state, Orbax ``StandardSave``) and
``.../{step}/meta`` (JSON: step, config, device count, ...). Orbax writes a step to a temporary
folder and renames it when complete, so a run killed mid-save leaves the previous checkpoint as
the latest one, never a truncated one.

Restoring takes an *abstract* state whose leaves carry the shardings of the current mesh, so a
checkpoint written on 8 devices (class-sharded head or not) restores onto 1, and vice versa.

Weights-only checkpoints ``{params, batch_stats}`` (from ``python -m multiface_jax.import_torch``)
and the ``state`` of a training checkpoint both load as backbone variables through
:func:`load_backbone_variables`, for evaluation and fine-tuning.
"""
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_SUBDIR = 'checkpoints'
STATE_ITEM = 'state'
META_ITEM = 'meta'


def checkpoint_dir(workdir: str) -> str:
  """The folder holding a run's step folders."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def create_checkpoint_manager(workdir: str, *, max_to_keep: int,
                              read_only: bool = False) -> ocp.CheckpointManager:
  """An Orbax manager for ``{workdir}/checkpoints`` keeping the last `max_to_keep` steps.

  Args:
    workdir: the run's folder.
    max_to_keep: older steps are deleted once a newer one is complete.
    read_only: open for restoring only (evaluation); creates nothing.

  Returns:
    A ``CheckpointManager`` with items ``state`` (pytree) and ``meta`` (JSON). Saves are
    asynchronous: call ``wait_until_finished()`` before exiting.
  """
  if read_only:  # (Orbax warns about any saving option given to a read-only manager)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE_ITEM, META_ITEM))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any]) -> None:
  """Starts saving `state` and `meta` as step `step` (asynchronously; every process calls this).

  Args:
    manager: from :func:`create_checkpoint_manager`.
    step: the step number (the state after `step` steps).
    state: the train-state pytree (sharded jax arrays).
    meta: JSON-serialisable facts about the run.
  """
  manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                                META_ITEM: ocp.args.JsonSave(dict(meta))}),
               force=True)


def restore_latest(manager: ocp.CheckpointManager,
                   abstract_state: Any) -> Optional[tuple[Any, dict[str, Any]]]:
  """Restores the newest complete step onto the shardings of `abstract_state`.

  Args:
    manager: from :func:`create_checkpoint_manager`.
    abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (the current mesh).

  Returns:
    ``(state, meta)``, or None when the folder has no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
         META_ITEM: ocp.args.JsonRestore()}))
  return restored[STATE_ITEM], dict(restored[META_ITEM] or {})


def latest_step_dir(workdir: str) -> Optional[str]:
  """Path of the newest complete (finalized) step folder of a run, or None."""
  directory = checkpoint_dir(workdir)
  steps = ocp.path.step.checkpoint_steps(directory) if os.path.isdir(directory) else []
  return os.path.join(directory, str(max(steps))) if steps else None


def load_backbone_variables(path: str, abstract_variables: Mapping[str, Any]) -> dict[str, Any]:
  """Loads backbone ``{params, batch_stats}`` from any checkpoint this project writes.

  Accepted `path` forms:
  - a weights-only checkpoint ``{params, batch_stats}`` (``import_torch``, or
    ``ocp.StandardCheckpointer().save(path, variables)``);
  - a training checkpoint's step folder (``.../checkpoints/1000``) or its ``state`` item: the
    backbone is ``params['backbone']``; the head and the optimizer state are not read.

  Args:
    path: one of the above.
    abstract_variables: ``{'params', 'batch_stats'}`` of ``jax.ShapeDtypeStruct`` with shardings
      (the backbone of the current config on the current mesh).

  Returns:
    ``{'params', 'batch_stats'}`` as sharded arrays.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: the checkpoint's variables do not fit the configured backbone (checked on
      its metadata before anything is read).
  """
  path = os.path.abspath(path)
  item_dir = os.path.join(path, STATE_ITEM) if os.path.isdir(os.path.join(path, STATE_ITEM)) else path
  if not os.path.isdir(item_dir):
    raise FileNotFoundError(f'{path}: no checkpoint there. Pass a step folder '
                            '(workdir/checkpoints/<step>) or a {params, batch_stats} checkpoint '
                            'written by python -m multiface_jax.import_torch.')
  try:
    # The handler reads the item's own tree metadata (the checkpointer would also look for
    # step-level metadata, which an item folder of a training checkpoint does not hold).
    saved_tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree
  except Exception as e:  # Orbax raises several types for "not a checkpoint".
    raise FileNotFoundError(f'{item_dir}: not an Orbax checkpoint ({e}).') from e
  if not isinstance(saved_tree, Mapping) or not {'params', 'batch_stats'} <= set(saved_tree):
    keys = sorted(saved_tree) if isinstance(saved_tree, Mapping) else type(saved_tree).__name__
    raise ValueError(f'{item_dir}: expected a checkpoint with params and batch_stats, found {keys}.')
  nested = 'backbone' in saved_tree['params']
  saved = {'params': saved_tree['params']['backbone'] if nested else saved_tree['params'],
           'batch_stats': saved_tree['batch_stats']}
  # Checked on the metadata, before Orbax starts reading, so that a mismatch is one clear error.
  _check_fits(item_dir, abstract_variables, saved)
  target = {'params': ({'backbone': abstract_variables['params']} if nested
                       else abstract_variables['params']),
            'batch_stats': abstract_variables['batch_stats']}
  restored = ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  params = restored['params']['backbone'] if nested else restored['params']
  logging.info('Loaded backbone variables from %s', item_dir)
  return {'params': params, 'batch_stats': restored['batch_stats']}


def _check_fits(path: str, expected: Any, saved: Any) -> None:
  """Raises ValueError naming the first leaf of `expected` that `saved` lacks or shapes
  differently (`saved` may hold more)."""
  saved_leaves = {jax.tree_util.keystr(k): v
                  for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  hint = 'check config.model.name and config.model.options'
  for key, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    name = jax.tree_util.keystr(key)
    if name not in saved_leaves:
      raise ValueError(f'{path}: the checkpoint lacks {name}, so its variables do not fit the '
                       f'configured backbone ({hint}).')
    shape = tuple(getattr(saved_leaves[name], 'shape', ()))
    if shape != tuple(leaf.shape):
      raise ValueError(f'{path}: {name} has shape {shape}, the configured backbone expects '
                       f'{tuple(leaf.shape)} ({hint}).')
