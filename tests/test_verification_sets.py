"""Verification .bin loading (safe unpickling, RGB decoding) and atomic saving."""
import hashlib
import io
import json
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from multiface_jax.data import verification_sets

DATA = os.path.join(os.path.dirname(__file__), 'data')
FIXTURE_BIN = os.path.join(DATA, 'emore', 'pairs20.bin')


def jpeg_bytes(rgb, quality=95):
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(rgb, np.uint8)).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def png_bytes(array):
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def solid(rgb, size=(8, 8)):
  return np.broadcast_to(np.asarray(rgb, np.uint8), size + (3,))


@pytest.fixture(scope='module')
def mxnet_bin():
  with open(os.path.join(DATA, 'mxnet_readback.json')) as f:
    return json.load(f)['pairs20_bin']


def test_load_bin_matches_mxnet_decoding(mxnet_bin):
  images, issame = verification_sets.load_bin(FIXTURE_BIN)
  assert images.dtype == np.uint8 and images.shape == (40, 112, 112, 3)
  assert issame.dtype == bool
  np.testing.assert_array_equal(issame, mxnet_bin['issame'])
  for image, decoded in zip(images, mxnet_bin['decoded']):
    assert list(image.shape) == decoded['shape']
    # mxnet's OpenCV and PIL's libjpeg may round a few pixels differently; a channel swap
    # would move the means by ~20.
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), decoded['channel_means'], atol=0.5)
  # The fixture faces are tinted R > G > B: decoded as RGB, not BGR.
  means = images.reshape(-1, 3).mean(0)
  assert means[0] > means[1] > means[2]


def test_read_bin_returns_the_stored_bytes(mxnet_bin):
  encoded, issame = verification_sets.read_bin(FIXTURE_BIN)
  assert [hashlib.sha256(b).hexdigest() for b in encoded] == mxnet_bin['image_sha256']
  assert encoded[3].startswith(b'\x89PNG') and encoded[0].startswith(b'\xff\xd8')
  assert issame.tolist() == mxnet_bin['issame']


class _RunsCode:
  """Unpickling this calls `func(*args)`: what a malicious .bin does."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


@pytest.mark.parametrize('make_payload, refused', [
    (lambda marker: _RunsCode(os.system, f'touch {marker}'), 'posix.system'),
    (lambda marker: _RunsCode(eval, f'open({str(marker)!r}, "w")'), 'builtins.eval'),
    (lambda marker: _RunsCode(open, str(marker), 'w'), 'io.open'),
], ids=['os.system', 'eval', 'open'])
def test_unsafe_pickle_is_refused_and_not_run(tmp_path, make_payload, refused):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.bin'
  with open(path, 'wb') as f:
    pickle.dump(([jpeg_bytes(solid((1, 2, 3))), make_payload(marker)], [True]), f)
  with pytest.raises(verification_sets.UnsafePickleError,
                     match=rf'evil\.bin: refused to load global {refused!r}.*nothing from it was '
                           'executed') as info:
    verification_sets.load_bin(path)
  assert info.value.global_name == refused
  assert isinstance(info.value, pickle.UnpicklingError)
  assert not marker.exists()


def test_numpy_object_arrays_are_refused(tmp_path):
  path = tmp_path / 'objects.bin'
  with open(path, 'wb') as f:
    pickle.dump(([b'x', b'y'], np.array([True, None], dtype=object)), f)
  with pytest.raises(verification_sets.UnsafePickleError, match=r"numpy\.dtype\('O"):
    verification_sets.read_bin(path)


def _py2_pickle(bins, issame):
  """The opcodes Python 2's cPickle (protocol 2) writes for (list of str, list of bool)."""
  out = [b'\x80\x02', b']', b'(']  # PROTO 2, EMPTY_LIST, MARK
  for data in bins:
    out.append(b'U' + bytes([len(data)]) + data if len(data) < 256
               else b'T' + len(data).to_bytes(4, 'little') + data)  # SHORT_/BINSTRING
  out += [b'e', b']', b'(']  # APPENDS, EMPTY_LIST, MARK
  out += [b'\x88' if same else b'\x89' for same in issame]  # NEWTRUE / NEWFALSE
  out += [b'e', b'\x86', b'.']  # APPENDS, TUPLE2, STOP
  return b''.join(out)


@pytest.mark.parametrize('writer', ['python2', 'protocol2', 'protocol5', 'numpy_arrays'])
def test_pickle_flavours_load(tmp_path, writer):
  colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 200)]
  bins = [jpeg_bytes(solid(colours[0])), png_bytes(solid(colours[1])),
          jpeg_bytes(solid(colours[2])), png_bytes(solid(200, (8, 8))[..., 0])]  # a gray PNG
  issame = [False, True]
  path = tmp_path / f'{writer}.bin'
  if writer == 'python2':
    data = _py2_pickle(bins, issame)
  elif writer == 'numpy_arrays':
    data = pickle.dumps(([np.frombuffer(b, np.uint8) for b in bins], np.array(issame)))
  else:
    data = pickle.dumps((bins, issame), protocol=int(writer[-1]))
  path.write_bytes(data)
  images, loaded_issame = verification_sets.load_bin(path)
  assert images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(loaded_issame, issame)
  np.testing.assert_allclose(images[:, 4, 4].astype(int), colours, atol=6)


@pytest.mark.parametrize('content, message', [
    (pickle.dumps([b'x']), 'expected a pickled \\(bins, issame_list\\) pair'),
    (pickle.dumps(([b'x', b'y', b'z'], [True])), '3 images for 1 pairs'),
    (pickle.dumps(([b'x', 5], [True])), 'image 1 is a int'),
    (pickle.dumps(([b'x', b'y'], ['yes'])), 'issame_list must be a flat list of booleans'),
    (b'GIF89a definitely not a pickle', 'not a readable pickle'),
    (pickle.dumps(([b'x', b'y'], [True])), 'image 0 \\(pair 0\\) cannot be decoded'),
], ids=['not_a_pair', 'count', 'not_bytes', 'not_bool', 'garbage', 'undecodable'])
def test_malformed_bins(tmp_path, content, message):
  path = tmp_path / 'bad.bin'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=rf'bad\.bin: .*{message}'):
    verification_sets.load_bin(path)


def test_images_of_different_sizes(tmp_path):
  path = tmp_path / 'sizes.bin'
  with open(path, 'wb') as f:
    pickle.dump(([jpeg_bytes(solid(9, (8, 8))), jpeg_bytes(solid(9, (8, 6)))], [True]), f)
  with pytest.raises(ValueError, match=r'image 1 is \(8, 6\), image 0 is \(8, 8\)'):
    verification_sets.load_bin(path, num_threads=2)


def test_save_bin_round_trip_readable_like_insightface(tmp_path):
  encoded = [jpeg_bytes(solid((i * 40, 100, 200 - i * 40))) for i in range(4)]
  path = tmp_path / 'mine.bin'
  verification_sets.save_bin(path, encoded, np.array([True, False]))
  with open(path, 'rb') as f:  # how insightface's load_bin reads it
    bins, issame_list = pickle.load(f, encoding='bytes')
  assert bins == encoded and issame_list == [True, False]
  assert all(type(v) is bool for v in issame_list)
  images, issame = verification_sets.load_bin(path)
  assert images.shape == (4, 8, 8, 3) and issame.tolist() == [True, False]
  assert os.listdir(tmp_path) == ['mine.bin']
  assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_save_bin_validates_before_writing(tmp_path):
  path = tmp_path / 'x.bin'
  with pytest.raises(ValueError, match='3 images for 1 pairs'):
    verification_sets.save_bin(path, [jpeg_bytes(solid(1))] * 3, [True])
  with pytest.raises(ValueError, match='image 1 is not JPEG or PNG'):
    verification_sets.save_bin(path, [jpeg_bytes(solid(1)), b'BM bitmap'], [True])
  assert not path.exists()


def test_save_bin_crash_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'set.bin'
  old = [jpeg_bytes(solid(5)), jpeg_bytes(solid(6))]
  verification_sets.save_bin(path, old, [True])
  before = path.read_bytes()

  def crash(obj, f, protocol):
    f.write(b'\x80\x04 half a pickle')
    raise KeyboardInterrupt('power cut')

  monkeypatch.setattr(verification_sets.pickle, 'dump', crash)
  with pytest.raises(KeyboardInterrupt):
    verification_sets.save_bin(path, old[::-1], [False])
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['set.bin']
