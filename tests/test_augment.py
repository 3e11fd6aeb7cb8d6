"""Training augmentation (data/augment.py) alone and inside the tf.data pipeline.

The geometric and photometric ops are checked against numpy written here (shifts, rotations and
pixel arithmetic), the pipeline's streams for determinism and resume on the mxnet-written
fixture, and the default (flip only) against the flip draw written out independently.
"""
import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from multiface_jax.data import augment
from multiface_jax.data import convert
from multiface_jax.data import pipeline

EMORE = os.path.join(os.path.dirname(__file__), 'data', 'emore')
STRONG = augment.Augment(shift=0.1, zoom=0.1, rotate=10.0, brightness=0.1, contrast=0.2)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  dst = tmp_path_factory.mktemp('tfrecord') / 'emore'
  convert.convert(EMORE, dst, num_shards=2, seed=0, progress=False)
  return str(dst)


def _params(shift_x=0.0, shift_y=0.0, zoom=1.0, angle=0.0, brightness=0.0, contrast=1.0):
  return tf.constant([shift_x, shift_y, zoom, angle, brightness, contrast], tf.float32)


def _image(height=12, width=12, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_the_identity_transform_leaves_the_image_unchanged():
  image = _image(11, 9)
  out = augment.apply(tf.constant(image), _params(), augment.Augment(shift=0.1))
  np.testing.assert_array_equal(out.numpy(), image)


def test_a_shift_moves_the_pixels_and_fills_black():
  image = _image(10, 12)
  geometric = augment.Augment(shift=0.5)
  right_3 = augment.apply(tf.constant(image), _params(shift_x=3 / 12), geometric).numpy()
  expected = np.zeros_like(image)
  expected[:, 3:] = image[:, :-3]
  np.testing.assert_array_equal(right_3, expected)
  up_2 = augment.apply(tf.constant(image), _params(shift_y=-2 / 10), geometric).numpy()
  expected = np.zeros_like(image)
  expected[:-2] = image[2:]
  np.testing.assert_array_equal(up_2, expected)


def test_a_quarter_turn_is_a_rotation_about_the_centre():
  image = _image(9, 9)
  out = augment.apply(tf.constant(image), _params(angle=np.pi / 2), augment.Augment(rotate=90.0))
  # output = R(90 deg) (input - centre) + centre, y pointing down: numpy's rot90 clockwise.
  np.testing.assert_array_equal(out.numpy(), np.rot90(image, k=-1))


def test_zoom_keeps_the_centre_and_magnifies_about_it():
  image = np.zeros((9, 9, 3), np.uint8)
  image[4, 4] = 200
  image[4, 5] = 100
  out = augment.apply(tf.constant(image), _params(zoom=2.0), augment.Augment(zoom=0.5)).numpy()
  assert out[4, 4, 0] == 200
  # Pixel (4, 6) of the output samples the input halfway between (4, 4) and (4, 5), ...
  assert out[4, 6, 0] == 100 and out[4, 5, 0] == 150  # ... (4, 5) a quarter of the way.


def test_brightness_and_contrast_round_and_clip_like_numpy():
  image = _image(6, 7, seed=3)
  ranges = augment.Augment(brightness=0.2, contrast=0.5)
  out = augment.apply(tf.constant(image), _params(brightness=0.1, contrast=1.3), ranges).numpy()
  pixels = image.astype(np.float64)
  expected = np.clip(np.round((pixels - pixels.mean()) * 1.3 + pixels.mean() + 25.5), 0, 255)
  # float32 arithmetic in the op: a value at .5 may round the other way.
  assert np.max(np.abs(out.astype(np.int64) - expected)) <= 1
  assert np.mean(out == expected) > 0.95


def test_draws_depend_only_on_the_seed_and_stay_in_range():
  seed = tf.constant([5, 17], tf.int64)
  a = augment.draw(STRONG, seed, 64).numpy()
  np.testing.assert_array_equal(a, augment.draw(STRONG, seed, 64).numpy())
  assert not np.array_equal(a, augment.draw(STRONG, tf.constant([5, 18], tf.int64), 64).numpy())
  assert a.shape == (64, 6) and a.dtype == np.float32
  assert np.all(np.abs(a[:, :2]) <= 0.1) and np.all(np.abs(a[:, 2] - 1) <= 0.1)
  assert np.all(np.abs(a[:, 3]) <= np.radians(10.0) + 1e-7)
  assert np.all(np.abs(a[:, 4]) <= 0.1) and np.all(np.abs(a[:, 5] - 1) <= 0.2)
  assert np.std(a[:, 0]) > 0.03  # spread over the range, not stuck


def test_ranges_are_checked():
  with pytest.raises(ValueError, match='augment.zoom=1.0 must be >= 0 and < 1'):
    augment.Augment(zoom=1.0)
  with pytest.raises(ValueError, match='augment.shift=-0.1 must be >= 0'):
    augment.Augment(shift=-0.1)
  assert augment.Augment().flip_only and not STRONG.flip_only


def test_the_op_is_the_same_eagerly_and_inside_tf_data():
  images = np.stack([_image(112, 112, seed=s) for s in range(4)])
  params = augment.draw(STRONG, tf.constant([1, 2], tf.int64), 4)
  eager = [augment.apply(tf.constant(x), p, STRONG).numpy() for x, p in zip(images, params)]
  ds = tf.data.Dataset.from_tensor_slices((images, params)).map(
      lambda x, p: augment.apply(x, p, STRONG))
  for a, b in zip(eager, ds.as_numpy_iterator()):
    np.testing.assert_array_equal(a, b)
    assert b.dtype == np.uint8 and b.shape == (112, 112, 3)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_augmented_stream_is_deterministic_per_seed_and_step_and_resumes(data_dir):
  stream = lambda seed, start=0: pipeline.create_input_iter(
      data_dir, 4, seed=seed, start_step=start, augment=STRONG)
  first, again = _take(stream(1), 6), _take(stream(1), 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['image'].dtype == np.uint8 and a['image'].shape == (4, 112, 112, 3)
    assert a['label'].dtype == np.int32
  resumed = _take(stream(1, start=3), 3)
  for a, b in zip(resumed, first[3:]):  # batch k is augmented from (seed, k) wherever it starts
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other = _take(stream(2), 6)
  assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(first, other))


def test_the_default_is_the_flip_draw_and_nothing_else(data_dir):
  """The default stream's images are the decoded JPEGs, mirrored exactly where a fair coin drawn
  from (flip seed, step) says so: the published recipe, bit for bit."""
  shard = os.path.join(data_dir, convert.shard_name(0, 2))
  serialized = list(tf.data.TFRecordDataset(shard).as_numpy_iterator())[:8]
  flip_seed = 12345
  parsed = pipeline.parse_batch(tf.constant(serialized), flip_seed, 7, num_classes=4)
  coins = tf.random.stateless_uniform([8], seed=tf.constant([flip_seed, 7], tf.int64)) < 0.5
  np.testing.assert_array_equal(parsed['flip'].numpy(), coins.numpy())
  np.testing.assert_array_equal(parsed['augment'].numpy(), np.zeros((8, 6), np.float32))
  for encoded, flip, params in zip(serialized, parsed['flip'], parsed['augment']):
    image = pipeline.decode_image(tf.train.Example.FromString(encoded).features.feature[
        'image'].bytes_list.value[0], flip, (112, 112))
    out = augment.apply(image, params, augment.Augment()).numpy()
    pil = np.asarray(Image.open(io.BytesIO(tf.train.Example.FromString(encoded).features.feature[
        'image'].bytes_list.value[0])))
    np.testing.assert_array_equal(out, pil[:, ::-1] if flip else pil)
  # No flip at all when asked.
  unflipped = pipeline.parse_batch(tf.constant(serialized), flip_seed, 7, num_classes=4,
                                   augment=augment.Augment(flip=False))
  assert not np.any(unflipped['flip'].numpy())
  # And the whole default stream equals the stream asked for with Augment() explicitly.
  default = _take(pipeline.create_input_iter(data_dir, 4, seed=0), 4)
  explicit = _take(pipeline.create_input_iter(data_dir, 4, seed=0, augment=augment.Augment()), 4)
  for a, b in zip(default, explicit):
    np.testing.assert_array_equal(a['image'], b['image'])
