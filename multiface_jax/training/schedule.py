"""Durations and the learning rate: the one place where epochs become steps.

A *step* is one call of the train step on one global batch of ``config.batch_size`` images. With
gradient accumulation (``grad_accum_steps = k``) the parameters change every k steps, on the mean
gradient of those k batches, and the learning rate of an update is the schedule's value at the
update's first step.
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

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
