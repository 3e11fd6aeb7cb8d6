"""What each kernel set and XLA option buys: the JAX train step (or embedding) of every variant,
compiled in one tuned process (``cpu_tuning.configure()``) and timed interleaved.

  .venv/bin/python bench/ablation.py                               # MobileFaceNet, batch 64
  .venv/bin/python bench/ablation.py --net=ir_se50 --batch=16 --mode=embed

Each variant is a ':'-separated entry of ','-separated options: ``kernel_set`` ('xla' is XLA's
own kernels everywhere, 'xla_cpu' the project's CPU kernels) and XLA compile options named
``xla_*`` for that variant's jit only, over the process's, with '+' for the ',' inside their
values and true/false for booleans. E.g. XLA:CPU's default library fusions against the tuned
process's:

  .venv/bin/python bench/ablation.py --variants=xla_cpu_experimental_ynn_fusion_type=\
LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION+\
LIBRARY_FUSION_TYPE_REDUCE:kernel_set=xla_cpu

Prints images/s (median over `--reps`) and compile seconds.
"""
import os
import statistics
import time

from absl import app, flags

from multiface_jax import cpu_tuning

FLAGS = flags.FLAGS
flags.DEFINE_string('net', 'mobilefacenet', 'Backbone.')
flags.DEFINE_integer('batch', 64, 'Training batch.')
flags.DEFINE_integer('num_classes', 10_000, 'Identities of the head.')
flags.DEFINE_integer('num_spheres', 2, 'N of the multi-sphere ArcFace head.')
flags.DEFINE_string('variants', 'kernel_set=xla:kernel_set=xla_cpu', 'Option sets to compare.')
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
  tuned = cpu_tuning.configure()
  import steps as bench_steps  # pylint: disable=import-outside-toplevel  (imports JAX)
  print(f'{FLAGS.net} {FLAGS.mode}, batch {FLAGS.batch}, {time.strftime("%Y-%m-%d %H:%M:%S")}, '
        f'load {os.getloadavg()[0]:.1f}, tuned process: {tuned}', flush=True)
  timed, compile_s = [], []
  for options in variants:
    kernel_set = options.get('kernel_set', 'auto')
    xla_options = {k: _option_value(v) for k, v in options.items() if k.startswith('xla_')}
    unknown = set(options) - {'kernel_set'} - set(xla_options)
    if unknown:
      raise app.UsageError(f'Unknown variant options {sorted(unknown)}: use kernel_set, xla_*.')
    if FLAGS.mode == 'train':
      step = bench_steps.jax_train_step(
          FLAGS.net, batch_size=FLAGS.batch, num_classes=FLAGS.num_classes,
          num_spheres=FLAGS.num_spheres, kernel_set=kernel_set, xla_options=xla_options)
    else:
      step = bench_steps.jax_embed(FLAGS.net, batch_size=FLAGS.batch, kernel_set=kernel_set,
                                   xla_options=xla_options)
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
