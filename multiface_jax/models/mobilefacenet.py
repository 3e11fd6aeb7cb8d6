"""MobileFaceNet of the original MultiFace code (64-channel variant, 112x112 input, NHWC).

Spatial size 112 -> 56 (conv1) -> 28 (conv_23) -> 14 (conv_34) -> 7 (conv_45) -> 1 (conv_6_dw).

Parameter tree (PyTorch state_dict key -> Flax path; BatchNorm ``weight``/``bias`` are Flax
``scale``/``bias`` in ``params``, ``running_mean``/``running_var`` are ``mean``/``var`` in
``batch_stats``; PReLU ``weight`` is ``negative_slope``)::

  conv1.{conv,bn,prelu}                  conv1/{conv,bn,prelu}            3x3 s2 3->64
  conv2_dw.{conv,bn,prelu}               conv2_dw/{conv,bn,prelu}         depthwise 3x3 64
  conv_23.{conv,conv_dw,project}.*       conv_23/{conv,conv_dw,project}/* DepthWise 64->64, x128, s2
  conv_3.model.{i}.{conv,conv_dw,project} conv_3/block_{i}/...            4 residual DepthWise
  conv_34.*                              conv_34/...                      64->128, x256, s2
  conv_4.model.{i}.*                     conv_4/block_{i}/...             6 residual, x256
  conv_45.*                              conv_45/...                      128->128, x512, s2
  conv_5.model.{i}.*                     conv_5/block_{i}/...             2 residual, x256
  conv_6_sep.{conv,bn,prelu}             conv_6_sep/{conv,bn,prelu}       1x1 128->512
  conv_6_dw.{conv,bn}                    conv_6_dw/{conv,bn}              depthwise 7x7 valid
  linear.weight                          linear/kernel                    512->embedding, no bias
  bn.*                                   bn/*                             BatchNorm1d

Kernel layouts: dense conv OIHW -> HWIO ``(kh, kw, in, out)``; depthwise conv ``(C, 1, kh, kw)`` ->
``(kh, kw, 1, C)``; Linear ``(out, in)`` -> ``(in, out)``. The flatten before ``linear`` sees a 1x1
map, so its order needs no permutation.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multiface_jax.models import kernels, layers

INPUT_SIZE = 112


class DepthWise(nn.Module):
  """Inverted bottleneck: 1x1 expand +BN+PReLU, depthwise 3x3 +BN+PReLU, 1x1 project +BN.

  Children ``conv``, ``conv_dw``, ``project`` (each a :class:`layers.ConvBlock`).

  Attributes:
    features: output channels.
    expansion: channels of the expanded (depthwise) stage, the original's ``groups``.
    strides: stride of the depthwise convolution.
    residual: add the input to the output (requires strides 1 and equal channels).
    dtype: compute dtype.
  """
  features: int
  expansion: int
  strides: int = 1
  residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    shortcut = x
    block = functools.partial(layers.ConvBlock, dtype=self.dtype)
    x = block(self.expansion, name='conv')(x, train)
    x = block(self.expansion, (3, 3), self.strides, padding=1, depthwise=True,
              name='conv_dw')(x, train)
    x = block(self.features, activation=False, name='project')(x, train)
    if self.residual:
      x = x + shortcut
    return x


class ResidualStack(nn.Module):
  """`num_blocks` residual :class:`DepthWise` blocks at constant width; children ``block_{i}``."""
  num_blocks: int
  expansion: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      x = DepthWise(x.shape[-1], self.expansion, residual=True, dtype=self.dtype,
                    name=f'block_{i}')(x, train)
    return x


class MobileFaceNet(nn.Module):
  """MobileFaceNet face-embedding backbone.

  Attributes:
    embedding_size: size of the output embedding.
    width: every layer's channels times this, rounded to a multiple of 8 (1.0: the original).
    kernel_set: kernel set of the whole network (:mod:`multiface_jax.models.kernels`).
    dtype: compute dtype; params are float32 and the output is float32.
  """
  embedding_size: int = 512
  width: float = 1.0
  kernel_set: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Embeds a batch of faces.

    Args:
      images: float (B, 112, 112, 3), normalised to [-1, 1].
      train: use batch statistics (and update ``batch_stats`` when it is mutable).

    Returns:
      float32 (B, embedding_size), unit L2 norm per row.
    """
    if images.ndim != 4 or images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      raise ValueError(f'MobileFaceNet expects (B, {INPUT_SIZE}, {INPUT_SIZE}, C) images, got '
                       f'{images.shape}: the 7x7 global depthwise conv fixes the input size.')
    if self.width <= 0:
      raise ValueError(f'MobileFaceNet width must be positive, got {self.width}.')
    c = lambda channels: max(8, round(channels * self.width / 8) * 8)
    with kernels.use(self.kernel_set):
      block = functools.partial(layers.ConvBlock, dtype=self.dtype)
      depthwise = functools.partial(DepthWise, dtype=self.dtype)
      stack = functools.partial(ResidualStack, dtype=self.dtype)

      x = block(c(64), (3, 3), 2, padding=1, name='conv1')(images, train)
      x = block(c(64), (3, 3), 1, padding=1, depthwise=True, name='conv2_dw')(x, train)
      x = depthwise(c(64), c(128), strides=2, name='conv_23')(x, train)
      x = stack(4, c(128), name='conv_3')(x, train)
      x = depthwise(c(128), c(256), strides=2, name='conv_34')(x, train)
      x = stack(6, c(256), name='conv_4')(x, train)
      x = depthwise(c(128), c(512), strides=2, name='conv_45')(x, train)
      x = stack(2, c(256), name='conv_5')(x, train)
      x = block(c(512), name='conv_6_sep')(x, train)
      x = block(c(512), (7, 7), 1, padding='VALID', depthwise=True, activation=False,
                name='conv_6_dw')(x, train)
      x = x.reshape(x.shape[0], -1)
      x = nn.Dense(self.embedding_size, use_bias=False, dtype=self.dtype, name='linear')(x)
      # The embedding's BatchNorm and the normalisation run in float32 whatever the compute dtype.
      x = layers.BatchNorm(use_running_average=not train, dtype=jnp.float32,
                           name='bn')(x.astype(jnp.float32))
      return layers.l2_normalize(x)
