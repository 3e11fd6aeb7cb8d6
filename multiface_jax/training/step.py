"""The train state and one training step, on plain arrays: what every run of the loop jits.

``train_step`` is a pure function of the state and a global batch; the caller (``Trainer``) jits
it over the mesh with the state donated. The state lives on the mesh from the moment it is
created (``jax.jit(create_train_state, out_shardings=...)``): parameters replicated, the head's
classes split over ``'model'``, the batch split over every device. The head and its loss run
sharded (``sharded_head``), with PartialFC's class sampling when its sample rate is below 1.
"""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from multiface_jax import models
from multiface_jax.training.sharded_head import ShardedHead

EMBEDDING_SIZE = 512


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a checkpoint stores exactly this.

  Attributes:
    step: int32 scalar, steps done.
    params: ``{'backbone': ..., 'head': {'kernel': (N, 512/N, C_padded)}}``, float32.
    batch_stats: the backbone's BatchNorm running statistics.
    opt_state: the optax state (momentum, and accumulated gradients with grad_accum_steps > 1)
      of every parameter, or of the backbone only when the head samples its classes.
    rng: uint32 (2,) base key; step t uses ``fold_in(rng, t)`` (so dropout masks and the class
      sample survive resume).
    head_momentum: with class sampling, the head kernel's SGD momentum (its columns move only
      when sampled); else None.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  head_momentum: Any = None


# Folded into the step's key for the class sample (the step's key itself drives dropout).
_SAMPLE_STREAM = 1


def init_variables(rng: jax.Array, model: nn.Module, head: ShardedHead,
                   image_size: tuple[int, int]) -> tuple[dict[str, Any], Any]:
  """Fresh ``(params, batch_stats)``: params = {'backbone', 'head'}."""
  model_rng, head_rng = jax.random.split(rng)
  variables = model.init(model_rng, jnp.zeros((1, *image_size, 3), jnp.float32), train=False)
  return ({'backbone': variables['params'], 'head': head.init_params(head_rng, EMBEDDING_SIZE)},
          variables['batch_stats'])


def optimized_params(params: dict[str, Any], head: ShardedHead) -> Any:
  """The parameters the optax optimizer updates: all, or the backbone's when sampling."""
  return {'backbone': params['backbone']} if head.sampling else params


def create_train_state(rng: jax.Array, *, model: nn.Module, head: ShardedHead,
                       tx: optax.GradientTransformation,
                       image_size: tuple[int, int]) -> TrainState:
  """A fresh train state at step 0 (call it under ``jax.jit`` to create it sharded)."""
  init_rng, state_rng = jax.random.split(rng)
  params, batch_stats = init_variables(init_rng, model, head, image_size)
  head_momentum = jnp.zeros_like(params['head']['kernel']) if head.sampling else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(optimized_params(params, head)), rng=state_rng,
                    head_momentum=head_momentum)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               head: ShardedHead, tx: optax.GradientTransformation,
               head_lr_fn: Callable[[jax.Array], jax.Array],
               head_sgd: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch.

  Args:
    state: the current state (donated by the jitted caller).
    batch: ``{'image': uint8 (B, H, W, 3), 'label': int32 (B,)}``, sharded over all devices.
    model, head, tx: the backbone, the head on its mesh and the optimizer.
    head_lr_fn, head_sgd: the learning rate per step and the SGD settings
      (``sharded_head.optimizer_settings``) of the sampled head's columns.

  Returns:
    ``(new_state, metrics)``; metrics: ``loss`` (sum over spheres), ``loss_per_sphere`` (N,),
    ``accuracy_per_sphere`` (N,), float32, averaged over the batch.
  """
  labels = batch['label']
  step_rng = jax.random.fold_in(state.rng, state.step)
  kernel = state.params['head']['kernel']
  if head.sampling:
    columns, class_ids = head.sample(labels, jax.random.fold_in(step_rng, _SAMPLE_STREAM))
    head_columns = head.gather(kernel, columns)
  else:
    head_columns, class_ids = kernel, head.all_columns()

  def loss_fn(backbone_params, head_columns):
    images = models.normalize_images(batch['image'])
    embeddings, updates = model.apply(
        {'params': backbone_params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': step_rng})
    loss, (per_sphere, accuracy) = head.loss(head_columns, class_ids,
                                             embeddings.astype(jnp.float32), labels)
    return loss, (per_sphere, accuracy, updates['batch_stats'])

  (loss, (per_sphere, accuracy, batch_stats)), (backbone_grads, head_grads) = (
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(state.params['backbone'],
                                                               head_columns))
  if head.sampling:
    grads = {'backbone': backbone_grads}
    new_kernel, head_momentum = head.update(kernel, state.head_momentum, columns, class_ids,
                                            head_columns, head_grads,
                                            lr=head_lr_fn(state.step), **head_sgd)
    head_params = {'kernel': new_kernel}
  else:
    grads = {'backbone': backbone_grads, 'head': {'kernel': head_grads}}
    head_momentum = None
  optimized = optimized_params(state.params, head)
  updates, opt_state = tx.update(grads, state.opt_state, optimized)
  params = optax.apply_updates(optimized, updates)
  if head.sampling:
    params = {**params, 'head': head_params}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, head_momentum=head_momentum)
  metrics = {'loss': loss, 'loss_per_sphere': per_sphere, 'accuracy_per_sphere': accuracy}
  return new_state, metrics
