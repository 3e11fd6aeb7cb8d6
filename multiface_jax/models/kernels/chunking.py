"""Work over a batch split into chunks of images, so that each chunk stays in the CPU's caches.

XLA:CPU reads a whole activation from memory once per reduction over it, and runs a network one
layer at a time over the whole batch. Chunks of a few images keep the data in cache between the
reductions (``sum_over_image_chunks``) and between the layers (``apply_in_chunks``). The
dispatcher in ``kernels/__init__.py`` uses these on CPU only; measured in bench/RESULTS.md.
"""
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Bytes of one input per chunk of the BatchNorm + PReLU backward's sums; 4 MiB and more lost
# most of the gain.
CHUNK_BYTES = 1 << 20
# Images per device per chunk of the eval-mode network (``apply_in_chunks``).
IMAGES_PER_CHUNK = 8


def sum_over_image_chunks(fn: Callable[..., jax.Array], chunk: int, *arrays: jax.Array) -> jax.Array:
  """sum of fn(*slices) over consecutive slices of `chunk` images of `arrays` (batch axis 0).

  A loop over chunk indices that slices the whole arrays, not a scan over a chunk-shaped reshape
  of them (XLA then recomputes an input, e.g. a padded one, in that shape: a second copy). The
  last, shorter chunk of a batch that `chunk` does not divide is added outside the loop.
  """
  batch = arrays[0].shape[0]
  chunk = min(chunk, batch)
  steps, rest = divmod(batch, chunk)
  if steps == 1 and not rest:
    return fn(*arrays)

  def body(step, total):
    start = step * chunk
    return total + fn(*(jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in arrays))

  result = jax.eval_shape(fn, *(a[:chunk] for a in arrays))
  total = jax.lax.fori_loop(0, steps, body, jnp.zeros(result.shape, result.dtype))
  if rest:
    total = total + fn(*(a[steps * chunk:] for a in arrays))
  return total


def images_per_chunk(x: jax.Array, chunk_bytes: int = CHUNK_BYTES) -> int:
  """How many images (slices along axis 0) of `x` fit in `chunk_bytes`, at least 1."""
  return max(1, chunk_bytes // (math.prod(x.shape[1:]) * x.dtype.itemsize))


def apply_in_chunks(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any,
                    images: jax.Array, *, data_devices: int = 1,
                    images_per_chunk: int = IMAGES_PER_CHUNK) -> jax.Array:
  """``apply_fn(variables, images)`` of an eval-mode network, run one chunk of images at a time.

  Chunk s holds images s, s + S, s + 2S, ... of the batch (S chunks), so that a batch sharded over
  `data_devices` devices gives every chunk the same share of each device's images and stays
  sharded. S is the largest divisor of the per-device batch that leaves at least
  `images_per_chunk` images per device in a chunk; where that is 1 the whole batch goes through
  at once. The images must not interact (no batch statistics).

  Returns:
    ``apply_fn(variables, images)``, the same up to float rounding.
  """
  batch = images.shape[0]
  per_device = batch // data_devices
  if per_device * data_devices != batch:
    return apply_fn(variables, images)
  steps = next(s for s in range(max(1, per_device // images_per_chunk), 0, -1)
               if per_device % s == 0)
  if steps == 1:
    return apply_fn(variables, images)
  chunks = images.reshape(batch // steps, steps, *images.shape[1:]).swapaxes(0, 1)
  out = jax.lax.map(lambda chunk: apply_fn(variables, chunk), chunks)
  return out.swapaxes(0, 1).reshape(batch, *out.shape[2:])
