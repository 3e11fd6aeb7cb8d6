"""Times the vectorised verification protocol against a straightforward per-threshold loop.

  .venv/bin/python bench/protocol.py [--pairs=6000] [--dim=512] [--repeats=20]

The loop version is the reference algorithm written plainly (one pass over the pairs per threshold,
per fold: 10 x (2 x 400 + 4000) passes). Both run on the same 6,000 LFW-sized pairs of random
512-d unit embeddings whose same-identity pairs are correlated; the script prints both times, the
ratio and the largest difference between the two results.
"""
import argparse
import time

import numpy as np
from scipy import interpolate
from sklearn.model_selection import KFold

from multiface_jax.evaluation import protocol


def loop_evaluate(embeddings, issame, nrof_folds=10, far_target=1e-3):
  """The reference algorithm, one threshold at a time."""
  dist = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1)
  folds = list(KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(len(issame))))

  def rates(threshold, d, same):
    predicted = np.less(d, threshold)
    tp, fp = np.sum(predicted & same), np.sum(predicted & ~same)
    tn, fn = np.sum(~predicted & ~same), np.sum(~predicted & same)
    tpr = 0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / d.size

  thresholds = np.arange(0, 4, 0.01)
  tprs, fprs = np.zeros((nrof_folds, 400)), np.zeros((nrof_folds, 400))
  accuracy = np.zeros(nrof_folds)
  for k, (train, test) in enumerate(folds):
    acc_train = [rates(t, dist[train], issame[train])[2] for t in thresholds]
    best = int(np.argmax(acc_train))
    for j, t in enumerate(thresholds):
      tprs[k, j], fprs[k, j], _ = rates(t, dist[test], issame[test])
    accuracy[k] = rates(thresholds[best], dist[test], issame[test])[2]

  thresholds = np.arange(0, 4, 0.001)
  val = np.zeros(nrof_folds)
  for k, (train, test) in enumerate(folds):
    far_train = np.array([rates(t, dist[train], issame[train])[1] for t in thresholds])
    threshold = 0.0
    if far_train.max() >= far_target:
      # scipy < 1.9's interp1d(kind='slinear'), which today's scipy refuses on repeated values.
      knots = np.r_[far_train[0], far_train, far_train[-1]]
      threshold = interpolate.BSpline(knots, thresholds, 1)(far_target)
    val[k] = rates(threshold, dist[test], issame[test])[0]
  return {'accuracy': accuracy, 'tpr': tprs.mean(0), 'fpr': fprs.mean(0), 'val': val.mean()}


def make_pairs(num_pairs, dim, seed=0):
  rng = np.random.default_rng(seed)
  issame = rng.random(num_pairs) < 0.5
  first = rng.normal(size=(num_pairs, dim))
  second = np.where(issame[:, None], first + 7.0 * rng.normal(size=(num_pairs, dim)),
                    rng.normal(size=(num_pairs, dim)))
  embeddings = np.empty((2 * num_pairs, dim))
  embeddings[0::2], embeddings[1::2] = first, second
  return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), issame


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pairs', type=int, default=6000)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  embeddings, issame = make_pairs(args.pairs, args.dim)

  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    fast = protocol.evaluate(embeddings, issame)
    times.append(time.perf_counter() - start)
  dist = protocol.pair_distances(embeddings)
  dist_times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    protocol.evaluate_distances(dist, issame)
    dist_times.append(time.perf_counter() - start)
  start = time.perf_counter()
  slow = loop_evaluate(embeddings, issame)
  loop_time = time.perf_counter() - start

  worst = max(float(np.max(np.abs(np.asarray(fast[k]) - slow[k]))) for k in slow)
  print(f'{args.pairs} pairs, D={args.dim}: accuracy {100 * fast["accuracy_mean"]:.2f} '
        f'+- {100 * fast["accuracy_std"]:.2f}, VAL@FAR=1e-3 {fast["val"]:.4f}')
  print(f'vectorised evaluate: median {1e3 * np.median(times):.1f} ms, '
        f'min {1e3 * min(times):.1f} ms over {args.repeats} runs')
  print(f'  of which the folds/thresholds/VAL on given distances: median '
        f'{1e3 * np.median(dist_times):.1f} ms (the rest: the ({args.pairs}, {args.dim}) '
        'pair distances)')
  print(f'loop evaluate:       {1e3 * loop_time:.0f} ms (one run)')
  print(f'speed-up:            {loop_time / np.median(times):.0f}x (median)')
  print(f'max |difference|:    {worst:.3g}')


if __name__ == '__main__':
  main()
