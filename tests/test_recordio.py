"""RecordIO reader/writer and EmoreFolder against files real mxnet wrote and read back.

tests/data/emore was written by mxnet 1.9.1 (tools/make_fixtures.py); what mxnet read back from
it is in tests/data/mxnet_readback.json. mxnet itself is not needed here.
"""
import hashlib
import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest

from multiface_jax.data import emore
from multiface_jax.data import recordio
from multiface_jax.data import recordio_writer

DATA = os.path.join(os.path.dirname(__file__), 'data')
EMORE = os.path.join(DATA, 'emore')
REC = os.path.join(EMORE, 'train.rec')
IDX = os.path.join(EMORE, 'train.idx')
MAGIC = struct.pack('<I', 0xCED7230A)


def sha256(data):
  return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope='module')
def mxnet_readback():
  with open(os.path.join(DATA, 'mxnet_readback.json')) as f:
    return json.load(f)


@pytest.fixture
def emore_copy(tmp_path):
  """A scratch copy of the fixture folder that a test may damage."""
  dst = tmp_path / 'emore'
  shutil.copytree(EMORE, dst)
  return dst


def lrec(cflag, length):
  return struct.pack('<I', (cflag << 29) | length)


# --- reading ------------------------------------------------------------------------------------

def test_reader_matches_mxnet_by_key(mxnet_readback):
  expected = mxnet_readback['emore']['records']
  with recordio.RecordIOReader(REC, IDX) as reader:
    assert reader.keys() == [r['key'] for r in expected]
    for entry in expected:
      record = reader.read(entry['key'])
      assert reader.offset(entry['key']) == entry['offset']
      assert len(record) == entry['record_length']
      assert sha256(record) == entry['record_sha256']
      header, payload = recordio.unpack(record)
      want = entry['header']
      assert (header.flag, header.id, header.id2) == (want['flag'], want['id'], want['id2'])
      if want['flag']:
        assert header.label.dtype == np.float32
        np.testing.assert_array_equal(header.label, want['label'])
      else:
        assert header.label == want['label']
      assert sha256(payload) == entry['payload_sha256']


def test_iteration_in_file_order_matches_mxnet(mxnet_readback):
  expected = mxnet_readback['emore']['file_order_record_sha256']
  with recordio.RecordIOReader(REC, IDX) as reader:
    assert [sha256(r) for r in reader] == expected


def test_reader_without_idx_scans_the_file(mxnet_readback):
  expected = mxnet_readback['emore']['records']
  with recordio.RecordIOReader(REC) as reader:
    # The fixture's keys are the record positions, so the scan's keys coincide with them.
    assert reader.keys() == list(range(len(expected)))
    for entry in expected:
      assert reader.offset(entry['key']) == entry['offset']
      assert sha256(reader.read(entry['key'])) == entry['record_sha256']


def test_split_record_is_rejoined(mxnet_readback):
  split_key = mxnet_readback['split_key']
  flags = mxnet_readback['emore']['chunk_flags']
  assert flags.count(1) == 1 and flags.count(3) == 1  # the writer did split one record
  with recordio.RecordIOReader(REC, IDX) as reader:
    record = reader.read(split_key)
    # The raw file: a first part (cflag 1) of a length that is a multiple of 4, then the rest.
    with open(REC, 'rb') as f:
      f.seek(reader.offset(split_key))
      magic, first = struct.unpack('<II', f.read(8))
    assert magic == 0xCED7230A and first >> 29 == 1
    first_len = first & ((1 << 29) - 1)
    assert first_len % 4 == 0
    assert record[first_len:first_len + 4] == MAGIC
    assert record.endswith(MAGIC + b'tail after the magic')
    entry = next(r for r in mxnet_readback['emore']['records'] if r['key'] == split_key)
    assert sha256(record) == entry['record_sha256']


def test_unknown_key_names_the_key_and_the_fix():
  with recordio.RecordIOReader(REC, IDX) as reader:
    assert 999 not in reader and 3 in reader and np.int64(3) in reader
    assert 3.0 not in reader and '3' not in reader
    with pytest.raises(recordio.RecordIOError, match=r'train\.idx: key 999: unknown key.*keys\(\)'):
      reader.read(999)


def test_non_contiguous_keys_and_duplicates(tmp_path):
  rec, idx = tmp_path / 'x.rec', tmp_path / 'x.idx'
  with recordio_writer.RecordIOWriter(rec, idx) as writer:
    for key, data in ((10, b'ten'), (3, b'three'), (7, b'seven'), (3, b'three again')):
      writer.write_idx(key, data)
  with recordio.RecordIOReader(rec, idx) as reader:
    assert reader.keys() == [10, 3, 7, 3]
    # As in mxnet's dict, the last line of a duplicated key wins.
    assert [reader.read(k) for k in (10, 3, 7)] == [b'ten', b'three again', b'seven']
    with pytest.raises(recordio.RecordIOError, match='key 4'):
      reader.read(4)


def test_reader_pickles_for_worker_processes():
  with recordio.RecordIOReader(REC, IDX) as reader:
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(7) == reader.read(7)
    clone.close()


# --- bad files ----------------------------------------------------------------------------------

def test_wrong_magic(emore_copy):
  rec = emore_copy / 'train.rec'
  with recordio.RecordIOReader(rec, emore_copy / 'train.idx') as reader:
    offset = reader.offset(3)
  data = bytearray(rec.read_bytes())
  data[offset:offset + 4] = b'JUNK'
  rec.write_bytes(bytes(data))
  with recordio.RecordIOReader(rec, emore_copy / 'train.idx') as reader:
    assert reader.read(2)  # the records around it are intact
    with pytest.raises(recordio.RecordIOError,
                       match=rf'train\.rec: key 3 \(offset {offset}\): expected the RecordIO '
                             r'magic 0xced7230a.*found 0x4b4e554a.*rebuild the \.idx'):
      reader.read(3)


def test_not_a_recordio_file(tmp_path):
  path = tmp_path / 'photo.rec'
  path.write_bytes(b'\xff\xd8\xff\xe0 this is a JPEG, not a .rec')
  with pytest.raises(recordio.RecordIOError, match=r'photo\.rec: offset 0: expected the RecordIO'):
    recordio.RecordIOReader(path)


def test_truncated_last_record(emore_copy):
  rec = emore_copy / 'train.rec'
  rec.write_bytes(rec.read_bytes()[:-5])
  with recordio.RecordIOReader(rec, emore_copy / 'train.idx') as reader:
    last = reader.keys()[-1]
    assert reader.read(last - 1)
    with pytest.raises(recordio.RecordIOError, match=rf'key {last}.*truncated.*re-copy'):
      reader.read(last)
    with pytest.raises(recordio.RecordIOError, match='truncated'):
      list(reader)
  # Scanning without the .idx meets the same end.
  with pytest.raises(recordio.RecordIOError, match=r'train\.rec: offset \d+: .*truncated'):
    recordio.RecordIOReader(rec)


def test_truncated_inside_chunk_header(tmp_path):
  rec = tmp_path / 'x.rec'
  with recordio_writer.RecordIOWriter(rec) as writer:
    writer.write(b'abcd')
  rec.write_bytes(rec.read_bytes() + MAGIC)  # a header cut after 4 of its 8 bytes
  with pytest.raises(recordio.RecordIOError, match=r'offset 12: file ends at byte 16 inside'):
    recordio.RecordIOReader(rec)


def test_idx_offset_past_end_of_file(emore_copy):
  idx = emore_copy / 'train.idx'
  size = os.path.getsize(emore_copy / 'train.rec')
  lines = idx.read_text().splitlines()
  lines[4] = f'4\t{size + 100}'
  idx.write_text('\n'.join(lines) + '\n')
  with pytest.raises(recordio.RecordIOError,
                     match=rf'train\.idx: key 4 \(line 5\): offset {size + 100} is past the end '
                           rf'of .*train\.rec \({size} bytes\).*idx_path=None'):
    recordio.RecordIOReader(emore_copy / 'train.rec', idx)


def test_idx_pointing_into_a_split_record(emore_copy, mxnet_readback):
  split_key = mxnet_readback['split_key']
  rec, idx = emore_copy / 'train.rec', emore_copy / 'train.idx'
  with recordio.RecordIOReader(rec, idx) as reader:
    offset = reader.offset(split_key)
  with open(rec, 'rb') as f:
    f.seek(offset)
    _, first = struct.unpack('<II', f.read(8))
  second_chunk = offset + 8 + (first & ((1 << 29) - 1))
  idx.write_text(idx.read_text().replace(f'{split_key}\t{offset}\n',
                                         f'{split_key}\t{second_chunk}\n'))
  with recordio.RecordIOReader(rec, idx) as reader:
    with pytest.raises(recordio.RecordIOError, match='continuation flag 3'):
      reader.read(split_key)


def test_malformed_idx_line(emore_copy):
  idx = emore_copy / 'train.idx'
  idx.write_text(idx.read_text().replace('2\t', '2 x\t', 1))
  with pytest.raises(recordio.RecordIOError, match=r'train\.idx: line 3: expected "key<TAB>'):
    recordio.RecordIOReader(emore_copy / 'train.rec', idx)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing.rec'):
    recordio.RecordIOReader(tmp_path / 'nothing.rec')
  (tmp_path / 'x.rec').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match=r'nothing\.idx.*idx_path=None'):
    recordio.RecordIOReader(tmp_path / 'x.rec', tmp_path / 'nothing.idx')
  with recordio.RecordIOReader(tmp_path / 'x.rec') as empty:
    assert empty.keys() == [] and list(empty) == []


# --- writing and packing ------------------------------------------------------------------------

def test_writer_is_byte_identical_to_mxnet(tmp_path, mxnet_readback):
  with recordio.RecordIOReader(REC, IDX) as reader:
    records = [(key, reader.read(key)) for key in reader.keys()]
  with recordio_writer.RecordIOWriter(tmp_path / 'train.rec', tmp_path / 'train.idx') as writer:
    for key, record in records:
      writer.write_idx(key, record)
  ours_rec = (tmp_path / 'train.rec').read_bytes()
  ours_idx = (tmp_path / 'train.idx').read_bytes()
  with open(REC, 'rb') as f:
    assert ours_rec == f.read()
  with open(IDX, 'rb') as f:
    assert ours_idx == f.read()
  assert sha256(ours_rec) == mxnet_readback['emore']['train_rec_sha256']
  # make_fixtures.py also gave our writer's files to real mxnet (fixture records plus 111
  # records with the magic at every kind of offset); this is its verdict.
  for verdict in mxnet_readback['our_writer_read_by_mxnet'].values():
    assert verdict['split_chunks_in_mxnet_file'] > 0
    assert verdict['mxnet_reads_our_records_by_key']
    assert verdict['mxnet_reads_our_records_in_order']
    assert verdict['rec_bytes_identical'] and verdict['idx_bytes_identical']


@pytest.mark.parametrize('record, expected', [
    (b'', MAGIC + lrec(0, 0)),
    (b'abcde', MAGIC + lrec(0, 5) + b'abcde\0\0\0'),
    # The magic at an unaligned offset stays in the data.
    (b'ab' + MAGIC, MAGIC + lrec(0, 6) + b'ab' + MAGIC + b'\0\0'),
    (b'abcd' + MAGIC + b'xy', MAGIC + lrec(1, 4) + b'abcd' + MAGIC + lrec(3, 2) + b'xy\0\0'),
    (MAGIC, MAGIC + lrec(1, 0) + MAGIC + lrec(3, 0)),
    (b'abcd' + MAGIC + b'efgh' + MAGIC + b'z',
     MAGIC + lrec(1, 4) + b'abcd' + MAGIC + lrec(2, 4) + b'efgh' + MAGIC + lrec(3, 1)
     + b'z\0\0\0'),
], ids=['empty', 'padding', 'unaligned_magic', 'one_split', 'only_magic', 'two_splits'])
def test_writer_chunks_by_hand(tmp_path, record, expected):
  with recordio_writer.RecordIOWriter(tmp_path / 'x.rec') as writer:
    writer.write(record)
    assert writer.tell() == len(expected)
  assert (tmp_path / 'x.rec').read_bytes() == expected
  with recordio.RecordIOReader(tmp_path / 'x.rec') as reader:
    assert list(reader) == [record]


def test_writer_refuses_huge_records(tmp_path):
  with recordio_writer.RecordIOWriter(tmp_path / 'x.rec') as writer:
    with pytest.raises(ValueError, match='2\\*\\*29'):
      writer.write(bytes(recordio.MAX_RECORD_BYTES))
    with pytest.raises(ValueError, match='idx_path'):
      writer.write_idx(0, b'x')


def test_pack_and_unpack_by_hand():
  assert recordio_writer.pack(recordio.IRHeader(0, 3.0, 7, 9), b'img') == (
      struct.pack('<IfQQ', 0, 3.0, 7, 9) + b'img')
  # A vector label: flag = its length, the header's label field 0, the labels after the header.
  packed = recordio_writer.pack((5, [17, 21.5], 0, 1), b'')
  assert packed == struct.pack('<IfQQff', 2, 0.0, 0, 1, 17.0, 21.5)
  header, payload = recordio.unpack(packed)
  assert header.flag == 2 and payload == b''
  np.testing.assert_array_equal(header.label, np.array([17.0, 21.5], np.float32))
  header, payload = recordio.unpack(struct.pack('<IfQQ', 0, 2.0, 4, 0) + b'\xff\xd8')
  assert header == (0, 2.0, 4, 0) and payload == b'\xff\xd8'
  with pytest.raises(ValueError, match='IRHeader says 3 labels'):
    recordio.unpack(struct.pack('<IfQQf', 3, 0.0, 0, 0, 1.0))


# --- EmoreFolder --------------------------------------------------------------------------------

def test_emore_folder_reads_the_fixture(mxnet_readback):
  by_key = {r['key']: r for r in mxnet_readback['emore']['records']}
  folder = emore.EmoreFolder(EMORE)
  assert folder.num_classes == mxnet_readback['num_classes'] == 4
  assert folder.image_size == (112, 112)
  header0 = by_key[0]['header']['label']
  assert folder.image_keys == range(1, int(header0[0]))
  assert folder.identity_keys == range(int(header0[0]), int(header0[1]))
  assert folder.num_images == 16
  for key in folder.image_keys:
    label, encoded = folder.read_image(key)
    assert label == by_key[key]['header']['label'] and isinstance(label, int)
    assert sha256(encoded) == by_key[key]['payload_sha256']
  for key in folder.identity_keys:
    assert list(folder.identity_range(key)) == by_key[key]['header']['label']
  assert folder.verification_bins() == [os.path.join(EMORE, 'pairs20.bin')]
  folder.close()


def test_emore_label_out_of_range(emore_copy):
  (emore_copy / 'property').write_text('2,112,112\n')
  folder = emore.EmoreFolder(emore_copy)
  assert folder.read_image(8) == (1, folder.read_image(8)[1])
  with pytest.raises(recordio.RecordIOError,
                     match=r'train\.rec: key 9: label 2\.0 is not an identity in \[0, 2\)'):
    folder.read_image(9)
  with pytest.raises(recordio.RecordIOError, match='key 0: label 17.0 is not an identity'):
    folder.read_image(0)  # the header record is not an image


def _write_folder(path, records, property_text='3,112,112\n'):
  path.mkdir()
  with recordio_writer.RecordIOWriter(path / 'train.rec', path / 'train.idx') as writer:
    for key, record in enumerate(records):
      writer.write_idx(key, record)
  (path / 'property').write_text(property_text)
  return path


def test_emore_payload_not_an_image(tmp_path):
  jpeg = b'\xff\xd8\xff\xe0' + bytes(20)
  png = b'\x89PNG\r\n\x1a\n' + bytes(20)
  folder = emore.EmoreFolder(_write_folder(tmp_path / 'e', [
      recordio_writer.pack((0, [4, 4], 0, 0), b''),
      recordio_writer.pack((0, 0.0, 1, 0), jpeg),
      recordio_writer.pack((0, 2.0, 2, 0), png),
      recordio_writer.pack((0, 1.0, 3, 0), b'GIF89a not accepted'),
  ]))
  assert folder.read_image(1) == (0, jpeg)
  assert folder.read_image(2) == (2, png)
  with pytest.raises(recordio.RecordIOError,
                     match=r'train\.rec: key 3: payload of 19 bytes .*not a JPEG or PNG'):
    folder.read_image(3)


def test_emore_without_header_record(tmp_path):
  jpeg = b'\xff\xd8\xff\xe0'
  folder = emore.EmoreFolder(_write_folder(
      tmp_path / 'e', [recordio_writer.pack((0, float(k % 3), k, 0), jpeg) for k in range(5)]))
  assert list(folder.image_keys) == [0, 1, 2, 3, 4]
  assert len(folder.identity_keys) == 0
  assert [folder.read_image(k)[0] for k in folder.image_keys] == [0, 1, 2, 0, 1]


def test_emore_vector_labels_use_the_first_entry(tmp_path):
  folder = emore.EmoreFolder(_write_folder(tmp_path / 'e', [
      recordio_writer.pack((0, [2, 2], 0, 0), b''),
      recordio_writer.pack((0, [1.0, 0.5], 1, 0), b'\xff\xd8\xff'),
  ]))
  assert folder.read_image(1) == (1, b'\xff\xd8\xff')


def test_emore_missing_files(tmp_path, emore_copy):
  os.remove(emore_copy / 'train.idx')
  with pytest.raises(FileNotFoundError,
                     match=r'lacks train\.idx; an emore folder holds train\.rec, train\.idx '
                           r'and property.*from_folder'):
    emore.EmoreFolder(emore_copy)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    emore.EmoreFolder(tmp_path / 'absent')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='lacks train.rec, train.idx, property'):
    emore.EmoreFolder(tmp_path / 'empty')


def test_emore_bad_property(emore_copy):
  (emore_copy / 'property').write_text('85742;112;112')
  with pytest.raises(ValueError, match=r'property: expected "num_classes,height,width"'):
    emore.EmoreFolder(emore_copy)
