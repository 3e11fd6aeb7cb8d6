"""The multi-sphere head over the mesh: classes split over 'model', logits never gathered, and
PartialFC class sampling.

The class axis (the last of the ``(N, D/N, C)`` kernel) is padded to a multiple of the model axis
with zero columns that never receive a target, are masked out of the softmax (logit -inf) and
the accuracy, and never change (zero gradient, zero weight decay, zero momentum). Each device
computes the logits of its own class shard for the embeddings of its data row; the softmax
cross-entropy reduces the max and the sum of exponentials over the model axis, so no device holds
(batch x C) logits or the whole classifier.

PartialFC (``sample_rate`` < 1, arcface_torch's v2 semantics): on every shard, every class that
is a label anywhere in the global batch is kept and random other classes of the shard fill up to
``ceil(sample_rate * C_local)`` (if the positives alone are more, only they); the logits and the
loss use only the kept columns. Shapes stay static: a shard gathers ``max(ceil(rate * C_local),
global batch)`` columns (at most that many positives exist) and masks the slots past the kept
count. The sample comes from the step's RNG, so a resumed run draws the same classes.

Unsampled columns do not move. arcface_torch keeps one dense parameter, so its momentum and weight
decay also move unsampled rows every step; here only the sampled columns are updated (their own
momentum, weight decay and learning rate as the optimizer's SGD would): a dense update would read
and write the whole classifier and its momentum (8.4 GB at WebFace42M's 2M classes) every step and
need a dense gradient, which is what sampling is meant to avoid. With sample_rate 1.0 the head is
the full softmax and the optimizer updates it like every other parameter.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from multiface_jax import heads
from multiface_jax.training.sharding import BATCH_AXES, DATA_AXIS, MODEL_AXIS


# Logits computed at once per device: a block of rows x local columns of about this many floats.
_LOGITS_BLOCK = 1 << 21


def rows_per_chunk(rows: int, columns: int) -> int:
  """The largest divisor of `rows` whose block of logits (chunk x `columns`) fits _LOGITS_BLOCK."""
  fitting = max(1, _LOGITS_BLOCK // max(columns, 1))
  return max(d for d in range(1, min(rows, fitting) + 1) if rows % d == 0)


def padded_num_classes(num_classes: int, model_axis_size: int) -> int:
  """The class count rounded up to a multiple of the model axis."""
  return -(-num_classes // model_axis_size) * model_axis_size


@dataclasses.dataclass(frozen=True)
class ShardedHead:
  """The head of a run on its mesh.

  Attributes:
    head: the multi-sphere head (margin, scale, spheres) with ``num_classes`` = the real C.
    mesh: the training mesh.
    global_batch: images per step over all devices (bounds the positives of a shard).
    sample_rate: PartialFC's rate in (0, 1]; 1.0 = the full softmax.
  """
  head: heads.MultiSphereHead
  mesh: Mesh
  global_batch: int
  sample_rate: float = 1.0

  @property
  def num_classes(self) -> int:
    return self.head.num_classes

  @property
  def padded_classes(self) -> int:
    return padded_num_classes(self.num_classes, self.mesh.shape[MODEL_AXIS])

  @property
  def local_classes(self) -> int:
    return self.padded_classes // self.mesh.shape[MODEL_AXIS]

  @property
  def sampling(self) -> bool:
    return self.sample_rate < 1.0

  @property
  def min_kept(self) -> int:
    """Classes a shard keeps at least: ``ceil(sample_rate * C_local)``."""
    return min(self.local_classes, math.ceil(self.sample_rate * self.local_classes))

  @property
  def slots(self) -> int:
    """Columns a shard gathers per step (static): room for every positive and the fill."""
    return min(self.local_classes, max(self.min_kept, self.global_batch))

  def init_params(self, rng: jax.Array, embedding_size: int) -> dict[str, jax.Array]:
    """The head's params ``{'kernel': (N, D/N, C_padded)}``: the head's own init of the real
    classes (the same on any mesh), zero padding columns."""
    kernel = self.head.init(rng, jnp.zeros((1, embedding_size), jnp.float32),
                            jnp.zeros((1,), jnp.int32))['params']['kernel']
    padding = self.padded_classes - self.num_classes
    return {'kernel': jnp.pad(kernel, ((0, 0), (0, 0), (0, padding)))}

  def _map(self, fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

  def all_columns(self) -> jax.Array:
    """Class ids of every local column (the full softmax), -1 for padding: int32 (C_padded,)."""
    ids = jnp.arange(self.padded_classes, dtype=jnp.int32)
    return jnp.where(ids < self.num_classes, ids, -1)

  def sample(self, labels: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The columns each shard keeps this step.

    Args:
      labels: int32 (B,) labels of the global batch.
      key: the step's sampling key (the same on every device).

    Returns:
      ``(columns, class_ids)``, both int32 (model * slots,) sharded over 'model': a shard's
      entries are local column indices and their global class ids (-1 for a slot past the kept
      count or a padding column).
    """
    local, slots, kept_at_least, classes = (self.local_classes, self.slots, self.min_kept,
                                            self.num_classes)

    def shard(labels, key):
      offset = jax.lax.axis_index(MODEL_AXIS) * local
      positions = labels - offset
      inside = (positions >= 0) & (positions < local)
      present = jnp.zeros(local, bool).at[jnp.where(inside, positions, local)].set(
          True, mode='drop')
      ids = offset + jnp.arange(local)
      noise = jax.random.uniform(jax.random.fold_in(key, jax.lax.axis_index(MODEL_AXIS)),
                                 (local,))
      score = jnp.where(present, 2.0, jnp.where(ids < classes, noise, -1.0))
      _, columns = jax.lax.top_k(score, slots)  # the positives first, then the random fill
      kept = jnp.maximum(kept_at_least, jnp.sum(present))
      valid = (jnp.arange(slots) < kept) & (offset + columns < classes)
      return columns.astype(jnp.int32), jnp.where(valid, offset + columns, -1).astype(jnp.int32)

    return self._map(shard, (P(), P()), (P(MODEL_AXIS), P(MODEL_AXIS)))(labels, key)

  def gather(self, kernel: jax.Array, columns: jax.Array) -> jax.Array:
    """Each shard's kept columns of a (N, D/N, C_padded) array: (N, D/N, model * slots)."""
    return self._map(lambda k, c: k[:, :, c], (P(None, None, MODEL_AXIS), P(MODEL_AXIS)),
                     P(None, None, MODEL_AXIS))(kernel, columns)

  def update(self, kernel: jax.Array, momentum: jax.Array, columns: jax.Array,
             class_ids: jax.Array, kernel_columns: jax.Array, grads: jax.Array, *,
             lr: jax.Array, **sgd: Any) -> tuple[jax.Array, jax.Array]:
    """SGD (:func:`sgd_columns`) on the kept columns, written back into the kernel and its
    momentum in place; slots past the kept count and padding columns are left alone.

    Args:
      kernel, momentum: (N, D/N, C_padded), sharded over 'model' (donate them).
      columns, class_ids: from :meth:`sample`.
      kernel_columns, grads: the gathered columns and the loss's gradient with respect to them.
      lr: the learning rate of this step; sgd: ``optimizer_settings``.
    """
    def shard(kernel, momentum, columns, ids, weights, grads):
      keep = ids >= 0

      def sphere(n, carry):  # one sphere at a time: temporaries of one sphere's columns
        kernel, momentum = carry
        # [n, :, columns] indexes as (columns, D/N): work in that layout.
        old_weights, old_momentum = weights[n].T, momentum[n, :, columns]
        new_weights, new_momentum = sgd_columns(old_weights, old_momentum, grads[n].T, lr=lr,
                                                **sgd)
        rows = keep[:, None]
        return (kernel.at[n, :, columns].set(jnp.where(rows, new_weights, old_weights)),
                momentum.at[n, :, columns].set(jnp.where(rows, new_momentum, old_momentum)))

      return jax.lax.fori_loop(0, kernel.shape[0], sphere, (kernel, momentum))
    spec = P(None, None, MODEL_AXIS)
    return self._map(shard, (spec, spec, P(MODEL_AXIS), P(MODEL_AXIS), spec, spec),
                     (spec, spec))(kernel, momentum, columns, class_ids, kernel_columns, grads)

  def loss(self, kernel_columns: jax.Array, class_ids: jax.Array, embeddings: jax.Array,
           labels: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The summed multi-sphere loss over the given columns, distributed over the mesh.

    Args:
      kernel_columns: (N, D/N, K) columns sharded over 'model' (the whole kernel, or a sample).
      class_ids: int32 (K,) their class ids, -1 for columns to leave out.
      embeddings: float32 (B, D), the batch sharded over every device.
      labels: int32 (B,).

    Returns:
      ``(total, (per_sphere, accuracy_per_sphere))``: the sum over spheres of each sphere's
      mean cross-entropy, and each sphere's (N,) loss and top-1 accuracy, replicated.
    """
    head = self.head

    def shard(kernel, ids, embeddings, labels):
      embeddings = jax.lax.all_gather(embeddings, MODEL_AXIS, tiled=True)  # this data row
      labels = jax.lax.all_gather(labels, MODEL_AXIS, tiled=True)
      slices = heads.split_spheres(embeddings, head.num_spheres, head.normalization)
      valid = ids >= 0
      rows = rows_per_chunk(labels.shape[0], ids.shape[0])

      @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of keeping them
      def chunk_nll(kernel_dk, slice_chunk, label_chunk):
        is_target = (label_chunk[:, None] == ids[None, :]) & valid[None, :]
        cos = jnp.clip(jnp.dot(slice_chunk, kernel_dk, precision=head.precision), -1.0, 1.0)
        logits = heads.margin_logits(cos, is_target, kind=head.kind, scale=head.scale,
                                     margin=head.margin, combined_margins=head.combined_margins,
                                     straight_through=head.straight_through)
        logits = jnp.where(valid[None, :], logits, -jnp.inf)
        top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), MODEL_AXIS)
        sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1), MODEL_AXIS)
        target = jax.lax.psum(jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1), MODEL_AXIS)
        return -((target - top) - jnp.log(sum_exp)), (target >= top).astype(jnp.float32)

      @jax.checkpoint  # nor a sphere's normalised columns: recomputed from its inputs
      def sphere_nll(args):  # one sphere, its rows in chunks: (rows,) losses and hits
        slice_bd, kernel_dk = args
        kernel_dk = heads.l2_normalize(kernel_dk, axis=0)
        chunks = (slice_bd.reshape(-1, rows, slice_bd.shape[-1]), labels.reshape(-1, rows))
        nll, hits = jax.lax.map(lambda c: chunk_nll(kernel_dk, *c), chunks)
        return nll.reshape(-1), hits.reshape(-1)

      # One sphere at a time, a chunk of rows at a time: a (rows, K_local) block of logits at
      # once, never (spheres, batch, K_local).
      nll, hits = jax.lax.map(sphere_nll, (slices, kernel))  # (N, rows of this data row)
      per_sphere = jax.lax.pmean(jnp.mean(nll, axis=-1), DATA_AXIS)
      accuracy = jax.lax.pmean(jnp.mean(hits, axis=-1), DATA_AXIS)
      return jnp.sum(per_sphere), per_sphere, accuracy

    total, per_sphere, accuracy = self._map(
        shard, (P(None, None, MODEL_AXIS), P(MODEL_AXIS), P(BATCH_AXES), P(BATCH_AXES)),
        (P(), P(), P()))(kernel_columns, class_ids, embeddings, labels)
    return total, (per_sphere, accuracy)


def sgd_columns(columns: jax.Array, momentum: jax.Array, grads: jax.Array, *, lr: jax.Array,
                momentum_decay: float, weight_decay: float,
                nesterov: bool = False) -> tuple[jax.Array, jax.Array]:
  """The optimizer's SGD (coupled weight decay, then momentum) on gathered columns: what
  ``optax.add_decayed_weights`` + ``optax.sgd`` do to a parameter. Returns (columns, momentum)."""
  grads = grads + weight_decay * columns
  momentum = grads + momentum_decay * momentum
  step = grads + momentum_decay * momentum if nesterov else momentum
  return columns - lr * step, momentum


def optimizer_settings(opt_config: Any) -> dict[str, Any]:
  """The head's SGD settings from ``config.optimizer``."""
  return dict(momentum_decay=float(opt_config.momentum),
              weight_decay=float(opt_config.weight_decay_head),
              nesterov=bool(opt_config.nesterov))


def check_sample_rate(sample_rate: float, grad_accum_steps: int) -> None:
  """Rejects a sample rate outside (0, 1] and sampling with gradient accumulation."""
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f'head.sample_rate={sample_rate} must be in (0, 1] (1.0: no sampling).')
  if sample_rate < 1.0 and grad_accum_steps > 1:
    raise ValueError('head.sample_rate < 1 samples other classes every step, so it cannot '
                     f'accumulate gradients over steps: set grad_accum_steps=1 (got '
                     f'{grad_accum_steps}) or head.sample_rate=1.0.')
