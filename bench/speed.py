"""Training and embedding throughput of this project (JAX) and PyTorch, side by side, in one run.

  PYTHONPATH=. .venv/bin/python bench/speed.py                      # MobileFaceNet + IR-SE50, CPU
  PYTHONPATH=. .venv/bin/python bench/speed.py --nets=mobilefacenet --dtypes=float32,bfloat16
  bash bench/gpu.sh                        # a GPU: JAX only, bigger batches, MFU (see gpu.sh)

Workloads (the issue's): MobileFaceNet trains with a 2-sphere ArcFace head over 10,000 classes at
batch 64 and embeds at batch 64; IR-SE nets train at batch 16 and embed at batch 32. The JAX and
PyTorch timings are interleaved (JAX reps, then PyTorch reps, alternating) so that both see the
same machine load; each line gives the median images/s over `--reps` repetitions of `--steps`
steps (each after one untimed step, see `time_reps`), the min-max range and the 1-minute load
average during the measurements.

Threads: PyTorch uses ``--torch_threads`` intra-op threads (default: every core). XLA:CPU runs
its own thread pool over every core; the two never run at the same time.

Memory: like main.py, the script re-runs itself with transparent huge pages for malloc and runs
JAX's CPU steps on the main thread with freed memory kept (``--nohuge_pages``,
``--noreuse_step_memory`` to measure without; multiface_jax/host_memory.py); PyTorch keeps freed
memory too (``steps.torch_reference``), so both sides allocate the same way.
"""
import functools
import os
import statistics
import time

from absl import app, flags

import steps as bench_steps  # bench/ is the script's directory, so it is on sys.path

FLAGS = flags.FLAGS
flags.DEFINE_list('nets', ['mobilefacenet', 'ir_se50'], 'Backbones to time.')
flags.DEFINE_list('dtypes', ['float32'], 'JAX compute dtypes (float32, bfloat16); PyTorch '
                  'uses CPU autocast for bfloat16.')
flags.DEFINE_list('modes', ['train', 'embed'], 'What to time: train and/or embed.')
flags.DEFINE_bool('torch', True, 'Also time PyTorch (CPU) and print the JAX/PyTorch ratio.')
flags.DEFINE_integer('torch_threads', os.cpu_count(), 'PyTorch intra-op threads.')
flags.DEFINE_integer('reps', 5, 'Timed repetitions per side (the median is reported).')
flags.DEFINE_integer('steps', 2, 'Steps per repetition.')
flags.DEFINE_integer('num_classes', 10_000, 'Identities of the training head.')
flags.DEFINE_integer('num_spheres', 2, 'N of the multi-sphere ArcFace head.')
flags.DEFINE_integer('mobilefacenet_train_batch', 64, 'MobileFaceNet training batch.')
flags.DEFINE_integer('mobilefacenet_embed_batch', 64, 'MobileFaceNet embedding batch.')
flags.DEFINE_integer('ir_train_batch', 16, 'IR / IR-SE training batch.')
flags.DEFINE_integer('ir_embed_batch', 32, 'IR / IR-SE embedding batch.')
flags.DEFINE_string('head_precision', 'highest', "Head matmul precision ('highest' or 'default').")
flags.DEFINE_list('model_options', [], 'Extra backbone options key=value, e.g. '
                  'depthwise_impl=lax,conv_impl=lax.')
flags.DEFINE_list('peak_tflops', [], 'Peak TFLOP/s of the device per compute dtype, e.g. '
                  'float32=494,bfloat16=989; MFU (model FLOPs = 3x the forward pass, counted by '
                  'XLA on the plain convolution graph) is printed for training lines.')


def batch_size(net: str, mode: str) -> int:
  prefix = 'mobilefacenet' if net == 'mobilefacenet' else 'ir'
  return getattr(FLAGS, f'{prefix}_{mode}_batch')


def model_options() -> dict:
  options = {}
  for item in FLAGS.model_options:
    key, _, value = item.partition('=')
    options[key] = value
  return options


def builders(net: str, mode: str, dtype: str):
  """(jax Timed factory, torch Timed factory or None) for one line of the table."""
  batch = batch_size(net, mode)
  precision = None if FLAGS.head_precision == 'default' else FLAGS.head_precision
  bf16 = dtype == 'bfloat16'
  if mode == 'train':
    common = dict(batch_size=batch, num_classes=FLAGS.num_classes,
                  num_spheres=FLAGS.num_spheres)
    make_jax = functools.partial(bench_steps.jax_train_step, net, dtype=dtype,
                                 head_precision=precision, model_options=model_options(),
                                 **common)
    make_torch = functools.partial(bench_steps.torch_train_step, net,
                                   threads=FLAGS.torch_threads, bfloat16=bf16, **common)
  else:
    make_jax = functools.partial(bench_steps.jax_embed, net, batch_size=batch, dtype=dtype,
                                 model_options=model_options())
    make_torch = functools.partial(bench_steps.torch_embed, net, batch_size=batch,
                                   threads=FLAGS.torch_threads, bfloat16=bf16)
  return batch, make_jax, (make_torch if FLAGS.torch else None)


def time_reps(timed, batch, reps_log):
  """Runs one repetition; appends (images/s, load average) to reps_log.

  A repetition starts with one untimed step: the first step after the other framework ran pays
  for that framework's use of memory and caches (JAX's MobileFaceNet training step measured 16.0
  images/s right after a PyTorch step, 25-27 for the steps after it).
  """
  timed.run(1)
  start = time.perf_counter()
  timed.run(FLAGS.steps)
  seconds = time.perf_counter() - start
  reps_log.append((FLAGS.steps * batch / seconds, os.getloadavg()[0]))


def summary(log):
  rates = [r for r, _ in log]
  return statistics.median(rates), min(rates), max(rates), statistics.median(l for _, l in log)


def measure(net: str, mode: str, dtype: str) -> dict:
  """Times one (net, mode, dtype) line, JAX and PyTorch interleaved."""
  batch, make_jax, make_torch = builders(net, mode, dtype)
  jax_timed = make_jax()
  compile_s = jax_timed.compile()
  jax_timed.run(1)  # warm-up (allocations, thread pools)
  torch_timed = None
  if make_torch is not None:
    torch_timed = make_torch()
    torch_timed.run(1)
  jax_log, torch_log = [], []
  for _ in range(FLAGS.reps):
    time_reps(jax_timed, batch, jax_log)
    if torch_timed is not None:
      time_reps(torch_timed, batch, torch_log)
  result = {'net': net, 'mode': mode, 'dtype': dtype, 'batch': batch, 'compile_s': compile_s,
            'jax': summary(jax_log), 'torch': summary(torch_log) if torch_log else None,
            'flops_per_step': jax_timed.flops_per_call}
  print_line(result, flush=True)
  return result


def print_line(r, flush=False):
  jax_med, jax_lo, jax_hi, load = r['jax']
  text = (f"{r['net']:14s} {r['mode']:5s} {r['dtype']:8s} b{r['batch']:<4d} "
          f"JAX {jax_med:8.1f} img/s [{jax_lo:.1f}-{jax_hi:.1f}]")
  if r['torch']:
    t_med, t_lo, t_hi, t_load = r['torch']
    text += f" | PyTorch {t_med:8.1f} [{t_lo:.1f}-{t_hi:.1f}] | JAX/PyTorch {jax_med / t_med:5.2f}x"
    load = (load + t_load) / 2
  text += f" | compile {r['compile_s']:.1f} s | load {load:.1f}"
  if r['flops_per_step']:
    tflops = r['flops_per_step'] * jax_med / r['batch'] / 1e12
    text += f" | XLA-counted {tflops * 1e3:.0f} GFLOP/s"
    peak = dict(item.split('=') for item in FLAGS.peak_tflops).get(r['dtype'])
    if peak and r['mode'] == 'train':
      achieved = model_tflops(r)
      text += f" | model {achieved:.2f} TFLOP/s, MFU {achieved / float(peak):.1%} of {peak}"
  print(text, flush=flush)


@functools.cache
def forward_flops_per_image(net: str) -> float:
  """Model FLOPs of one image's forward pass: XLA's count for the graph of XLA's own (lax)
  convolutions, taken from the lowered (not compiled) function, so any backend counts alike."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  options = {'conv_impl': 'lax'}
  if net == 'mobilefacenet':
    options['depthwise_impl'] = 'lax'
  model = bench_steps.create_model(net, 'float32', options)
  images = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             images)
  analysis = jax.jit(functools.partial(model.apply, train=False)).lower(
      variables, images).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def model_tflops(r) -> float:
  """Achieved model TFLOP/s of a training line: 3 x forward FLOPs per image x images/s."""
  return 3 * forward_flops_per_image(r['net']) * r['jax'][0] / 1e12


def main(argv):
  del argv
  host_memory = bench_steps.host_memory_from_flags()
  import jax  # pylint: disable=import-outside-toplevel
  print(f'JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); '
        f'{os.cpu_count()} CPUs; {host_memory}; reps={FLAGS.reps} x steps={FLAGS.steps}; '
        f'model_options={model_options()}; head_precision={FLAGS.head_precision}; '
        f'{time.strftime("%Y-%m-%d %H:%M:%S")}', flush=True)
  if FLAGS.torch:
    import torch  # pylint: disable=import-outside-toplevel
    print(f'PyTorch {torch.__version__}, {FLAGS.torch_threads} threads, '
          f'{torch.backends.cpu.get_cpu_capability()}', flush=True)
  # Training first: it carries the targets, and a GPU lease may end before embedding is done.
  results = [measure(net, mode, dtype)
             for mode in FLAGS.modes for net in FLAGS.nets for dtype in FLAGS.dtypes]
  print('\nsummary (median images/s):')
  for r in results:
    print_line(r)


if __name__ == '__main__':
  app.run(main)
