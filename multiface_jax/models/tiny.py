"""A tiny face-embedding backbone for tests and smoke runs.

Same interface and layer conventions as :mod:`multiface_jax.models.mobilefacenet` (NHWC 112x112
input, ConvBlock = conv + BatchNorm + PReLU, a global 7x7 depthwise conv, then ``linear`` ->
``bn`` -> L2-normalise), but only four narrow stride-2 convolutions, so it has ~20k parameters and
compiles in about a second on CPU. Its parameter names follow MobileFaceNet's (``linear``, ``bn``,
``*/conv``, ``*/bn``, ``*/prelu``), so weight-decay groups and checkpoints treat it the same way.

Spatial size 112 -> 56 -> 28 -> 14 -> 7 (``stage_{i}``) -> 1 (``global_dw``).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from multiface_jax.models import kernels, layers

INPUT_SIZE = 112


class TinyFaceNet(nn.Module):
  """Four stride-2 ConvBlocks, a global depthwise conv, Linear, BatchNorm1d, L2-normalise.

  Attributes:
    embedding_size: size of the output embedding.
    widths: channels of the four stride-2 stages.
    width: the stages' channels times this (as MobileFaceNet's ``width``), at least 4.
    kernel_set: kernel set of the whole network (:mod:`multiface_jax.models.kernels`).
    dtype: compute dtype; params and the output are float32.
  """
  embedding_size: int = 512
  widths: Sequence[int] = (8, 16, 16, 32)
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
      raise ValueError(f'TinyFaceNet expects (B, {INPUT_SIZE}, {INPUT_SIZE}, C) images, got '
                       f'{images.shape}.')
    with kernels.use(self.kernel_set):
      x = images
      for i, channels in enumerate(self.widths):
        x = layers.ConvBlock(max(4, round(channels * self.width)), (3, 3), 2, padding=1,
                             dtype=self.dtype, name=f'stage_{i}')(x, train)
      x = layers.ConvBlock(x.shape[-1], (7, 7), 1, padding='VALID', depthwise=True,
                           activation=False, dtype=self.dtype, name='global_dw')(x, train)
      x = x.reshape(x.shape[0], -1)
      x = nn.Dense(self.embedding_size, use_bias=False, dtype=self.dtype, name='linear')(x)
      x = layers.BatchNorm(use_running_average=not train, dtype=jnp.float32,
                           name='bn')(x.astype(jnp.float32))
      return layers.l2_normalize(x)
