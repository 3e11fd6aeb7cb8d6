"""Training-time image augmentation as TensorFlow ops, drawn per batch from (seed, step).

The published recipe flips at random and does nothing else (``Augment()``). The other fields add
a random similarity transform about the image centre (shift, zoom, rotation; pixels moved in
from outside are black, as around the aligned faces) and random brightness and contrast. Every
random number of batch k comes from a stateless draw seeded by (seed, k), so a resumed stream
augments exactly like the uninterrupted one, and with the default only the flip is drawn: the
images are bit for bit those of a pipeline without this module.

Runs eagerly or inside tf.data alike (``tests/test_input_pipeline.py`` checks both).
"""
import dataclasses
import math

import tensorflow as tf

# Columns of the per-image parameter table that `draw` returns.
_SHIFT_X, _SHIFT_Y, _ZOOM, _ANGLE, _BRIGHTNESS, _CONTRAST = range(6)
_NUM_PARAMS = 6


@dataclasses.dataclass(frozen=True)
class Augment:
  """What is drawn for each training image (all ranges symmetric and uniform).

  Attributes:
    flip: mirror left-right with probability 1/2 (the original's only augmentation).
    shift: largest translation, as a fraction of the image side, in x and in y independently.
    zoom: largest relative change of scale (0.1: the face is scaled by 0.9 to 1.1).
    rotate: largest rotation in degrees.
    brightness: largest added brightness, as a fraction of full scale (255).
    contrast: largest relative change of contrast about the image's mean (0.2: x0.8 to x1.2).
  """
  flip: bool = True
  shift: float = 0.0
  zoom: float = 0.0
  rotate: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0

  def __post_init__(self):
    for name in ('shift', 'zoom', 'rotate', 'brightness', 'contrast'):
      value = getattr(self, name)
      if not 0.0 <= value or (name in ('zoom', 'contrast') and value >= 1.0):
        raise ValueError(f'augment.{name}={value} must be >= 0' +
                         (' and < 1' if name in ('zoom', 'contrast') else ''))

  @property
  def geometric(self) -> bool:
    return bool(self.shift or self.zoom or self.rotate)

  @property
  def photometric(self) -> bool:
    return bool(self.brightness or self.contrast)

  @property
  def flip_only(self) -> bool:
    return not (self.geometric or self.photometric)


def draw(augment: Augment, seed: tf.Tensor, batch_size: tf.Tensor) -> tf.Tensor:
  """The per-image parameters of one batch: float32 (batch_size, 6), in their units.

  Args:
    augment: the ranges.
    seed: int64 (2,) stateless seed, (augmentation seed, step).
    batch_size: images in the batch.

  Returns:
    Columns shift x and y (pixels as a fraction of the side), zoom factor, angle (radians),
    brightness delta (fraction of 255), contrast factor.
  """
  u = tf.random.stateless_uniform([batch_size, _NUM_PARAMS], seed=seed, minval=-1.0, maxval=1.0)
  return tf.stack([
      u[:, _SHIFT_X] * augment.shift,
      u[:, _SHIFT_Y] * augment.shift,
      1.0 + u[:, _ZOOM] * augment.zoom,
      u[:, _ANGLE] * (augment.rotate * math.pi / 180.0),
      u[:, _BRIGHTNESS] * augment.brightness,
      1.0 + u[:, _CONTRAST] * augment.contrast,
  ], axis=1)


def similarity_transform(params: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """The (8,) projective transform (output pixel -> input pixel) of one image's parameters.

  The face is zoomed and rotated about the image centre, then shifted: output = zoom * R(angle)
  (input - centre) + centre + shift, inverted here because TensorFlow samples the input at the
  point each output pixel maps to.
  """
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
  tx, ty = params[_SHIFT_X] * width, params[_SHIFT_Y] * height
  cos, sin = tf.cos(params[_ANGLE]) / params[_ZOOM], tf.sin(params[_ANGLE]) / params[_ZOOM]
  a0, a1, b0, b1 = cos, sin, -sin, cos
  a2 = cx - a0 * (cx + tx) - a1 * (cy + ty)
  b2 = cy - b0 * (cx + tx) - b1 * (cy + ty)
  return tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])


def apply(image: tf.Tensor, params: tf.Tensor, augment: Augment) -> tf.Tensor:
  """One uint8 (h, w, 3) image with its drawn parameters applied (the flip is not part of it).

  Args:
    image: uint8 (h, w, 3).
    params: float32 (6,), a row of :func:`draw`.
    augment: the ranges (which parts to apply).

  Returns:
    uint8 (h, w, 3): bilinear resampling with a black border, then brightness and contrast,
    rounded and clipped to [0, 255].
  """
  if augment.flip_only:
    return image
  height, width = image.shape[0], image.shape[1]
  pixels = tf.cast(image, tf.float32)
  if augment.geometric:
    pixels = tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels[None], transforms=similarity_transform(params, height, width)[None],
        output_shape=[height, width], fill_value=0.0, interpolation='BILINEAR',
        fill_mode='CONSTANT')[0]
  if augment.photometric:
    mean = tf.reduce_mean(pixels)
    pixels = (pixels - mean) * params[_CONTRAST] + mean + params[_BRIGHTNESS] * 255.0
  return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)
