"""The train state and one training step, on plain arrays: what every run of the loop jits.

``train_step`` is a pure function of the state and a global batch; the caller (``Trainer``) jits
it over the mesh with the state donated. The state lives on the mesh from the moment it is
created (``jax.jit(create_train_state, out_shardings=...)``): parameters replicated, the head's
classes split over ``'model'``, the batch split over every device.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from multiface_jax import heads, models
from multiface_jax.training import sharding

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
    embeddings = sharding.constrain(embeddings.astype(jnp.float32), mesh,
                                    P(sharding.DATA_AXIS, None))
    logits = head.apply({'params': params['head']}, embeddings, labels)
    logits = sharding.constrain(logits, mesh, P(None, sharding.DATA_AXIS, sharding.MODEL_AXIS))
    loss, per_sphere = heads.multi_sphere_loss(logits, labels)
    return loss, (per_sphere, heads.sphere_accuracy(logits, labels), updates['batch_stats'])

  (loss, (per_sphere, accuracy, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  metrics = {'loss': loss, 'loss_per_sphere': per_sphere, 'accuracy_per_sphere': accuracy}
  return new_state, metrics


