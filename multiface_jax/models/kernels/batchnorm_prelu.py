"""BatchNorm followed by PReLU as one operation with a written-out backward pass.

The BatchNorm statistics give a per-channel ``x * multiplier + shift``; PReLU of that is computed
here in float32. Autodiff of the two layers keeps both the BatchNorm output and ``x`` for the
backward pass; this keeps only ``x`` (which the convolution before already wrote) and recomputes
the rest inside the backward's fused loops. Used on every backend; the backward's per-channel sums
loop over chunks of images where the dispatcher asks for it (CPU).
"""
import functools

import jax
import jax.numpy as jnp

from multiface_jax.models.kernels.chunking import sum_over_image_chunks


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def affine_prelu(x: jax.Array, multiplier: jax.Array, shift: jax.Array, slope: jax.Array,
                 images_per_chunk: int) -> jax.Array:
  """PReLU(x * multiplier + shift) with per-channel (last axis) float32 vectors.

  Args:
    x: (B, ..., C) input, any float dtype.
    multiplier, shift: float32 (C,), e.g. from ``layers.BatchNorm.affine``.
    slope: (C,) PReLU slopes.
    images_per_chunk: the backward's sums run over chunks of this many images (the batch size:
      in one pass).

  Returns:
    The activation in the dtype of `x`.
  """
  del images_per_chunk
  y = x.astype(jnp.float32) * multiplier + shift
  return jnp.where(y >= 0, y, slope.astype(jnp.float32) * y).astype(x.dtype)


def _affine_prelu_fwd(x, multiplier, shift, slope, images_per_chunk):
  return (affine_prelu(x, multiplier, shift, slope, images_per_chunk),
          (x, multiplier, shift, slope))


def _affine_prelu_bwd(images_per_chunk, residuals, grad_out):
  x, multiplier, shift, slope = residuals
  axes = tuple(range(x.ndim - 1))
  slope32 = slope.astype(jnp.float32)

  def recomputed(x, grad_out):
    x32 = x.astype(jnp.float32)
    y = x32 * multiplier + shift
    negative = y < 0
    grad_out = grad_out.astype(jnp.float32)
    return x32, y, negative, grad_out, jnp.where(negative, slope32 * grad_out, grad_out)

  def sums(x, grad_out):  # (3, C): the gradients of multiplier, shift and slope
    x32, y, negative, grad_out, grad_y = recomputed(x, grad_out)
    return jnp.stack([jnp.sum(grad_y * x32, axes), jnp.sum(grad_y, axes),
                      jnp.sum(jnp.where(negative, y * grad_out, 0.0), axes)])

  grad_multiplier, grad_shift, grad_slope = sum_over_image_chunks(
      sums, images_per_chunk, x, grad_out)
  grad_y = recomputed(x, grad_out)[-1]
  return ((grad_y * multiplier).astype(x.dtype), grad_multiplier, grad_shift,
          grad_slope.astype(slope.dtype))


affine_prelu.defvjp(_affine_prelu_fwd, _affine_prelu_bwd)
