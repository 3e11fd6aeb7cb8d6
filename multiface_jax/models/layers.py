"""Building blocks shared by the backbones (NHWC, PyTorch conventions of the original).

Conventions of the original: convolutions have no bias, BatchNorm uses eps 1e-5 and PyTorch
momentum 0.1 (Flax momentum 0.9), PReLU has one learnable slope per channel initialised at 0.25,
and a 3x3 convolution pads 1 pixel on every side (explicit ``((1, 1), (1, 1))``: Flax's ``'SAME'``
pads a stride-2 convolution of an even input on the bottom/right only, which PyTorch never does).

Parameters are float32; ``dtype`` is the compute dtype.

The depthwise convolution lives behind a single module, :class:`DepthwiseConv2D`, so that its
implementation can be swapped for speed without touching the backbones or the checkpoints: every
implementation reads the same ``kernel`` of shape ``(kh, kw, 1, C)`` (the layout of Flax's grouped
``nn.Conv`` kernel).
"""
import functools
from typing import Any, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = Union[str, int, Sequence[tuple[int, int]]]

DEPTHWISE_IMPLS = ('auto', 'lax', 'shifted')

BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def resolve_depthwise_impl(impl: str) -> str:
  """Returns the concrete depthwise implementation for `impl` on the default backend.

  Args:
    impl: one of ``DEPTHWISE_IMPLS``. ``'auto'`` picks ``'shifted'`` on CPU (measured several
      times faster there for 3x3 kernels) and ``'lax'`` elsewhere (not measured on accelerators).

  Returns:
    ``'lax'`` or ``'shifted'``.
  """
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f'Unknown depthwise_impl {impl!r}; valid: {", ".join(DEPTHWISE_IMPLS)}.')
  if impl == 'auto':
    return 'shifted' if jax.default_backend() == 'cpu' else 'lax'
  return impl


def _explicit_padding(padding: Padding, ndim: int = 2) -> tuple[tuple[int, int], ...]:
  """Turns 'VALID', an int or per-dimension (lo, hi) pairs into explicit pairs."""
  if isinstance(padding, str):
    if padding.upper() != 'VALID':
      raise ValueError(f"Only 'VALID' or explicit padding is supported, got {padding!r}: "
                       "'SAME' differs from PyTorch for strided convolutions.")
    return ((0, 0),) * ndim
  if isinstance(padding, int):
    return ((padding, padding),) * ndim
  pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pairs) != ndim:
    raise ValueError(f'Expected {ndim} (lo, hi) padding pairs, got {padding!r}.')
  return pairs


def depthwise_conv_lax(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                       padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Depthwise convolution through XLA's grouped convolution.

  Args:
    x: (B, H, W, C) input.
    kernel: (kh, kw, 1, C) kernel, same dtype as `x`.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    (B, Ho, Wo, C).
  """
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                           padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Depthwise convolution as kh*kw shifted multiply-adds (fast on CPU, where XLA's grouped
  convolution is not vectorised over channels).

  Strides are applied by slicing each shifted view, so no work is spent on skipped outputs. When
  the kernel covers the whole padded input (the global 7x7 depthwise conv of MobileFaceNet), the
  convolution is a plain weighted sum over H and W.

  Args:
    x: (B, H, W, C) input.
    kernel: (kh, kw, 1, C) kernel.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    (B, Ho, Wo, C) in the dtype of `x` (accumulated in float32), equal to
    :func:`depthwise_conv_lax` up to float rounding.
  """
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  out_dtype = x.dtype
  # Accumulate in float32: CPUs compute bfloat16 arithmetic in float32 anyway, and a bfloat16
  # MobileFaceNet compiled 2.5x slower and ran slower when the taps stayed in bfloat16 (XLA CPU).
  x = x.astype(jnp.float32)
  weights = kernel[:, :, 0, :].astype(jnp.float32)  # (kh, kw, C)
  if any(lo or hi for lo, hi in padding):
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  height, width = x.shape[1:3]
  out_h = (height - kh) // sh + 1
  out_w = (width - kw) // sw + 1
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f'Kernel {kh}x{kw} is larger than the padded input {height}x{width}.')
  if (height, width) == (kh, kw):
    return jnp.sum(x * weights, axis=(1, 2), keepdims=True).astype(out_dtype)
  out = None
  for i in range(kh):
    for j in range(kw):
      view = x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
      term = view * weights[i, j]
      out = term if out is None else out + term
  return out.astype(out_dtype)


_DEPTHWISE_FNS = {'lax': depthwise_conv_lax, 'shifted': depthwise_conv_shifted}


class DepthwiseConv2D(nn.Module):
  """Depthwise 2-D convolution without bias (one kh x kw filter per input channel).

  Attributes:
    kernel_size: (kh, kw).
    strides: (sh, sw) or an int.
    padding: 'VALID', an int (symmetric) or ((top, bottom), (left, right)).
    impl: 'auto', 'lax' or 'shifted' (see :func:`resolve_depthwise_impl`); all read the same
      ``kernel`` param of shape (kh, kw, 1, C).
    dtype: compute dtype.
    param_dtype: dtype of the kernel.
  """
  kernel_size: tuple[int, int]
  strides: Union[int, tuple[int, int]] = 1
  padding: Padding = 0
  impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    channels = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, channels), self.param_dtype)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    fn = _DEPTHWISE_FNS[resolve_depthwise_impl(self.impl)]
    return fn(x.astype(self.dtype), kernel.astype(self.dtype), strides,
              _explicit_padding(self.padding))


class PReLU(nn.Module):
  """PReLU with one learnable slope per channel (last axis), initialised at 0.25.

  Param: ``negative_slope`` (C,), PyTorch's ``prelu.weight``.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param('negative_slope', nn.initializers.constant(self.init_slope),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(self.dtype)
    return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)


class ConvBlock(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional PReLU; the original's Conv_block / Linear_block.

  Children: ``conv`` (``nn.Conv`` or :class:`DepthwiseConv2D` when ``depthwise``), ``bn``, and
  ``prelu`` when ``activation``.

  Attributes:
    features: output channels (ignored for depthwise: output channels = input channels).
    kernel_size: (kh, kw).
    strides: stride of the convolution.
    padding: 'VALID', an int or explicit pairs (PyTorch-style symmetric padding).
    depthwise: one filter per channel instead of a dense convolution.
    activation: apply PReLU after BatchNorm (Conv_block) or not (Linear_block).
    depthwise_impl: implementation of the depthwise convolution.
    dtype: compute dtype.
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: Padding = 0
  depthwise: bool = False
  activation: bool = True
  depthwise_impl: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.depthwise:
      x = DepthwiseConv2D(self.kernel_size, self.strides, self.padding, impl=self.depthwise_impl,
                          dtype=self.dtype, name='conv')(x)
    else:
      x = nn.Conv(self.features, self.kernel_size, self.strides,
                  padding=_explicit_padding(self.padding), use_bias=False, dtype=self.dtype,
                  name='conv')(x)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn')(x)
    if self.activation:
      x = PReLU(dtype=self.dtype, name='prelu')(x)
    return x


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation of IR-SE: global average pool -> 1x1 conv C->C/reduction (no bias)
  -> ReLU -> 1x1 conv back (no bias) -> sigmoid -> rescale the input channels.

  Children: ``fc1``, ``fc2`` (``nn.Conv`` 1x1), as in the original's SEModule.
  """
  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    gate = jnp.mean(x, axis=(1, 2), keepdims=True)
    gate = nn.Conv(channels // self.reduction, (1, 1), use_bias=False, dtype=self.dtype,
                   name='fc1')(gate)
    gate = nn.relu(gate)
    gate = nn.Conv(channels, (1, 1), use_bias=False, dtype=self.dtype, name='fc2')(gate)
    return x * nn.sigmoid(gate)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of `x` scaled to unit L2 norm, computed in float32 (torch.nn.functional.normalize).

  Args:
    x: (B, D).
    eps: lower bound on the norm, so a zero row stays zero instead of becoming NaN.

  Returns:
    float32 (B, D).
  """
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)
