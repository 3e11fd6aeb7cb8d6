"""Multi-sphere margin heads (softmax / ArcFace / CosFace / combined) and their loss.

MultiFace cuts the backbone's 512-d embedding into N contiguous slices ("spheres"); each slice has its
own classifier of shape (D/N, C) whose columns are L2-normalised, each produces margin logits, and the
training loss is the sum over spheres of the mean cross-entropy.

All N classifiers live in ONE param `kernel` of shape (N, D/N, C): the class axis is last so that it can
be sharded over a `model` mesh axis with `PartitionSpec(None, None, 'model')`. Nothing below reduces
over the class axis except the target-cosine pick (a one-hot masked sum, no gather), so the head stays
shard-friendly.

Target logit of class y (c = clip(e . w_y, -1, 1), theta = arccos c), all logits times `scale`:

  softmax   c                                     (NormFace)
  cosface   c - m
  arcface   cos(theta + m) = c cos m - sqrt(1 - c^2) sin m;
            where c <= cos(pi - m): c - m sin m   (the original's fallback)
  combined  cos(m1 theta + m2) - m3               (insightface's combined margin)
            where m1 theta + m2 >= pi: c - d sin d - m3, with d = pi - (pi - m2) / m1

The combined fallback generalises ArcFace's: past theta* = (pi - m2)/m1 the angle m1 theta + m2 leaves
[0, pi] and cos(.) would *increase* with theta again, rewarding a worse embedding. ArcFace replaces the
margin there by a CosFace-style constant equal to the margin's first-order effect at the threshold,
(angular margin) * sin(theta*). For the combined margin the angular margin at theta* is
d = (m1 - 1) theta* + m2 = pi - theta*, and sin(theta*) = sin d, hence the constant d sin d. With
(m1, m2, m3) = (1, m, 0) this is exactly ArcFace's c - m sin m; with (1, 0, m) (CosFace) d = 0 and the
fallback never changes anything; when m1 pi + m2 <= pi (theta* >= pi) the fallback never applies.

Non-target logits are c. Labels out of range cannot raise inside jit: an out-of-range label simply
gets no margin and a cross-entropy against a zero target logit. The input pipeline validates labels
against `num_classes` on the host.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KINDS = ('softmax', 'arcface', 'cosface', 'combined')
NORMALIZATIONS = ('global', 'per_sphere')

# Keeps the normalisation of an all-zero vector finite (a zero slice under 'per_sphere').
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  """`x` scaled to unit L2 norm along `axis`; an all-zero vector stays zero."""
  sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sum_sq, _NORM_EPS))


def unit_columns_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """The original's classifier init: uniform(-1, 1), then every column renormalised to unit norm.

  Args:
    key: PRNG key.
    shape: (..., D, C); columns are taken over the second-to-last axis.
    dtype: param dtype.

  Returns:
    An array of `shape` whose columns `w[..., :, c]` have unit L2 norm.
  """
  kernel = jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
  return l2_normalize(kernel, axis=-2)


def split_spheres(embeddings: jax.Array, num_spheres: int, normalization: str = 'global') -> jax.Array:
  """Cuts (B, D) embeddings into N contiguous slices, float32 (N, B, D/N).

  Args:
    embeddings: (B, D) embeddings, any float dtype (cast up to float32).
    num_spheres: N; must divide D.
    normalization: 'global' keeps the slices of the (already unit) embedding as they are, so each has
      norm < 1 (the original); 'per_sphere' L2-normalises every slice onto its own unit sphere.

  Returns:
    float32 (N, B, D/N).
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got {normalization!r}')
  if embeddings.ndim != 2:
    raise ValueError(f'embeddings must be (batch, dim), got shape {embeddings.shape}')
  batch, dim = embeddings.shape
  if dim % num_spheres:
    raise ValueError(f'embedding size {dim} is not divisible by num_spheres={num_spheres}')
  slices = embeddings.astype(jnp.float32).reshape(batch, num_spheres, dim // num_spheres)
  slices = jnp.transpose(slices, (1, 0, 2))
  if normalization == 'per_sphere':
    slices = l2_normalize(slices, axis=-1)
  return slices


def _sin_from_cos(cos: jax.Array) -> jax.Array:
  """sqrt(1 - c^2) with an exact value and a finite (zero) gradient at |c| = 1.

  The double `where` keeps sqrt's infinite derivative at 0 out of the backward pass: a plain
  `sqrt(clip(1 - c^2, 0))` gives inf * 0 = NaN gradients for an embedding equal to a weight column.
  """
  one_minus_sq = jnp.clip(1.0 - jnp.square(cos), 0.0, 1.0)
  positive = one_minus_sq > 0.0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, one_minus_sq, 1.0)), 0.0)


def _margin_target(cos: jax.Array, kind: str, margin: float,
                   combined_margins: tuple[float, float, float]) -> jax.Array:
  """Target cosine with the margin applied (before scaling); `cos` already clipped to [-1, 1]."""
  if kind == 'softmax':
    return cos
  if kind == 'cosface':
    return cos - margin
  if kind == 'arcface':
    with_margin = cos * math.cos(margin) - _sin_from_cos(cos) * math.sin(margin)
    return jnp.where(cos <= math.cos(math.pi - margin), cos - margin * math.sin(margin), with_margin)
  if kind == 'combined':
    m1, m2, m3 = combined_margins
    # atan2 instead of arccos: its gradient stays finite at |c| = 1 once sin is guarded.
    theta = jnp.arctan2(_sin_from_cos(cos), cos)
    with_margin = jnp.cos(m1 * theta + m2) - m3
    threshold_angle = (math.pi - m2) / m1
    if threshold_angle >= math.pi:
      return with_margin
    past_pi = math.pi - threshold_angle
    fallback = cos - past_pi * math.sin(past_pi) - m3
    return jnp.where(cos <= math.cos(threshold_angle), fallback, with_margin)
  raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')


def margin_logits(cos: jax.Array, is_target: jax.Array, *, kind: str, scale: float,
                  margin: float, combined_margins: tuple[float, float, float] = (1.0, 0.5, 0.0),
                  straight_through: bool = False) -> jax.Array:
  """Scaled logits from cosines (B, C) with the margin on each row's target column.

  Args:
    cos: float32 (B, C) cosines, clipped to [-1, 1].
    is_target: bool (B, C), True at each row's label (at most one per row; none: no margin).
    kind, scale, margin, combined_margins, straight_through: as :class:`MultiSphereHead`'s.

  Returns:
    float32 (B, C): ``scale * cos`` with the target columns replaced by the margin target.
  """
  target_cos = jnp.sum(jnp.where(is_target, cos, 0.0), axis=-1)
  target = _margin_target(target_cos, kind, margin, combined_margins)
  if straight_through:
    target = target_cos + jax.lax.stop_gradient(target - target_cos)
  return scale * jnp.where(is_target, target[:, None], cos)


class MultiSphereHead(nn.Module):
  """N margin classifiers, one per embedding slice, vmapped over the sphere axis.

  N = 1 is the plain single-sphere head. Call as `head.apply(params, embeddings, labels)`.

  Attributes:
    num_classes: C.
    num_spheres: N; must divide the embedding size.
    kind: 'softmax' | 'arcface' | 'cosface' | 'combined'.
    scale: s, multiplies every logit.
    margin: m for 'arcface' and 'cosface' (ignored by 'softmax' and 'combined').
    combined_margins: (m1, m2, m3) for 'combined': target cos(m1 theta + m2) - m3.
    normalization: 'global' (slices of the unit embedding, the original) or 'per_sphere'.
    straight_through: arcface_torch's gradient: the margin is added under stop_gradient, so the target
      logit's gradient is that of s * c (value unchanged). Applies to every kind.
    precision: matmul precision of e . W; 'highest' keeps the cosines float32 on accelerators whose
      default would use TF32/bf16 passes. None = the backend default (faster, less precise).
  """
  num_classes: int
  num_spheres: int = 1
  kind: str = 'arcface'
  scale: float = 64.0
  margin: float = 0.5
  combined_margins: tuple[float, float, float] = (1.0, 0.5, 0.0)
  normalization: str = 'global'
  straight_through: bool = False
  precision: str | None = 'highest'

  def _check_attributes(self):
    if self.kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {self.kind!r}')
    if self.num_spheres < 1:
      raise ValueError(f'num_spheres must be >= 1, got {self.num_spheres}')
    if self.kind == 'combined':
      m1, m2, _ = self.combined_margins
      if m1 <= 0 or not 0 <= m2 < math.pi:
        raise ValueError(f'combined_margins (m1, m2, m3) need m1 > 0 and 0 <= m2 < pi, '
                         f'got {self.combined_margins}')

  @nn.compact
  def __call__(self, embeddings: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """Margin logits of every sphere.

    Args:
      embeddings: (B, D) backbone embeddings (unit norm for 'global'), any float dtype.
      labels: int (B,) class ids in [0, num_classes), or None for the plain scaled cosines.

    Returns:
      float32 logits (N, B, C); the target class carries the margin when labels are given.
    """
    self._check_attributes()
    slices = split_spheres(embeddings, self.num_spheres, self.normalization)
    if labels is not None and labels.shape != embeddings.shape[:1]:
      raise ValueError(f'labels must be ({embeddings.shape[0]},) like the batch, got {labels.shape}')
    kernel = self.param('kernel', unit_columns_init,
                        (self.num_spheres, slices.shape[-1], self.num_classes), jnp.float32)

    def cosines(slice_bd, kernel_dc):
      kernel_dc = l2_normalize(kernel_dc, axis=0)
      # |e . w| <= 1 already; the clip only removes rounding past +-1 before arccos-like maths.
      return jnp.clip(jnp.dot(slice_bd, kernel_dc, precision=self.precision), -1.0, 1.0)

    def sphere_logits(slice_bd, kernel_dc):
      cos = cosines(slice_bd, kernel_dc)
      if labels is None:
        return self.scale * cos
      is_target = labels[:, None] == jnp.arange(self.num_classes)[None, :]
      return margin_logits(cos, is_target, kind=self.kind, scale=self.scale, margin=self.margin,
                           combined_margins=self.combined_margins,
                           straight_through=self.straight_through)

    return jax.vmap(sphere_logits)(slices, kernel)


def _check_logits_labels(logits: jax.Array, labels: jax.Array):
  if logits.ndim != 3 or labels.shape != logits.shape[1:2]:
    raise ValueError(f'expected logits (N, B, C) and labels (B,), got {logits.shape} and {labels.shape}')


def multi_sphere_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum over spheres of the mean softmax cross-entropy, in float32.

  Args:
    logits: (N, B, C) head output.
    labels: int (B,) class ids.

  Returns:
    (total, per_sphere): scalar sum over spheres and (N,) mean cross-entropy of each sphere.
  """
  _check_logits_labels(logits, labels)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # One-hot masked sum rather than a gather: stays local when the class axis is sharded.
  is_target = labels[:, None] == jnp.arange(logits.shape[-1])[None, :]
  nll = -jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
  per_sphere = jnp.mean(nll, axis=-1)
  return jnp.sum(per_sphere), per_sphere


def sphere_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 training accuracy of each sphere, float32 (N,), for logging.

  Args:
    logits: (N, B, C) head output (with or without margin).
    labels: int (B,) class ids.

  Returns:
    float32 (N,) fraction of the batch whose argmax is the label.
  """
  _check_logits_labels(logits, labels)
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels[None, :], axis=-1, dtype=jnp.float32)
