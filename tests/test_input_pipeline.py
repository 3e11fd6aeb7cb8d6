"""The tf.data pipeline on the mxnet-written fixture, converted to TFRecords.

References are independent of the pipeline: PIL decodes the fixture's JPEG payloads (read with
the RecordIO reader) and mxnet's own decode is summarised in tests/data/mxnet_readback.json.
"""
import io
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from multiface_jax.data import pipeline
from multiface_jax.data import convert
from multiface_jax.data import emore

DATA = os.path.join(os.path.dirname(__file__), 'data')
EMORE = os.path.join(DATA, 'emore')
NUM_IMAGES = 16


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  dst = tmp_path_factory.mktemp('tfrecord') / 'emore'
  convert.convert(EMORE, dst, num_shards=4, seed=0, progress=False)
  return str(dst)


@pytest.fixture(scope='module')
def references():
  """key -> (label, payload bytes, PIL-decoded RGB image)."""
  folder = emore.EmoreFolder(EMORE)
  refs = {}
  for key in folder.image_keys:
    label, payload = folder.read_image(key)
    image = np.asarray(Image.open(io.BytesIO(payload)).convert('RGB'))
    refs[key] = (label, payload, image)
  folder.close()
  assert len(refs) == NUM_IMAGES
  return refs


@pytest.fixture(scope='module')
def identify(references):
  """Maps a yielded image to (key, flipped) by exact pixel equality."""
  table = {}
  for key, (_, _, image) in references.items():
    table[image.tobytes()] = (key, False)
    table[image[:, ::-1].tobytes()] = (key, True)
  assert len(table) == 2 * NUM_IMAGES  # no face equals another face or its own mirror image

  def lookup(image):
    assert image.tobytes() in table, 'image is neither a decoded fixture image nor its mirror'
    return table[image.tobytes()]
  return lookup


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def write_folder(path, records, *, num_classes=4, image_size=(112, 112), num_shards=1):
  """A TFRecord folder in the converter's format from (label, encoded) pairs."""
  os.makedirs(path, exist_ok=True)
  shards = []
  for j, block in enumerate(np.array_split(np.arange(len(records)), num_shards)):
    name = convert.shard_name(j, num_shards)
    with tf.io.TFRecordWriter(os.path.join(path, name)) as writer:
      for i in block:
        writer.write(convert.serialize_example(*records[i]))
    shards.append({'name': name, 'num_images': len(block)})
  metadata = {'num_images': len(records), 'num_classes': num_classes,
              'image_size': list(image_size), 'shards': shards, 'source': 'test', 'seed': 0,
              'verification_sets': []}
  with open(os.path.join(path, 'metadata.json'), 'w') as f:
    json.dump(metadata, f)
  return str(path)


def jpeg(shape, seed=0):
  image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


# --- what the batches hold -----------------------------------------------------------------------

def test_training_batches_are_numpy_uint8_images_and_int32_labels(data_dir):
  batch = next(pipeline.create_input_iter(data_dir, 4, seed=0))
  assert set(batch) == {'image', 'label'}
  assert isinstance(batch['image'], np.ndarray) and batch['image'].dtype == np.uint8
  assert batch['image'].shape == (4, 112, 112, 3)
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (4,)


def test_eval_pixels_equal_pil_and_mxnet_decodes(data_dir, references, identify):
  with open(os.path.join(DATA, 'mxnet_readback.json')) as f:
    mxnet_means = {r['key']: r['decoded']['channel_means']
                   for r in json.load(f)['emore']['records'] if 'decoded' in r}
  batches = list(pipeline.create_input_iter(data_dir, 5, seed=0, train=False))
  assert [len(b['label']) for b in batches] == [5, 5, 5, 1]  # one pass, remainder kept
  seen = []
  for batch in batches:
    for image, label in zip(batch['image'], batch['label']):
      key, flipped = identify(image)  # exact equality with PIL's decode
      assert not flipped
      assert label == references[key][0]
      # mxnet's decoder (OpenCV/libjpeg) gave the same pixels: its per-channel means agree.
      np.testing.assert_allclose(image.reshape(-1, 3).mean(0), mxnet_means[key], rtol=0,
                                 atol=1e-9)
      seen.append(key)
  assert sorted(seen) == sorted(references)


def test_training_epochs_cover_every_image_once_with_random_mirrors(data_dir, references,
                                                                   identify):
  batches = take(pipeline.create_input_iter(data_dir, 4, seed=3), 3 * NUM_IMAGES // 4)
  decoded = [(identify(image), label) for b in batches for image, label in
             zip(b['image'], b['label'])]
  for (key, _), label in decoded:
    assert label == references[key][0]
  epochs = [[key for (key, _), _ in decoded[e * NUM_IMAGES:(e + 1) * NUM_IMAGES]]
            for e in range(3)]
  for keys in epochs:
    assert sorted(keys) == sorted(references)  # shuffle before repeat: whole epochs
  assert epochs[0] != epochs[1] != epochs[2]  # each epoch has its own order
  assert epochs[0] != sorted(epochs[0])
  flips = [flipped for (_, flipped), _ in decoded]
  assert 0.25 < np.mean(flips) < 0.75  # 48 fair coins: both sides well represented


def test_same_seed_gives_the_same_stream_another_seed_another(data_dir):
  first = take(pipeline.create_input_iter(data_dir, 4, seed=7), 6)
  again = take(pipeline.create_input_iter(data_dir, 4, seed=7), 6)
  other = take(pipeline.create_input_iter(data_dir, 4, seed=8), 6)
  assert_same_batches(first, again)
  assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(first, other))


@pytest.mark.parametrize('start_step', [1, 5, 11, 16])
def test_resume_continues_the_uninterrupted_stream(data_dir, start_step):
  # batch 3 over 16 images per epoch: batches straddle epoch boundaries.
  uninterrupted = take(pipeline.create_input_iter(data_dir, 3, seed=5), 20)
  resumed = take(pipeline.create_input_iter(data_dir, 3, seed=5, start_step=start_step),
                 20 - start_step)
  assert_same_batches(resumed, uninterrupted[start_step:])


def test_processes_read_disjoint_shards_that_cover_the_data(data_dir, identify):
  keys = []
  for index in range(2):
    batches = pipeline.create_input_iter(data_dir, 4, seed=0, train=False,
                                               process_index=index, process_count=2)
    keys.append({identify(image)[0] for b in batches for image in b['image']})
  assert not keys[0] & keys[1]
  assert len(keys[0] | keys[1]) == NUM_IMAGES
  # Training on process 1 stays within its own files.
  train = take(pipeline.create_input_iter(data_dir, 4, seed=0, process_index=1,
                                                process_count=2), 4)
  assert {identify(image)[0] for b in train for image in b['image']} == keys[1]


def test_more_processes_than_shard_files_fails_clearly(data_dir):
  with pytest.raises(ValueError, match=r'4 shard files cannot feed 5 processes.*--num_shards'):
    pipeline.create_input_iter(data_dir, 4, seed=0, process_index=0, process_count=5)


def test_preprocessing_is_the_same_eagerly_and_inside_tf_data(data_dir):
  path = os.path.join(data_dir, convert.shard_name(0, 4))
  serialized = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
  size = (112, 112)
  parsed = pipeline.parse_batch(tf.constant(serialized), 11, 3, num_classes=4)
  np.testing.assert_array_equal(parsed['label'], [
      tf.train.Example.FromString(s).features.feature['label'].int64_list.value[0]
      for s in serialized])
  eager = [pipeline.decode_image(e, f, size).numpy()
           for e, f in zip(parsed['encoded'], parsed['flip'])]
  assert 0 < np.sum(parsed['flip'].numpy()) < len(serialized)  # both branches exercised
  ds = tf.data.Dataset.from_tensors(serialized).map(
      lambda s: pipeline.parse_batch(s, 11, tf.constant(3, tf.int64), num_classes=4))
  ds = ds.unbatch().map(lambda ex: pipeline.decode_image(ex['encoded'], ex['flip'], size))
  graph = list(ds.as_numpy_iterator())
  for a, b, flip, encoded in zip(eager, graph, parsed['flip'].numpy(), serialized):
    np.testing.assert_array_equal(a, b)
    example = tf.train.Example.FromString(encoded)
    pil = np.asarray(Image.open(io.BytesIO(example.features.feature['image'].bytes_list.value[0])))
    np.testing.assert_array_equal(a, pil[:, ::-1] if flip else pil)  # flip = reversed width


# --- bad input ----------------------------------------------------------------------------------

def test_folder_without_metadata_names_the_converter(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'metadata\.json.*multiface_jax\.data\.convert'):
    pipeline.create_input_iter(str(tmp_path), 4, seed=0)


def test_malformed_metadata_is_reported(tmp_path, data_dir):
  shutil.copytree(data_dir, tmp_path / 'copy')
  (tmp_path / 'copy' / 'metadata.json').write_text('{"num_images": 3')
  with pytest.raises(ValueError, match=r'metadata\.json is malformed'):
    pipeline.read_metadata(tmp_path / 'copy')


def test_missing_shard_is_named(tmp_path, data_dir):
  shutil.copytree(data_dir, tmp_path / 'copy')
  os.remove(tmp_path / 'copy' / convert.shard_name(2, 4))
  with pytest.raises(FileNotFoundError, match=convert.shard_name(2, 4)):
    pipeline.create_input_iter(str(tmp_path / 'copy'), 4, seed=0)


def test_truncated_shard_fails_with_the_folder_and_the_fix(tmp_path, data_dir):
  shutil.copytree(data_dir, tmp_path / 'copy')
  path = tmp_path / 'copy' / convert.shard_name(1, 4)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  batches = pipeline.create_input_iter(str(tmp_path / 'copy'), 4, seed=0, train=False)
  with pytest.raises(ValueError, match=r'(?s)copy/train-00001-of-00004\.tfrecord: truncated record'
                                       r'.*corrupt.*rerun the converter'):
    list(batches)


def test_out_of_range_label_names_the_shard_and_record(tmp_path):
  records = [(0, jpeg((112, 112, 3), 0)), (1, jpeg((112, 112, 3), 1)), (7, jpeg((112, 112, 3)))]
  path = write_folder(tmp_path / 'bad_label', records, num_classes=4)
  with pytest.raises(ValueError, match=r'train-00000-of-00001\.tfrecord: record 2 has label 7, '
                                       r'outside \[0, 4\)'):
    next(pipeline.create_input_iter(path, 3, seed=0))


def test_image_of_the_wrong_size_is_reported(tmp_path):
  path = write_folder(tmp_path / 'small', [(0, jpeg((64, 64, 3)))] * 2)
  with pytest.raises(ValueError, match=r'small.*\[64,64,3\].*\[112,112,3\]'):
    next(pipeline.create_input_iter(path, 2, seed=0))


def test_payload_that_is_not_an_image_is_reported(tmp_path):
  path = write_folder(tmp_path / 'garbage', [(0, b'\xff\xd8\xff not really a jpeg')] * 2)
  with pytest.raises(ValueError, match=r'garbage.*(JPEG|image)'):
    next(pipeline.create_input_iter(path, 2, seed=0))
