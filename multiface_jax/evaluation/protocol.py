"""The face-verification protocol behind every published accuracy (LFW, CFP-FP, AgeDB-30, ...).

Reproduces insightface's ``verification.evaluate`` (facenet's lfw helper) number for number:

* ``dist`` = squared L2 distance of the two (flip-summed, L2-normalised) embeddings of each pair;
  a pair is predicted "same" when ``dist < threshold``.
* Accuracy: thresholds ``arange(0, 4, 0.01)``; 10 contiguous folds (sklearn ``KFold`` without
  shuffle: the first ``P % 10`` folds hold one extra pair). For each fold the threshold with the
  best accuracy on the other nine folds (the first one on ties) is applied to the held-out fold.
  TPR/FPR of the held-out folds at every threshold are averaged over folds (the ROC curve).
* VAL@FAR=1e-3: thresholds ``arange(0, 4, 0.001)``; per fold, the training folds' FAR curve is
  inverted at 1e-3 by ``scipy.interpolate.interp1d(far, thresholds, kind='slinear')`` (threshold 0
  when the FAR never reaches 1e-3), then VAL and FAR are measured on the held-out fold.

Instead of one pass over the pairs per threshold, every pair is binned once by the number of
thresholds at or below its distance (``searchsorted``); a cumulative sum of the per-fold histograms
gives the accepted counts at every threshold. All counts are integers and every ratio is formed the
way the reference forms it, so the results are bit-identical, not merely close.

Two corner cases where the reference has no answer get a defined one here: it raises
ZeroDivisionError when a fold has no same (or no different) pairs, where this code reports VAL (FAR)
0 as it already does for TPR/FPR; and modern scipy (>= 1.9) refuses ``interp1d(kind='slinear')`` on
a FAR curve with repeated values (it always has some), so the published numbers come from the older
scipy semantics that :func:`slinear_interp` reproduces exactly.
"""
from __future__ import annotations

from typing import Any

import numpy as np

ROC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def fold_bounds(num_pairs: int, num_folds: int) -> np.ndarray:
  """Start/stop offsets of sklearn ``KFold(num_folds, shuffle=False)`` test folds.

  Args:
    num_pairs: number of items split into folds.
    num_folds: number of folds (at least 1; 1 means train = test = everything, as insightface's
      ``LFold`` does).

  Returns:
    int array (num_folds + 1,): fold k holds items ``bounds[k]:bounds[k+1]``.
  """
  if num_folds < 1:
    raise ValueError(f'nrof_folds must be >= 1, got {num_folds}')
  if num_pairs < num_folds:
    raise ValueError(f'cannot split {num_pairs} pairs into {num_folds} folds: '
                     'use a larger verification set or fewer folds')
  sizes = np.full(num_folds, num_pairs // num_folds, dtype=np.int64)
  sizes[:num_pairs % num_folds] += 1
  return np.concatenate([[0], np.cumsum(sizes)])


def pair_distances(embeddings: np.ndarray, num_pairs: int | None = None) -> np.ndarray:
  """Squared L2 distance between rows 2i and 2i+1, computed as the reference does, as float64.

  Args:
    embeddings: (2P, D) array; pair i is rows 2i and 2i+1.
    num_pairs: if given, the number of pairs expected (a mismatch raises).

  Returns:
    float64 (P,) distances (summed in the input's dtype, then widened exactly).
  """
  embeddings = np.asarray(embeddings)
  if embeddings.ndim != 2 or embeddings.shape[0] % 2:
    raise ValueError(f'embeddings must be (2P, D) with pair i in rows 2i and 2i+1, got shape '
                     f'{embeddings.shape}')
  if num_pairs is not None and embeddings.shape[0] != 2 * num_pairs:
    raise ValueError(f'{embeddings.shape[0]} embeddings for {num_pairs} pairs: expected '
                     f'{2 * num_pairs} rows (two per issame entry)')
  diff = np.subtract(embeddings[0::2], embeddings[1::2])
  return np.sum(np.square(diff), 1).astype(np.float64)


def _accepted_counts(dist: np.ndarray, issame: np.ndarray, bounds: np.ndarray,
                     thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per fold and class, how many pairs have ``dist < threshold``, at every threshold.

  Returns:
    accepted int64 (F, 2, T) with class 0 = different, 1 = same; totals int64 (F, 2).
  """
  num_folds, num_thresholds = len(bounds) - 1, len(thresholds)
  # Pair i is accepted at threshold j iff j >= first_accepting[i] (NaN sorts last: never accepted).
  first_accepting = np.searchsorted(thresholds, dist, side='right')
  fold = np.repeat(np.arange(num_folds), np.diff(bounds))
  bins = (fold * 2 + issame) * (num_thresholds + 1) + first_accepting
  hist = np.bincount(bins, minlength=num_folds * 2 * (num_thresholds + 1))
  hist = hist.reshape(num_folds, 2, num_thresholds + 1)
  return np.cumsum(hist, axis=-1)[..., :num_thresholds], hist.sum(-1)


def _train_counts(test_counts: np.ndarray) -> np.ndarray:
  """Counts over the other folds (all folds when there is a single one, as insightface's LFold)."""
  if test_counts.shape[0] == 1:
    return test_counts
  return test_counts.sum(0, keepdims=True) - test_counts


def _ratio_or_zero(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """``numerator / denominator`` as floats; 0 where the denominator is 0, as the reference's TPR."""
  numerator, denominator = np.broadcast_arrays(numerator, denominator)
  out = np.zeros(numerator.shape, dtype=np.float64)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


def slinear_interp(x: np.ndarray, y: np.ndarray, x_new: float) -> float:
  """``interp1d(x, y, kind='slinear')(x_new)`` as scipy < 1.9 computed it, duplicates in x included.

  scipy built a degree-1 B-spline with knots ``[x0, x0, x1, ..., xn, xn]`` and coefficients y
  (x stably sorted), located the knot interval with ``find_interval`` (the last interval whose left
  knot is <= x_new, capped at the last one) and evaluated it with de Boor's recursion, which gives 0
  on a zero-length interval. The arithmetic below is that recursion's, operation for operation.

  Args:
    x: non-decreasing float64 (n,), n >= 2 (a FAR curve is non-decreasing, so sorting is identity).
    y: float64 (n,) values at x.
    x_new: point inside [x[0], x[-1]].

  Returns:
    the interpolated value.
  """
  if not x[0] <= x_new <= x[-1]:
    raise ValueError(f'{x_new} is outside the interpolation range [{x[0]}, {x[-1]}]')
  right = min(int(np.searchsorted(x, x_new, side='right')), len(x) - 1)
  x_left, x_right = x[right - 1], x[right]
  if x_right == x_left:
    return 0.0
  w = 1.0 / (x_right - x_left)
  return float(y[right - 1] * (w * (x_right - x_new)) + y[right] * (w * (x_new - x_left)))


def evaluate_distances(dist: np.ndarray, issame: np.ndarray,
                       nrof_folds: int = 10) -> dict[str, Any]:
  """The verification protocol on precomputed pair distances (see the module docstring).

  Args:
    dist: (P,) squared L2 distances of the pairs, in [0, 4] for unit embeddings.
    issame: (P,) bool, whether pair i shows the same identity.
    nrof_folds: number of contiguous folds.

  Returns:
    dict with numpy values:
      accuracy (F,) held-out accuracy of each fold; accuracy_mean, accuracy_std (population
      std, as reported in the tables); best_thresholds (F,) the threshold chosen on each fold's
      training folds and best_threshold their mean; thresholds (T,), tpr (T,), fpr (T,) the
      fold-averaged ROC; val, val_std, far at FAR_TARGET and val_thresholds (F,) the
      interpolated thresholds; num_pairs.
  """
  dist = np.asarray(dist, dtype=np.float64)
  issame = np.asarray(issame)
  if dist.ndim != 1 or issame.shape != dist.shape:
    raise ValueError(f'dist {dist.shape} and issame {issame.shape} must both be (P,)')
  if issame.dtype != np.bool_:
    if not np.isin(issame, (0, 1)).all():
      raise ValueError('issame must hold booleans (or 0/1)')
    issame = issame.astype(np.bool_)
  issame = issame.astype(np.int64)
  bounds = fold_bounds(len(dist), nrof_folds)
  test_sizes = np.diff(bounds)

  # Accuracy and ROC.
  accepted, totals = _accepted_counts(dist, issame, bounds, ROC_THRESHOLDS)
  true_pos, false_pos = accepted[:, 1], accepted[:, 0]
  n_same, n_diff = totals[:, 1:2], totals[:, 0:1]
  correct = true_pos + (n_diff - false_pos)
  train_correct = _train_counts(correct)
  train_sizes = test_sizes if nrof_folds == 1 else len(dist) - test_sizes
  train_accuracy = train_correct / train_sizes[:, None]
  best = np.argmax(train_accuracy, axis=1)
  accuracy = correct[np.arange(nrof_folds), best] / test_sizes
  tpr = np.mean(_ratio_or_zero(true_pos, n_same), 0)
  fpr = np.mean(_ratio_or_zero(false_pos, n_diff), 0)

  # VAL at FAR_TARGET.
  accepted, totals = _accepted_counts(dist, issame, bounds, VAL_THRESHOLDS)
  far_train = _ratio_or_zero(_train_counts(accepted[:, 0]), _train_counts(totals[:, 0:1]))
  val, far, val_thresholds = (np.zeros(nrof_folds) for _ in range(3))
  for k in range(nrof_folds):
    if np.max(far_train[k]) >= FAR_TARGET:
      val_thresholds[k] = slinear_interp(far_train[k], VAL_THRESHOLDS, FAR_TARGET)
    fold = slice(bounds[k], bounds[k + 1])
    accepted_test = dist[fold] < val_thresholds[k]
    same_test = issame[fold].astype(bool)
    val[k] = _ratio_or_zero(np.sum(accepted_test & same_test), np.sum(same_test))
    far[k] = _ratio_or_zero(np.sum(accepted_test & ~same_test), np.sum(~same_test))

  return {
      'accuracy': accuracy,
      'accuracy_mean': float(np.mean(accuracy)),
      'accuracy_std': float(np.std(accuracy)),
      'best_thresholds': ROC_THRESHOLDS[best],
      'best_threshold': float(np.mean(ROC_THRESHOLDS[best])),
      'thresholds': ROC_THRESHOLDS,
      'tpr': tpr,
      'fpr': fpr,
      'val': float(np.mean(val)),
      'val_std': float(np.std(val)),
      'far': float(np.mean(far)),
      'val_thresholds': val_thresholds,
      'num_pairs': len(dist),
  }


def evaluate(embeddings: np.ndarray, issame: np.ndarray, nrof_folds: int = 10) -> dict[str, Any]:
  """Verification accuracy, ROC and VAL@FAR of paired embeddings, as the published tables report.

  Args:
    embeddings: (2P, D) embeddings, pair i in rows 2i and 2i+1; already flip-summed and
      L2-normalised (see ``evaluation.embed``); not renormalised here, like the reference.
    issame: (P,) bool.
    nrof_folds: number of contiguous folds (10 in every published table).

  Returns:
    the dict of :func:`evaluate_distances`.
  """
  issame = np.asarray(issame)
  return evaluate_distances(pair_distances(embeddings, len(issame)), issame, nrof_folds)
