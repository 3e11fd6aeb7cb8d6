"""From faces to embeddings: one object for aligned crops and for raw photos.

  embedder = FaceEmbedder.from_checkpoint('runs/mfn_arcface_n2')   # any checkpoint of the project
  vectors = embedder.embed_aligned(crops_uint8)                # (n, 112, 112, 3) -> (n, 512)
  faces = embedder.embed_photo(read_rgb('me.jpg'))             # detect, align, embed

Embeddings are those the evaluator scores: the image and its mirror go through the network, the
two raw embeddings are summed and L2-normalised; batched, over every local device.
"""
import dataclasses
import functools
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType

from multiface_jax.evaluation import embed
from multiface_jax.inference import align, detect, loading


@dataclasses.dataclass(frozen=True)
class FaceEmbedding:
  """One face of a photo: where it is, its aligned crop and its unit embedding."""
  face: detect.Face
  crop: np.ndarray
  embedding: np.ndarray


def _local_mesh() -> Optional[jax.sharding.Mesh]:
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  return jax.make_mesh((len(devices), 1), ('data', 'model'), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


class FaceEmbedder:
  """Embeds faces with a loaded backbone (``loading.Backbone``).

  Args:
    backbone: the model and its variables.
    batch_size: images per device call (rounded up to a multiple of the local devices).
    detector: finds faces in photos (default: YuNet, created on first use).
  """

  def __init__(self, backbone: loading.Backbone, *, batch_size: int = 64,
               detector: Optional[detect.Detector] = None):
    self.backbone = backbone
    self.mesh = _local_mesh()
    devices = 1 if self.mesh is None else self.mesh.size
    self.batch_size = -(-batch_size // devices) * devices
    self._detector = detector
    # Equal partials of one module compare equal: the embedding compiles once per batch shape.
    self.apply_fn = functools.partial(backbone.model.apply, train=False)

  @classmethod
  def from_checkpoint(cls, path: str, record: Optional[dict] = None, **kwargs) -> 'FaceEmbedder':
    """Loads any checkpoint of the project (see ``loading.load_backbone``)."""
    return cls(loading.load_backbone(path, record), **kwargs)

  @property
  def detector(self) -> detect.Detector:
    if self._detector is None:
      self._detector = detect.YuNet()
    return self._detector

  @property
  def embedding_size(self) -> int:
    return int(self.backbone.record['embedding_size'])

  def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
    """Unit float32 (n, D) embeddings of aligned uint8 (n, 112, 112, 3) RGB crops."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != (112, 112, 3) or crops.dtype != np.uint8:
      raise ValueError(f'aligned crops must be uint8 (n, 112, 112, 3) RGB, got {crops.dtype} '
                       f'{crops.shape}')
    if not len(crops):
      return np.zeros((0, self.embedding_size), np.float32)
    vectors, _ = embed.extract_embeddings(self.apply_fn, self.backbone.variables, crops,
                                          batch_size=self.batch_size, mesh=self.mesh)
    return vectors.astype(np.float32)

  def detect_and_align(self, image: np.ndarray, name: str = '', *,
                       all_faces: bool = False) -> list[tuple[detect.Face, np.ndarray]]:
    """The faces of an RGB uint8 photo (the largest only, unless `all_faces`), each with its
    aligned 112x112 crop; [] when there is none."""
    faces = self.detector(image, name)
    if not all_faces:
      faces = faces[:1]
    return [(face, align.align_face(image, face.landmarks)) for face in faces]

  def embed_photo(self, image: np.ndarray, name: str = '', *,
                  all_faces: bool = False) -> list[FaceEmbedding]:
    """Detects, aligns and embeds the face(s) of one RGB uint8 photo."""
    return self.embed_photos([image], [name], all_faces=all_faces)[0]

  def embed_photos(self, images: Sequence[np.ndarray], names: Optional[Sequence[str]] = None, *,
                   all_faces: bool = False) -> list[list[FaceEmbedding]]:
    """:meth:`embed_photo` for several photos, embedded in batches; one list per photo."""
    names = list(names) if names is not None else [''] * len(images)
    found = [self.detect_and_align(image, name, all_faces=all_faces)
             for image, name in zip(images, names)]
    crops = [crop for faces in found for _, crop in faces]
    vectors = iter(self.embed_aligned(np.stack(crops)) if crops else ())
    return [[FaceEmbedding(face, crop, next(vectors)) for face, crop in faces] for faces in found]


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
  """Cosine of two embeddings (unit vectors: their dot product)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
