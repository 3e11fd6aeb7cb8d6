"""insightface's IJB recipe on arrays: image features -> templates -> scores -> TAR@FAR, 1:N.

- Image feature: the embedding of the image plus that of its mirror (``flip``), as they are
  ("norm score": their norm carries the face's quality) or L2-normalised (``norm_score=False``),
  times the detector's faceness (``detector_score``).
- Template: the faces of one media averaged (a single face kept as it is), the media summed,
  the sum L2-normalised.
- 1:1: the cosine of the two templates of every pair; the ROC over all pairs; TAR at a FAR is
  the TPR of the ROC point whose FPR is nearest it (ties: the larger TPR).
- 1:N: probes against the gallery; rank-k = the mate among the k most similar; TPIR at FPIR f:
  the share of probes whose mated similarity exceeds the ceil(probes * f)-th largest non-mated
  similarity over all probe x gallery pairs.

Everything is vectorised: pooling is two segment sums over the faces sorted by (template,
media), scoring is one jitted gather-and-dot that loops over chunks of pairs inside XLA.
"""
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import metrics

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (1e-2, 1e-1)
RANKS = (1, 5, 10)
# Pairs scored per step of the loop inside the jitted scorer: bounds its memory (2 x 512 floats
# a pair).
PAIRS_PER_CHUNK = 1 << 16


def image_features(views: np.ndarray, faceness: np.ndarray, *, flip: bool = True,
                   norm_score: bool = True, detector_score: bool = True) -> np.ndarray:
  """Per-face features (n, D) float32 from the raw view embeddings (views, n, D)."""
  features = views[0] + views[1] if flip else views[0].copy()
  features = features.astype(np.float32)
  if not norm_score:
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  if detector_score:
    features *= faceness.astype(np.float32)[:, None]
  return features


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norms == 0, 1.0, norms)


def pool_templates(features: np.ndarray, templates: np.ndarray,
                   medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(template ids sorted, their unit features (T, D) float32) from per-face features."""
  order = np.lexsort((medias, templates))
  keys = np.stack([templates[order], medias[order]], axis=1)
  new_group = np.ones(len(keys), bool)
  new_group[1:] = np.any(keys[1:] != keys[:-1], axis=1)
  group_starts = np.flatnonzero(new_group)
  sums = np.add.reduceat(features[order].astype(np.float64), group_starts, axis=0)
  counts = np.diff(np.append(group_starts, len(keys)))
  media_means = sums / counts[:, None]
  group_templates = keys[group_starts, 0]
  template_starts = np.flatnonzero(np.append(True, group_templates[1:] != group_templates[:-1]))
  pooled = np.add.reduceat(media_means, template_starts, axis=0)
  return group_templates[template_starts], _l2_normalize(pooled).astype(np.float32)


@functools.partial(jax.jit, static_argnames='chunk')
def _chunked_scores(features, first, second, chunk):
  def score(indices):
    a, b = indices
    return jnp.sum(features[a] * features[b], axis=-1)
  return jax.lax.map(score, (first.reshape(-1, chunk), second.reshape(-1, chunk))).reshape(-1)


def template_index(template_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """Positions of `wanted` template ids in the sorted `template_ids` (all must be there)."""
  positions = np.searchsorted(template_ids, wanted)
  positions = np.minimum(positions, len(template_ids) - 1)
  if np.any(template_ids[positions] != wanted):
    missing = wanted[template_ids[positions] != wanted][0]
    raise ValueError(f'template {missing} has no pooled feature')
  return positions


def pair_scores(template_ids: np.ndarray, template_features: np.ndarray,
                pairs: np.ndarray) -> np.ndarray:
  """Cosine similarity (float32 (p,)) of the two templates of every pair."""
  first = template_index(template_ids, pairs[:, 0])
  second = template_index(template_ids, pairs[:, 1])
  count = len(pairs)
  chunk = min(PAIRS_PER_CHUNK, max(count, 1))
  padded = -(-count // chunk) * chunk
  first = np.pad(first, (0, padded - count)).astype(np.int32)
  second = np.pad(second, (0, padded - count)).astype(np.int32)
  scores = _chunked_scores(jnp.asarray(template_features), first, second, chunk=chunk)
  return np.asarray(scores)[:count]


def tar_at_far(labels: np.ndarray, scores: np.ndarray, fars=FARS) -> tuple[list[dict], Any]:
  """TAR at each FAR (insightface's reading of the ROC) and the ROC (fpr, tpr)."""
  fpr, tpr, _ = metrics.roc_curve(labels, scores)
  flipped_fpr, flipped_tpr = fpr[::-1], tpr[::-1]
  rows = []
  for far in fars:
    nearest = int(np.argmin(np.abs(flipped_fpr - far)))  # first of the ties: the larger TPR
    rows.append({'far': far, 'tar': float(flipped_tpr[nearest])})
  return rows, (fpr, tpr)


def identification(probe_features: np.ndarray, probe_subjects: np.ndarray,
                   gallery_features: np.ndarray, gallery_subjects: np.ndarray,
                   fpirs=FPIRS, ranks=RANKS) -> dict[str, Any]:
  """1:N figures of unit probe and gallery features (one gallery template per subject)."""
  order = np.argsort(gallery_subjects)
  if np.any(np.diff(gallery_subjects[order]) == 0):
    raise ValueError('the gallery holds a subject in more than one template')
  mate = np.searchsorted(gallery_subjects[order], probe_subjects)
  mate = np.minimum(mate, len(order) - 1)
  if np.any(gallery_subjects[order][mate] != probe_subjects):
    raise ValueError(f'{int(np.sum(gallery_subjects[order][mate] != probe_subjects))} probes '
                     'have no template of their subject in the gallery')
  mate = order[mate]
  similarity = probe_features @ gallery_features.T  # (probes, gallery)
  mated = similarity[np.arange(len(mate)), mate]
  # Rank of the mate: 1 + gallery templates strictly more similar than it.
  rank = 1 + np.sum(similarity > mated[:, None], axis=1)
  non_mated = similarity.copy()
  non_mated[np.arange(len(mate)), mate] = -np.inf
  needed = [math.ceil(len(mate) * fpir) for fpir in fpirs]
  largest = np.sort(np.partition(non_mated.ravel(), -max(needed))[-max(needed):])[::-1]
  tpir = []
  for fpir, k in zip(fpirs, needed):
    threshold = float(largest[k - 1])
    tpir.append({'fpir': fpir, 'tpir': float(np.mean(mated > threshold)),
                 'threshold': threshold})
  return {'rank': {str(k): float(np.mean(rank <= k)) for k in ranks}, 'tpir_at_fpir': tpir,
          'probes': int(len(mate)), 'gallery': int(len(gallery_subjects))}
