"""tf.data input pipeline: TFRecord shards -> numpy batches of decoded, randomly flipped faces.

Reads the folder `python -m multiface_jax.data.convert` writes (`train-*.tfrecord` + metadata.json)
and yields `{'image': uint8 (B, H, W, 3) RGB, 'label': int32 (B,)}` numpy batches, B per process.

The example order is a pure function of (seed, process_index, process_count): every epoch
permutes this process's shard files and shuffles their records with seeds derived from (seed,
process_index, epoch), and the flips (and any other augmentation, ``data.augment``) of batch k
are drawn from (seed, process_index, k) with stateless ops. `start_step=k` therefore continues
an interrupted run exactly (batches k, k+1, ...), and it gets there by dropping serialized
records, before any image is decoded. (tf.data's shuffle
also mixes in TensorFlow's global seed: a process that calls `tf.random.set_seed` gets another,
equally reproducible, order. Nothing in this project calls it.)

Only this module and `data/convert.py` import TensorFlow; the training core never sees it.
"""
import json
import os
import re

import numpy as np
import tensorflow as tf

from multiface_jax.data import augment as augment_lib

try:
  # TF must not grab GPU memory that JAX owns.
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):
  pass  # TF already initialised its devices (another importer hid them first, or no GPU).

AUTOTUNE = tf.data.AUTOTUNE
METADATA_NAME = 'metadata.json'
_METADATA_KEYS = ('num_images', 'num_classes', 'image_size', 'shards')
_FOREVER = np.iinfo(np.int64).max
# Shards interleaved at once: more mixing across files for a few MiB of read buffers.
_CYCLE_LENGTH = 8
_READ_BUFFER_BYTES = 256 * 1024
_BAD_LABEL = 'label out of range:'
_FEATURES = {
    'image': tf.io.FixedLenFeature([], tf.string),
    'label': tf.io.FixedLenFeature([], tf.int64),
}


def _convert_hint(data_dir):
  return (f'create it with `python -m multiface_jax.data.convert --src=EMORE_DIR '
          f'--dst={data_dir}` (rerunning it resumes a half-finished conversion)')


def read_metadata(data_dir):
  """Reads and checks `metadata.json` of a converted TFRecord folder.

  Args:
    data_dir: folder written by `multiface_jax.data.convert`.

  Returns:
    The metadata dict: num_images, num_classes, image_size [h, w], shards [{name, num_images}],
    source, seed, verification_sets (and the converter's bookkeeping fields).

  Raises:
    FileNotFoundError: metadata.json or a shard it lists is missing.
    ValueError: metadata.json is malformed.
  """
  data_dir = os.fspath(data_dir)
  path = os.path.join(data_dir, METADATA_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: {data_dir} is not a converted TFRecord '
                            f'folder (or its conversion did not finish); {_convert_hint(data_dir)}')
  try:
    with open(path, encoding='utf-8') as f:
      metadata = json.load(f)
    missing = [key for key in _METADATA_KEYS if key not in metadata]
    if missing:
      raise ValueError(f'lacks {", ".join(missing)}')
    height, width = (int(v) for v in metadata['image_size'])
    shard_counts = [int(shard['num_images']) for shard in metadata['shards']]
    names = [str(shard['name']) for shard in metadata['shards']]
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f'{path} is malformed ({e}); {_convert_hint(data_dir)}') from None
  if sum(shard_counts) != metadata['num_images'] or height <= 0 or width <= 0:
    raise ValueError(f'{path} is inconsistent: shard counts sum to {sum(shard_counts)}, '
                     f'num_images says {metadata["num_images"]}, image_size '
                     f'{metadata["image_size"]}; {_convert_hint(data_dir)}')
  absent = [name for name in names if not os.path.isfile(os.path.join(data_dir, name))]
  if absent:
    raise FileNotFoundError(f'{data_dir} lacks {len(absent)} of the shards metadata.json lists '
                            f'(first: {absent[0]}); {_convert_hint(data_dir)}')
  metadata['image_size'] = [height, width]
  return metadata


def process_shards(metadata, process_index=0, process_count=1):
  """Returns the shard entries ({name, num_images}) this process reads: every process_count-th.

  Raises:
    ValueError: fewer shards than processes, or a bad process_index.
  """
  shards = metadata['shards']
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  if len(shards) < process_count:
    raise ValueError(f'{len(shards)} shard files cannot feed {process_count} processes (each '
                     'process reads whole files); rerun `python -m multiface_jax.data.convert` '
                     f'with --num_shards >= {process_count} (a multiple of it balances them)')
  return shards[process_index::process_count]


def _derived_seeds(seed, process_index):
  """Independent seeds of the random decisions: file order, record shuffle, flips, augmentation."""
  return tuple(int(s) for s in np.random.SeedSequence([seed, process_index]).generate_state(4))


def parse_batch(serialized, flip_seed, step, *, num_classes, augment=None, augment_seed=0):
  """Parses a batch of serialized tf.train.Examples and draws their flips and augmentation.

  Vectorised: one protobuf parse per batch, not per image. The random draws of batch `step`
  depend only on (seed, step), so a resumed stream augments exactly like the uninterrupted one.

  Args:
    serialized: string (B,) of tf.train.Example bytes.
    flip_seed: int seed of the flips, or None for no flips and no augmentation (evaluation).
    step: index of this batch in the stream (int64 scalar).
    num_classes: labels must lie in [0, num_classes).
    augment: ``augment.Augment`` (None: flips only); ``augment.flip=False`` draws no flips.
    augment_seed: int seed of the augmentation beyond the flips.

  Returns:
    {'encoded': string (B,), 'label': int32 (B,), 'flip': bool (B,), 'augment': float32 (B, 6)
    (zeros unless `augment` draws more than flips)}.
  """
  augment = augment or augment_lib.Augment()
  example = tf.io.parse_example(serialized, _FEATURES)
  labels = example['label']
  batch = tf.shape(labels, out_type=tf.int64)[0]
  step = tf.cast(step, tf.int64)
  if flip_seed is None or not augment.flip:
    flips = tf.zeros([batch], tf.bool)
  else:
    seed = tf.stack([tf.constant(flip_seed, tf.int64), step])
    flips = tf.random.stateless_uniform([batch], seed=seed) < 0.5
  if flip_seed is None or augment.flip_only:
    params = tf.zeros([batch, 6], tf.float32)
  else:
    params = augment_lib.draw(augment, tf.stack([tf.constant(augment_seed, tf.int64), step]),
                              batch)
  return {'encoded': example['image'], 'label': _check_labels(labels, num_classes),
          'flip': flips, 'augment': params}


def _check_labels(labels, num_classes):
  bad = tf.logical_or(labels < 0, labels >= num_classes)
  check = tf.debugging.Assert(
      tf.logical_not(tf.reduce_any(bad)),
      [_BAD_LABEL, tf.boolean_mask(labels, bad), f'outside [0, {num_classes})'])
  with tf.control_dependencies([check]):
    return tf.cast(labels, tf.int32)


def decode_image(encoded, flip, image_size):
  """Decodes one JPEG (or PNG) into uint8 (h, w, 3) RGB and mirrors it left-right if `flip`.

  INTEGER_ACCURATE is libjpeg's integer DCT, which mxnet (OpenCV) and PIL use too: the pixels are
  identical to theirs. Runs eagerly or inside tf.data alike.
  """
  image = tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE')
  image = tf.ensure_shape(image, [*image_size, 3])
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def _read_records(paths, cycle_length):
  """Serialized records of `paths` (a string tensor), `cycle_length` files interleaved."""
  return tf.data.Dataset.from_tensor_slices(paths).interleave(
      lambda path: tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES),
      cycle_length=cycle_length, block_length=1)


def create_dataset(data_dir, batch_size, *, seed, train=True, start_step=0, process_index=0,
                   process_count=1, num_parallel_calls=AUTOTUNE, shuffle_buffer_size=16_384,
                   augment=None, metadata=None):
  """Builds the tf.data pipeline that `create_input_iter` wraps for numpy (same arguments).

  Returns:
    A tf.data.Dataset of {'image': uint8 (B, h, w, 3), 'label': int32 (B,)}.
  """
  metadata = metadata or read_metadata(data_dir)
  image_size = tuple(metadata['image_size'])
  num_classes = int(metadata['num_classes'])
  shards = process_shards(metadata, process_index, process_count)
  paths = [os.path.join(os.fspath(data_dir), shard['name']) for shard in shards]
  images_per_epoch = sum(shard['num_images'] for shard in shards)
  if images_per_epoch == 0:
    raise ValueError(f'the shards of process {process_index} in {data_dir} hold no images')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  file_seed, shuffle_seed, flip_seed, augment_seed = _derived_seeds(seed, process_index)
  augment = augment or augment_lib.Augment()
  cycle_length = min(_CYCLE_LENGTH, len(paths))

  if train:
    def epoch_records(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(len(paths)), seed=tf.stack([tf.constant(file_seed, tf.int64), epoch]))
      records = _read_records(tf.gather(tf.constant(paths), order), cycle_length)
      # Shuffle each epoch on its own, then start the next (shuffle before repeat): no example
      # comes twice before all have come once, and a resume can turn its step into (epoch,
      # offset) arithmetically because epochs end exactly where they should.
      return records.shuffle(shuffle_buffer_size, seed=shuffle_seed + epoch,
                             reshuffle_each_iteration=False)

    first_epoch, offset = divmod(start_step * batch_size, images_per_epoch)
    records = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(epoch_records)
    # Resuming drops serialized records only: nothing is decoded until after the skip.
    records = records.skip(offset).batch(batch_size, drop_remainder=True)
    steps = tf.data.Dataset.range(start_step, _FOREVER)
  else:
    if start_step:
      raise ValueError('start_step applies to training only (train=True)')
    flip_seed, augment = None, augment_lib.Augment(flip=False)
    records = _read_records(tf.constant(paths), 1).batch(batch_size)
    steps = tf.data.Dataset.range(_FOREVER)

  def parse(step, serialized):
    return parse_batch(serialized, flip_seed, step, num_classes=num_classes, augment=augment,
                       augment_seed=augment_seed)

  def decode(example):
    image = decode_image(example['encoded'], example['flip'], image_size)
    return {'image': augment_lib.apply(image, example['augment'], augment),
            'label': example['label']}

  # Parse whole batches (cheap), decode image by image (where the time goes), then re-form the
  # very same batches: every parsed batch holds exactly batch_size records except the last one.
  ds = tf.data.Dataset.zip(steps, records).map(parse).unbatch()
  ds = ds.map(decode, num_parallel_calls=num_parallel_calls)
  ds = ds.batch(batch_size, drop_remainder=train)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options).prefetch(AUTOTUNE)


def _op_error_text(error):
  """The readable part of a TF runtime error (without the function-node and op decorations)."""
  text = re.sub(r'\s*\[\[\]\]', '', re.sub(r'\{\{[^}]*\}\}', '', error.message))
  text = re.sub(r'Error in user-defined function passed to .*? with iterator: \S+: ', '', text)
  return re.sub(r'\s*\[Op:\w+\].*$', '', text, flags=re.S).strip()


def _find_bad_record(paths, num_classes):
  """Names the first record that TFRecord cannot read or whose label is out of range.

  Runs only after the pipeline failed: it reads and parses, but decodes nothing.
  """
  for path in paths:
    labels = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES).batch(1024).map(
        lambda serialized: tf.io.parse_example(serialized, _FEATURES)['label'])
    position = 0
    try:
      for chunk in labels.as_numpy_iterator():
        bad = np.flatnonzero((chunk < 0) | (chunk >= num_classes))
        if bad.size:
          return (f'{path}: record {position + bad[0]} has label {chunk[bad[0]]}, outside '
                  f'[0, {num_classes})')
        position += len(chunk)
    except tf.errors.OpError as e:
      return f'{path}: {_op_error_text(e)}'
  return None


def _numpy_batches(ds, description, paths, num_classes):
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      problem = _op_error_text(e)
      if isinstance(e, tf.errors.DataLossError) or _BAD_LABEL in problem:
        problem = _find_bad_record(paths, num_classes) or problem
      raise ValueError(
          f'reading {description} failed: {problem}\nA shard is corrupt (truncated copy, disk '
          'error) or was not written by multiface_jax.data.convert; rerun the converter into a '
          'fresh folder: it checks every image and label.') from None
    yield batch


def create_input_iter(data_dir, batch_size, *, seed, train=True, start_step=0, process_index=0,
                      process_count=1, num_parallel_calls=AUTOTUNE, shuffle_buffer_size=16_384,
                      augment=None):
  """Iterator of numpy training (or evaluation) batches from a converted TFRecord folder.

  Args:
    data_dir: folder with train-*.tfrecord and metadata.json (from `data.convert`).
    batch_size: examples per batch of this process.
    seed: non-negative int; with the process layout it fixes the whole example order and flips.
    train: True: shuffled, flipped, repeated forever, remainder dropped. False: one pass over
      this process's shards in file order, no flip, last batch may be smaller.
    start_step: training resumes here: the first batch is batch `start_step` of the
      uninterrupted stream.
    process_index, process_count: this process reads shards[process_index::process_count].
    num_parallel_calls: parallel decodes (tf.data.AUTOTUNE, or 1 to use one core).
    shuffle_buffer_size: records held by the per-epoch shuffle buffer.
    augment: ``augment.Augment`` of training batches (None: random flips only, the original's).

  Returns:
    An iterator of {'image': uint8 (B, h, w, 3) RGB, 'label': int32 (B,)}.

  Raises:
    FileNotFoundError / ValueError: missing or malformed folder, too few shards for the
      processes; while iterating, ValueError naming the folder (and, for a bad label or image
      size, the shard file and record) when a shard is corrupt.
  """
  metadata = read_metadata(data_dir)
  ds = create_dataset(data_dir, batch_size, seed=seed, train=train, start_step=start_step,
                      process_index=process_index, process_count=process_count,
                      num_parallel_calls=num_parallel_calls,
                      shuffle_buffer_size=shuffle_buffer_size, augment=augment,
                      metadata=metadata)
  paths = [os.path.join(os.fspath(data_dir), shard['name'])
           for shard in process_shards(metadata, process_index, process_count)]
  return _numpy_batches(ds, f'{data_dir} (process {process_index} of {process_count})', paths,
                        int(metadata['num_classes']))
