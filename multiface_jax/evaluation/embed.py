"""Embeddings of a verification set: jitted, sharded over devices, flip test-time augmentation.

As insightface's verification ``test``: every image and its horizontal flip go through the network,
the two raw embeddings are summed and L2-normalised, and XNorm is the mean L2 norm of the raw
(per-view) embeddings. The sum and the normalisation happen on the host in float64, as the
reference does them, so that distances (and hence accuracies) match it to the last digit.

The batch has one fixed size: the last partial batch is zero-padded (its padding rows dropped
afterwards), so the network compiles once per set of shapes. With a mesh the batch is split over
the ``data`` axis.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from multiface_jax.models import compiler_options, normalize_images

ApplyFn = Callable[[Any, jax.Array], jax.Array]


# On CPU the network runs over a batch in chunks of about this many images per device, one chunk
# after another, so that a chunk's activations stay in the caches from one layer to the next.
# Measured (2 cores, images/s, interleaved in one process): MobileFaceNet, batch 64, whole batch
# 114, chunks of 8 173, of 4 163, of 2 132, of 1 106; IR-SE50, batch 32 (compute-bound): 8.1
# whole, 8.2 in chunks of 8.
CPU_IMAGES_PER_CHUNK = 8


def apply_in_chunks(apply_fn: ApplyFn, variables: Any, images: jax.Array, *,
                    data_devices: int = 1) -> jax.Array:
  """``apply_fn(variables, images)`` of an eval-mode network, on CPU one chunk of images at a time.

  Chunk s holds images s, s + S, s + 2S, ... of the batch (S chunks), so a batch sharded over
  `data_devices` devices gives every chunk the same share of each device's images and stays
  sharded. S is the largest divisor of the per-device batch that leaves at least
  `CPU_IMAGES_PER_CHUNK` images per device in a chunk; where that is 1, and off CPU, the whole
  batch goes through at once. The images must not interact (no batch statistics).

  Args:
    apply_fn: ``apply_fn(variables, images) -> (B, ...)``.
    variables: its variables.
    images: (B, ...) batch, B a multiple of `data_devices`.
    data_devices: devices the batch is split over.

  Returns:
    ``apply_fn(variables, images)``, the same up to float rounding.
  """
  batch = images.shape[0]
  per_device = batch // data_devices
  if jax.default_backend() != 'cpu' or per_device * data_devices != batch:
    return apply_fn(variables, images)
  steps = next(s for s in range(max(1, per_device // CPU_IMAGES_PER_CHUNK), 0, -1)
               if per_device % s == 0)
  if steps == 1:
    return apply_fn(variables, images)
  chunks = images.reshape(batch // steps, steps, *images.shape[1:]).swapaxes(0, 1)
  out = jax.lax.map(lambda chunk: apply_fn(variables, chunk), chunks)
  return out.swapaxes(0, 1).reshape(batch, *out.shape[2:])


def _embed_views(apply_fn: ApplyFn, variables: Any, images_uint8: jax.Array, flip: bool,
                 data_devices: int = 1) -> jax.Array:
  """(views, B, D) float32 raw embeddings of a uint8 NHWC batch and (if flip) its mirror image."""
  images = normalize_images(images_uint8)
  views = (images, images[:, :, ::-1, :]) if flip else (images,)
  return jnp.stack([
      apply_in_chunks(apply_fn, variables, view, data_devices=data_devices).astype(jnp.float32)
      for view in views])


@functools.cache
def _raw_embeddings() -> Callable[..., jax.Array]:
  """`_embed_views` jitted with the models' compile options for the default backend (built on
  first use, not at import, so that importing does not start a backend)."""
  return jax.jit(_embed_views, static_argnames=('apply_fn', 'flip', 'data_devices'),
                 compiler_options=compiler_options())


@dataclasses.dataclass(frozen=True)
class _HashablePartial:
  """A ``functools.partial`` that compares by value, so a fresh one reuses the compiled code."""
  func: Callable[..., Any]
  args: tuple[Any, ...]
  keywords: tuple[tuple[str, Any], ...]

  def __call__(self, *args):
    return self.func(*self.args, *args, **dict(self.keywords))


def _cache_key(apply_fn: ApplyFn) -> ApplyFn:
  """`apply_fn` itself, or for a partial (``partial(model.apply, train=False)``) its value."""
  if isinstance(apply_fn, functools.partial):
    key = _HashablePartial(apply_fn.func, apply_fn.args, tuple(sorted(apply_fn.keywords.items())))
    try:
      hash(key)
      return key
    except TypeError:  # an unhashable bound argument: fall back to the object's identity
      pass
  return apply_fn


def _place_on_mesh(variables: Any, mesh: Mesh) -> Any:
  """Replicates over `mesh` every leaf not already laid out on exactly its devices."""
  replicated = NamedSharding(mesh, PartitionSpec())
  mesh_devices = set(mesh.devices.flat)

  def place(leaf):
    if isinstance(leaf, jax.Array) and leaf.sharding.device_set == mesh_devices:
      return leaf
    return jax.device_put(leaf, replicated)

  return jax.tree.map(place, variables)


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
  """Rows divided by their L2 norm; all-zero rows stay zero.

  Bit for bit ``sklearn.preprocessing.normalize``, which the reference applies: the same einsum
  for the squared norms (a different summation order would move the last digit).
  """
  norms = np.sqrt(np.einsum('ij,ij->i', x, x))
  norms[norms == 0] = 1.0
  return x / norms[:, np.newaxis]


def extract_embeddings(apply_fn: ApplyFn, variables: Any, images_uint8: np.ndarray, *,
                       batch_size: int, mesh: Mesh | None = None,
                       flip: bool = True) -> tuple[np.ndarray, float]:
  """Embeds images for verification, with flip TTA, in fixed-size (padded) batches.

  Args:
    apply_fn: ``apply_fn(variables, images_float_nhwc) -> (B, D)``, e.g.
      ``functools.partial(model.apply, train=False)``. It is a static argument of the jitted
      function: the same object, or an equal partial of the same module instance's ``apply``,
      reuses the compiled code; a new lambda (or model instance) each call compiles each call.
    variables: the model variables (numpy or jax arrays).
    images_uint8: (n, H, W, 3) uint8 RGB images.
    batch_size: images per device call (global, over all devices of the mesh).
    mesh: optional mesh with a ``data`` axis; batches are sharded over it and batch_size must be
      a multiple of its size. Variables not yet on the mesh are replicated over it.
    flip: add the embedding of the horizontally flipped image before normalising.

  Returns:
    (embeddings float64 (n, D) of unit L2 norm, xnorm: the mean L2 norm of the raw embeddings of
    every view of every image, as insightface reports it).
  """
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.ndim != 4 or images_uint8.dtype != np.uint8 or images_uint8.shape[-1] != 3:
    raise ValueError(f'images must be uint8 (n, H, W, 3), got {images_uint8.dtype} '
                     f'{images_uint8.shape}')
  if len(images_uint8) == 0:
    raise ValueError('no images to embed')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  apply_fn = _cache_key(apply_fn)
  put = jax.device_put
  data_size = 1
  if mesh is not None:
    data_size = mesh.shape['data']
    if batch_size % data_size:
      suggestion = data_size * max(1, batch_size // data_size)
      raise ValueError(f'batch_size {batch_size} is not a multiple of the mesh data axis '
                       f'({data_size} devices): use e.g. {suggestion}')
    variables = _place_on_mesh(variables, mesh)
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec('data')))

  # Dispatch every batch before reading any back so that the host never waits on the device.
  pending = []
  for start in range(0, len(images_uint8), batch_size):
    batch = images_uint8[start:start + batch_size]
    valid = len(batch)
    if valid < batch_size:
      padding = np.zeros((batch_size - valid,) + batch.shape[1:], np.uint8)
      batch = np.concatenate([batch, padding])
    pending.append((_raw_embeddings()(apply_fn, variables, put(batch), flip=flip,
                                      data_devices=data_size), valid))
  raw = np.concatenate([np.asarray(out)[:, :valid] for out, valid in pending], axis=1)
  raw = raw.astype(np.float64)  # (views, n, D)

  xnorm = float(np.mean(np.linalg.norm(raw, axis=-1)))
  return l2_normalize_rows(raw.sum(0)), xnorm
