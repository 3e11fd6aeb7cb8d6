"""MXNet RecordIO (`.rec` + `.idx`) read and written without mxnet.

A `.rec` file is a sequence of chunks `uint32 magic, uint32 lrec, data, zero padding to 4 bytes`
(little-endian). `lrec` packs a continuation flag (upper 3 bits) and the data length (lower 29).
dmlc's writer splits a record wherever the magic number sits at a 4-byte-aligned offset of the
payload (cflag 1 = first part, 2 = middle, 3 = last) and drops those magic words; readers put
them back between the parts. The `.idx` file holds text lines `key\\toffset` (offset of the chunk
that starts the record). A record's payload starts with an `IRHeader` (`<IfQQ`), followed by
`flag` float32 labels when flag > 0, then the user bytes (an encoded image in emore).

This module reads; ``recordio_writer`` writes. Both need only numpy.
"""
import collections
import mmap
import operator
import os
import struct

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack('<I', MAGIC)
_CHUNK_HEADER = struct.Struct('<II')
_IR_HEADER = struct.Struct('<IfQQ')
_LENGTH_MASK = (1 << 29) - 1
MAX_RECORD_BYTES = 1 << 29  # dmlc refuses records of 2**29 bytes or more

IRHeader = collections.namedtuple('IRHeader', ['flag', 'label', 'id', 'id2'])
IRHeader.__doc__ = """Header of an image record, as mxnet.recordio defines it.

flag: 0 when `label` is one float; otherwise the number of float32 labels.
label: a float, or (when flag > 0) a float32 ndarray of `flag` labels.
id, id2: two uint64 fields (im2rec stores the record index in `id`).
"""


class RecordIOError(ValueError):
  """A `.rec`/`.idx` pair that cannot be read; the message names the file, the record and the fix.

  Attributes:
    path: the file at fault.
    where: the record ('key 12', 'offset 4096', 'line 3').
    reason: what is wrong and what to do about it.
  """

  def __init__(self, path, where, reason):
    self.path = str(path)
    self.where = str(where)
    self.reason = str(reason)
    super().__init__(f'{self.path}: {self.where}: {self.reason}')

  def __reduce__(self):
    return type(self), (self.path, self.where, self.reason)


def align4(n):
  return (n + 3) & ~3


def unpack(record):
  """Splits a record payload into its IRHeader and the bytes after the labels.

  Args:
    record: bytes of one logical record (as `RecordIOReader.read` returns).

  Returns:
    (IRHeader, payload bytes). When flag > 0 the header's label is a float32 ndarray of length
    flag; otherwise a Python float.

  Raises:
    ValueError: the record is shorter than its header says.
  """
  if len(record) < _IR_HEADER.size:
    raise ValueError(f'record of {len(record)} bytes is shorter than the {_IR_HEADER.size}-byte '
                     'IRHeader: not an image record')
  flag, label, id1, id2 = _IR_HEADER.unpack_from(record, 0)
  start = _IR_HEADER.size
  if flag > 0:
    end = start + 4 * flag
    if len(record) < end:
      raise ValueError(f'IRHeader says {flag} labels but the record has only '
                       f'{len(record) - start} bytes after the header')
    label = np.frombuffer(record, dtype='<f4', count=flag, offset=start).astype(np.float32)
    start = end
  return IRHeader(flag, label, id1, id2), bytes(record[start:])


class RecordIOReader:
  """Random access and sequential reads of a `.rec` file, with or without its `.idx`.

  With an `.idx`, keys are the ones it lists; without, the file is scanned once and the key of a
  record is its position in the file (0, 1, ...), which is what im2rec's keys are.
  The file is memory-mapped, so reads are slices and the object can be shared by threads.
  """

  def __init__(self, rec_path, idx_path=None):
    """Opens the files and loads (or builds) the key -> offset table.

    Args:
      rec_path: path of the `.rec` file.
      idx_path: path of its `.idx` file, or None to scan the `.rec`.

    Raises:
      FileNotFoundError: a path does not exist.
      RecordIOError: the `.idx` is malformed or points past the end of the `.rec`, or (when
        scanning) the `.rec` is corrupt.
    """
    self.rec_path = os.fspath(rec_path)
    self.idx_path = None if idx_path is None else os.fspath(idx_path)
    self._open()
    if self.idx_path is None:
      self._keys, self._offsets = self._scan_offsets()
    else:
      self._keys, self._offsets = self._load_idx()
    self._build_lookup()

  def _open(self):
    if not os.path.isfile(self.rec_path):
      raise FileNotFoundError(f'RecordIO file {self.rec_path} does not exist')
    self._file = open(self.rec_path, 'rb')
    self._size = os.fstat(self._file.fileno()).st_size
    # mmap refuses empty files; an empty bytes object reads the same.
    self._data = (mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
                  if self._size else b'')

  def __getstate__(self):
    return {'rec_path': self.rec_path, 'idx_path': self.idx_path,
            '_keys': self._keys, '_offsets': self._offsets}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()
    self._build_lookup()

  def close(self):
    """Releases the memory map and the file."""
    if isinstance(self._data, mmap.mmap):
      self._data.close()
    self._data = b''
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _load_idx(self):
    if not os.path.isfile(self.idx_path):
      raise FileNotFoundError(f'RecordIO index {self.idx_path} does not exist (pass '
                              f'idx_path=None to index {self.rec_path} by scanning it)')
    with open(self.idx_path, 'rb') as f:
      text = f.read()
    lines = text.split(b'\n')
    if lines and not lines[-1].strip():
      lines.pop()
    keys = np.empty(len(lines), np.int64)
    offsets = np.empty(len(lines), np.int64)
    try:
      # Two numeric columns: let numpy parse them in one go; fall back to a line loop to name the
      # bad line when that fails (numpy raises OverflowError for numbers past int64).
      table = np.array(text.split(), dtype=np.int64).reshape(len(lines), 2)
      keys[:], offsets[:] = table[:, 0], table[:, 1]
    except (ValueError, OverflowError):
      for line_no, line in enumerate(lines, 1):
        fields = line.strip().split(b'\t')
        try:
          if len(fields) != 2:
            raise ValueError
          keys[line_no - 1], offsets[line_no - 1] = int(fields[0]), int(fields[1])
        except (ValueError, OverflowError):
          raise RecordIOError(self.idx_path, f'line {line_no}',
                              f'expected "key<TAB>offset" with 64-bit integers, found '
                              f'{line[:80]!r}; the .idx is corrupt: rebuild it or open the .rec '
                              'without it (idx_path=None) to index by scanning') from None
    if len(offsets):
      bad = np.flatnonzero((offsets < 0) | (offsets + _CHUNK_HEADER.size > self._size))
      if bad.size:
        i = int(bad[0])
        raise RecordIOError(
            self.idx_path, f'key {int(keys[i])} (line {i + 1})',
            f'offset {int(offsets[i])} is past the end of {self.rec_path} ({self._size} bytes): '
            'the .rec is truncated or the .idx belongs to another file; re-copy the .rec or open '
            'it without the .idx (idx_path=None) to index by scanning')
    return keys, offsets

  def _scan_offsets(self):
    offsets = [offset for offset, _ in self._iter_chunks(starts_only=True)]
    return np.arange(len(offsets), dtype=np.int64), np.asarray(offsets, dtype=np.int64)

  def _build_lookup(self):
    n = len(self._keys)
    self._first_key = int(self._keys[0]) if n else 0
    # im2rec's keys are 0..n-1 in order: then the key is the row. Otherwise binary search
    # (duplicates: the last line wins, as in mxnet's dict).
    self._contiguous = bool(n == 0 or np.array_equal(
        self._keys, np.arange(self._first_key, self._first_key + n)))
    if not self._contiguous:
      self._order = np.argsort(self._keys, kind='stable')
      self._sorted_keys = self._keys[self._order]

  def keys(self):
    """Returns the list of keys (int), in the order of the `.idx` (or of the file)."""
    return self._keys.tolist()

  def __len__(self):
    return len(self._keys)

  def _row(self, key):
    try:
      key = operator.index(key)  # ints and numpy integers; 3.5 or '3' are unknown keys
    except TypeError:
      return None
    if self._contiguous:
      row = key - self._first_key
      return row if 0 <= row < len(self._keys) else None
    pos = int(np.searchsorted(self._sorted_keys, key, side='right')) - 1
    if pos >= 0 and self._sorted_keys[pos] == key:
      return int(self._order[pos])
    return None

  def __contains__(self, key):
    return self._row(key) is not None

  def offset(self, key):
    """Returns the byte offset of the record `key` in the `.rec`."""
    row = self._row(key)
    if row is None:
      n = len(self._keys)
      known = (f'keys {int(self._keys.min())}..{int(self._keys.max())}, {n} records' if n
               else 'no records')
      raise RecordIOError(self.idx_path or self.rec_path, f'key {key!r}',
                          f'unknown key ({known}); use keys() to list the valid keys')
    return int(self._offsets[row])

  def read(self, key):
    """Returns the bytes of the record `key` (split parts re-joined).

    Raises:
      RecordIOError: unknown key, or a corrupt/truncated record at its offset.
    """
    offset = self.offset(key)
    # Fast path for the common whole, intact record; anything else takes read_at's checks.
    if offset + _CHUNK_HEADER.size <= self._size:
      magic, lrec = _CHUNK_HEADER.unpack_from(self._data, offset)
      start = offset + _CHUNK_HEADER.size
      if magic == MAGIC and lrec >> 29 == 0 and start + align4(lrec) <= self._size:
        return self._data[start:start + lrec]
    record, _ = self.read_at(offset, where=f'key {key} (offset {offset})')
    return record

  def read_at(self, offset, where=None):
    """Reads the logical record whose first chunk starts at byte `offset`.

    Args:
      offset: byte offset of a chunk with cflag 0 or 1.
      where: how error messages name the record (default 'offset N').

    Returns:
      (record bytes, offset of the next record).
    """
    parts = []
    expect_start = True
    pos = offset
    while True:
      cflag, start, length, pos = self._chunk(pos, where)
      if expect_start and cflag not in (0, 1):
        raise RecordIOError(self.rec_path, where or f'offset {offset}',
                            f'chunk has continuation flag {cflag}, i.e. it is the middle or end '
                            'of a split record, not the start of one; the .idx offsets are wrong: '
                            'rebuild the .idx or open the .rec without it')
      if not expect_start and cflag not in (2, 3):
        raise RecordIOError(self.rec_path, where or f'offset {offset}',
                            f'split record interrupted by a chunk with flag {cflag} at offset '
                            f'{start - 8}; the file is corrupt: re-create it')
      parts.append(self._data[start:start + length])
      if cflag in (0, 3):
        break
      expect_start = False
    record = parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)
    return bytes(record), pos

  def _chunk(self, pos, where=None):
    """Decodes the chunk at `pos`: returns (cflag, data start, data length, next chunk pos)."""
    where = where or f'offset {pos}'
    if pos + _CHUNK_HEADER.size > self._size:
      raise RecordIOError(self.rec_path, where,
                          f'file ends at byte {self._size} inside the chunk header at offset '
                          f'{pos}: the .rec is truncated (an interrupted copy or write?); '
                          're-copy or re-create it')
    magic, lrec = _CHUNK_HEADER.unpack_from(self._data, pos)
    if magic != MAGIC:
      raise RecordIOError(self.rec_path, where,
                          f'expected the RecordIO magic 0x{MAGIC:08x} at offset {pos}, found '
                          f'0x{magic:08x}: not an MXNet .rec file, or the .idx offsets do not '
                          'match it; check the file, rebuild the .idx or open the .rec without '
                          'it (idx_path=None)')
    length = lrec & _LENGTH_MASK
    start = pos + _CHUNK_HEADER.size
    end = start + align4(length)
    if end > self._size:
      raise RecordIOError(self.rec_path, where,
                          f'chunk at offset {pos} needs bytes up to {end} but the file has '
                          f'{self._size}: the last record is truncated (an interrupted copy or '
                          'write?); re-copy or re-create the .rec')
    return lrec >> 29, start, length, end

  def _iter_chunks(self, starts_only=False):
    """Yields (offset, cflag) of every chunk (or only of record starts) in file order."""
    pos = 0
    while pos < self._size:
      cflag, _, _, next_pos = self._chunk(pos)
      if not starts_only or cflag in (0, 1):
        yield pos, cflag
      pos = next_pos

  def __iter__(self):
    """Yields every logical record (bytes) in file order, split records re-joined."""
    pos = 0
    while pos < self._size:
      record, pos = self.read_at(pos)
      yield record
