"""The operations the layers call, in XLA's form or in the form written for XLA:CPU.

Everything this project does for speed on CPU inside a network lives in this package; the layers
and backbones are architecture only. Each backbone picks the kernel set once, for its whole
forward (and backward) pass::

  class MobileFaceNet(nn.Module):
    kernel_set: str = 'auto'
    def __call__(self, images, train):
      with kernels.use(self.kernel_set):
        ...  # every layer's conv2d / depthwise_conv2d / batchnorm_prelu below

``'auto'`` (what ``models.create_model`` builds) is ``'xla_cpu'`` on the CPU backend and
``'xla'`` elsewhere, decided when the network is traced. Both sets compute the same function
with the same parameters; ``'xla_cpu'`` differs in how:

- depthwise convolutions as shifted multiply-adds with a written-out backward pass, and 1x1 and
  3-channel dense ones as matmuls (``convolutions.py``);
- the per-channel sums of the BatchNorm + PReLU backward over chunks of images that fit in cache
  (``batchnorm_prelu.py``, ``chunking.py``); the eval-mode network over chunks of 8 images
  (:func:`apply_in_chunks`).

The process-wide half of the CPU tuning (XLA:CPU's compile flags, malloc) is
``multiface_jax.cpu_tuning.configure()``; :data:`XLA_CPU_FLAGS` is what it sets for XLA.
"""
import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax

from multiface_jax.models.kernels import batchnorm_prelu, chunking, convolutions

KERNEL_SETS = ('auto', 'xla', 'xla_cpu')

# XLA:CPU gives single convolutions, dots and reductions to its YNNPACK library by default; its
# reductions are the fast ones here, its convolution gradients and 1x1 matmuls the slow ones
# (bench/RESULTS.md, "CPU kernels"). So only reductions go to YNNPACK.
XLA_CPU_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}

_ACTIVE = contextvars.ContextVar('multiface_jax_kernels', default='auto')


def _resolve(name: str) -> str:
  if name not in KERNEL_SETS:
    raise ValueError(f'Unknown kernel set {name!r}; valid: {", ".join(KERNEL_SETS)}.')
  if name == 'auto':
    return 'xla_cpu' if jax.default_backend() == 'cpu' else 'xla'
  return name


@contextlib.contextmanager
def use(name: str) -> Iterator[str]:
  """Makes the operations below use kernel set `name` ('auto', 'xla' or 'xla_cpu') while active.

  Meant for a backbone's ``__call__`` (the choice is read while the network is traced), and for
  tests that compare the two sets. Yields the resolved name.
  """
  token = _ACTIVE.set(_resolve(name))
  try:
    yield _ACTIVE.get()
  finally:
    _ACTIVE.reset(token)


def active() -> str:
  """The kernel set in use here: that of the enclosing :func:`use`, else 'auto' resolved."""
  return _resolve(_ACTIVE.get())


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: convolutions.Pairs) -> jax.Array:
  """Dense NHWC convolution without bias, kernel (kh, kw, Cin, Cout), explicit padding pairs."""
  fn = convolutions.conv2d_gemm if active() == 'xla_cpu' else convolutions.conv2d_lax
  return fn(x, kernel, strides, padding)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                     padding: convolutions.Pairs) -> jax.Array:
  """Depthwise NHWC convolution without bias, kernel (kh, kw, 1, C), explicit padding pairs."""
  fn = (convolutions.depthwise_conv_shifted if active() == 'xla_cpu' else
        convolutions.depthwise_conv_lax)
  return fn(x, kernel, strides, padding)


def batchnorm_then_prelu(x: jax.Array, multiplier: jax.Array, shift: jax.Array,
                         slope: jax.Array) -> jax.Array:
  """PReLU(x * multiplier + shift): BatchNorm's per-channel affine map, then PReLU, fused."""
  chunk = chunking.images_per_chunk(x) if active() == 'xla_cpu' else x.shape[0]
  return batchnorm_prelu.affine_prelu(x, multiplier, shift, slope, chunk)


def apply_in_chunks(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
                    images: jax.Array, *, data_devices: int = 1) -> jax.Array:
  """``apply_fn(variables, images)`` of an eval-mode network; with 'xla_cpu' over chunks of images
  (:func:`chunking.apply_in_chunks`), otherwise over the whole batch at once."""
  if active() != 'xla_cpu':
    return apply_fn(variables, images)
  return chunking.apply_in_chunks(apply_fn, variables, images, data_devices=data_devices,
                                  images_per_chunk=chunking.IMAGES_PER_CHUNK)
