"""Building blocks shared by the backbones (NHWC, the PyTorch conventions of the original).

Conventions of the original: convolutions have no bias, BatchNorm uses eps 1e-5 and PyTorch
momentum 0.1 (Flax momentum 0.9), PReLU has one learnable slope per channel initialised at 0.25,
and a 3x3 convolution pads 1 pixel on every side (explicit ``((1, 1), (1, 1))``: Flax's ``'SAME'``
pads a stride-2 convolution of an even input on the bottom/right only, which PyTorch never does).

Parameters are float32; ``dtype`` is the compute dtype. The convolutions and the fused BatchNorm +
PReLU of :class:`ConvBlock` run through :mod:`multiface_jax.models.kernels`, which picks their
implementation; the variables are those of Flax's layers (``kernel`` of ``nn.Conv``, separate
``bn`` and ``prelu`` children).
"""
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from multiface_jax.models import kernels

Dtype = Any
Padding = Union[str, int, Sequence[tuple[int, int]]]


def explicit_padding(padding: Padding, ndim: int = 2) -> tuple[tuple[int, int], ...]:
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


class DepthwiseConv2D(nn.Module):
  """Depthwise 2-D convolution without bias (one kh x kw filter per input channel).

  Attributes:
    kernel_size: (kh, kw).
    strides: (sh, sw) or an int.
    padding: 'VALID', an int (symmetric) or ((top, bottom), (left, right)).
    dtype: compute dtype.
    param_dtype: dtype of the kernel.
  """
  kernel_size: tuple[int, int]
  strides: Union[int, tuple[int, int]] = 1
  padding: Padding = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    channels = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, channels), self.param_dtype)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    return kernels.depthwise_conv2d(x.astype(self.dtype), kernel.astype(self.dtype), strides,
                                    explicit_padding(self.padding))


class Conv2D(nn.Module):
  """Dense 2-D convolution without bias, NHWC.

  Reads the same ``kernel`` param (kh, kw, Cin, Cout) as ``flax.linen.Conv(use_bias=False)``.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw) or an int.
    padding: 'VALID', an int (symmetric) or ((top, bottom), (left, right)).
    dtype: compute dtype.
    param_dtype: dtype of the kernel.
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: Union[int, tuple[int, int]] = 1
  padding: Padding = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    return kernels.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), strides,
                          explicit_padding(self.padding))


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over the last axis with PyTorch's eps 1e-5 and momentum 0.1, the
  same variables (params ``scale``, ``bias``; batch_stats ``mean``, ``var``, biased) and the same
  statistics (float32, ``var = max(E[x^2] - E[x]^2, 0)``, running averages not updated by
  ``init``), computed as ``x * a + b`` with per-channel ``a = scale / sqrt(var + eps)`` and
  ``b = bias - mean * a`` (:meth:`affine`).

  Why not Flax's ``(x - mean) * a + bias``: for that form autodiff keeps ``x - mean`` for the
  backward pass, one extra tensor written and read per layer; ``x * a + b`` needs only ``x``,
  which the previous layer already wrote. Mathematically identical; the rounding differs by
  ~|mean| / std ulps.

  Attributes:
    use_running_average: normalise with the running statistics (eval) instead of the batch's.
    momentum: weight of the old running statistics (Flax convention; PyTorch's 0.1 = 0.9 here).
    epsilon: added to the variance.
    dtype: output dtype (default: the input's promoted with float32, as Flax).
    param_dtype: dtype of ``scale`` and ``bias``.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def affine(self, x: jax.Array,
             use_running_average: Optional[bool] = None) -> tuple[jax.Array, jax.Array]:
    """The per-channel (multiplier, shift), float32 (C,), such that BN(x) = x * multiplier + shift.

    Declares the variables and, in training outside ``init``, updates the running statistics.
    """
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    features = (x.shape[-1],)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      x32 = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axes)
      var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    return multiplier, bias.astype(jnp.float32) - mean * multiplier

  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    multiplier, shift = self.affine(x, use_running_average)
    out_dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
    return (x.astype(jnp.float32) * multiplier + shift).astype(out_dtype)


class PReLU(nn.Module):
  """PReLU with one learnable slope per channel (last axis), initialised at 0.25.

  Param: ``negative_slope`` (C,), PyTorch's ``prelu.weight``. Called with ``affine=(multiplier,
  shift)`` (e.g. :meth:`BatchNorm.affine`), it applies PReLU to ``x * multiplier + shift`` as one
  fused operation (``kernels.batchnorm_then_prelu``).
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array,
               affine: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    slope = self.param('negative_slope', nn.initializers.constant(self.init_slope),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(self.dtype)
    if affine is not None:
      return kernels.batchnorm_then_prelu(x, *affine, slope)
    return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)


class ConvBlock(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional PReLU; the original's Conv_block / Linear_block.

  Children: ``conv`` (:class:`Conv2D`, or :class:`DepthwiseConv2D` when ``depthwise``), ``bn``, and
  ``prelu`` when ``activation``.

  Attributes:
    features: output channels (ignored for depthwise: output channels = input channels).
    kernel_size: (kh, kw).
    strides: stride of the convolution.
    padding: 'VALID', an int or explicit pairs (PyTorch-style symmetric padding).
    depthwise: one filter per channel instead of a dense convolution.
    activation: apply PReLU after BatchNorm (Conv_block) or not (Linear_block).
    dtype: compute dtype.
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: Padding = 0
  depthwise: bool = False
  activation: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.depthwise:
      x = DepthwiseConv2D(self.kernel_size, self.strides, self.padding, dtype=self.dtype,
                          name='conv')(x)
    else:
      x = Conv2D(self.features, self.kernel_size, self.strides, self.padding, dtype=self.dtype,
                 name='conv')(x)
    bn = BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn')
    if self.activation:
      return PReLU(dtype=self.dtype, name='prelu')(x, affine=bn.affine(x))
    return bn(x)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation of IR-SE: global average pool -> 1x1 conv C->C/reduction (no bias)
  -> ReLU -> 1x1 conv back (no bias) -> sigmoid -> rescale the input channels.

  Children: ``fc1``, ``fc2`` (1x1 :class:`Conv2D`), as in the original's SEModule.
  """
  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    gate = jnp.mean(x, axis=(1, 2), keepdims=True)
    gate = Conv2D(channels // self.reduction, dtype=self.dtype, name='fc1')(gate)
    gate = nn.relu(gate)
    gate = Conv2D(channels, dtype=self.dtype, name='fc2')(gate)
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
