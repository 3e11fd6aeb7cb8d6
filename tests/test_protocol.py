"""The verification protocol against hand-computed answers and an independent loop version."""
import numpy as np
import pytest
from scipy import interpolate
from sklearn.model_selection import KFold

from multiface_jax.evaluation import protocol


# --- An independent, deliberately plain implementation: one pass per threshold per fold. ---------

def _scipy_lt_1_9_slinear(x, y, x_new):
  """What `interp1d(x, y, kind='slinear')(x_new)` returned before scipy 1.9 rejected repeated x.

  interp1d stably sorted x, then `make_interp_spline(k=1)` returned
  `BSpline(r_[x[0], x, x[-1]], y, 1)`; BSpline still accepts repeated knots, so build it directly.
  """
  order = np.argsort(x, kind='mergesort')
  x, y = x[order], y[order]
  if x_new < x[0] or x_new > x[-1]:
    raise ValueError('out of bounds')
  return interpolate.BSpline(np.r_[x[0], x, x[-1]], y, 1)(x_new)


def _loop_reference(dist, issame, nrof_folds=10, far_target=1e-3):
  issame = np.asarray(issame, dtype=bool)
  folds = list(KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(len(dist))))

  def counts(threshold, d, same):
    predicted = np.less(d, threshold)
    tp = np.sum(predicted & same)
    fp = np.sum(predicted & ~same)
    tn = np.sum(~predicted & ~same)
    fn = np.sum(~predicted & same)
    return tp, fp, tn, fn

  thresholds = np.arange(0, 4, 0.01)
  tprs = np.zeros((nrof_folds, len(thresholds)))
  fprs = np.zeros((nrof_folds, len(thresholds)))
  accuracy = np.zeros(nrof_folds)
  best_thresholds = np.zeros(nrof_folds)
  for k, (train, test) in enumerate(folds):
    acc_train = np.zeros(len(thresholds))
    for j, threshold in enumerate(thresholds):
      tp, _, tn, _ = counts(threshold, dist[train], issame[train])
      acc_train[j] = float(tp + tn) / len(train)
    best = np.argmax(acc_train)
    best_thresholds[k] = thresholds[best]
    for j, threshold in enumerate(thresholds):
      tp, fp, tn, fn = counts(threshold, dist[test], issame[test])
      tprs[k, j] = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
      fprs[k, j] = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    tp, _, tn, _ = counts(thresholds[best], dist[test], issame[test])
    accuracy[k] = float(tp + tn) / len(test)

  thresholds = np.arange(0, 4, 0.001)
  val, far = np.zeros(nrof_folds), np.zeros(nrof_folds)
  for k, (train, test) in enumerate(folds):
    far_train = np.zeros(len(thresholds))
    for j, threshold in enumerate(thresholds):
      _, fp, tn, _ = counts(threshold, dist[train], issame[train])
      far_train[j] = float(fp) / float(fp + tn)
    threshold = 0.0
    if np.max(far_train) >= far_target:
      threshold = _scipy_lt_1_9_slinear(far_train, thresholds, far_target)
    tp, fp, tn, fn = counts(threshold, dist[test], issame[test])
    val[k] = float(tp) / float(tp + fn)
    far[k] = float(fp) / float(fp + tn)
  return dict(accuracy=accuracy, best_thresholds=best_thresholds, tpr=np.mean(tprs, 0),
              fpr=np.mean(fprs, 0), val=np.mean(val), val_std=np.std(val), far=np.mean(far))


def _assert_matches_loop(result, reference):
  for key, expected in reference.items():
    np.testing.assert_allclose(result[key], expected, rtol=0, atol=1e-12, err_msg=key)
  assert result['accuracy_mean'] == pytest.approx(np.mean(reference['accuracy']), abs=1e-12)
  assert result['accuracy_std'] == pytest.approx(np.std(reference['accuracy']), abs=1e-12)


def _unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- Known answers. ------------------------------------------------------------------------------

def test_hand_computed_two_folds():
  # Fold 0 = pairs 0-2, fold 1 = pairs 3-5. Fold 0 trains on (0.205 S, 0.705 D, 0.405 D): first
  # perfect threshold 0.21; on its test fold 0.305 S is then rejected -> 2/3. Fold 1 trains on
  # (0.105 S, 0.505 D, 0.305 S): first perfect threshold 0.31, test fold all right -> 1.
  dist = np.array([0.105, 0.505, 0.305, 0.205, 0.705, 0.405])
  issame = np.array([True, False, True, True, False, False])
  r = protocol.evaluate_distances(dist, issame, nrof_folds=2)
  np.testing.assert_allclose(r['accuracy'], [2 / 3, 1.0])
  assert r['accuracy_mean'] == pytest.approx(5 / 6)
  assert r['accuracy_std'] == pytest.approx(1 / 6)
  np.testing.assert_allclose(r['best_thresholds'], [0.21, 0.31])
  # At threshold 0.21: fold 0 accepts 1 of 2 same pairs, fold 1 its only one.
  assert r['tpr'][21] == pytest.approx(0.75)
  assert r['fpr'][21] == 0.0
  # VAL: fold 0's training FAR jumps 0 -> 1/2 past 0.405, interpolated at 1e-3:
  # 0.405 * (1 - 2e-3) + 0.406 * 2e-3 = 0.405002 (same pairs 0.105, 0.305 accepted, 0.505 not);
  # fold 1's jumps 0 -> 1 past 0.505: 0.505001, which also accepts the different pair at 0.405.
  np.testing.assert_allclose(r['val_thresholds'], [0.405002, 0.505001], rtol=0, atol=1e-12)
  assert (r['val'], r['val_std'], r['far']) == (1.0, 0.0, pytest.approx(0.25))


def test_perfectly_separable():
  # Same pairs identical (dist 0), different pairs orthogonal (dist exactly 2).
  rng = np.random.default_rng(0)
  num_pairs, dim = 600, 64
  basis = np.eye(dim)
  issame = rng.random(num_pairs) < 0.5
  rows = []
  for i, same in enumerate(issame):
    a = basis[i % dim]
    rows += [a, a if same else basis[(i + 1) % dim]]
  r = protocol.evaluate(np.stack(rows), issame)
  np.testing.assert_array_equal(r['accuracy'], np.ones(10))
  assert (r['accuracy_mean'], r['accuracy_std']) == (1.0, 0.0)
  # The first threshold above 0 already separates: 0.01.
  np.testing.assert_allclose(r['best_thresholds'], 0.01)
  assert r['tpr'][0] == 0.0 and np.all(r['tpr'][1:] == 1.0)
  assert np.all(r['fpr'][r['thresholds'] <= 2.0] == 0.0) and np.all(r['fpr'][-10:] == 1.0)
  # The reference's VAL quirk: training FAR is 0 up to threshold 2.0 and 1 from 2.001, so the
  # interpolated threshold is 2.0 * 0.999 + 2.001 * 0.001 = 2.000001 > 2: every pair is accepted.
  np.testing.assert_allclose(r['val_thresholds'], 2.000001, rtol=0, atol=1e-12)
  assert (r['val'], r['far']) == (1.0, 1.0)


def test_all_ties():
  # Every embedding equal: dist 0 everywhere. Threshold 0 rejects all pairs, any other accepts all;
  # with balanced folds both score 1/2 and the first (threshold 0) wins.
  issame = np.tile([True, False], 300)
  embeddings = np.tile(_unit_rows(np.ones((1, 8))), (1200, 1))
  r = protocol.evaluate(embeddings, issame)
  np.testing.assert_array_equal(r['best_thresholds'], np.zeros(10))
  np.testing.assert_array_equal(r['accuracy'], np.full(10, 0.5))
  assert r['tpr'][0] == 0.0 and np.all(r['tpr'][1:] == 1.0)
  np.testing.assert_array_equal(r['tpr'], r['fpr'])
  # FAR jumps 0 -> 1 at the second VAL threshold: 0 * 0.999 + 0.001 * 0.001.
  np.testing.assert_allclose(r['val_thresholds'], 1e-6, rtol=0, atol=1e-15)
  assert (r['val'], r['far']) == (1.0, 1.0)


def test_more_different_pairs_in_training_folds_picks_threshold_zero():
  # All tied, 2 same / 8 different per fold: rejecting everything (threshold 0) is best.
  issame = np.tile([True, True] + [False] * 8, 10)
  r = protocol.evaluate_distances(np.full(100, 0.5), issame)
  np.testing.assert_array_equal(r['best_thresholds'], np.zeros(10))
  np.testing.assert_allclose(r['accuracy'], 0.8)


def test_random_embeddings_are_at_chance():
  rng = np.random.default_rng(1)
  embeddings = _unit_rows(rng.normal(size=(12000, 128)))
  issame = rng.random(6000) < 0.5
  r = protocol.evaluate(embeddings, issame)
  assert 0.47 < r['accuracy_mean'] < 0.53
  # Random unit vectors in 128-d: dist concentrates around 2, so does every chosen threshold
  # (or 0 / just above the largest distance, which accept none / all).
  assert np.all(np.abs(r['fpr'] - r['tpr']) < 0.05)


# --- Equality with the loop implementation. ------------------------------------------------------

@pytest.mark.parametrize('num_pairs, nrof_folds, dtype', [
    (6000, 10, np.float64),
    (1007, 10, np.float32),  # uneven folds: the first 7 hold one extra pair
    (333, 3, np.float64),
])
def test_matches_loop_on_random_embeddings_with_ties(num_pairs, nrof_folds, dtype):
  rng = np.random.default_rng(num_pairs)
  # Coarsely quantised embeddings give many exactly repeated distances; copies give dist 0.
  raw = rng.integers(-1, 2, size=(2 * num_pairs, 4)).astype(np.float64) + 0.5
  embeddings = _unit_rows(raw)
  copies = rng.random(num_pairs) < 0.2
  embeddings[1::2][copies] = embeddings[0::2][copies]
  embeddings = embeddings.astype(dtype)
  # Labels correlate with distance so the thresholds (and the VAL interpolation) are non-trivial.
  dist = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1).astype(np.float64)
  issame = rng.random(num_pairs) < np.exp(-dist)
  assert len(np.unique(dist)) < num_pairs / 3

  result = protocol.evaluate(embeddings, issame, nrof_folds=nrof_folds)
  _assert_matches_loop(result, _loop_reference(dist, issame, nrof_folds))


def test_matches_loop_when_distances_sit_on_the_thresholds():
  # Distances drawn from both threshold grids test `dist < threshold` at equality.
  rng = np.random.default_rng(7)
  grid = np.concatenate([protocol.ROC_THRESHOLDS, protocol.VAL_THRESHOLDS[:1500]])
  dist = rng.choice(grid, size=2000)
  issame = rng.random(2000) < np.clip(1.2 - dist, 0.02, 0.98)
  _assert_matches_loop(protocol.evaluate_distances(dist, issame), _loop_reference(dist, issame))


def test_fold_bounds_follow_kfold():
  for num_pairs, num_folds in [(6000, 10), (1007, 10), (10, 10), (23, 4)]:
    bounds = protocol.fold_bounds(num_pairs, num_folds)
    expected = [test[0] for _, test in KFold(num_folds).split(np.arange(num_pairs))] + [num_pairs]
    np.testing.assert_array_equal(bounds, expected)


def test_slinear_interp_matches_scipy():
  rng = np.random.default_rng(3)
  # Strictly increasing x: the modern interp1d agrees.
  x = np.r_[0.0, np.cumsum(rng.random(20))]
  y = np.sort(rng.random(21))
  for x_new in [0.0, x[5], 0.5 * (x[3] + x[4]), x[-1]]:
    expected = interpolate.interp1d(x, y, kind='slinear')(x_new)
    assert protocol.slinear_interp(x, y, x_new) == pytest.approx(float(expected), abs=1e-15)
  # Repeated x (a FAR curve): the pre-1.9 behaviour, including the zero at a repeated maximum.
  x = np.array([0.0, 0.0, 0.0, 0.001, 0.001, 0.004, 0.004])
  y = np.arange(7) * 0.1
  for x_new in [0.0, 0.0005, 0.001, 0.002, 0.004]:
    assert protocol.slinear_interp(x, y, x_new) == pytest.approx(
        float(_scipy_lt_1_9_slinear(x, y, x_new)), abs=1e-15)
  assert protocol.slinear_interp(x, y, 0.0005) == pytest.approx(0.25)
  assert protocol.slinear_interp(x, y, 0.004) == 0.0
  with pytest.raises(ValueError, match='outside'):
    protocol.slinear_interp(x, y, 0.005)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match='two per issame'):
    protocol.evaluate(np.zeros((10, 4)), np.zeros(4, bool))
  with pytest.raises(ValueError, match=r'\(2P, D\)'):
    protocol.evaluate(np.zeros((9, 4)), np.zeros(4, bool))
  with pytest.raises(ValueError, match='folds'):
    protocol.evaluate(np.zeros((10, 4)), np.zeros(5, bool))
  with pytest.raises(ValueError, match='booleans'):
    protocol.evaluate_distances(np.zeros(20), np.full(20, 2))


def test_single_fold_trains_on_everything():
  dist = np.array([0.105, 0.505, 0.305, 0.205, 0.705, 0.405])
  issame = np.array([True, False, True, True, False, False])
  r = protocol.evaluate_distances(dist, issame, nrof_folds=1)
  np.testing.assert_allclose(r['best_thresholds'], [0.31])
  np.testing.assert_allclose(r['accuracy'], [1.0])
