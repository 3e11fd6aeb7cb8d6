"""IR and IR-SE backbones (improved ResNet of ArcFace) at depths 50, 100 and 152, NHWC, 112x112.

Four stages of widths 64, 128, 256, 512; the first unit of each stage has stride 2, so the map goes
112 (input_layer) -> 56 -> 28 -> 14 -> 7.

Parameter tree (PyTorch state_dict key -> Flax path; BatchNorm ``weight``/``bias`` are Flax
``scale``/``bias`` in ``params``, ``running_mean``/``running_var`` are ``mean``/``var`` in
``batch_stats``; PReLU ``weight`` is ``negative_slope``)::

  input_layer.0 (conv 3x3 3->64)   input_layer/conv
  input_layer.1 (BatchNorm2d)      input_layer/bn
  input_layer.2 (PReLU)            input_layer/prelu
  body.{i}.shortcut_layer.0 / .1   body_{i}/shortcut_layer/conv, /bn  (only when in != depth;
                                   otherwise the shortcut is a 1x1 max-pool: x[:, ::s, ::s])
  body.{i}.res_layer.0 (BN in)     body_{i}/res_layer/bn1
  body.{i}.res_layer.1 (3x3 s1)    body_{i}/res_layer/conv1
  body.{i}.res_layer.2 (PReLU)     body_{i}/res_layer/prelu
  body.{i}.res_layer.3 (3x3 s)     body_{i}/res_layer/conv2
  body.{i}.res_layer.4 (BN)        body_{i}/res_layer/bn2
  body.{i}.res_layer.5.fc1 / fc2   body_{i}/res_layer/se/fc1, /fc2    (IR-SE only)
  output_layer.0 (BatchNorm2d)     output_layer/bn2d
  output_layer.3 (Linear, bias)    output_layer/linear
  output_layer.4 (BatchNorm1d)     output_layer/bn1d

``body_{i}`` counts units over all stages, as the original's flat ``body`` Sequential does.
Kernel layouts: conv OIHW -> HWIO ``(kh, kw, in, out)``. The flatten before ``output_layer/linear``
is NHWC (index ``(h*7 + w)*512 + c``) where PyTorch's is NCHW (``c*49 + h*7 + w``), so the Linear
weight (512, 25088) maps to ``W.reshape(E, 512, 7, 7).transpose(2, 3, 1, 0).reshape(25088, E)``.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from multiface_jax.models import kernels, layers

INPUT_SIZE = 112
STAGE_WIDTHS = (64, 128, 256, 512)
UNITS_BY_DEPTH = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}


class IRResidual(nn.Module):
  """Residual branch of an IR unit: BN -> conv 3x3 s1 -> PReLU -> conv 3x3 stride -> BN [-> SE].

  Attributes:
    depth: output channels.
    strides: stride of the second convolution.
    use_se: append squeeze-and-excitation (IR-SE).
    dtype: compute dtype.
  """
  depth: int
  strides: int
  use_se: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(layers.Conv2D, self.depth, (3, 3), padding=1, dtype=self.dtype)
    bn = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
    x = bn(name='bn1')(x)
    x = conv(strides=1, name='conv1')(x)
    x = layers.PReLU(dtype=self.dtype, name='prelu')(x)
    x = conv(strides=self.strides, name='conv2')(x)
    x = bn(name='bn2')(x)
    if self.use_se:
      x = layers.SqueezeExcite(reduction=16, dtype=self.dtype, name='se')(x)
    return x


class IRUnit(nn.Module):
  """One IR / IR-SE unit: ``res_layer(x) + shortcut(x)``.

  The shortcut is a 1x1 max-pool of stride `strides` (plain subsampling) when the width does not
  change, else a 1x1 strided conv + BN named ``shortcut_layer``.
  """
  depth: int
  strides: int
  use_se: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if x.shape[-1] == self.depth:
      shortcut = x[:, ::self.strides, ::self.strides, :]
    else:
      shortcut = layers.ConvBlock(self.depth, (1, 1), self.strides, activation=False,
                                  dtype=self.dtype, name='shortcut_layer')(x, train)
    residual = IRResidual(self.depth, self.strides, self.use_se, dtype=self.dtype,
                          name='res_layer')(x, train)
    return residual + shortcut


class OutputLayer(nn.Module):
  """BN2d -> Dropout -> flatten (NHWC) -> Linear (with bias) -> BN1d (float32)."""
  embedding_size: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn2d')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.embedding_size, dtype=self.dtype, name='linear')(x)
    # The embedding's BatchNorm runs in float32 whatever the compute dtype.
    return layers.BatchNorm(use_running_average=not train, dtype=jnp.float32,
                            name='bn1d')(x.astype(jnp.float32))


class IResNet(nn.Module):
  """IR (``use_se=False``) or IR-SE (``use_se=True``) face-embedding backbone.

  Attributes:
    num_units: units per stage, e.g. ``UNITS_BY_DEPTH[50]``.
    use_se: squeeze-and-excitation in every unit.
    embedding_size: size of the output embedding.
    dropout_rate: dropout before the output Linear, active only when ``train``.
    kernel_set: kernel set of the whole network (:mod:`multiface_jax.models.kernels`).
    dtype: compute dtype; params are float32 and the output is float32.
  """
  num_units: Sequence[int]
  use_se: bool = True
  embedding_size: int = 512
  dropout_rate: float = 0.6
  kernel_set: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Embeds a batch of faces.

    Args:
      images: float (B, 112, 112, 3), normalised to [-1, 1].
      train: use batch statistics (updating ``batch_stats`` when mutable) and dropout (needs a
        ``'dropout'`` rng).

    Returns:
      float32 (B, embedding_size), unit L2 norm per row.
    """
    if images.ndim != 4 or images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      raise ValueError(f'IResNet expects (B, {INPUT_SIZE}, {INPUT_SIZE}, C) images, got '
                       f'{images.shape}: the output Linear is sized for a 7x7 map.')
    if len(self.num_units) != len(STAGE_WIDTHS):
      raise ValueError(f'num_units needs {len(STAGE_WIDTHS)} stages, got {self.num_units}.')
    with kernels.use(self.kernel_set):
      x = layers.ConvBlock(64, (3, 3), 1, padding=1, dtype=self.dtype,
                           name='input_layer')(images, train)
      index = 0
      for width, units in zip(STAGE_WIDTHS, self.num_units):
        for unit in range(units):
          x = IRUnit(width, 2 if unit == 0 else 1, self.use_se, dtype=self.dtype,
                     name=f'body_{index}')(x, train)
          index += 1
      x = OutputLayer(self.embedding_size, self.dropout_rate, dtype=self.dtype,
                      name='output_layer')(x, train)
      return layers.l2_normalize(x)
