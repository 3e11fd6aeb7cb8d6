"""The head alone at emore, Glint360K and WebFace42M sizes, on 8 forced CPU devices: memory per
device from the compiled program, and time per step where it fits this machine.

  .venv/bin/python bench/head_scale.py                       # the whole grid (memory), timings
  .venv/bin/python bench/head_scale.py --classes=2059906 --spheres=4 --axes=8 --rates=1,0.1

One step = the head's forward, backward and SGD update (momentum 0.9, weight decay 4e-4) for a
global batch of 512 unit embeddings, the kernel and its momentum donated. Memory per device is
XLA's count for the compiled step: arguments + outputs + temporaries - what the outputs alias
(the donated kernel and momentum). A step is timed for --time_classes x --time_axes,
where 8 devices' worth of it fits in --host_gb; --plot writes memory per device against C.
"""
import argparse
import os
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

# pylint: disable=wrong-import-position
from multiface_jax import cpu_tuning  # noqa: E402

cpu_tuning.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from multiface_jax import heads  # noqa: E402
from multiface_jax.training import sharded_head, sharding  # noqa: E402

BATCH, DIM = 512, 512
SGD = dict(momentum_decay=0.9, weight_decay=4e-4)


def head_step_fn(head):
  def step(kernel, momentum, embeddings, labels, key):
    if head.sampling:
      columns, ids = head.sample(labels, key)
      columns_w = head.gather(kernel, columns)
    else:
      columns_w, ids = kernel, head.all_columns()
    loss, grads = jax.value_and_grad(
        lambda w: head.loss(w, ids, embeddings, labels)[0])(columns_w)
    if head.sampling:
      return (*head.update(kernel, momentum, columns, ids, columns_w, grads, lr=0.1, **SGD),
              loss)
    new_kernel, new_momentum = sharded_head.sgd_columns(kernel, momentum, grads, lr=0.1, **SGD)
    return new_kernel, new_momentum, loss
  return step


def measure(classes, spheres, axis, rate, args):
  mesh = sharding.create_mesh(axis)
  head = sharded_head.ShardedHead(
      heads.MultiSphereHead(num_classes=classes, num_spheres=spheres, kind='arcface'), mesh,
      global_batch=BATCH, sample_rate=rate)
  kernel_sharding = NamedSharding(mesh, P(None, None, 'model'))
  batch_sharding = sharding.batch_sharding(mesh)
  shape = (spheres, DIM // spheres, head.padded_classes)
  abstract = (jax.ShapeDtypeStruct(shape, jnp.float32, sharding=kernel_sharding),) * 2 + (
      jax.ShapeDtypeStruct((BATCH, DIM), jnp.float32, sharding=batch_sharding),
      jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=batch_sharding),
      jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  step = jax.jit(head_step_fn(head), donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = step.lower(*abstract).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
                memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  row = {'classes': classes, 'spheres': spheres, 'axis': axis, 'rate': rate,
         'gib': per_device / 2**30, 'compile_s': compile_s, 'step_s': None}
  timed = classes in args.time_classes and axis in args.time_axes
  if timed and per_device * 8 < args.host_gb * 2**30:
    rng = np.random.default_rng(0)
    make = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32) * 0.05,
                   out_shardings=kernel_sharding)
    kernel = make(jax.random.key(1))
    momentum = jax.jit(jnp.zeros_like, out_shardings=kernel_sharding)(kernel)
    embeddings = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    embeddings = jax.device_put(embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True),
                                batch_sharding)
    labels = jax.device_put(rng.integers(0, classes, BATCH).astype(np.int32), batch_sharding)
    kernel, momentum, loss = compiled(kernel, momentum, embeddings, labels, jax.random.key(2))
    loss.block_until_ready()
    times = []
    for rep in range(args.reps):
      start = time.perf_counter()
      kernel, momentum, loss = compiled(kernel, momentum, embeddings, labels,
                                        jax.random.key(3 + rep))
      loss.block_until_ready()
      times.append(time.perf_counter() - start)
    row['step_s'] = float(np.median(times))
    del kernel, momentum
  timing = (f'{row["step_s"]:7.2f} s/step {BATCH / row["step_s"]:8.1f} img/s'
            if row['step_s'] else ('   (not run: does not fit --host_gb)' if timed else ''))
  print(f'C={classes:>9,} N={spheres} model={axis} rate={rate:<4} | {row["gib"]:7.3f} GiB per '
        f'device | compile {compile_s:5.1f} s | {timing}', flush=True)
  return row


def plot(rows, path):
  """Memory per device against C: one panel per sphere count, colour = model axis, line = rate."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  spheres = sorted({r['spheres'] for r in rows})
  axes_sizes = sorted({r['axis'] for r in rows})
  rates = sorted({r['rate'] for r in rows}, reverse=True)
  styles = ['-', '--', ':', '-.']
  fig, panels = plt.subplots(1, len(spheres), figsize=(5 * len(spheres), 4.5), dpi=100,
                             sharey=True, squeeze=False)
  for panel, n in zip(panels[0], spheres):
    for color, axis in enumerate(axes_sizes):
      for style, rate in zip(styles, rates):
        line = sorted((r['classes'], r['gib']) for r in rows
                      if (r['spheres'], r['axis'], r['rate']) == (n, axis, rate))
        panel.plot(*zip(*line), marker='o', color=f'C{color}', linestyle=style,
                   label=f'model axis {axis}, rate {rate:g}')
    panel.set_xscale('log')
    panel.set_yscale('log')
    panel.set_title(f'N = {n} sphere{"s" if n > 1 else ""}, global batch {BATCH}')
    panel.set_xlabel('classes C')
    panel.grid(True, which='both', alpha=0.3)
  panels[0][0].set_ylabel('GiB per device (compiled head step)')
  panels[0][-1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path)
  print(f'plot: {path}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--classes', default='85742,360232,2059906')
  parser.add_argument('--spheres', default='1,4')
  parser.add_argument('--axes', default='1,2,4,8')
  parser.add_argument('--rates', default='1,0.3,0.1')
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--time_classes', default='85742,360232,2059906',
                      help='time the steps of these class counts (memory is counted for all)')
  parser.add_argument('--time_axes', default='8', help='... and of these model axis sizes')
  parser.add_argument('--host_gb', type=float, default=14.0)
  parser.add_argument('--plot', default=None, help='PNG of memory per device against C')
  args = parser.parse_args()
  args.time_classes = [int(c) for c in args.time_classes.split(',') if c]
  args.time_axes = [int(a) for a in args.time_axes.split(',') if a]
  print(f'{jax.device_count()} devices ({os.cpu_count()} cores); global batch {BATCH}, '
        f'embedding {DIM}; {time.strftime("%Y-%m-%d %H:%M:%S")}', flush=True)
  rows = [measure(c, n, a, r, args)
          for c in map(int, args.classes.split(',')) for n in map(int, args.spheres.split(','))
          for a in map(int, args.axes.split(',')) for r in map(float, args.rates.split(','))]
  if args.plot:
    plot(rows, args.plot)


if __name__ == '__main__':
  main()
