"""Optimiser of the original recipe: SGD momentum with coupled, grouped weight decay.

- ``plan_steps`` is the one place where durations given in epochs become steps.
- ``create_learning_rate_fn``: step decay (/10 at epochs 12, 15, 18), cosine or polynomial decay,
  optional linear warmup.
- ``param_groups`` labels every parameter with its weight-decay group, ``create_optimizer`` chains
  one masked ``add_decayed_weights`` per group before ``optax.sgd``: the decay is added to the
  gradient *before* momentum, exactly like ``torch.optim.SGD(weight_decay=...)`` (coupled L2, not
  AdamW-style decoupled decay).

A *step* is one call of the train step on one global batch of ``config.batch_size`` images. With
gradient accumulation (``grad_accum_steps = k``) the parameters change every k steps, on the mean
gradient of those k batches, and the learning rate of an update is the schedule's value at the
update's first step.
"""
import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Weight-decay groups (REFERENCE section 4): MobileFaceNet 4e-5 on backbone params, 4e-4 on the
# final Linear ("embedding") and the head, 0 on BatchNorm; IR-SE 5e-4 everywhere except BatchNorm.
GROUPS = ('backbone', 'embedding', 'head', 'bn')
LEARNING_RATE_SCHEDULES = ('step', 'cosine', 'poly', 'constant')


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """Every duration of a run, in steps.

  Attributes:
    steps_per_epoch: ``num_images // batch_size`` (the last partial batch of an epoch is dropped).
    total_steps: steps of the whole run.
    warmup_steps: steps of linear learning-rate warmup (0 = none).
    boundaries: steps at which the 'step' schedule multiplies the learning rate by its factor.
    eval_every: steps between evaluations (0 = only at the end).
  """
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  boundaries: tuple[int, ...]
  eval_every: int


def _epochs_to_steps(steps: int, epochs: float, steps_per_epoch: int) -> int:
  """`steps` when it is set (>= 0), else `epochs` worth of steps, rounded to the nearest step."""
  return int(steps) if steps >= 0 else int(round(epochs * steps_per_epoch))


def plan_steps(config: ml_collections.ConfigDict, num_images: int) -> StepPlan:
  """Converts the config's durations (in epochs or in steps) to steps, in one place.

  Args:
    config: the run's config (fields ``batch_size``, ``num_epochs``, ``num_train_steps``,
      ``eval_every_steps``, ``eval_every_epochs`` and ``optimizer.warmup_*``,
      ``optimizer.boundaries_*``).
    num_images: images in the training set.

  Returns:
    The run's :class:`StepPlan`.
  """
  steps_per_epoch = num_images // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'The training set has {num_images} images, fewer than one global batch '
                     f'(batch_size={config.batch_size}).')
  opt = config.optimizer
  total = _epochs_to_steps(config.num_train_steps, config.num_epochs, steps_per_epoch)
  if total < 1:
    raise ValueError(f'The run has {total} steps: set num_train_steps > 0 or num_epochs > 0.')
  boundaries = (tuple(int(b) for b in opt.boundaries_steps) if opt.boundaries_steps else
                tuple(int(round(e * steps_per_epoch)) for e in opt.boundaries_epochs))
  return StepPlan(
      steps_per_epoch=steps_per_epoch,
      total_steps=total,
      warmup_steps=_epochs_to_steps(opt.warmup_steps, opt.warmup_epochs, steps_per_epoch),
      boundaries=boundaries,
      eval_every=_epochs_to_steps(config.eval_every_steps, config.eval_every_epochs,
                                  steps_per_epoch))


def create_learning_rate_fn(opt_config: ml_collections.ConfigDict,
                            plan: StepPlan) -> Callable[[jax.Array], jax.Array]:
  """Learning rate as a function of the step.

  Args:
    opt_config: ``config.optimizer`` (``lr``, ``schedule``, ``decay_factor``, ``end_lr``,
      ``poly_power``).
    plan: the run's durations in steps.

  Returns:
    ``lr_fn(step) -> float32 scalar``. 'step': ``lr * decay_factor ** (number of boundaries <=
    step)`` (a drop "at epoch 12" applies from the first step of epoch 12, as torch's
    MultiStepLR). 'cosine' / 'poly': decay from ``lr`` at the end of warmup to ``end_lr`` at
    ``total_steps``. During warmup the rate rises linearly, ``lr * (step + 1) / warmup_steps``.
  """
  schedule = opt_config.schedule
  if schedule not in LEARNING_RATE_SCHEDULES:
    raise ValueError(f'optimizer.schedule={schedule!r}; valid: {LEARNING_RATE_SCHEDULES}.')
  base_lr, end_lr = float(opt_config.lr), float(opt_config.end_lr)
  warmup = plan.warmup_steps
  decay_steps = max(plan.total_steps - warmup, 1)

  def lr_fn(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if schedule == 'step':
      drops = sum((step >= b).astype(jnp.float32) for b in plan.boundaries)
      lr = base_lr * jnp.power(float(opt_config.decay_factor), drops)
    elif schedule == 'cosine':
      lr = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    elif schedule == 'poly':
      lr = end_lr + (base_lr - end_lr) * (1.0 - progress) ** float(opt_config.poly_power)
    else:
      lr = jnp.asarray(base_lr, jnp.float32)
    if warmup > 0:
      lr = jnp.where(step < warmup, base_lr * (step + 1.0) / warmup, lr)
    return lr

  return lr_fn


# Path of each backbone's final Linear (the 512-d embedding layer), as the models name it.
_EMBEDDING_LAYERS = {'mobilefacenet': 'linear', 'tiny': 'linear'}
_IR_EMBEDDING_LAYER = 'output_layer/linear'


def embedding_layer_of(model_name: str) -> str:
  """Path of the final Linear of backbone `model_name` ('linear' or 'output_layer/linear')."""
  if model_name in _EMBEDDING_LAYERS:
    return _EMBEDDING_LAYERS[model_name]
  if model_name.startswith('ir'):
    return _IR_EMBEDDING_LAYER
  raise ValueError(f'No known final Linear for model {model_name!r}; add it to '
                   'optim._EMBEDDING_LAYERS.')


def param_groups(params: Mapping[str, Any], batch_stats: Mapping[str, Any], *,
                 embedding_layer: str) -> Any:
  """Labels every parameter with its weight-decay group.

  Rules, in order:
  - ``'head'``: everything under ``params['head']`` (the classifier kernels).
  - ``'bn'``: a backbone parameter whose module also owns ``batch_stats`` (running mean/var);
    only BatchNorm layers do, so this finds them whatever they are named.
  - ``'embedding'``: the backbone's final Linear, the module at path `embedding_layer`.
  - ``'backbone'``: every other backbone parameter (convs, PReLU slopes, SE convs ...).

  Args:
    params: ``{'backbone': ..., 'head': ...}``, arrays or ``jax.ShapeDtypeStruct``.
    batch_stats: the backbone's ``batch_stats`` tree.
    embedding_layer: '/'-separated path of the backbone's final Linear module (see
      :func:`embedding_layer_of`).

  Returns:
    A pytree with the structure of `params` whose leaves are group names (see ``GROUPS``).
  """
  bn_modules = {tuple(_key_names(path[:-1]))
                for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats)}
  embedding_path = tuple(embedding_layer.split('/'))
  backbone_modules = {tuple(_key_names(path[:-1]))
                      for path, _ in jax.tree_util.tree_leaves_with_path(params['backbone'])}
  if embedding_path not in backbone_modules:
    raise ValueError(f'The backbone has no module {embedding_layer!r} (its final Linear); '
                     f'modules: {sorted("/".join(m) for m in backbone_modules)}.')

  def group_of(path, _):
    names = _key_names(path)
    if names[0] == 'head':
      return 'head'
    if names[0] != 'backbone':
      raise ValueError(f'Unexpected parameter {"/".join(names)}: expected backbone/ or head/.')
    module = tuple(names[1:-1])
    if module in bn_modules:
      return 'bn'
    if module == embedding_path:
      return 'embedding'
    return 'backbone'

  return jax.tree_util.tree_map_with_path(group_of, params)


def _key_names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def create_optimizer(opt_config: ml_collections.ConfigDict,
                     lr_fn: Callable[[jax.Array], jax.Array],
                     groups: Any,
                     grad_accum_steps: int = 1) -> optax.GradientTransformation:
  """SGD with momentum and coupled per-group weight decay, optionally accumulating gradients.

  Args:
    opt_config: ``config.optimizer`` (``momentum``, ``nesterov``, ``weight_decay_<group>``).
    lr_fn: learning rate per step (from :func:`create_learning_rate_fn`).
    groups: parameter -> group name tree from :func:`param_groups`.
    grad_accum_steps: average the gradients of this many steps before each update
      (``optax.MultiSteps``); 1 = update every step.

  Returns:
    The optax transformation. Its update is, per parameter ``p`` of group ``g``:
    ``d = grad + wd_g * p; buf = momentum * buf + d; p -= lr * buf``.
  """
  decays = {g: float(opt_config[f'weight_decay_{g}']) for g in GROUPS}
  chain = [optax.add_decayed_weights(decays[g], mask=jax.tree.map(lambda x, g=g: x == g, groups))
           for g in GROUPS if decays[g]]
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f'grad_accum_steps={k} must be >= 1.')
  # The inner optimizer counts updates; the schedule is written in steps.
  schedule = (lambda update: lr_fn(update * k)) if k > 1 else lr_fn
  chain.append(optax.sgd(schedule, momentum=float(opt_config.momentum),
                         nesterov=bool(opt_config.nesterov)))
  tx = optax.chain(*chain)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k, use_grad_mean=True).gradient_transformation()
  return tx
