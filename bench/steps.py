"""The work the speed benchmarks time: this project's JAX train step and embedding, and the same
work in PyTorch (the reference backbones of the weight-import tests, ``tests/torch_reference.py``).

Per training step both sides run the backbone forward in training mode (batch statistics, dropout
for IR), the multi-sphere ArcFace head over `num_classes` identities (N slices of the unit
embedding, one column-normalised (512/N, C) classifier each), the summed cross-entropy, the
backward pass and an SGD-momentum update with weight decay. The JAX side is the project's own
``train.train_step``, jitted with the state donated as ``train.Trainer`` does; the PyTorch side
trains the way the original does (``torch.optim.SGD``, the original's ArcFace head, which
computes the margin for every class and keeps the target's).

Every builder returns a :class:`Timed`: ``compile()`` (seconds; JAX only) then ``run(n)``, which
does `n` steps and waits for the result, so a wall clock around it measures the work.
"""
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from multiface_jax import heads, host_memory, models, optim, parallel
from multiface_jax.evaluation import embed as embed_lib

flags.DEFINE_bool('huge_pages', True, 'Re-run the script with transparent huge pages for malloc '
                  '(multiface_jax/host_memory.py), as main.py does; JAX and PyTorch both get them.')
flags.DEFINE_bool('reuse_step_memory', True, 'Run JAX CPU steps on the main thread and keep freed '
                  'memory (multiface_jax/host_memory.py), as main.py does. PyTorch keeps freed '
                  'memory either way (torch_reference).')


def host_memory_from_flags() -> str:
  """Applies --huge_pages (re-executing the script once) and --reuse_step_memory, as main.py
  does; call it before JAX's first computation. Returns what is on, for the results' header."""
  if flags.FLAGS.huge_pages:
    host_memory.reexec_with_huge_pages()
  if flags.FLAGS.reuse_step_memory:
    host_memory.reuse_step_memory()
  return (f'huge pages {"on" if host_memory.active() else "off"}, step memory '
          f'{"reused" if flags.FLAGS.reuse_step_memory else "not reused"}')


def _import_train():
  """``multiface_jax.train``; on an image without TensorFlow (clu's metric writers import it,
  e.g. the GPU machines' image) with clu stubbed out: the train step does not use clu."""
  try:
    from multiface_jax import train  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    if 'tensorflow' not in str(error) and 'clu' not in str(error):
      raise
    for name in ('clu', 'clu.metric_writers', 'clu.periodic_actions'):
      sys.modules.pop(name, None)
    sys.modules['clu'] = types.SimpleNamespace(metric_writers=None, periodic_actions=None)
    from multiface_jax import train  # pylint: disable=import-outside-toplevel
    print(f'bench: clu stubbed ({error}); the train step does not use it.', flush=True)
  return train


train = _import_train()

IMAGE_SIZE = 112
SEED = 0
MARGIN = 0.5
SCALE = 64.0


@dataclasses.dataclass
class Timed:
  """A benchmarked piece of work.

  Attributes:
    run: ``run(n)`` does n steps and blocks until they are done.
    compile: compiles the work and returns the seconds it took (0 for PyTorch).
    flops_per_call: FLOPs of one call as XLA counts them (None when unknown).
    hlo_text: after ``compile()``, returns the optimised HLO (JAX only), for profiles.
  """
  run: Callable[[int], None]
  compile: Callable[[], float] = lambda: 0.0
  flops_per_call: Optional[float] = None
  hlo_text: Optional[Callable[[], str]] = None


def create_model(net: str, dtype: str, model_options: Optional[dict] = None):
  """``models.create_model``, or the backbone class itself when an option is not exposed there
  (``conv_impl`` lets the benchmark compare implementations)."""
  options = dict(model_options or {})
  conv_impl = options.pop('conv_impl', None)
  model = models.create_model(net, dtype=jnp.dtype(dtype), **options)
  return model if conv_impl is None else model.clone(conv_impl=conv_impl)


def create_head(num_classes: int, num_spheres: int,
                precision: Optional[str] = 'highest') -> heads.MultiSphereHead:
  """The multi-sphere ArcFace head of the default config (m = 0.5, s = 64)."""
  return heads.MultiSphereHead(num_classes=num_classes, num_spheres=num_spheres, kind='arcface',
                               scale=SCALE, margin=MARGIN, precision=precision)


def random_batch(batch_size: int, num_classes: int) -> dict[str, jax.Array]:
  """A fixed uint8 image batch and int32 labels on the default device."""
  rng = np.random.default_rng(SEED)
  images = rng.integers(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (batch_size,), dtype=np.int32)
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}


def _compiled_flops(compiled) -> Optional[float]:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get('flops')
  return float(flops) if flops else None


def compiler_options(xla_options: Optional[dict] = None) -> dict:
  """The project's compile options for the default backend (``models.compiler_options``), with
  `xla_options` (XLA option name -> value) over them."""
  return {**models.compiler_options(), **(xla_options or {})}


def _aot(jitted, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


class JaxTrainSetup:
  """Model, head, optimizer, initial state and batch of one JAX training benchmark."""

  def __init__(self, net: str, *, batch_size: int, num_classes: int, num_spheres: int,
               dtype: str = 'float32', head_precision: Optional[str] = 'highest',
               model_options: Optional[dict] = None):
    self.model = create_model(net, dtype, model_options)
    self.head = create_head(num_classes, num_spheres, head_precision)
    self.mesh = parallel.create_mesh(1, devices=jax.devices()[:1])
    opt_config = _optimizer_config()
    plan = optim.StepPlan(steps_per_epoch=1000, total_steps=10**6, warmup_steps=0,
                          boundaries=(), eval_every=0)
    rng = jax.random.PRNGKey(SEED)
    image_size = (IMAGE_SIZE, IMAGE_SIZE)
    abstract_params, abstract_stats = jax.eval_shape(
        functools.partial(train.init_variables, model=self.model, head=self.head,
                          image_size=image_size), rng)
    groups = optim.param_groups(abstract_params, abstract_stats,
                                embedding_layer=optim.embedding_layer_of(net))
    self.tx = optim.create_optimizer(opt_config, optim.create_learning_rate_fn(opt_config, plan),
                                     groups)
    self.state = jax.jit(functools.partial(train.create_train_state, model=self.model,
                                           head=self.head, tx=self.tx,
                                           image_size=image_size))(rng)
    self.batch = random_batch(batch_size, num_classes)


def _optimizer_config():
  """The default recipe's SGD (momentum 0.9, grouped coupled weight decay), constant rate."""
  from configs import default  # pylint: disable=import-outside-toplevel
  opt = default.get_config().optimizer
  opt.schedule = 'constant'
  return opt


def jax_train_step(net: str, *, xla_options: Optional[dict] = None, **kwargs) -> Timed:
  """This project's train step (``train.train_step``, jitted, state donated) on one device.

  Args:
    net: backbone name.
    xla_options: XLA compile options over the project's own (:func:`compiler_options`).
    **kwargs: :class:`JaxTrainSetup` arguments (batch_size, num_classes, num_spheres, dtype,
      head_precision, model_options).
  """
  setup = JaxTrainSetup(net, **kwargs)
  step = jax.jit(functools.partial(train.train_step, model=setup.model, head=setup.head,
                                   tx=setup.tx, mesh=setup.mesh), donate_argnums=0,
                 compiler_options=compiler_options(xla_options))
  holder = {}
  timed = Timed(run=None)

  def compile_step():
    holder['step'], seconds = _aot(step, setup.state, setup.batch)
    timed.flops_per_call = _compiled_flops(holder['step'])
    timed.hlo_text = holder['step'].as_text
    return seconds

  def run(steps):
    state = setup.state
    for _ in range(steps):
      state, metrics = holder['step'](state, setup.batch)
    jax.block_until_ready((state, metrics))
    setup.state = state

  timed.run, timed.compile = run, compile_step
  return timed


def jax_embed(net: str, *, batch_size: int, dtype: str = 'float32',
              model_options: Optional[dict] = None,
              xla_options: Optional[dict] = None) -> Timed:
  """Jitted eval-mode embedding: uint8 (B, 112, 112, 3) in, unit (B, 512) float32 out."""
  model = create_model(net, dtype, model_options)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))

  apply_fn = functools.partial(model.apply, train=False)

  def whole_batch(variables, images_uint8):
    return apply_fn(variables, models.normalize_images(images_uint8))

  @functools.partial(jax.jit, compiler_options=compiler_options(xla_options))
  def embed(variables, images_uint8):
    # As the evaluation embeds (evaluation/embed.py), without the flipped view.
    return embed_lib.apply_in_chunks(apply_fn, variables, models.normalize_images(images_uint8))

  images = random_batch(batch_size, 1)['image']
  holder = {}
  timed = Timed(run=None)

  def compile_embed():
    holder['embed'], seconds = _aot(embed, variables, images)
    # XLA counts a loop's body once: count the same network applied to the whole batch.
    timed.flops_per_call = _compiled_flops(jax.jit(whole_batch).lower(variables, images))
    timed.hlo_text = holder['embed'].as_text
    return seconds

  def run(steps):
    for _ in range(steps):
      out = holder['embed'](variables, images)
    jax.block_until_ready(out)

  timed.run, timed.compile = run, compile_embed
  return timed


# ------------------------------------------------------------------------------------ PyTorch


def torch_reference():
  """Imports ``tests/torch_reference.py`` (needs torch, from requirements-torch.txt).

  Every PyTorch builder goes through here, so it also makes glibc keep freed memory
  (``host_memory.keep_freed_memory``; process-wide). PyTorch allocates its CPU activations with
  malloc, which maps large blocks afresh and unmaps them on free: measured on MobileFaceNet
  embedding, batch 64, here, 29-35 images/s in a fresh process and 80-89 with freed memory kept
  (mmap and trim thresholds of 1 GB then, as ``MALLOC_MMAP_THRESHOLD_`` /
  ``MALLOC_TRIM_THRESHOLD_`` do), and earlier PyTorch numbers depended on whether a training
  benchmark had run first. Real deployments avoid the cost the same way (or with jemalloc /
  tcmalloc), so the benchmarks give it to PyTorch.
  """
  host_memory.keep_freed_memory()
  tests_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')
  if tests_dir not in sys.path:
    sys.path.insert(0, tests_dir)
  import torch_reference as reference  # pylint: disable=import-outside-toplevel,import-error
  return reference


def torch_arcface_loss(embeddings, kernels, labels):
  """The original's multi-sphere ArcFace loss: per slice, column-normalised weights, the margin
  computed for every class (fallback ``c - m sin m`` past ``cos(pi - m)``), the target's kept,
  times s; the cross-entropies summed over slices."""
  import torch  # pylint: disable=import-outside-toplevel
  cos_m, sin_m = math.cos(MARGIN), math.sin(MARGIN)
  threshold, fallback = math.cos(math.pi - MARGIN), MARGIN * math.sin(MARGIN)
  rows = torch.arange(labels.shape[0])
  total = 0.0
  for slice_, kernel in zip(embeddings.chunk(len(kernels), dim=1), kernels):
    cos = torch.mm(slice_, kernel / torch.norm(kernel, 2, 0, True)).clamp(-1, 1)
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))
    with_margin = torch.where(cos - threshold <= 0, cos - fallback, cos * cos_m - sin * sin_m)
    logits = cos.clone()
    logits[rows, labels] = with_margin[rows, labels]
    total = total + torch.nn.functional.cross_entropy(logits * SCALE, labels)
  return total


class TorchTrainSetup:
  """Model, head kernels, SGD and a fixed batch of one PyTorch training benchmark."""

  def __init__(self, net: str, *, batch_size: int, num_classes: int, num_spheres: int,
               threads: int, bfloat16: bool = False):
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    self.torch = torch
    self.model = torch_reference().create_torch_model(net).train()
    dim = 512 // num_spheres
    self.kernels = [torch.nn.Parameter(torch.empty(dim, num_classes).uniform_(-1, 1))
                    for _ in range(num_spheres)]
    self.optimizer = torch.optim.SGD(list(self.model.parameters()) + self.kernels, lr=0.05,
                                     momentum=0.9, weight_decay=4e-5)
    rng = np.random.default_rng(SEED)
    self.images = torch.from_numpy(
        rng.uniform(-1, 1, (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32))
    self.labels = torch.from_numpy(rng.integers(0, num_classes, (batch_size,)))
    self.bfloat16 = bfloat16

  def autocast(self):
    return self.torch.autocast('cpu', dtype=self.torch.bfloat16, enabled=self.bfloat16)


def torch_train_step(net: str, **kwargs) -> Timed:
  """The same training step in PyTorch on CPU; kwargs as :class:`TorchTrainSetup`."""
  setup = TorchTrainSetup(net, **kwargs)

  def run(steps):
    for _ in range(steps):
      setup.optimizer.zero_grad(set_to_none=True)
      with setup.autocast():
        embeddings = setup.model(setup.images)
      loss = torch_arcface_loss(embeddings.float(), setup.kernels, setup.labels)
      loss.backward()
      setup.optimizer.step()

  return Timed(run=run)


def torch_embed(net: str, *, batch_size: int, threads: int, bfloat16: bool = False) -> Timed:
  """Eval-mode PyTorch embedding under ``torch.inference_mode``."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  torch.manual_seed(SEED)
  model = torch_reference().create_torch_model(net).eval()
  images = torch.from_numpy(np.random.default_rng(SEED).uniform(
      -1, 1, (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32))

  def run(steps):
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bfloat16):
      for _ in range(steps):
        model(images)

  return Timed(run=run)
