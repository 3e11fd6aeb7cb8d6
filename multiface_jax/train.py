"""Training and evaluation loops: one jitted step over a ('data', 'model') mesh, Orbax checkpoints.

``train_and_evaluate(config, workdir)`` runs (or resumes) a run; ``evaluate(config, workdir)``
restores a checkpoint and runs the verification evaluator.

The train state lives on the mesh from the moment it is created (``jax.jit(init,
out_shardings=...)``): parameters replicated, the head's classes split over ``'model'``, the batch
split over every device. Each step is ``jax.jit`` with the state donated. Guarantees:

- Resume: a restart in the same workdir restores the newest checkpoint onto the current devices
  (any count) and the input continues at the restored step, so K steps + restart + K steps gives
  the parameters of 2K uninterrupted steps.
- SIGTERM: the loop saves the current step, waits for the write and returns normally.
- Non-finite values: metrics are checked at every log step and before every checkpoint (the
  parameters too); the run stops with ``FloatingPointError`` naming the steps, and the newest
  checkpoint on disk is the last good one.
"""
import functools
import json
import os
from typing import Any, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import PartitionSpec as P

from multiface_jax import checkpointing, heads, models, optim, parallel
from multiface_jax.train_hooks import PreemptionWatcher, ProgressLog, first_non_finite
from multiface_jax.train_inputs import dataset_facts, synthetic_batches

EMBEDDING_SIZE = 512


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a checkpoint stores exactly this.

  Attributes:
    step: int32 scalar, steps done.
    params: ``{'backbone': ..., 'head': {'kernel': (N, 512/N, C)}}``, float32.
    batch_stats: the backbone's BatchNorm running statistics.
    opt_state: the optax state (momentum, and accumulated gradients with grad_accum_steps > 1).
    rng: uint32 (2,) base key; step t uses ``fold_in(rng, t)`` (so dropout masks survive resume).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def create_backbone(config: ml_collections.ConfigDict) -> nn.Module:
  """The configured backbone (``config.model``) with its compute dtype."""
  return models.create_model(config.model.name, dtype=jnp.dtype(config.model.dtype),
                             embedding_size=EMBEDDING_SIZE, **config.model.options.to_dict())


def create_head(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The configured multi-sphere head (``config.head``) over `num_classes` identities."""
  h = config.head
  return heads.MultiSphereHead(num_classes=num_classes, num_spheres=h.num_spheres, kind=h.kind,
                               scale=h.scale, margin=h.margin,
                               combined_margins=tuple(h.combined_margins),
                               normalization=h.normalization, straight_through=h.straight_through)


def init_variables(rng: jax.Array, model: nn.Module, head: nn.Module,
                   image_size: tuple[int, int]) -> tuple[dict[str, Any], Any]:
  """Fresh ``(params, batch_stats)``: params = {'backbone', 'head'}."""
  model_rng, head_rng = jax.random.split(rng)
  variables = model.init(model_rng, jnp.zeros((1, *image_size, 3), jnp.float32), train=False)
  head_variables = head.init(head_rng, jnp.zeros((1, EMBEDDING_SIZE), jnp.float32),
                             jnp.zeros((1,), jnp.int32))
  return ({'backbone': variables['params'], 'head': head_variables['params']},
          variables['batch_stats'])


def create_train_state(rng: jax.Array, *, model: nn.Module, head: nn.Module,
                       tx: optax.GradientTransformation,
                       image_size: tuple[int, int]) -> TrainState:
  """A fresh train state at step 0 (call it under ``jax.jit`` to create it sharded)."""
  init_rng, state_rng = jax.random.split(rng)
  params, batch_stats = init_variables(init_rng, model, head, image_size)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=state_rng)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               head: nn.Module, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch.

  Args:
    state: the current state (donated by the jitted caller).
    batch: ``{'image': uint8 (B, H, W, 3), 'label': int32 (B,)}``, sharded over all devices.
    model, head, tx: the backbone, the head and the optimizer.
    mesh: the training mesh (for sharding constraints).

  Returns:
    ``(new_state, metrics)``; metrics: ``loss`` (sum over spheres), ``loss_per_sphere`` (N,),
    ``accuracy_per_sphere`` (N,), float32, averaged over the batch.
  """
  labels = batch['label']
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    images = models.normalize_images(batch['image'])
    embeddings, updates = model.apply(
        {'params': params['backbone'], 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    # The backbone is data-parallel over every device; the head needs each embedding on every
    # device of its 'model' row, where the classes are split.
    embeddings = parallel.constrain(embeddings.astype(jnp.float32), mesh,
                                    P(parallel.DATA_AXIS, None))
    logits = head.apply({'params': params['head']}, embeddings, labels)
    logits = parallel.constrain(logits, mesh, P(None, parallel.DATA_AXIS, parallel.MODEL_AXIS))
    loss, per_sphere = heads.multi_sphere_loss(logits, labels)
    return loss, (per_sphere, heads.sphere_accuracy(logits, labels), updates['batch_stats'])

  (loss, (per_sphere, accuracy, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  metrics = {'loss': loss, 'loss_per_sphere': per_sphere, 'accuracy_per_sphere': accuracy}
  return new_state, metrics


COMPUTE_DTYPES = ('float32', 'bfloat16')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects config values the loop cannot run with, naming the field and the valid range."""
  if config.model.dtype not in COMPUTE_DTYPES:
    raise ValueError(f'model.dtype={config.model.dtype!r}; valid: {COMPUTE_DTYPES}.')
  for field in ('batch_size', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                'grad_accum_steps', 'eval_batch_size'):
    if config[field] < 1:
      raise ValueError(f'{field}={config[field]} must be >= 1.')
  if EMBEDDING_SIZE % config.head.num_spheres:
    raise ValueError(f'head.num_spheres={config.head.num_spheres} must divide the '
                     f'{EMBEDDING_SIZE}-d embedding.')


class Trainer:
  """Builds everything a run needs from the config: data facts, mesh, model, optimizer, state."""

  def __init__(self, config: ml_collections.ConfigDict):
    check_config(config)
    self.config = config
    self.facts = dataset_facts(config)
    self.plan = optim.plan_steps(config, self.facts.num_images)
    self.mesh = parallel.create_mesh(config.mesh.model_axis_size)
    self.local_batch_size = parallel.check_batch_size(config.batch_size, self.mesh)
    self.model = create_backbone(config)
    self.head = create_head(config, self.facts.num_classes)
    self.lr_fn = optim.create_learning_rate_fn(config.optimizer, self.plan)

    rng = jax.random.PRNGKey(config.seed)
    abstract_params, abstract_stats = jax.eval_shape(
        functools.partial(init_variables, model=self.model, head=self.head,
                          image_size=self.facts.image_size), rng)
    groups = optim.param_groups(abstract_params, abstract_stats,
                                embedding_layer=optim.embedding_layer_of(config.model.name))
    self.tx = optim.create_optimizer(config.optimizer, self.lr_fn, groups,
                                     config.grad_accum_steps)
    init = functools.partial(create_train_state, model=self.model, head=self.head, tx=self.tx,
                             image_size=self.facts.image_size)
    abstract_state = jax.eval_shape(init, rng)
    self.state_shardings = parallel.state_shardings(self.mesh, abstract_state)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
        self.state_shardings)
    self._init = jax.jit(init, out_shardings=self.state_shardings)
    self._rng = rng
    self.train_step = jax.jit(
        functools.partial(train_step, model=self.model, head=self.head, tx=self.tx,
                          mesh=self.mesh),
        in_shardings=(self.state_shardings, parallel.batch_sharding(self.mesh)),
        out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
        donate_argnums=0, compiler_options=models.compiler_options())
    self.all_finite = jax.jit(parallel.tree_all_finite)

  def fresh_state(self) -> TrainState:
    """A new state created directly on the mesh; with ``init_checkpoint``, its backbone loaded."""
    # Partitionable threefry compiles ~6x slower on XLA:CPU (jax 0.10.2: 58 s vs 10 s for the
    # tiny model's init); init runs once, so take the classic scheme. The values are the same on
    # any mesh either way: only the training step's random bits need to be partitionable.
    with jax.threefry_partitionable(False):
      state = self._init(self._rng)
    if self.config.init_checkpoint:
      abstract = {'params': self.abstract_state.params['backbone'],
                  'batch_stats': self.abstract_state.batch_stats}
      loaded = checkpointing.load_backbone_variables(self.config.init_checkpoint, abstract)
      state = state.replace(params={**state.params, 'backbone': loaded['params']},
                            batch_stats=loaded['batch_stats'])
    return state

  def input_iter(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches, starting at batch `start_step` of the uninterrupted stream."""
    config = self.config
    if config.synthetic_data:
      return synthetic_batches(config.batch_size, num_classes=self.facts.num_classes,
                               image_size=self.facts.image_size, seed=config.seed,
                               start_step=start_step, process_index=jax.process_index(),
                               process_count=jax.process_count())
    from multiface_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    return input_pipeline.create_input_iter(
        config.data_dir, self.local_batch_size, seed=config.seed, train=True,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())

  def meta(self, step: int) -> dict[str, Any]:
    """JSON facts saved next to each checkpoint."""
    c = self.config
    return {'step': int(step), 'model': c.model.name, 'num_classes': self.facts.num_classes,
            'num_spheres': c.head.num_spheres, 'batch_size': c.batch_size, 'seed': c.seed,
            'num_devices': jax.device_count(), 'num_processes': jax.process_count(),
            'mesh': dict(self.mesh.shape), 'config': c.to_json()}

  def check_resumable(self, meta: dict[str, Any], workdir: str) -> None:
    """Refuses to resume a checkpoint of a different model/head; warns on a changed batch."""
    c = self.config
    mine = {'model': c.model.name, 'num_classes': self.facts.num_classes,
            'num_spheres': c.head.num_spheres}
    for key, value in mine.items():
      if key in meta and meta[key] != value:
        raise ValueError(f'{workdir} holds a run with {key}={meta[key]!r}, this config has '
                         f'{value!r}: use a new --workdir (or the matching config).')
    if meta.get('batch_size', c.batch_size) != c.batch_size or meta.get('seed', c.seed) != c.seed:
      logging.warning('Resuming with batch_size/seed %s/%s, saved with %s/%s: the data order '
                      'will not continue exactly.', c.batch_size, c.seed, meta.get('batch_size'),
                      meta.get('seed'))


def _create_evaluator(config: ml_collections.ConfigDict):
  """The verification evaluator for data_dir's .bin sets, or None when there are none."""
  from multiface_jax.evaluation import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  if not config.data_dir:
    return None
  if not evaluator_lib.find_verification_sets(config.data_dir, config.eval_sets or None):
    logging.warning('No verification .bin sets in %s: evaluation is skipped.', config.data_dir)
    return None
  return evaluator_lib.Evaluator(config.data_dir, batch_size=config.eval_batch_size,
                                 num_spheres=config.head.num_spheres,
                                 names=config.eval_sets or None, mesh=_local_mesh())


def _local_mesh() -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over this process's devices only.

  The evaluator gathers embeddings to the host, which needs arrays this process can address
  whole; with several processes each one therefore embeds the (small) verification sets on its
  own devices, and process 0 reports.
  """
  return parallel.create_mesh(1, devices=jax.local_devices())


def _eval_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  """Backbone variables as process-local arrays (they are replicated on the training mesh)."""
  variables = {'params': params, 'batch_stats': batch_stats}
  if jax.process_count() == 1:
    return variables
  return jax.tree.map(lambda x: x.addressable_data(0), variables)


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
  restored = checkpointing.restore_latest(manager, trainer.abstract_state)
  if restored is None:
    state = trainer.fresh_state()
    if jax.process_index() == 0:
      writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})
  else:
    state, meta = restored
    trainer.check_resumable(meta, workdir)
    _announce(f'Resumed {workdir} at step {int(state.step)} on {jax.device_count()} devices '
              f'(saved on {meta.get("num_devices")}).')
  start_step = int(state.step)
  last_saved = start_step if restored is not None else -1
  _announce(f'Run: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), global batch '
            f'{config.batch_size}, mesh {dict(trainer.mesh.shape)}, '
            f'{trainer.facts.num_classes} classes, {config.model.name} '
            f'({config.model.dtype}), {config.head.kind} x{config.head.num_spheres}.')

  evaluator = _create_evaluator(config) if config.eval_during_training else None
  eval_apply = functools.partial(trainer.model.apply, train=False)
  progress = ProgressLog(config, plan, trainer.lr_fn, writer, start_step)
  report = periodic_actions.ReportProgress(num_train_steps=plan.total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  batches = trainer.input_iter(start_step)
  pending = []  # (step, metrics) not yet checked on the host
  checked_step = start_step

  def check_finite(step, params_too):
    nonlocal checked_step
    bad = first_non_finite(pending)
    if bad is None and params_too and not bool(trainer.all_finite(state.params)):
      bad = step
    if bad is not None:
      manager.wait_until_finished()  # an earlier, good save may still be in flight
      last = manager.latest_step()
      raise FloatingPointError(
          f'Non-finite loss or parameters between steps {checked_step + 1} and {step} (first '
          f'seen at step {bad}); stopped without saving. The newest checkpoint '
          f'({"step " + str(last) if last is not None else "none"}) in '
          f'{checkpointing.checkpoint_dir(workdir)} is the last good one. Lower '
          f'optimizer.lr (now {config.optimizer.lr}) or add optimizer.warmup_epochs.')
    checked_step = step

  def save(step):
    nonlocal last_saved
    check_finite(step, params_too=True)
    checkpointing.save(manager, step, state, trainer.meta(step))
    last_saved = step

  step = start_step
  while step < plan.total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      batch = parallel.make_global_batch(trainer.mesh, next(batches))
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
        evaluator.run(eval_apply, _eval_variables(state.params['backbone'], state.batch_stats),
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


def _announce(message: str) -> None:
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


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: Optional[str] = None) -> dict[str, Any]:
  """Restores a checkpoint and evaluates it on config.data_dir's verification sets.

  Args:
    config: the run's config (model, head.num_spheres, data_dir, eval_batch_size, eval_sets).
    workdir: the run folder; results go to ``{workdir}/eval``, the newest checkpoint of
      ``{workdir}/checkpoints`` is used when `checkpoint` is None.
    checkpoint: optional path: a step folder of a training checkpoint or a
      ``{params, batch_stats}`` checkpoint (imported weights).

  Returns:
    The evaluator's results, ``{set name: metrics}``.
  """
  path = checkpoint or checkpointing.latest_step_dir(workdir)
  if path is None:
    raise FileNotFoundError(f'{checkpointing.checkpoint_dir(workdir)} holds no checkpoint; '
                            'train first or pass --checkpoint=PATH.')
  if not config.data_dir:
    raise ValueError('Set --config.data_dir to the folder holding the verification .bin files.')
  mesh = _local_mesh()
  model = create_backbone(config)
  abstract = jax.eval_shape(
      lambda rng: model.init(rng, jnp.zeros((1, 112, 112, 3), jnp.float32), train=False),
      jax.random.PRNGKey(0))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
      dict(abstract))
  variables = checkpointing.load_backbone_variables(path, abstract)
  step = _step_of(path)
  evaluator = _create_evaluator(config)
  if evaluator is None:
    raise FileNotFoundError(f'{config.data_dir} holds no verification .bin sets.')
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  try:
    return evaluator.run(functools.partial(model.apply, train=False), variables, step=step,
                         workdir=workdir, writer=writer, label=f'{config.model.name} {path}')
  finally:
    writer.close()


def _step_of(path: str) -> int:
  """The step recorded in a training checkpoint's meta, or 0 (imported weights)."""
  meta_file = os.path.join(path, checkpointing.META_ITEM, 'metadata')
  if os.path.exists(meta_file):
    with open(meta_file) as f:
      return int(json.load(f).get('step', 0))
  return 0
