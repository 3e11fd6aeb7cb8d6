"""What each convolution implementation buys: the JAX train step with every combination, timed
interleaved in one run.

  PYTHONPATH=. .venv/bin/python bench/ablation.py                       # MobileFaceNet, batch 64
  PYTHONPATH=. .venv/bin/python bench/ablation.py --net=ir_se50 --batch=16 \\
      --variants=conv_impl=lax:conv_impl=gemm

Each variant is a ':'-separated entry of ','-separated backbone options; 'lax' everywhere is plain
XLA (``feature_group_count`` depthwise, XLA's own convolution gradients), the first Flax
MobileFaceNet the issue measured. Options named ``xla_*`` are XLA compile options instead, over
the project's own (``models.compiler_options``), with '+' for the ',' inside their values and
true/false for booleans (``xla_cpu_use_onednn=true``); e.g.
XLA:CPU's default library fusions against the project's:

  PYTHONPATH=. .venv/bin/python bench/ablation.py --net=ir_se50 --batch=16 --variants=\
xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT+\
LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION+LIBRARY_FUSION_TYPE_REDUCE:conv_impl=gemm

`--mode=embed` times the eval-mode embedding instead. Prints images/s (median over `--reps`) and
compile seconds.
"""
import os
import statistics
import time

from absl import app, flags

import steps as bench_steps

FLAGS = flags.FLAGS
flags.DEFINE_string('net', 'mobilefacenet', 'Backbone.')
flags.DEFINE_integer('batch', 64, 'Training batch.')
flags.DEFINE_integer('num_classes', 10_000, 'Identities of the head.')
flags.DEFINE_integer('num_spheres', 2, 'N of the multi-sphere ArcFace head.')
flags.DEFINE_string('variants', 'conv_impl=lax,depthwise_impl=lax:'
                    'conv_impl=lax,depthwise_impl=shifted:conv_impl=gemm,depthwise_impl=shifted',
                    'Option sets to compare.')
flags.DEFINE_enum('mode', 'train', ['train', 'embed'], 'Time train steps or the embedding.')
flags.DEFINE_integer('reps', 3, 'Timed repetitions per variant.')
flags.DEFINE_integer('steps', 1, 'Steps per repetition.')


def _option_value(text: str):
  """A compile option's value: 'true' / 'false' as bools (XLA rejects those strings for its
  boolean options), else the text with '+' for ','."""
  return {'true': True, 'false': False}.get(text.lower(), text.replace('+', ','))


def main(argv):
  del argv
  variants = [dict(item.split('=') for item in entry.split(','))
              for entry in FLAGS.variants.split(':')]
  host_memory = bench_steps.host_memory_from_flags()
  print(f'{FLAGS.net} {FLAGS.mode}, batch {FLAGS.batch}, {time.strftime("%Y-%m-%d %H:%M:%S")}, '
        f'load {os.getloadavg()[0]:.1f}, {host_memory}', flush=True)
  timed, compile_s = [], []
  for options in variants:
    model_options = {k: v for k, v in options.items() if not k.startswith('xla_')}
    xla_options = {k: _option_value(v) for k, v in options.items() if k.startswith('xla_')}
    if FLAGS.mode == 'train':
      step = bench_steps.jax_train_step(
          FLAGS.net, batch_size=FLAGS.batch, num_classes=FLAGS.num_classes,
          num_spheres=FLAGS.num_spheres, model_options=model_options, xla_options=xla_options)
    else:
      step = bench_steps.jax_embed(FLAGS.net, batch_size=FLAGS.batch,
                                   model_options=model_options, xla_options=xla_options)
    compile_s.append(step.compile())
    step.run(1)
    timed.append(step)
    print(f'  compiled {options} in {compile_s[-1]:.1f} s', flush=True)
  rates = [[] for _ in variants]
  for _ in range(FLAGS.reps):
    for step, log in zip(timed, rates):
      start = time.perf_counter()
      step.run(FLAGS.steps)
      log.append(FLAGS.steps * FLAGS.batch / (time.perf_counter() - start))
  for options, log, seconds in zip(variants, rates, compile_s):
    print(f'{str(options):55s} {statistics.median(log):7.2f} img/s '
          f'[{min(log):.2f}-{max(log):.2f}]  compile {seconds:6.1f} s')
  print(f'load {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  app.run(main)
