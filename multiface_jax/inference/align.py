"""Face alignment as the field does it: five landmarks onto the ArcFace template, one warp.

The five points (left eye, right eye, nose tip, left and right mouth corners, as seen in the
image) are mapped onto :data:`ARCFACE_TEMPLATE` by the least-squares similarity transform
(Umeyama 1991: rotation, uniform scale and translation, no reflection), and the image is warped
with it bilinearly, zeros outside (OpenCV's ``warpAffine``). The result is the 112x112 crop that
emore's faces are and the models expect.
"""
import numpy as np

# Where the five landmarks sit in a 112x112 aligned face (insightface's arcface_dst).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)


def template(image_size: int = 112) -> np.ndarray:
  """The template for a square crop of `image_size`: scaled from 112, or for multiples of 128
  scaled from 128 with the 8-pixel x offset insightface uses."""
  if image_size % 112 == 0:
    return ARCFACE_TEMPLATE * (image_size / 112)
  if image_size % 128 == 0:
    ratio = image_size / 128
    return (ARCFACE_TEMPLATE + [8.0, 0.0]) * ratio
  raise ValueError(f'image_size={image_size}: use a multiple of 112 (or of 128).')


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 2x3 matrix of the similarity transform that maps `src` points onto `dst` best.

  Umeyama's least-squares estimate (scikit-image's ``SimilarityTransform.estimate``).

  Args:
    src, dst: (n, 2) float points, n >= 2, not all equal.

  Returns:
    float64 (2, 3) ``[s R | t]`` with ``dst ~ s R src + t``.

  Raises:
    ValueError: the points do not determine a transform (fewer than 2, or all the same).
  """
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
    raise ValueError(f'need two (n >= 2, 2) point arrays, got {src.shape} and {dst.shape}')
  src_mean, dst_mean = src.mean(0), dst.mean(0)
  src_centred, dst_centred = src - src_mean, dst - dst_mean
  variance = np.sum(src_centred**2) / len(src)
  if variance <= 0 or not np.isfinite(variance):
    raise ValueError(f'the landmarks {src.tolist()} coincide: no transform fits them')
  covariance = dst_centred.T @ src_centred / len(src)
  u, singular, vt = np.linalg.svd(covariance)
  signs = np.ones(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map would reflect
    signs[-1] = -1.0
  rotation = u @ np.diag(signs) @ vt
  scale = float(singular @ signs) / variance
  translation = dst_mean - scale * rotation @ src_mean
  return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
  """The aligned square crop of a face.

  Args:
    image: RGB uint8 (H, W, 3).
    landmarks: float (5, 2) in (x, y) pixels: left eye, right eye, nose tip, left and right
      mouth corners (as seen in the image).
    image_size: side of the crop (112 for the models here).

  Returns:
    RGB uint8 (image_size, image_size, 3).
  """
  import cv2  # pylint: disable=import-outside-toplevel  (opencv-python-headless)
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f'image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}')
  landmarks = np.asarray(landmarks, np.float64)
  if landmarks.shape != (5, 2) or not np.all(np.isfinite(landmarks)):
    raise ValueError(f'landmarks must be 5 finite (x, y) points, got {landmarks.tolist()}')
  matrix = similarity_transform(landmarks, template(image_size))
  return cv2.warpAffine(image, matrix, (image_size, image_size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
