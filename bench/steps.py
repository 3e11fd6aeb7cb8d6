"""The work the speed benchmarks time: this project's JAX train step and embedding, and the same
work in PyTorch (the reference backbones of the weight-import tests, ``torch_reference``).

Per training step both sides run the backbone forward in training mode (batch statistics, dropout
for IR), the multi-sphere ArcFace head over `num_classes` identities (N slices of the unit
embedding, one column-normalised (512/N, C) classifier each), the summed cross-entropy, the
backward pass and an SGD-momentum update with weight decay. The JAX side is the project's own
``training.step.train_step`` under a plain ``jax.jit`` with the state donated, as a user's script
or ``training.trainer.Trainer`` jits it; the PyTorch side trains the way the original does
(``torch.optim.SGD``, the original's ArcFace head, which computes the margin for every class and
keeps the target's).

Every builder returns a :class:`Timed`: ``compile()`` (seconds; JAX only) then ``run(n)``, which
does `n` steps and waits for the result, so a wall clock around it measures the work.
"""
import dataclasses
import functools
import math
import os
import runpy
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from multiface_jax import cpu_tuning, heads, models
from multiface_jax.models import kernels
from multiface_jax.training import optim, schedule, sharded_head, sharding, step

IMAGE_SIZE = 112
SEED = 0
MARGIN = 0.5
SCALE = 64.0
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'configs', 'default.py')


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


def create_model(net: str, dtype: str = 'float32', kernel_set: str = 'auto'):
  """``models.create_model`` with a compute dtype and a kernel set."""
  return models.create_model(net, dtype=jnp.dtype(dtype), kernel_set=kernel_set)


def create_head(num_classes: int, num_spheres: int, mesh, global_batch: int,
                precision: Optional[str] = 'highest',
                sample_rate: float = 1.0) -> sharded_head.ShardedHead:
  """The multi-sphere ArcFace head of the default config (m = 0.5, s = 64) on `mesh`."""
  head = heads.MultiSphereHead(num_classes=num_classes, num_spheres=num_spheres, kind='arcface',
                               scale=SCALE, margin=MARGIN, precision=precision)
  return sharded_head.ShardedHead(head, mesh, global_batch=global_batch, sample_rate=sample_rate)


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


def _aot(jitted, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _optimizer_config():
  """The default recipe's SGD (momentum 0.9, grouped coupled weight decay), constant rate."""
  opt = runpy.run_path(DEFAULT_CONFIG)['get_config']().optimizer
  opt.schedule = 'constant'
  return opt


class JaxTrainSetup:
  """Model, head, optimizer, initial state and batch of one JAX training benchmark."""

  def __init__(self, net: str, *, batch_size: int, num_classes: int, num_spheres: int,
               dtype: str = 'float32', head_precision: Optional[str] = 'highest',
               kernel_set: str = 'auto'):
    self.model = create_model(net, dtype, kernel_set)
    self.mesh = sharding.create_mesh(1, devices=jax.devices()[:1])
    self.head = create_head(num_classes, num_spheres, self.mesh, batch_size, head_precision)
    opt_config = _optimizer_config()
    plan = schedule.StepPlan(steps_per_epoch=1000, total_steps=10**6, warmup_steps=0,
                             boundaries=(), eval_every=0)
    rng = jax.random.PRNGKey(SEED)
    image_size = (IMAGE_SIZE, IMAGE_SIZE)
    abstract_params, abstract_stats = jax.eval_shape(
        functools.partial(step.init_variables, model=self.model, head=self.head,
                          image_size=image_size), rng)
    groups = optim.param_groups(abstract_params, abstract_stats,
                                embedding_layer=optim.embedding_layer_of(net))
    self.lr_fn = schedule.create_learning_rate_fn(opt_config, plan)
    self.head_sgd = sharded_head.optimizer_settings(opt_config)
    self.tx = optim.create_optimizer(opt_config, self.lr_fn, groups)
    self.state = jax.jit(functools.partial(step.create_train_state, model=self.model,
                                           head=self.head, tx=self.tx,
                                           image_size=image_size))(rng)
    self.batch = random_batch(batch_size, num_classes)


def jax_train_step(net: str, *, xla_options: Optional[dict] = None, **kwargs) -> Timed:
  """This project's train step (``training.step.train_step``, jitted, state donated), one device.

  Args:
    net: backbone name.
    xla_options: XLA compile options for this jit only (the ablation's), over the process's.
    **kwargs: :class:`JaxTrainSetup` arguments (batch_size, num_classes, num_spheres, dtype,
      head_precision, kernel_set).
  """
  setup = JaxTrainSetup(net, **kwargs)
  train_step = jax.jit(functools.partial(step.train_step, model=setup.model, head=setup.head,
                                         tx=setup.tx, head_lr_fn=setup.lr_fn,
                                         head_sgd=setup.head_sgd), donate_argnums=0,
                       compiler_options=xla_options or None)
  holder = {}
  timed = Timed(run=None)

  def compile_step():
    holder['step'], seconds = _aot(train_step, setup.state, setup.batch)
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


def jax_embed(net: str, *, batch_size: int, dtype: str = 'float32', kernel_set: str = 'auto',
              xla_options: Optional[dict] = None) -> Timed:
  """Jitted eval-mode embedding, as the evaluation embeds one view: uint8 (B, 112, 112, 3) in,
  unit (B, 512) float32 out."""
  model = create_model(net, dtype, kernel_set)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))
  apply_fn = functools.partial(model.apply, train=False)

  def whole_batch(variables, images_uint8):
    return apply_fn(variables, models.normalize_images(images_uint8))

  @functools.partial(jax.jit, compiler_options=xla_options or None)
  def embed(variables, images_uint8):
    return kernels.apply_in_chunks(apply_fn, variables, models.normalize_images(images_uint8))

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


def onnx_embed(net: str, *, batch_size: int, threads: int) -> Timed:
  """The backbone exported as ``python -m multiface_jax.export`` does, run by onnxruntime on
  normalised float32 NCHW batches (random weights)."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  from multiface_jax.inference import loading, onnx_export  # pylint: disable=import-outside-toplevel
  model = create_model(net)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(SEED), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))
  backbone = loading.Backbone(model=model, variables=variables, record=loading.model_record(net),
                              path='', step=0)
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = threads
  session = onnxruntime.InferenceSession(onnx_export.to_onnx(backbone).SerializeToString(),
                                         options, providers=['CPUExecutionProvider'])
  images = np.random.default_rng(SEED).uniform(
      -1, 1, (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)

  def run(steps):
    for _ in range(steps):
      session.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: images})

  return Timed(run=run)


# ------------------------------------------------------------------------------------ PyTorch


def torch_reference():
  """``multiface_jax.torch_reference`` (needs torch, from requirements-torch.txt).

  Every PyTorch builder goes through here, so it also makes glibc keep freed memory
  (``cpu_tuning.keep_freed_memory``; process-wide): PyTorch allocates its CPU activations with
  malloc, which otherwise maps large blocks afresh and unmaps them on free. Deployments avoid
  that cost the same way (or with jemalloc / tcmalloc), so the benchmarks give it to PyTorch.
  """
  cpu_tuning.keep_freed_memory()
  from multiface_jax import torch_reference as reference  # pylint: disable=import-outside-toplevel
  return reference


def torch_arcface_loss(embeddings, kernels_, labels):
  """The original's multi-sphere ArcFace loss: per slice, column-normalised weights, the margin
  computed for every class (fallback ``c - m sin m`` past ``cos(pi - m)``), the target's kept,
  times s; the cross-entropies summed over slices."""
  import torch  # pylint: disable=import-outside-toplevel
  cos_m, sin_m = math.cos(MARGIN), math.sin(MARGIN)
  threshold, fallback = math.cos(math.pi - MARGIN), MARGIN * math.sin(MARGIN)
  rows = torch.arange(labels.shape[0])
  total = 0.0
  for slice_, kernel in zip(embeddings.chunk(len(kernels_), dim=1), kernels_):
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
