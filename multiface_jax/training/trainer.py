"""Everything a run builds from its config: data facts, mesh, backbone, head, optimizer, state.

``Trainer(config)`` is what the loop (``loop.py``) and the checkpoint evaluation (``evaluate.py``)
start from; ``create_backbone`` / ``create_head`` turn ``config.model`` / ``config.head`` into
modules for anyone else (the demo, the benchmarks).
"""
import functools
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from multiface_jax import heads
from multiface_jax.inference import loading
from multiface_jax.training import inputs, optim, schedule, sharded_head, sharding, step


def create_backbone(config: ml_collections.ConfigDict) -> nn.Module:
  """The configured backbone (``config.model``) with its compute dtype."""
  return loading.create_backbone(model_record(config))


def model_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the run's checkpoints record about the backbone (``inference.loading``)."""
  return loading.record_from_config(config, embedding_size=step.EMBEDDING_SIZE)


def create_head(config: ml_collections.ConfigDict, num_classes: int,
                mesh: jax.sharding.Mesh) -> sharded_head.ShardedHead:
  """The configured multi-sphere head (``config.head``) over `num_classes` identities, on
  `mesh` (classes over 'model', PartialFC sampling at ``head.sample_rate``)."""
  h = config.head
  head = heads.MultiSphereHead(num_classes=num_classes, num_spheres=h.num_spheres, kind=h.kind,
                               scale=h.scale, margin=h.margin,
                               combined_margins=tuple(h.combined_margins),
                               normalization=h.normalization, straight_through=h.straight_through)
  return sharded_head.ShardedHead(head, mesh, global_batch=config.batch_size,
                                  sample_rate=float(h.sample_rate))


COMPUTE_DTYPES = ('float32', 'bfloat16')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects config values the loop cannot run with, naming the field and the valid range."""
  if config.model.dtype not in COMPUTE_DTYPES:
    raise ValueError(f'model.dtype={config.model.dtype!r}; valid: {COMPUTE_DTYPES}.')
  for field in ('batch_size', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                'grad_accum_steps', 'eval_batch_size'):
    if config[field] < 1:
      raise ValueError(f'{field}={config[field]} must be >= 1.')
  if step.EMBEDDING_SIZE % config.head.num_spheres:
    raise ValueError(f'head.num_spheres={config.head.num_spheres} must divide the '
                     f'{step.EMBEDDING_SIZE}-d embedding.')
  sharded_head.check_sample_rate(config.head.sample_rate, config.grad_accum_steps)



class Trainer:
  """Builds everything a run needs from the config: data facts, mesh, model, optimizer, state."""

  def __init__(self, config: ml_collections.ConfigDict):
    check_config(config)
    self.config = config
    self.facts = inputs.dataset_facts(config)
    self.plan = schedule.plan_steps(config, self.facts.num_images)
    self.mesh = sharding.create_mesh(config.mesh.model_axis_size)
    self.local_batch_size = sharding.check_batch_size(config.batch_size, self.mesh)
    self.model = create_backbone(config)
    self.head = create_head(config, self.facts.num_classes, self.mesh)
    self.lr_fn = schedule.create_learning_rate_fn(config.optimizer, self.plan)

    rng = jax.random.PRNGKey(config.seed)
    abstract_params, abstract_stats = jax.eval_shape(
        functools.partial(step.init_variables, model=self.model, head=self.head,
                          image_size=self.facts.image_size), rng)
    groups = optim.param_groups(step.optimized_params(abstract_params, self.head), abstract_stats,
                                embedding_layer=optim.embedding_layer_of(config.model.name))
    self.tx = optim.create_optimizer(config.optimizer, self.lr_fn, groups,
                                     config.grad_accum_steps)
    init = functools.partial(step.create_train_state, model=self.model, head=self.head, tx=self.tx,
                             image_size=self.facts.image_size)
    abstract_state = jax.eval_shape(init, rng)
    self.state_shardings = sharding.state_shardings(self.mesh, abstract_state)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
        self.state_shardings)
    self._init = jax.jit(init, out_shardings=self.state_shardings)
    self._rng = rng
    self.train_step = jax.jit(
        functools.partial(step.train_step, model=self.model, head=self.head, tx=self.tx,
                          head_lr_fn=self.lr_fn,
                          head_sgd=sharded_head.optimizer_settings(config.optimizer)),
        in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh)),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=0)
    self.all_finite = jax.jit(sharding.tree_all_finite)

  def fresh_state(self) -> step.TrainState:
    """A new state created directly on the mesh; with ``init_checkpoint``, its backbone loaded."""
    # Partitionable threefry compiles several times slower on XLA:CPU, and init runs once: take
    # the classic scheme. Either way the values are the same on any mesh.
    with jax.threefry_partitionable(False):
      state = self._init(self._rng)
    if self.config.init_checkpoint:
      abstract = {'params': self.abstract_state.params['backbone'],
                  'batch_stats': self.abstract_state.batch_stats}
      loaded = loading.load_backbone_variables(self.config.init_checkpoint, abstract)
      state = state.replace(params={**state.params, 'backbone': loaded['params']},
                            batch_stats=loaded['batch_stats'])
    return state

  def input_iter(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches, starting at batch `start_step` of the uninterrupted stream."""
    return inputs.create_input_iter(self.config, self.facts,
                                    local_batch_size=self.local_batch_size,
                                    start_step=start_step, process_index=jax.process_index(),
                                    process_count=jax.process_count())

  def meta(self, step: int) -> dict[str, Any]:
    """JSON facts saved next to each checkpoint."""
    c = self.config
    return {'step': int(step), 'model': c.model.name, 'num_classes': self.facts.num_classes,
            'num_spheres': c.head.num_spheres, 'batch_size': c.batch_size, 'seed': c.seed,
            'num_devices': jax.device_count(), 'num_processes': jax.process_count(),
            'mesh': dict(self.mesh.shape), 'config': c.to_json(),
            'class_sampling': self.head.sampling, loading.RECORD_KEY: model_record(c)}

  def check_resumable(self, meta: dict[str, Any], workdir: str) -> None:
    """Refuses to resume a checkpoint of a different model/head; warns on a changed batch."""
    c = self.config
    # Class sampling keeps the head's momentum outside the optimizer: another state layout.
    mine = {'model': c.model.name, 'num_classes': self.facts.num_classes,
            'num_spheres': c.head.num_spheres, 'class_sampling': self.head.sampling}
    for key, value in mine.items():
      if key in meta and meta[key] != value:
        raise ValueError(f'{workdir} holds a run with {key}={meta[key]!r}, this config has '
                         f'{value!r}: use a new --workdir (or the matching config).')
    if meta.get('batch_size', c.batch_size) != c.batch_size or meta.get('seed', c.seed) != c.seed:
      logging.warning('Resuming with batch_size/seed %s/%s, saved with %s/%s: the data order '
                      'will not continue exactly.', c.batch_size, c.seed, meta.get('batch_size'),
                      meta.get('seed'))
