"""The training loop: ``train_and_evaluate(config, workdir)`` runs or resumes a run.

Guarantees:

- Resume: a restart in the same workdir restores the newest checkpoint onto the current devices
  (any count) and the input continues at the restored step, so K steps + restart + K steps gives
  the parameters of 2K uninterrupted steps.
- SIGTERM: the loop saves the current step, waits for the write and returns normally.
- Non-finite values: metrics are checked at every log step and before every checkpoint (the
  parameters too); the run stops with ``FloatingPointError`` naming the steps, and the newest
  checkpoint on disk is the last good one.
"""
import functools
from typing import Any

import jax
import ml_collections
from absl import logging
from clu import metric_writers, periodic_actions

from multiface_jax.training import checkpointing, evaluate, sharding
from multiface_jax.training.hooks import PreemptionWatcher, ProgressLog, first_non_finite
from multiface_jax.training.step import TrainState
from multiface_jax.training.trainer import Trainer



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the configured run in `workdir`; evaluates every K steps and at the end.

  Args:
    config: the run's config (see ``configs/default.py``).
    workdir: checkpoints (``checkpoints/``), TensorBoard events and evaluation results go here;
      a workdir holding checkpoints is resumed from the newest one.

  Returns:
    The final train state (also after a SIGTERM-triggered stop).

  Raises:
    FloatingPointError: a loss or parameter became NaN/inf; the message names the steps.
  """
  trainer = Trainer(config)
  plan = trainer.plan
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  manager = checkpointing.create_checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints)
  watcher = PreemptionWatcher()
  try:
    return _train_loop(trainer, config, workdir, plan, writer, manager, watcher)
  finally:
    watcher.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()


def _train_loop(trainer, config, workdir, plan, writer, manager, watcher) -> TrainState:
  restored = checkpointing.restore_latest(
      manager, trainer.abstract_state,
      check_meta=functools.partial(trainer.check_resumable, workdir=workdir))
  if restored is None:
    state = trainer.fresh_state()
    if jax.process_index() == 0:
      writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})
  else:
    state, meta = restored
    announce(f'Resumed {workdir} at step {int(state.step)} on {jax.device_count()} devices '
             f'(saved on {meta.get("num_devices")}).')
  start_step = int(state.step)
  last_saved = start_step if restored is not None else -1
  announce(f'Run: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), global batch '
            f'{config.batch_size}, mesh {dict(trainer.mesh.shape)}, '
            f'{trainer.facts.num_classes} classes, {config.model.name} '
            f'({config.model.dtype}), {config.head.kind} x{config.head.num_spheres}.')

  evaluator = evaluate.create_evaluator(config) if config.eval_during_training else None
  eval_apply = functools.partial(trainer.model.apply, train=False)
  progress = ProgressLog(config, plan, trainer.lr_fn, writer, start_step)
  report = periodic_actions.ReportProgress(num_train_steps=plan.total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  batches = trainer.input_iter(start_step)
  pending = []  # (step, metrics) not yet checked on the host
  checked_step = start_step  # the losses are known finite up to this step ...
  params_checked_step = start_step  # ... and the parameters at this one (the last save)

  def check_finite(step, params_too):
    nonlocal checked_step, params_checked_step
    bad, since = first_non_finite(pending), checked_step
    if bad is None and params_too and not bool(trainer.all_finite(state.params)):
      # Finite losses do not vouch for the parameters: they broke after the last save.
      bad, since = step, params_checked_step
    if bad is not None:
      manager.wait_until_finished()  # an earlier, good save may still be in flight
      last = manager.latest_step()
      raise FloatingPointError(
          f'Non-finite loss or parameters between steps {since + 1} and {step} (first '
          f'seen at step {bad}); stopped without saving. The newest checkpoint '
          f'({"step " + str(last) if last is not None else "none"}) in '
          f'{checkpointing.checkpoint_dir(workdir)} is the last good one. Lower '
          f'optimizer.lr (now {config.optimizer.lr}) or add optimizer.warmup_epochs.')
    checked_step = step
    if params_too:
      params_checked_step = step

  def save(step):
    nonlocal last_saved
    check_finite(step, params_too=True)
    checkpointing.save(manager, step, state, trainer.meta(step))
    last_saved = step

  step = start_step
  while step < plan.total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = sharding.make_global_batch(trainer.mesh, next(batches))
      state, metrics = trainer.train_step(state, batch)
    step += 1
    pending.append((step, metrics))
    report(step)
    if step % config.log_every_steps == 0 or step == plan.total_steps:
      history = jax.device_get(pending)
      pending[:] = history
      check_finite(step, params_too=False)
      progress.log(step, [m for _, m in history])
      pending.clear()
    if step % config.checkpoint_every_steps == 0 or step == plan.total_steps:
      save(step)
      pending.clear()
    if evaluator is not None and ((plan.eval_every and step % plan.eval_every == 0)
                                  or step == plan.total_steps):
      with report.timed('eval'):
        evaluator.run(eval_apply, evaluate.local_variables(state.params['backbone'], state.batch_stats),
                      step=step, workdir=workdir, writer=writer)
    if watcher.should_stop(step):
      if last_saved != step:
        save(step)
      manager.wait_until_finished()
      logging.warning('Preemption signal: saved step %d in %s; exiting.', step,
                      checkpointing.checkpoint_dir(workdir))
      return state
  if last_saved != step and step > 0:
    save(step)
  return state


def announce(message: str) -> None:
  """A run-level fact for the console (process 0 prints; the others log it)."""
  if jax.process_index() == 0:
    print(message, flush=True)
  else:
    logging.info(message)


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out
