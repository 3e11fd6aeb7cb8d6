"""Subprocess helper of test_sharded_head.py: the sharded head on 8 forced CPU devices.

  python tests/sharded_head_worker.py OUT.npz

Runs one head-only SGD step (forward, backward, update) for every (kind, spheres, model axis)
with C = 1001 classes (prime to 8), the same step of the unsharded head as the reference, the
PartialFC step at rates 0.1 and 0.999, and the compiled program's memory; writes every array the
test checks into OUT.npz.
"""
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

from multiface_jax import heads
from multiface_jax.training import sharded_head, sharding

CLASSES, BATCH, DIM = 1001, 32, 512
LR, MOMENTUM, DECAY = 0.1, 0.9, 5e-4


def make_head(kind, spheres, axis, rate=1.0, classes=CLASSES, batch=BATCH):
  head = heads.MultiSphereHead(num_classes=classes, num_spheres=spheres, kind=kind,
                               margin=0.5 if kind == 'arcface' else 0.35)
  return sharded_head.ShardedHead(head, sharding.create_mesh(axis), global_batch=batch,
                                  sample_rate=rate)


def data(seed=0):
  rng = np.random.default_rng(seed)
  embeddings = rng.normal(size=(BATCH, DIM)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
  return embeddings, labels


def reference_step(kind, spheres, kernel, embeddings, labels):
  """The unsharded head: MultiSphereHead + multi_sphere_loss + optax SGD, on one device."""
  head = heads.MultiSphereHead(num_classes=CLASSES, num_spheres=spheres, kind=kind,
                               margin=0.5 if kind == 'arcface' else 0.35)
  tx = optax.chain(optax.add_decayed_weights(DECAY), optax.sgd(LR, momentum=MOMENTUM))

  def loss_fn(kernel):
    logits = head.apply({'params': {'kernel': kernel}}, embeddings, labels)
    return heads.multi_sphere_loss(logits, labels)[0]

  loss, grads = jax.value_and_grad(loss_fn)(kernel)
  updates, _ = tx.update(grads, tx.init(kernel), kernel)
  return float(loss), np.asarray(optax.apply_updates(kernel, updates))


def sharded_step(head, kernel, embeddings, labels):
  """The same step with the head on its mesh (the full softmax through optax)."""
  tx = optax.chain(optax.add_decayed_weights(DECAY), optax.sgd(LR, momentum=MOMENTUM))
  mesh = head.mesh
  kernel = jax.device_put(kernel, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, None, 'model')))
  batch = sharding.batch_sharding(mesh)
  embeddings, labels = jax.device_put(embeddings, batch), jax.device_put(labels, batch)

  @jax.jit
  def step(kernel, embeddings, labels):
    loss_fn = lambda k: head.loss(k, head.all_columns(), embeddings, labels)[0]
    loss, grads = jax.value_and_grad(loss_fn)(kernel)
    updates, _ = tx.update(grads, tx.init(kernel), kernel)
    return loss, optax.apply_updates(kernel, updates)

  loss, new_kernel = step(kernel, embeddings, labels)
  return float(loss), np.asarray(new_kernel), new_kernel.sharding.spec


def sampled_step(head, kernel, momentum, embeddings, labels, key):
  """The PartialFC step: sample, gather, loss on the columns, SGD on them, scatter back."""
  @jax.jit
  def step(kernel, momentum, embeddings, labels):
    columns, ids = head.sample(labels, key)
    gathered = head.gather(kernel, columns)
    loss_fn = lambda w: head.loss(w, ids, embeddings, labels)[0]
    loss, grads = jax.value_and_grad(loss_fn)(gathered)
    new_kernel, new_momentum = head.update(kernel, momentum, columns, ids, gathered, grads,
                                           lr=LR, momentum_decay=MOMENTUM, weight_decay=DECAY)
    return loss, columns, ids, new_kernel, new_momentum

  return [np.asarray(x) for x in step(kernel, momentum, embeddings, labels)]


def main(out_path):
  out = {}
  embeddings, labels = data()
  key = jax.random.key(0)
  for kind in ('softmax', 'arcface', 'cosface'):
    for spheres in (1, 4):
      head1 = make_head(kind, spheres, 1)
      kernel = np.asarray(head1.init_params(key, DIM)['kernel'])
      loss, new = reference_step(kind, spheres, kernel, embeddings, labels)
      out[f'ref_{kind}_{spheres}_loss'], out[f'ref_{kind}_{spheres}_kernel'] = loss, new
      for axis in (1, 2, 4, 8):
        head = make_head(kind, spheres, axis)
        padded = np.asarray(head.init_params(key, DIM)['kernel'])
        loss, new, spec = sharded_step(head, padded, embeddings, labels)
        out[f'{kind}_{spheres}_{axis}_loss'], out[f'{kind}_{spheres}_{axis}_kernel'] = loss, new
        out[f'{kind}_{spheres}_{axis}_spec'] = str(spec)
  # PartialFC on 8 shards: rate 0.1, and 0.999 (every column of a shard kept).
  for rate in (0.1, 0.999):
    head = make_head('arcface', 4, 8, rate)
    kernel = np.asarray(head.init_params(key, DIM)['kernel'])
    momentum = np.random.default_rng(1).normal(size=kernel.shape).astype(np.float32) * 0.01
    momentum[..., CLASSES:] = 0
    loss, columns, ids, new_kernel, new_momentum = sampled_step(
        head, kernel, momentum, embeddings, labels, jax.random.key(7))
    for name, value in dict(loss=loss, columns=columns, ids=ids, kernel=kernel,
                            momentum=momentum, new_kernel=new_kernel,
                            new_momentum=new_momentum).items():
      out[f'pfc{rate}_{name}'] = value
    out[f'pfc{rate}_slots'] = head.slots
    out[f'pfc{rate}_min_kept'] = head.min_kept
  full = make_head('arcface', 4, 8)
  out['pfc_full_loss'] = sharded_step(full, np.asarray(full.init_params(key, DIM)['kernel']),
                                      embeddings, labels)[0]
  # Memory of the compiled head step, 8 x 4096 classes, batch 64 on the 8-device model axis.
  big = make_head('arcface', 4, 8, classes=8 * 4096, batch=64)
  shape = jax.ShapeDtypeStruct
  abstract = (shape((4, DIM // 4, 8 * 4096), jnp.float32, sharding=jax.sharding.NamedSharding(
      big.mesh, jax.sharding.PartitionSpec(None, None, 'model'))),
              shape((64, DIM), jnp.float32, sharding=sharding.batch_sharding(big.mesh)),
              shape((64,), jnp.int32, sharding=sharding.batch_sharding(big.mesh)))
  grad = jax.jit(jax.grad(lambda k, e, l: big.loss(k, big.all_columns(), e, l)[0]))
  memory = grad.lower(*abstract).compile().memory_analysis()
  out['memory_temp'] = memory.temp_size_in_bytes
  out['memory_arguments'] = memory.argument_size_in_bytes
  np.savez(out_path, **out)
  print('worker: done', flush=True)


if __name__ == '__main__':
  main(sys.argv[1])
