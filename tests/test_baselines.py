"""The baselines of the demo's table against references written here in numpy and scipy.

Eigenfaces against an SVD, Fisherfaces against the generalised eigenproblem of the scatter
matrices, raw pixels against explicitly built pixel embeddings, and the pretrained SFace on real
ORL faces (the same person closer than two different people).
"""
import os

import numpy as np
import pytest
import scipy.linalg

from multiface_jax.data import orl
from multiface_jax.evaluation import baselines, protocol


def _faces(num_people=6, per_person=8, size=8, seed=0):
  """Random 'people': a random face each, plus per-image noise: uint8 (n, size, size, 3)."""
  rng = np.random.default_rng(seed)
  centres = rng.integers(40, 216, size=(num_people, size, size, 3))
  noise = rng.normal(0, 25, size=(num_people, per_person, size, size, 3))
  images = np.clip(centres[:, None] + noise, 0, 255).astype(np.uint8)
  return images.reshape(-1, size, size, 3), np.repeat(np.arange(num_people), per_person)


def _same_up_to_column_signs(a, b, **tolerance):
  signs = np.sign(np.sum(a * b, axis=0))
  np.testing.assert_allclose(a, b * signs, **tolerance)


def test_eigenfaces_are_the_whitened_projection_onto_the_top_singular_vectors():
  train, labels = _faces()
  test, _ = _faces(seed=1)
  method = baselines.Eigenfaces(components=10).fit(train, labels)
  x = (train.astype(np.float64) / 255 - 0.5).reshape(len(train), -1) / 0.5
  mean = x.mean(0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  y = (test.astype(np.float64) / 255 - 0.5).reshape(len(test), -1) / 0.5
  expected = (y - mean) @ vt[:10].T / (s[:10] / np.sqrt(len(x) - 1))
  _same_up_to_column_signs(method.features(test), expected, rtol=1e-6, atol=1e-8)
  assert method.name == 'eigenfaces (whitened PCA 10)'
  # At most one component fewer than the training images.
  assert baselines.Eigenfaces(components=500).fit(train, labels).components == len(train) - 1


def test_fisherfaces_solve_the_scatter_eigenproblem_after_pca():
  train, labels = _faces(num_people=5, per_person=9)
  test, _ = _faces(num_people=5, per_person=3, seed=2)
  method = baselines.Fisherfaces(components=12).fit(train, labels)
  x = (train.astype(np.float64) / 255 - 0.5).reshape(len(train), -1) / 0.5
  mean = x.mean(0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  reduced = (x - mean) @ vt[:12].T
  classes = np.unique(labels)
  class_means = np.stack([reduced[labels == c].mean(0) for c in classes])
  within = sum((reduced[labels == c] - m).T @ (reduced[labels == c] - m)
               for c, m in zip(classes, class_means)) / (len(x) - len(classes))
  centred = class_means - reduced.mean(0)
  between = (centred.T * np.bincount(labels) / len(x)) @ centred
  values, vectors = scipy.linalg.eigh(between, within)  # v' within v = 1, ascending
  directions = vectors[:, ::-1][:, :len(classes) - 1]
  y = (test.astype(np.float64) / 255 - 0.5).reshape(len(test), -1) / 0.5
  expected = ((y - mean) @ vt[:12].T - reduced.mean(0)) @ directions
  got = method.features(test)
  assert got.shape == (len(test), len(classes) - 1) and values[-1] > values[0]
  # Equal up to each direction's sign and one common scale (the scatter's normalisation), which
  # the protocol's L2 normalisation removes.
  unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
  _same_up_to_column_signs(unit(got), unit(expected), rtol=1e-5, atol=1e-7)
  # PCA keeps at most images - identities dimensions.
  assert baselines.Fisherfaces(components=500).fit(train, labels).components == 45 - 5


def test_raw_pixels_follow_the_protocol_on_flip_summed_pixels():
  rng = np.random.default_rng(9)
  num_pairs = 40
  images = rng.integers(0, 256, size=(2 * num_pairs, 10, 10, 3), dtype=np.uint8)
  issame = np.arange(num_pairs) % 2 == 0
  images[1::2][issame] = images[0::2][issame]  # same pairs: identical pixels, dist 0
  r = baselines.evaluate(baselines.RawPixels(), images, issame, chunk_pairs=7)
  assert r['accuracy_mean'] == 1.0
  pixels = (images.astype(np.float64) / 255 - 0.5) / 0.5
  flat = (pixels + pixels[:, :, ::-1]).reshape(2 * num_pairs, -1)
  expected = protocol.evaluate(flat / np.linalg.norm(flat, axis=1, keepdims=True), issame)
  np.testing.assert_allclose(r['tpr'], expected['tpr'], atol=1e-12)
  assert r['val'] == expected['val'] and r['best_threshold'] == expected['best_threshold']
  with pytest.raises(ValueError, match='do not hold 2 images for each of 40 pairs'):
    baselines.evaluate(baselines.RawPixels(), images[:-1], issame)


def test_sface_puts_the_same_person_closer_than_two_people():
  from multiface_jax.inference import align, detect, images  # pylint: disable=import-outside-toplevel
  root = orl.find_faces()
  detector = detect.YuNet()

  def aligned(person, photo):
    image = images.read_rgb(os.path.join(root, f's{person}', f'{photo}.pgm'))
    return align.align_face(image, detector(image, '')[0].landmarks)

  faces = np.stack([aligned(1, 1), aligned(1, 6), aligned(2, 1), aligned(2, 6)])
  features = baselines.SFace().features(faces)
  assert features.shape == (4, 128)
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  cosine = unit @ unit.T
  assert min(cosine[0, 1], cosine[2, 3]) > max(cosine[0, 2], cosine[0, 3], cosine[1, 2],
                                               cosine[1, 3]) + 0.2
