"""IJB-C-sized pooling + scoring + ROC: the project's vectorised recipe and the reference's loops.

  .venv/bin/python bench/ijb_scale.py                   # 469,375 faces, 23,124 templates, 15.7M pairs
  .venv/bin/python bench/ijb_scale.py --scale=0.1       # a tenth of it

Random 512-d face features (the network's part is not timed), templates of 1-60 faces in 1-6
media, pairs drawn among the templates with IJB-C's count of genuine ones. Times, on the same
arrays, ``evaluation.ijb.recipe`` (image features, template pooling, pair scores, ROC + TAR@FAR)
and the same recipe written as insightface's ``eval_ijbc.py`` writes it (a Python loop over the
templates and their media, scores in batches of 100,000 pairs), and compares their results.
"""
import argparse
import time

import numpy as np

from multiface_jax import cpu_tuning


def synthetic(scale: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  faces, templates_count = int(469_375 * scale), int(23_124 * scale)
  pairs_count, genuine = int(15_658_489 * scale), int(19_557 * scale)
  templates = np.sort(rng.integers(0, templates_count, faces))
  medias = templates * 8 + rng.integers(0, 6, faces)
  features = rng.normal(size=(2, faces, 512)).astype(np.float32)
  faceness = rng.uniform(0.5, 1.0, faces)
  ids = np.unique(templates)
  pairs = rng.choice(ids, (pairs_count, 2))
  labels = np.zeros(pairs_count, np.int64)
  labels[rng.choice(pairs_count, genuine, replace=False)] = 1
  return features, faceness, templates, medias, pairs, labels


def reference(views, faceness, templates, medias, pairs, labels):
  """insightface's eval_ijbc.py, its loops kept (image2template_feature, verification)."""
  from sklearn import metrics, preprocessing  # pylint: disable=import-outside-toplevel
  img_feats = (views[0] + views[1]) * faceness[:, None].astype(np.float32)
  unique_templates = np.unique(templates)
  template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
  for count, uqt in enumerate(unique_templates):
    ind_t = np.where(templates == uqt)
    face_norm_feats = img_feats[ind_t]
    face_medias = medias[ind_t]
    unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
    media_norm_feats = []
    for u, ct in zip(unique_medias, unique_media_counts):
      (ind_m,) = np.where(face_medias == u)
      if ct == 1:
        media_norm_feats += [face_norm_feats[ind_m]]
      else:
        media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
    template_feats[count] = np.sum(np.array(media_norm_feats), axis=0)
  template_norm_feats = preprocessing.normalize(template_feats)
  template2id = np.zeros(max(unique_templates) + 1, dtype=int)
  template2id[unique_templates] = np.arange(len(unique_templates))
  score = np.zeros(len(pairs))
  batch = 100_000
  for start in range(0, len(pairs), batch):
    s = slice(start, start + batch)
    feat1 = template_norm_feats[template2id[pairs[s, 0]]]
    feat2 = template_norm_feats[template2id[pairs[s, 1]]]
    score[s] = np.sum(feat1 * feat2, -1)
  fpr, tpr, _ = metrics.roc_curve(labels, score)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  tars = [float(tpr[min(zip(abs(fpr - far), range(len(fpr))))[1]])
          for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)]
  return score, tars


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--scale', type=float, default=1.0)
  parser.add_argument('--no_reference', action='store_true', help='time the recipe only')
  args = parser.parse_args()
  cpu_tuning.configure()
  from multiface_jax.evaluation.ijb import recipe  # pylint: disable=import-outside-toplevel
  views, faceness, templates, medias, pairs, labels = synthetic(args.scale)
  print(f'{views.shape[1]:,} faces, {len(np.unique(templates)):,} templates, {len(pairs):,} '
        f'pairs ({labels.sum():,} genuine); {time.strftime("%Y-%m-%d %H:%M:%S")}', flush=True)
  timings = {}
  start = time.perf_counter()
  features = recipe.image_features(views, faceness)
  ids, pooled = recipe.pool_templates(features, templates, medias)
  timings['pooling'] = time.perf_counter() - start
  start = time.perf_counter()
  scores = recipe.pair_scores(ids, pooled, pairs)
  timings['scoring'] = time.perf_counter() - start
  start = time.perf_counter()
  rows, _ = recipe.tar_at_far(labels, scores)
  timings['roc'] = time.perf_counter() - start
  total = sum(timings.values())
  print('recipe: ' + ', '.join(f'{k} {v:.1f} s' for k, v in timings.items()) +
        f'; total {total:.1f} s', flush=True)
  if not args.no_reference:
    start = time.perf_counter()
    ref_scores, ref_tars = reference(views, faceness, templates, medias, pairs, labels)
    seconds = time.perf_counter() - start
    tars = [r['tar'] for r in rows]
    print(f'reference loops: {seconds:.1f} s ({seconds / total:.1f}x the recipe); max |score '
          f'difference| {np.max(np.abs(ref_scores - scores)):.1e} (float32 against the '
          f'reference\'s float64); TAR@FAR recipe {tars}, reference {ref_tars}', flush=True)


if __name__ == '__main__':
  main()
