"""Face-embedding backbones: `create_model(name, ...)` and the input normalisation.

Every model maps float NHWC images (B, 112, 112, 3), normalised by :func:`normalize_images`, to
float32 (B, embedding_size) embeddings of unit L2 norm::

  model = create_model('mobilefacenet')
  variables = model.init(rng, images, train=False)          # {'params', 'batch_stats'}
  emb = model.apply(variables, images, train=False)
  emb, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                             rngs={'dropout': key})

How the layers compute (XLA's kernels, or the ones written for XLA:CPU) is chosen by the backend
when the network is traced (:mod:`multiface_jax.models.kernels`); parameters never depend on it.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multiface_jax.models.iresnet import UNITS_BY_DEPTH, IResNet
from multiface_jax.models.kernels import KERNEL_SETS
from multiface_jax.models.mobilefacenet import MobileFaceNet
from multiface_jax.models.tiny import TinyFaceNet

# name -> (depth, squeeze-and-excitation)
_IR_VARIANTS = {'ir50': (50, False), 'ir100': (100, False), 'ir152': (152, False),
                'ir_se50': (50, True), 'ir_se100': (100, True), 'ir_se152': (152, True)}
MODEL_NAMES = ('mobilefacenet', *_IR_VARIANTS)


def create_model(name: str, *, dtype: Any = jnp.float32, embedding_size: int = 512,
                 kernel_set: str = 'auto', **options: Any) -> nn.Module:
  """Builds a backbone by name.

  Args:
    name: one of ``MODEL_NAMES``.
    dtype: compute dtype (params stay float32; the embedding's BatchNorm and L2 normalisation run
      in float32).
    embedding_size: size of the output embedding.
    kernel_set: 'auto' (by backend), 'xla' or 'xla_cpu' (see :mod:`multiface_jax.models.kernels`).
    **options: backbone-specific: ``dropout_rate`` (default 0.6, IR / IR-SE), ``width``
      (default 1.0, MobileFaceNet and tiny: channels times this).

  Returns:
    An unbound ``flax.linen.Module``; call it as ``model.apply(variables, images, train=...)``.

  Raises:
    ValueError: unknown name or an option the backbone does not take.
  """
  if name == 'mobilefacenet':
    allowed, factory = {'width'}, MobileFaceNet
  elif name == 'tiny':  # tests and smoke runs only; not an architecture of the original
    allowed, factory = {'width'}, TinyFaceNet
  elif name in _IR_VARIANTS:
    depth, use_se = _IR_VARIANTS[name]
    allowed = {'dropout_rate'}
    factory = functools.partial(IResNet, UNITS_BY_DEPTH[depth], use_se=use_se)
  else:
    raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)} (and tiny).')
  unknown = set(options) - allowed
  if unknown:
    raise ValueError(f'Model {name!r} does not take option(s) {sorted(unknown)}; '
                     f'it takes dtype, embedding_size, kernel_set and {sorted(allowed)}.')
  if kernel_set not in KERNEL_SETS:
    raise ValueError(f'Unknown kernel_set {kernel_set!r}; valid: {", ".join(KERNEL_SETS)}.')
  return factory(dtype=dtype, embedding_size=embedding_size, kernel_set=kernel_set, **options)


def normalize_images(images_uint8: jax.Array) -> jax.Array:
  """Maps uint8 pixels to float32 in [-1, 1]: ``(x / 255 - 0.5) / 0.5`` as the original does.

  Args:
    images_uint8: uint8 (..., H, W, C); works on device inside jitted functions.

  Returns:
    float32 array of the same shape.
  """
  x = jnp.asarray(images_uint8).astype(jnp.float32)
  return (x / 255.0 - 0.5) / 0.5


__all__ = ['MODEL_NAMES', 'KERNEL_SETS', 'create_model', 'normalize_images', 'MobileFaceNet',
           'IResNet', 'TinyFaceNet', 'UNITS_BY_DEPTH']
