"""Embeddings of a verification set: jitted, sharded over devices, flip test-time augmentation.

As insightface's verification ``test``: every image and its horizontal flip go through the network,
the two raw embeddings are summed and L2-normalised, and XNorm is the mean L2 norm of the raw
(per-view) embeddings. The sum and the normalisation happen on the host in float64, as the
reference does them, so that distances (and hence accuracies) match it to the last digit.

The batch has one fixed size: the last partial batch is zero-padded (its padding rows dropped
afterwards), so the network compiles once per set of shapes. With a mesh the batch is split over
the ``data`` axis. On CPU the network runs over chunks of a few images at a time
(``models.kernels.apply_in_chunks``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from multiface_jax.models import kernels, normalize_images

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _embed_views(apply_fn: ApplyFn, variables: Any, images_uint8: jax.Array, flip: bool,
                 data_devices: int = 1) -> jax.Array:
  """(views, B, D) float32 raw embeddings of a uint8 NHWC batch and (if flip) its mirror image."""
  images = normalize_images(images_uint8)
  views = (images, images[:, :, ::-1, :]) if flip else (images,)
  return jnp.stack([
      kernels.apply_in_chunks(apply_fn, variables, view, data_devices=data_devices)
      .astype(jnp.float32)
      for view in views])


_raw_embeddings = jax.jit(_embed_views, static_argnames=('apply_fn', 'flip', 'data_devices'))


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


def distinct_images(images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The distinct images of a set, and where each image of the set is among them.

  Verification sets show the same image in many pairs (LFW: ~7,700 distinct of 12,000; a set of
  every pair of a few people: each image many times), and each needs embedding once.

  Returns:
    ``(first, inverse)``: int (k,) the index of each distinct image's first occurrence, and int
    (n,) such that ``images_uint8[first][inverse]`` equals ``images_uint8``.
  """
  images_uint8 = np.ascontiguousarray(images_uint8)
  seen, first, inverse = {}, [], np.empty(len(images_uint8), np.int64)
  for i, image in enumerate(images_uint8):
    key = hashlib.blake2b(memoryview(image).cast('B'), digest_size=16).digest()
    if key not in seen:
      seen[key] = len(first)
      first.append(i)
    inverse[i] = seen[key]
  return np.asarray(first, np.int64), inverse


def raw_embeddings(apply_fn: ApplyFn, variables: Any, images_uint8: np.ndarray, *,
                   batch_size: int, mesh: Mesh | None = None, flip: bool = True) -> np.ndarray:
  """The network's own embeddings of every image and (if `flip`) of its mirror image.

  Arguments as :func:`extract_embeddings`'s. An image that occurs several times is embedded once.

  Returns:
    float32 (views, n, D): views = 2 with flip (the image, then its mirror), else 1.
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

  first, inverse = distinct_images(images_uint8)
  distinct = images_uint8[first]
  # Dispatch every batch before reading any back so that the host never waits on the device.
  pending = []
  for start in range(0, len(distinct), batch_size):
    batch = distinct[start:start + batch_size]
    valid = len(batch)
    if valid < batch_size:
      padding = np.zeros((batch_size - valid,) + batch.shape[1:], np.uint8)
      batch = np.concatenate([batch, padding])
    pending.append((_raw_embeddings(apply_fn, variables, put(batch), flip=flip,
                                    data_devices=data_size), valid))
  embedded = np.concatenate([np.asarray(out)[:, :valid] for out, valid in pending], axis=1)
  return embedded[:, inverse]


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
  raw = raw_embeddings(apply_fn, variables, images_uint8, batch_size=batch_size, mesh=mesh,
                       flip=flip).astype(np.float64)  # (views, n, D)
  xnorm = float(np.mean(np.linalg.norm(raw, axis=-1)))
  return l2_normalize_rows(raw.sum(0)), xnorm
