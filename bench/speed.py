"""Training and embedding throughput: a plain jax.jit, the same after cpu_tuning.configure(), and
PyTorch, side by side in one run.

  .venv/bin/python bench/speed.py                         # MobileFaceNet + IR-SE50, CPU
  .venv/bin/python bench/speed.py --nets=mobilefacenet --dtypes=float32,bfloat16
  .venv/bin/python bench/speed.py --modes=embed --sides=tuned,onnxruntime,pytorch \
      --mobilefacenet_embed_batch=1 --ir_embed_batch=1  # the exported model too, batch 1
  bash bench/gpu.sh                                       # a GPU: JAX only (see gpu.sh)

Each side runs in a process of its own, as a user's script would:
  plain     ``models.create_model`` + the project's train step under a plain ``jax.jit``;
  tuned     the same code in a process that called ``cpu_tuning.configure()`` first;
  pytorch   the original's architecture and ArcFace head (``torch_reference``);
  onnxruntime  (embedding only) the model ``python -m multiface_jax.export`` writes.
The processes are started once per line and take turns, so all sides see the same machine load:
every repetition is one untimed step then `--steps` timed steps, and a line reports the median
images/s over `--reps` repetitions, the min-max range and the ratios.

Workloads: MobileFaceNet trains with a 2-sphere ArcFace head over 10,000 classes at batch 64 and
embeds at batch 64; IR-SE nets train at batch 16 and embed at batch 32. PyTorch uses
``--torch_threads`` intra-op threads (default: every core); XLA:CPU its own pool over every core.
"""
import functools
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_list('nets', ['mobilefacenet', 'ir_se50'], 'Backbones to time.')
flags.DEFINE_list('dtypes', ['float32'], 'JAX compute dtypes (float32, bfloat16); PyTorch '
                  'uses CPU autocast for bfloat16.')
flags.DEFINE_list('modes', ['train', 'embed'], 'What to time: train and/or embed.')
flags.DEFINE_list('sides', ['plain', 'tuned', 'pytorch'], 'Processes to compare (see above).')
flags.DEFINE_integer('torch_threads', os.cpu_count(), 'PyTorch and onnxruntime intra-op '
                     'threads.')
flags.DEFINE_integer('reps', 5, 'Timed repetitions per side (the median is reported).')
flags.DEFINE_integer('steps', 2, 'Steps per repetition.')
flags.DEFINE_integer('num_classes', 10_000, 'Identities of the training head.')
flags.DEFINE_integer('num_spheres', 2, 'N of the multi-sphere ArcFace head.')
flags.DEFINE_integer('mobilefacenet_train_batch', 64, 'MobileFaceNet training batch.')
flags.DEFINE_integer('mobilefacenet_embed_batch', 64, 'MobileFaceNet embedding batch.')
flags.DEFINE_integer('ir_train_batch', 16, 'IR / IR-SE training batch.')
flags.DEFINE_integer('ir_embed_batch', 32, 'IR / IR-SE embedding batch.')
flags.DEFINE_list('peak_tflops', [], 'Peak TFLOP/s of the device per compute dtype, e.g. '
                  'float32=494,bfloat16=989; MFU (model FLOPs = 3x the forward pass, counted by '
                  'XLA) is printed for training lines.')
flags.DEFINE_string('worker', None, 'Internal: run as the worker of one side and line.')
flags.DEFINE_string('net', None, 'Internal: the worker\'s net.')
flags.DEFINE_string('mode', None, 'Internal: the worker\'s mode.')
flags.DEFINE_string('dtype', None, 'Internal: the worker\'s dtype.')


def batch_size(net: str, mode: str) -> int:
  prefix = 'mobilefacenet' if net == 'mobilefacenet' else 'ir'
  return getattr(FLAGS, f'{prefix}_{mode}_batch')


# ----------------------------------------------------------------------------------- worker


def _build(side: str, net: str, mode: str, dtype: str):
  """The side's Timed work; imports JAX (or torch) only here, after the tuning decision."""
  if side == 'tuned':
    from multiface_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
    cpu_tuning.configure()
  import steps  # pylint: disable=import-outside-toplevel  (bench/, the script's folder)
  batch = batch_size(net, mode)
  bf16 = dtype == 'bfloat16'
  if side == 'onnxruntime':
    return steps.onnx_embed(net, batch_size=batch, threads=FLAGS.torch_threads)
  if side == 'pytorch':
    if mode == 'train':
      return steps.torch_train_step(net, batch_size=batch, num_classes=FLAGS.num_classes,
                                    num_spheres=FLAGS.num_spheres, threads=FLAGS.torch_threads,
                                    bfloat16=bf16)
    return steps.torch_embed(net, batch_size=batch, threads=FLAGS.torch_threads, bfloat16=bf16)
  if mode == 'train':
    return steps.jax_train_step(net, batch_size=batch, num_classes=FLAGS.num_classes,
                                num_spheres=FLAGS.num_spheres, dtype=dtype)
  return steps.jax_embed(net, batch_size=batch, dtype=dtype)


def run_worker() -> None:
  """Builds and compiles the work, then answers 'run' lines on stdin with images/s."""
  net, mode, dtype = FLAGS.net, FLAGS.mode, FLAGS.dtype
  timed = _build(FLAGS.worker, net, mode, dtype)
  compile_s = timed.compile()
  timed.run(1)  # warm-up: allocations, thread pools
  print(f'ready {compile_s:.2f} {timed.flops_per_call or 0}', flush=True)
  batch = batch_size(net, mode)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    # One untimed step first: the step after another process ran pays for the caches it left.
    timed.run(1)
    start = time.perf_counter()
    timed.run(FLAGS.steps)
    print(f'rate {FLAGS.steps * batch / (time.perf_counter() - start):.4f}', flush=True)


# ----------------------------------------------------------------------------------- parent


class Side:
  """One side's worker process for one line."""

  def __init__(self, side: str, net: str, mode: str, dtype: str):
    self.name = side
    passed = [f'--{name}={getattr(FLAGS, name)}' for name in (
        'torch_threads', 'steps', 'num_classes', 'num_spheres', 'mobilefacenet_train_batch',
        'mobilefacenet_embed_batch', 'ir_train_batch', 'ir_embed_batch')]
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f'--worker={side}', f'--net={net}',
         f'--mode={mode}', f'--dtype={dtype}', *passed],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.rates = []

  def _reply(self, word: str) -> list[str]:
    for line in self.process.stdout:
      if line.startswith(word + ' '):
        return line.split()[1:]
    raise RuntimeError(f'the {self.name} worker exited (code {self.process.wait()})')

  def ready(self) -> tuple[float, float]:
    compile_s, flops = self._reply('ready')
    return float(compile_s), float(flops)

  def rep(self) -> None:
    self.process.stdin.write('run\n')
    self.process.stdin.flush()
    self.rates.append(float(self._reply('rate')[0]))

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()


def measure(net: str, mode: str, dtype: str) -> dict:
  """Times one (net, mode, dtype) line, the sides taking turns."""
  sides = [Side(side, net, mode, dtype) for side in FLAGS.sides
           if side != 'onnxruntime' or mode == 'embed']
  ready = {}
  try:
    for side in sides:  # one at a time: compiling two at once would slow both
      ready[side.name] = side.ready()
    loads = []
    for _ in range(FLAGS.reps):
      for side in sides:
        side.rep()
      loads.append(os.getloadavg()[0])
  finally:
    for side in sides:
      side.close()
  result = {'net': net, 'mode': mode, 'dtype': dtype, 'batch': batch_size(net, mode),
            'load': statistics.median(loads), 'sides': {}}
  for side in sides:
    compile_s, flops = ready[side.name]
    result['sides'][side.name] = (statistics.median(side.rates), min(side.rates),
                                  max(side.rates), compile_s, flops)
  print_line(result)
  return result


@functools.cache
def forward_flops_per_image(net: str) -> float:
  """Model FLOPs of one image's forward pass: XLA's count for the graph of XLA's own kernels,
  taken from the lowered (not compiled) function, so any backend counts alike."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import steps  # pylint: disable=import-outside-toplevel
  model = steps.create_model(net, 'float32', kernel_set='xla')
  images = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             images)
  analysis = jax.jit(functools.partial(model.apply, train=False)).lower(
      variables, images).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def print_line(r) -> None:
  text = f"{r['net']:14s} {r['mode']:5s} {r['dtype']:8s} b{r['batch']:<4d}"
  for name, (median, low, high, compile_s, _) in r['sides'].items():
    compiled = f', compile {compile_s:.0f} s' if name in ('plain', 'tuned') else ''
    text += f' | {name} {median:7.1f} img/s [{low:.1f}-{high:.1f}{compiled}]'
  sides = r['sides']
  if 'pytorch' in sides:
    for name in ('plain', 'tuned', 'onnxruntime'):
      if name in sides:
        text += f" | {name}/pytorch {sides[name][0] / sides['pytorch'][0]:.2f}x"
  if 'tuned' in sides and 'onnxruntime' in sides:
    text += f" | tuned/onnxruntime {sides['tuned'][0] / sides['onnxruntime'][0]:.2f}x"
  text += f" | load {r['load']:.1f}"
  peak = dict(item.split('=') for item in FLAGS.peak_tflops).get(r['dtype'])
  jax_side = next((name for name in ('tuned', 'plain') if name in sides), None)
  if peak and r['mode'] == 'train' and jax_side:
    achieved = 3 * forward_flops_per_image(r['net']) * sides[jax_side][0] / 1e12
    text += f' | model {achieved:.2f} TFLOP/s, MFU {achieved / float(peak):.1%} of {peak}'
  print(text, flush=True)


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.worker:
    run_worker()
    return
  import jax  # pylint: disable=import-outside-toplevel  (the parent computes nothing)
  print(f'JAX {jax.__version__}; {os.cpu_count()} CPUs; reps={FLAGS.reps} x steps={FLAGS.steps}; '
        f'sides {",".join(FLAGS.sides)}; {time.strftime("%Y-%m-%d %H:%M:%S")}', flush=True)
  # Training first: it carries the targets, and a GPU lease may end before embedding is done.
  results = [measure(net, mode, dtype)
             for mode in FLAGS.modes for net in FLAGS.nets for dtype in FLAGS.dtypes]
  print('\nsummary (median images/s):')
  for r in results:
    print_line(r)


if __name__ == '__main__':
  app.run(main)
