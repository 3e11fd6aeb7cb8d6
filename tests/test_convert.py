"""emore -> TFRecord conversion on the mxnet-written fixture (tests/data/emore).

The expected bytes come from tests/data/mxnet_readback.json (what mxnet read from the fixture),
and the shards are read back with tf.train.Example directly, not through the converter's code.
"""
import hashlib
import io
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from multiface_jax.data import convert
from multiface_jax.data import recordio
from multiface_jax.data import recordio_writer

DATA = os.path.join(os.path.dirname(__file__), 'data')
EMORE = os.path.join(DATA, 'emore')


def sha256(data):
  return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope='module')
def mxnet_images():
  """key -> (label, payload sha256) of the image records, as mxnet read them."""
  with open(os.path.join(DATA, 'mxnet_readback.json')) as f:
    records = json.load(f)['emore']['records']
  end = int(records[0]['header']['label'][0])  # header record: images are keys 1..end-1
  return {r['key']: (int(r['header']['label']), r['payload_sha256'])
          for r in records if 1 <= r['key'] < end}


def read_shard(path):
  """[(label, image bytes)] of a shard, in file order."""
  out = []
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    example = tf.train.Example.FromString(record)
    assert set(example.features.feature) == {'image', 'label'}
    out.append((example.features.feature['label'].int64_list.value[0],
                example.features.feature['image'].bytes_list.value[0]))
  return out


def read_all(dst):
  with open(os.path.join(dst, 'metadata.json')) as f:
    metadata = json.load(f)
  return metadata, [read_shard(os.path.join(dst, s['name'])) for s in metadata['shards']]


def key_order(shards, mxnet_images):
  by_sha = {sha: key for key, (_, sha) in mxnet_images.items()}
  return [by_sha[sha256(image)] for shard in shards for _, image in shard]


def tree_digest(dst):
  return {name: sha256((dst / name).read_bytes()) for name in sorted(os.listdir(dst))
          if (dst / name).is_file()}


def corrupt_copy(tmp_path, damage):
  """A copy of the fixture rewritten with part A's RecordIO writer; damage(key, header, payload)
  returns the replacement (header, payload) of a record, or None to keep it."""
  dst = tmp_path / 'damaged'
  dst.mkdir()
  reader = recordio.RecordIOReader(os.path.join(EMORE, 'train.rec'),
                                   os.path.join(EMORE, 'train.idx'))
  with recordio_writer.RecordIOWriter(dst / 'train.rec', dst / 'train.idx') as writer:
    for key in reader.keys():
      header, payload = recordio.unpack(reader.read(key))
      header, payload = damage(key, header, payload) or (header, payload)
      writer.write_idx(key, recordio_writer.pack(header, payload))
  reader.close()
  shutil.copy(os.path.join(EMORE, 'property'), dst / 'property')
  return dst


def jpeg(shape):
  buffer = io.BytesIO()
  Image.fromarray(np.full(shape, 128, np.uint8)).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


# --- a clean conversion --------------------------------------------------------------------------

def test_shards_hold_the_original_bytes_and_labels(tmp_path, mxnet_images):
  metadata = convert.convert(EMORE, tmp_path / 'out', num_shards=3, seed=0, progress=False)
  on_disk, shards = read_all(tmp_path / 'out')
  assert on_disk == metadata
  got = sorted((label, sha256(image)) for shard in shards for label, image in shard)
  assert got == sorted(mxnet_images.values())  # byte-identical, nothing re-encoded
  assert [len(s) for s in shards] == [s['num_images'] for s in metadata['shards']] == [6, 5, 5]


def test_metadata_describes_the_conversion(tmp_path):
  metadata = convert.convert(EMORE, tmp_path / 'out', num_shards=2, seed=4, progress=False)
  assert metadata == {
      'num_images': 16, 'num_classes': 4, 'image_size': [112, 112],
      'shards': [{'name': 'train-00000-of-00002.tfrecord', 'num_images': 8},
                 {'name': 'train-00001-of-00002.tfrecord', 'num_images': 8}],
      'source': os.path.abspath(EMORE), 'seed': 4, 'skipped': [], 'skip_reasons': {},
      'verification_sets': ['pairs20.bin']}
  # The verification set is carried along unchanged.
  with open(os.path.join(EMORE, 'pairs20.bin'), 'rb') as f:
    assert (tmp_path / 'out' / 'pairs20.bin').read_bytes() == f.read()


def test_default_shard_count():
  assert convert.default_num_shards(16) == 1
  assert convert.default_num_shards(20_000) == 5
  assert convert.default_num_shards(5_822_653) == 1024  # emore: ~5.7k images per shard


def test_shuffle_permutes_globally_and_depends_on_the_seed(tmp_path, mxnet_images):
  orders = {}
  for seed in (0, 1):
    convert.convert(EMORE, tmp_path / f's{seed}', num_shards=4, seed=seed, progress=False)
    orders[seed] = key_order(read_all(tmp_path / f's{seed}')[1], mxnet_images)
  convert.convert(EMORE, tmp_path / 'again', num_shards=4, seed=0, progress=False)
  assert key_order(read_all(tmp_path / 'again')[1], mxnet_images) == orders[0]
  assert sorted(orders[0]) == sorted(mxnet_images)
  assert orders[0] != sorted(orders[0]) and orders[0] != orders[1]
  # Each shard mixes identities (the fixture stores them in blocks of 4 consecutive keys).
  labels = [mxnet_images[key][0] for key in orders[0]]
  assert all(len(set(labels[i:i + 4])) > 1 for i in range(0, 16, 4))


def test_rerun_keeps_finished_shards_and_redoes_the_rest(tmp_path):
  dst = tmp_path / 'out'
  convert.convert(EMORE, dst, num_shards=4, seed=0, progress=False)
  before = tree_digest(dst)
  names = [convert.shard_name(j, 4) for j in range(4)]
  mtimes = {name: os.stat(dst / name).st_mtime_ns for name in names}
  # An interrupted run: shard 2 and its result gone, shard 3 half written, no metadata yet.
  os.remove(dst / names[2])
  os.remove(dst / convert.PROGRESS_DIR / (names[2] + '.json'))
  (dst / names[3]).write_bytes((dst / names[3]).read_bytes()[:100])
  (dst / (names[1] + '.tmp')).write_bytes(b'left over by a killed run')
  os.remove(dst / 'metadata.json')
  convert.convert(EMORE, dst, num_shards=4, seed=0, progress=False)
  assert tree_digest(dst) == before  # same bytes, no .tmp left
  for name in names[:2]:
    assert os.stat(dst / name).st_mtime_ns == mtimes[name]  # kept, not rewritten


def test_workers_write_the_same_shards(tmp_path):
  convert.convert(EMORE, tmp_path / 'one', num_shards=3, seed=2, progress=False)
  convert.convert(EMORE, tmp_path / 'two', num_shards=3, seed=2, workers=2, progress=False)
  one, two = tree_digest(tmp_path / 'one'), tree_digest(tmp_path / 'two')
  one.pop('metadata.json'), two.pop('metadata.json')  # differ only in the folder they name
  assert one == two and len(one) == 4


def test_command_line(tmp_path, capsys):
  assert convert.main(['convert', f'--src={EMORE}', f'--dst={tmp_path / "out"}',
                       '--num_shards=2', '--seed=3']) == 0
  out = capsys.readouterr().out
  assert 'wrote 16 images of 4 identities into 2 shards' in out and 'pairs20.bin' in out
  assert json.loads((tmp_path / 'out' / 'metadata.json').read_text())['seed'] == 3


# --- bad input -----------------------------------------------------------------------------------

def damage_three(key, header, payload):
  if key == 3:  # starts like a JPEG, does not decode
    return header, payload[:3] + b'\0' * 64
  if key == 7:  # identity 9 with property saying 4 identities
    return header._replace(label=9.0), payload
  if key == 12:  # a real JPEG of the wrong size
    return header, jpeg((100, 100, 3))
  return None


@pytest.mark.parametrize('workers', [1, 2])
def test_unusable_records_are_skipped_and_reported(tmp_path, mxnet_images, workers):
  src = corrupt_copy(tmp_path, damage_three)
  metadata = convert.convert(src, tmp_path / 'out', num_shards=2, workers=workers,
                             progress=False)
  assert metadata['skipped'] == [3, 7, 12]
  reasons = metadata['skip_reasons']
  assert 'does not decode' in reasons['3']
  assert 'label 9.0' in reasons['7'] and '[0, 4)' in reasons['7']
  assert '100x100' in reasons['12'] and '112x112' in reasons['12']
  assert metadata['num_images'] == 13
  _, shards = read_all(tmp_path / 'out')
  got = sorted((label, sha256(image)) for shard in shards for label, image in shard)
  assert got == sorted(v for k, v in mxnet_images.items() if k not in (3, 7, 12))
  summary = convert.summarize(metadata, str(tmp_path / 'out'))
  assert 'skipped 3 unusable records' in summary and 'key 7: label 9.0' in summary


@pytest.mark.parametrize('workers', [1, 2])
def test_strict_fails_on_the_first_bad_record_and_writes_no_metadata(tmp_path, workers):
  src = corrupt_copy(tmp_path, damage_three)
  dst = tmp_path / 'out'
  with pytest.raises(convert.ConversionError, match=r'train\.rec: key (3|7|12): .*--strict'):
    convert.convert(src, dst, num_shards=1, strict=True, workers=workers, progress=False)
  assert not (dst / 'metadata.json').exists()
  assert not [name for name in os.listdir(dst) if name.endswith(('.tmp', '.tfrecord'))]
  # A shard kept from a lenient run does not make a strict rerun pass either.
  convert.convert(src, dst, num_shards=1, progress=False)
  with pytest.raises(convert.ConversionError, match=r'key 3: .*earlier run without --strict'):
    convert.convert(src, dst, num_shards=1, strict=True, progress=False)


def test_command_line_strict_reports_the_key(tmp_path, capsys):
  src = corrupt_copy(tmp_path, damage_three)
  assert convert.main(['convert', f'--src={src}', f'--dst={tmp_path / "out"}', '--strict']) == 1
  assert 'error:' in capsys.readouterr().err


def test_missing_source_and_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nowhere.*does not exist'):
    convert.convert(tmp_path / 'nowhere', tmp_path / 'out', progress=False)
  shutil.copytree(EMORE, tmp_path / 'partial')
  os.remove(tmp_path / 'partial' / 'property')
  with pytest.raises(FileNotFoundError, match=r'partial lacks property'):
    convert.convert(tmp_path / 'partial', tmp_path / 'out', progress=False)


def test_command_line_without_src_prints_usage(capsys):
  assert convert.main(['convert', '--dst=/tmp/x']) == 2
  assert 'usage: python -m multiface_jax.data.convert' in capsys.readouterr().err


def test_destination_of_another_conversion_is_refused_untouched(tmp_path):
  dst = tmp_path / 'out'
  convert.convert(EMORE, dst, num_shards=2, seed=0, progress=False)
  before = tree_digest(dst)
  with pytest.raises(convert.ConversionError, match=r'other settings.*differs in .*seed'):
    convert.convert(EMORE, dst, num_shards=2, seed=1, progress=False)
  assert tree_digest(dst) == before
  # A source re-created since (same keys, new train.rec) is not mixed with the old shards.
  src = tmp_path / 'src'
  shutil.copytree(EMORE, src)
  convert.convert(src, tmp_path / 'from_copy', num_shards=2, progress=False)
  os.utime(src / 'train.rec', ns=(1, 1))
  with pytest.raises(convert.ConversionError, match=r'differs in train_rec_mtime_ns'):
    convert.convert(src, tmp_path / 'from_copy', num_shards=2, progress=False)
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'train-00000-of-00001.tfrecord').write_bytes(b'someone else')
  with pytest.raises(convert.ConversionError, match=r'not written by this converter'):
    convert.convert(EMORE, foreign, progress=False)


def test_source_without_any_usable_image_fails(tmp_path):
  src = corrupt_copy(tmp_path, lambda key, header, payload: (header._replace(label=99.0), payload)
                     if key else None)
  with pytest.raises(convert.ConversionError, match=r'no usable image.*all 16 records'):
    convert.convert(src, tmp_path / 'out', progress=False)
