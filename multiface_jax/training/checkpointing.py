"""Checkpoints: the train state with Orbax, restorable onto any mesh.

Layout: ``{workdir}/checkpoints/{step}/state`` (the train state, Orbax ``StandardSave``) and
``.../{step}/meta`` (JSON: step, config, device count, ...). Orbax writes a step to a temporary
folder and renames it when complete, so a run killed mid-save leaves the previous checkpoint as
the latest one, never a truncated one.

Restoring takes an *abstract* state whose leaves carry the shardings of the current mesh, so a
checkpoint written on 8 devices (class-sharded head or not) restores onto 1, and vice versa.

Any checkpoint of the project (a step folder, or imported weights) loads as backbone variables
through ``inference.loading``, for evaluation, fine-tuning and the photo commands.
"""
import os
from typing import Any, Callable, Mapping, Optional

import orbax.checkpoint as ocp

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


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   check_meta: Optional[Callable[[dict[str, Any]], None]] = None
                   ) -> Optional[tuple[Any, dict[str, Any]]]:
  """Restores the newest complete step onto the shardings of `abstract_state`.

  The head's class axis is padded to a multiple of the model axis, so a checkpoint written with
  another model axis size holds a differently padded kernel: its arrays are restored padded with
  (or stripped of) zero columns, which is exact because padding columns are zero and stay zero.

  Args:
    manager: from :func:`create_checkpoint_manager`.
    abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (the current mesh).
    check_meta: called with the step's meta before the state is read (it raises to refuse a
      checkpoint of another model or head, whose shapes would otherwise be padded to fit).

  Returns:
    ``(state, meta)``, or None when the folder has no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  meta = dict(manager.restore(step, args=ocp.args.Composite(
      **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM] or {})
  if check_meta is not None:
    check_meta(meta)
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardRestore(abstract_state, strict=False)}))
  return restored[STATE_ITEM], meta


def latest_step_dir(workdir: str) -> Optional[str]:
  """Path of the newest complete (finalized) step folder of a run, or None."""
  directory = checkpoint_dir(workdir)
  steps = ocp.path.step.checkpoint_steps(directory) if os.path.isdir(directory) else []
  return os.path.join(directory, str(max(steps))) if steps else None
