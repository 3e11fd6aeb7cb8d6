"""Writing MXNet RecordIO (`.rec` + `.idx`) without mxnet, byte for byte as dmlc's writer does.

The format is described in ``recordio``; ``pack`` builds an image record's payload, ``frame`` the
bytes one record takes in a `.rec`, and ``RecordIOWriter`` writes files that mxnet reads back
(tools/make_fixtures.py checks it against real mxnet).
"""
import numbers
import os

import numpy as np

from multiface_jax.data.recordio import (_CHUNK_HEADER, _IR_HEADER, _MAGIC_BYTES, MAGIC,
                                         MAX_RECORD_BYTES, IRHeader, align4)


def pack(header, payload):
  """Builds a record payload from an IRHeader and bytes, exactly like `mxnet.recordio.pack`.

  Args:
    header: IRHeader (or a 4-tuple). A number label gives flag 0; a sequence/array label gives
      flag = its size, the header label field 0, and the labels as float32 before the payload.
    payload: bytes (an encoded image).

  Returns:
    bytes.
  """
  header = IRHeader(*header)
  if isinstance(header.label, numbers.Number):
    flag, label, prefix = 0, float(header.label), b''
  else:
    labels = np.asarray(header.label, dtype='<f4').ravel()
    flag, label, prefix = labels.size, 0.0, labels.tobytes()
  return _IR_HEADER.pack(flag, label, header.id, header.id2) + prefix + bytes(payload)


def frame(record, path='record'):
  """Returns the bytes dmlc's writer puts in a `.rec` for `record` (chunks, split, padding).

  Args:
    record: bytes of one logical record.
    path: names the destination in the error message.

  Raises:
    ValueError: the record is 2**29 bytes or longer.
  """
  raw = bytes(record)
  size = len(raw)
  if size >= MAX_RECORD_BYTES:
    raise ValueError(f'{path}: a RecordIO record must be shorter than 2**29 bytes, got {size}')
  data = memoryview(raw)
  chunks = []
  part_start = search = 0
  while True:
    # dmlc checks every 4-byte-aligned word of the payload; find() skips to candidates fast.
    i = raw.find(_MAGIC_BYTES, search)
    if i < 0:
      break
    if i % 4:
      search = i + 1
      continue
    cflag = 1 if part_start == 0 else 2
    chunks.append(_CHUNK_HEADER.pack(MAGIC, (cflag << 29) | (i - part_start)))
    chunks.append(data[part_start:i])
    part_start = search = i + 4
  cflag = 3 if part_start else 0
  chunks.append(_CHUNK_HEADER.pack(MAGIC, (cflag << 29) | (size - part_start)))
  chunks.append(data[part_start:])
  chunks.append(b'\0' * (align4(size) - size))
  return b''.join(chunks)


class RecordIOWriter:
  """Writes a `.rec` (and optionally a `.idx`) that mxnet/dmlc read; byte-identical to dmlc's."""

  def __init__(self, rec_path, idx_path=None):
    """Creates (truncates) the files.

    Args:
      rec_path: the `.rec` to write.
      idx_path: the `.idx` to write, or None; needed for `write_idx`.
    """
    self.rec_path = os.fspath(rec_path)
    self.idx_path = None if idx_path is None else os.fspath(idx_path)
    self._rec = open(self.rec_path, 'wb')
    self._idx = None if self.idx_path is None else open(self.idx_path, 'w', encoding='ascii')
    self._pos = 0

  def tell(self):
    """Returns the offset at which the next record will start."""
    return self._pos

  def write(self, record):
    """Appends one record, split at aligned magic numbers like dmlc's RecordIOWriter.

    Args:
      record: bytes (for image records, the output of `pack`).

    Raises:
      ValueError: the record is 2**29 bytes or longer.
    """
    out = frame(record, self.rec_path)
    self._rec.write(out)
    self._pos += len(out)

  def write_idx(self, key, record):
    """Appends `record` and a `key\\toffset` line to the `.idx` (mxnet's write_idx)."""
    if self._idx is None:
      raise ValueError(f'{self.rec_path}: write_idx needs a RecordIOWriter opened with idx_path')
    offset = self._pos
    self.write(record)
    self._idx.write(f'{key}\t{offset}\n')

  def close(self):
    """Flushes and closes the files."""
    self._rec.close()
    if self._idx is not None:
      self._idx.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
