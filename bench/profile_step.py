"""Where a training step's time goes: backbone forward, backward, head, optimizer; compile times.

  .venv/bin/python bench/profile_step.py --net=mobilefacenet
  .venv/bin/python bench/profile_step.py --net=ir_se50 --batch=16

In a tuned process (``cpu_tuning.configure()``), as every command of the project runs.

JAX pieces are separately jitted functions on the benchmark's state and batch:
  forward        backbone in training mode (batch statistics), embeddings out
  forward+back   backbone forward and the gradient w.r.t. its params for a fixed cotangent
  head           head + loss, forward and gradient w.r.t. the head kernel and the embeddings
  optimizer      ``tx.update`` + ``optax.apply_updates`` on the full gradient tree
  whole step     ``training.step.train_step`` as ``bench/speed.py`` times it
backward = forward+back - forward. PyTorch's pieces are timed inside real steps (forward; head and
loss forward; backward through head and backbone; ``optimizer.step``). Each piece prints its
median over `--reps` calls and, for JAX, its compile time.
"""
import os
import statistics
import time

from absl import app, flags

from multiface_jax import cpu_tuning

cpu_tuning.configure()  # before JAX's first computation

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import optax

import steps as bench_steps
from multiface_jax import heads, models

FLAGS = flags.FLAGS
flags.DEFINE_string('net', 'mobilefacenet', 'Backbone.')
flags.DEFINE_integer('batch', 64, 'Training batch.')
flags.DEFINE_integer('num_classes', 10_000, 'Identities of the head.')
flags.DEFINE_integer('num_spheres', 2, 'N of the multi-sphere ArcFace head.')
flags.DEFINE_string('dtype', 'float32', 'JAX compute dtype.')
flags.DEFINE_string('head_precision', 'highest', "'highest' or 'default'.")
flags.DEFINE_string('kernel_set', 'auto', "The backbone's kernel set: auto, xla or xla_cpu.")
flags.DEFINE_integer('reps', 5, 'Timed calls per piece.')
flags.DEFINE_bool('torch', True, 'Also split a PyTorch step.')
flags.DEFINE_integer('torch_threads', os.cpu_count(), 'PyTorch intra-op threads.')


def median_ms(fn, reps):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def jax_pieces(setup):
  """{name: (jitted fn, args)} of the JAX step's pieces."""
  model, head, state, batch = setup.model, setup.head.head, setup.state, setup.batch
  images = models.normalize_images(batch['image'])
  labels = batch['label']
  rngs = {'dropout': jax.random.PRNGKey(1)}

  def forward(params, batch_stats):
    return model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                       mutable=['batch_stats'], rngs=rngs)

  def forward_backward(params, batch_stats, cotangent):
    (embeddings, updates), vjp = jax.vjp(lambda p: forward(p, batch_stats), params)
    del embeddings
    return vjp((cotangent, jax.tree.map(jnp.zeros_like, updates)))[0], updates

  def head_loss(head_params, embeddings):
    logits = head.apply({'params': head_params}, embeddings, labels)
    return heads.multi_sphere_loss(logits, labels)[0]

  embeddings = jax.eval_shape(forward, state.params['backbone'], state.batch_stats)[0]
  embeddings = jax.random.normal(jax.random.PRNGKey(2), embeddings.shape)
  embeddings /= jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
  cotangent = jnp.ones_like(embeddings) / embeddings.size
  grads = jax.tree.map(jnp.zeros_like, state.params)

  def optimizer(opt_state, params, grads):
    updates, opt_state = setup.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jit = jax.jit
  return {
      'forward': (jit(forward), (state.params['backbone'], state.batch_stats)),
      'forward+back': (jit(forward_backward),
                       (state.params['backbone'], state.batch_stats, cotangent)),
      'head': (jit(jax.value_and_grad(head_loss, (0, 1))), (state.params['head'], embeddings)),
      'optimizer': (jit(optimizer), (state.opt_state, state.params, grads)),
  }


def profile_jax():
  precision = None if FLAGS.head_precision == 'default' else FLAGS.head_precision
  kwargs = dict(batch_size=FLAGS.batch, num_classes=FLAGS.num_classes,
                num_spheres=FLAGS.num_spheres, dtype=FLAGS.dtype, head_precision=precision,
                kernel_set=FLAGS.kernel_set)
  setup = bench_steps.JaxTrainSetup(FLAGS.net, **kwargs)
  rows = {}
  for name, (fn, args) in jax_pieces(setup).items():
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    rows[name] = (median_ms(lambda: jax.block_until_ready(compiled(*args)), FLAGS.reps),
                  compile_s)
  whole = bench_steps.jax_train_step(FLAGS.net, **kwargs)
  compile_s = whole.compile()
  whole.run(1)
  rows['whole step'] = (median_ms(lambda: whole.run(1), FLAGS.reps), compile_s)
  rows['backward (derived)'] = (rows['forward+back'][0] - rows['forward'][0], None)
  return rows


def profile_torch():
  setup = bench_steps.TorchTrainSetup(FLAGS.net, batch_size=FLAGS.batch,
                                      num_classes=FLAGS.num_classes,
                                      num_spheres=FLAGS.num_spheres, threads=FLAGS.torch_threads)
  pieces = {'forward': [], 'head': [], 'backward': [], 'optimizer': [], 'whole step': []}
  for rep in range(FLAGS.reps + 1):
    t0 = time.perf_counter()
    setup.optimizer.zero_grad(set_to_none=True)
    embeddings = setup.model(setup.images)
    t1 = time.perf_counter()
    loss = bench_steps.torch_arcface_loss(embeddings, setup.kernels, setup.labels)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    setup.optimizer.step()
    t4 = time.perf_counter()
    if rep:  # the first step warms up
      for name, seconds in zip(pieces, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
        pieces[name].append(seconds)
  return {name: (1e3 * statistics.median(v), None) for name, v in pieces.items()}


def main(argv):
  del argv
  print(f'{FLAGS.net} batch {FLAGS.batch}, {FLAGS.num_spheres}-sphere ArcFace over '
        f'{FLAGS.num_classes} classes, {FLAGS.dtype}, head precision {FLAGS.head_precision}, '
        f'kernel set {FLAGS.kernel_set}; {jax.default_backend()}; '
        f'{time.strftime("%Y-%m-%d %H:%M:%S")}; load {os.getloadavg()[0]:.1f}', flush=True)
  jax_rows = profile_jax()
  print(f'{"JAX piece":20s} {"median ms":>10s} {"compile s":>10s}')
  for name, (ms, compile_s) in jax_rows.items():
    print(f'{name:20s} {ms:10.1f} {"" if compile_s is None else f"{compile_s:10.1f}"}')
  if FLAGS.torch:
    print(f'{"PyTorch piece":20s} {"median ms":>10s}   (load {os.getloadavg()[0]:.1f})')
    for name, (ms, _) in profile_torch().items():
      print(f'{name:20s} {ms:10.1f}')
  print(f'load {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  app.run(main)
