"""Property-based fuzzing of every parser of untrusted input (hypothesis).

Each test feeds mutated real-format inputs (the mxnet-written emore fixture, `.bin` pickles, a
`.pth` written by torch.save, JPEG/PNG/GIF/TIFF/... photos, IJB meta lines) and fully random bytes
to one parser. Mutations: bit flips, byte sets, truncations, insertions, deletions, duplicated
spans, absurd integers written into header fields (lengths near 2**29, label counts, image
dimensions of 100000), whole pickle opcodes moved, code-running globals spliced into pickles and,
for text, odd tokens in place of fields. The property, for every input: the parser
returns a result of its documented type, or raises one of its documented error classes with a
message naming the file; never another exception type, never a hang (hypothesis deadline per
example, plus a faulthandler watchdog that ends the process on a real hang), never a peak-memory
jump (the resident-set high-water mark is reset and read around every example), and pickles never
run code (a sentinel file that the injected `os.system` / `eval` calls would create never appears).

Profiles: "ci" (default, derandomized, a few dozen examples per parser) and "thorough"
(MULTIFACE_FUZZ_PROFILE=thorough, 2000 examples per parser). The outcome counts per parser are
printed at the end of a thorough run and written as JSON to MULTIFACE_FUZZ_COUNTS=path when set
(counts of one process: run without pytest-xdist's -n for the whole table):

  MULTIFACE_FUZZ_PROFILE=thorough python -m pytest -q tests/test_fuzz.py -p no:randomly

The guards, the counts and the mutation strategies are in ``fuzzing.py``.
"""
import contextlib
import functools
import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import sys
import time
import zipfile

from hypothesis import example, given
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pytest

from multiface_jax.data import convert
from multiface_jax.data import emore
from multiface_jax.data import recordio
from multiface_jax.data import recordio_writer
from multiface_jax.data import verification_sets
from multiface_jax.evaluation.ijb import meta as ijb_meta
from multiface_jax.inference import images

import fuzzing
from fuzzing import (ABSURD_INTS, MAX_PEAK_GROWTH, fix_png_crcs, fuzz_example, fuzzed, fuzzes,
                     mutated, patched, png_bytes, value_fields)

# PIL and torch warn about what they skip in damaged files: expected here, and thousands of them.
pytestmark = [pytest.mark.filterwarnings('ignore::UserWarning'),
              pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')]

DATA = os.path.join(os.path.dirname(__file__), 'data')
EMORE = os.path.join(DATA, 'emore')


# ------------------------------------------------------- the harness's fixtures (fuzzing.py)

@pytest.fixture(scope='module', autouse=True)
def _watchdog_stream(request):
  """Copies the real stderr for the watchdog: output captured by pytest would die with it."""
  capture = request.config.pluginmanager.getplugin('capturemanager')
  with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
    stream = os.fdopen(os.dup(sys.stderr.fileno()), 'w')
  fuzzing.WATCHDOG.append(stream)
  yield
  fuzzing.WATCHDOG.remove(stream)
  stream.close()


@pytest.fixture(autouse=True)
def _time_parser(request):
  start = time.perf_counter()
  yield
  parser = getattr(request.function, 'fuzz_parser', None)
  if parser is not None:
    fuzzing.SECONDS[parser] += time.perf_counter() - start


class _CountReport:
  """Prints the table in pytest's terminal summary (thorough profile or when counts are asked)."""

  def pytest_terminal_summary(self, terminalreporter):
    if fuzzing.PROFILE == 'thorough' or os.environ.get('MULTIFACE_FUZZ_COUNTS'):
      terminalreporter.write_line(fuzzing.format_table(fuzzing.count_table()))


@pytest.fixture(scope='module', autouse=True)
def _count_report(request):
  reporter = _CountReport()
  request.config.pluginmanager.register(reporter)
  yield
  out = os.environ.get('MULTIFACE_FUZZ_COUNTS')
  if out:
    with open(out, 'w', encoding='utf-8') as f:
      json.dump({'profile': fuzzing.PROFILE, 'parsers': fuzzing.count_table()}, f, indent=1)
      f.write('\n')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp('fuzz')


# ------------------------------------------------------------------------- RecordIO reader

with open(os.path.join(EMORE, 'train.rec'), 'rb') as _f:
  REC_SEED = _f.read()
with open(os.path.join(EMORE, 'train.idx'), 'rb') as _f:
  IDX_SEED = _f.read()
with open(os.path.join(EMORE, 'property'), 'rb') as _f:
  PROPERTY_SEED = _f.read()
_REC_OFFSETS = [int(line.split(b'\t')[1]) for line in IDX_SEED.split(b'\n') if line.strip()]
# Chunk magic and lrec, the IRHeader's flag, label and ids, the first labels of a header record.
REC_FIELDS = tuple((o + d, kind) for o in _REC_OFFSETS
                   for d, kind in ((0, 'u32le'), (4, 'u32le'), (8, 'u32le'), (12, 'f32le'),
                                   (16, 'u64le'), (32, 'f32le'), (36, 'f32le')))


def _write(path, data):
  with open(path, 'wb') as f:
    f.write(data)
  return path


@fuzzes('RecordIO reader')
@given(rec=fuzzed(REC_SEED, REC_FIELDS),
       idx=st.one_of(st.none(), st.just(IDX_SEED), fuzzed(IDX_SEED, text=True)))
@example(rec=patched(REC_SEED, 4, struct.pack('<I', (1 << 29) - 1)), idx=None)
# Found by the fuzzer (through the emore folder): numbers past int64 in the .idx escaped as
# OverflowError.
@example(rec=REC_SEED, idx=b'0\t99999999999999999999\n')
@example(rec=REC_SEED, idx=b'99999999999999999999\t0\n')
@example(rec=REC_SEED, idx=f'{(1 << 63) - 1}\t0\n-{1 << 63}\t40\n'.encode())
def test_recordio_reader(workdir, rec, idx):
  rec_path = _write(workdir / 'reader.rec', rec)
  idx_path = None if idx is None else _write(workdir / 'reader.idx', idx)
  with fuzz_example('RecordIO reader', [rec_path] + ([idx_path] if idx_path else []),
                    (recordio.RecordIOError,)) as ex:
    reader = ex.attempt(recordio.RecordIOReader, rec_path, idx_path)
    if reader is None:
      return
    with reader:
      keys = reader.keys()
      assert len(keys) == len(reader)
      for key in keys:
        assert key in reader
        record = ex.attempt(reader.read, key)
        if record is not None:
          assert isinstance(record, bytes) and len(record) <= len(rec)
      records = ex.attempt(list, reader)
      if records is not None:
        assert all(isinstance(r, bytes) for r in records)


# ------------------------------------------- emore folder (RecordIO + property) and converter


def _image_is_usable(encoded, image_size):
  """The converter's promise for a record it keeps, checked with PIL directly."""
  with Image.open(io.BytesIO(encoded)) as image:
    image.load()
    return image.format in ('JPEG', 'PNG') and image.size[::-1] == tuple(image_size)


def _check_emore_folder(ex, folder_dir):
  folder = ex.attempt(emore.EmoreFolder, folder_dir)
  if folder is None:
    return
  try:
    assert folder.num_classes > 0 and min(folder.image_size) > 0
    # The header record may name keys the .idx lacks (reading them is a RecordIOError), but never
    # more keys than the file has records.
    assert len(folder.image_keys) + len(folder.identity_keys) <= len(folder.reader)
    for key in folder.image_keys:
      image = ex.attempt(folder.read_image, key)
      if image is not None:
        label, payload = image
        assert 0 <= label < folder.num_classes and emore.is_encoded_image(payload)
      problem = convert.record_problem(folder, key)
      if problem is None:
        assert _image_is_usable(folder.read_image(key)[1], folder.image_size)
      else:
        assert isinstance(problem, str) and problem
        ex.note('skipped')
    for key in folder.identity_keys:
      span = ex.attempt(folder.identity_range, key)
      if span is not None:
        assert all(isinstance(v, int) for v in span)
  finally:
    folder.close()


def _mostly(seed, strategy):
  """Usually `seed` itself, so that the other file's mutations are what the parser meets."""
  return st.one_of(st.just(seed), st.just(seed), st.just(seed), strategy)


@fuzzes('emore folder + converter')
@given(rec=fuzzed(REC_SEED, REC_FIELDS),
       idx=_mostly(IDX_SEED, fuzzed(IDX_SEED, text=True)),
       prop=_mostly(PROPERTY_SEED, fuzzed(PROPERTY_SEED, text=True)))
@example(rec=REC_SEED, idx=IDX_SEED, prop=PROPERTY_SEED)
# Found by the fuzzer: a NaN header label (ValueError without the path), an identity record with
# flag 0 (TypeError), an .idx number past int64 (OverflowError). Found in review: an infinite
# label (OverflowError), label[1] = 1e30 (a range of 10**30 identity keys).
@example(rec=patched(REC_SEED, 32, struct.pack('<f', float('nan'))), idx=IDX_SEED,
         prop=PROPERTY_SEED)
@example(rec=patched(REC_SEED, 32, struct.pack('<f', float('inf'))), idx=IDX_SEED,
         prop=PROPERTY_SEED)
@example(rec=patched(REC_SEED, 36, struct.pack('<f', 1e30)), idx=IDX_SEED, prop=PROPERTY_SEED)
@example(rec=patched(REC_SEED, _REC_OFFSETS[17] + 8, struct.pack('<I', 0)), idx=IDX_SEED,
         prop=PROPERTY_SEED)
@example(rec=REC_SEED, idx=b'10000000000000000000', prop=PROPERTY_SEED)
@example(rec=REC_SEED, idx=IDX_SEED, prop=b'4,112,112' + b'1' * 5000)
def test_emore_folder(workdir, rec, idx, prop):
  folder_dir = workdir / 'emore'
  folder_dir.mkdir(exist_ok=True)
  _write(folder_dir / 'train.rec', rec)
  _write(folder_dir / 'train.idx', idx)
  _write(folder_dir / 'property', prop)
  with fuzz_example('emore folder + converter', [folder_dir],
                    (recordio.RecordIOError, ValueError, FileNotFoundError)) as ex:
    _check_emore_folder(ex, folder_dir)


def _fixture_payloads():
  reader = recordio.RecordIOReader(os.path.join(EMORE, 'train.rec'),
                                   os.path.join(EMORE, 'train.idx'))
  with reader:
    return [recordio.unpack(reader.read(key))[1] for key in (1, 9)]


JPEG_PAYLOADS = _fixture_payloads()  # 112x112 JPEGs as mxnet stored them
PNG_PAYLOAD = png_bytes(112, 112, rows=bytes(range(113)) * 112)
CONVERTER_SEEDS = JPEG_PAYLOADS + [PNG_PAYLOAD]


@st.composite
def converter_payloads(draw):
  seed = draw(st.sampled_from(CONVERTER_SEEDS))
  data = draw(fuzzed(seed, value_fields(seed, (112,), ('u16be', 'u32be'))))
  return fix_png_crcs(data) if draw(st.booleans()) else data


@fuzzes('converter image check')
@given(payloads=st.lists(converter_payloads(), min_size=1, max_size=3))
@example(payloads=[patched(JPEG_PAYLOADS[0], JPEG_PAYLOADS[0].find(b'\xff\xc0') + 5,
                           struct.pack('>HH', 65535, 65535))])
@example(payloads=[png_bytes(8000, 8000)])
def test_converter_image_check(workdir, payloads):
  """Mutated image payloads packed into a valid emore folder: the converter's per-record check."""
  folder_dir = workdir / 'payloads'
  shutil.rmtree(folder_dir, ignore_errors=True)
  folder_dir.mkdir()
  with recordio_writer.RecordIOWriter(folder_dir / 'train.rec', folder_dir / 'train.idx') as w:
    for key, payload in enumerate(payloads):
      w.write_idx(key, recordio_writer.pack((0, 0.0, key, 0), payload))
  (folder_dir / 'property').write_text('1,112,112\n')
  with fuzz_example('converter image check', [folder_dir],
                    (recordio.RecordIOError, ValueError, FileNotFoundError)) as ex:
    _check_emore_folder(ex, folder_dir)


# ------------------------------------------------------------------------- verification .bin

with open(os.path.join(EMORE, 'pairs20.bin'), 'rb') as _f:
  BIN_SEED = _f.read()  # 20 pairs pickled as insightface does (HIGHEST_PROTOCOL: 5, framed)


def _small_bins():
  """Real .bin files of 2 pairs in every pickle flavour the loader accepts."""
  encoded = [JPEG_PAYLOADS[0], JPEG_PAYLOADS[1], PNG_PAYLOAD, PNG_PAYLOAD]
  issame = [True, False]
  return [pickle.dumps((encoded, issame), protocol=4),  # what save_bin writes
          pickle.dumps((encoded, np.array(issame)), protocol=2),  # numpy _reconstruct
          pickle.dumps(([np.frombuffer(b, np.uint8) for b in encoded], np.array(issame)),
                       protocol=5)]  # numpy _frombuffer


BIN_SEEDS = [BIN_SEED] + _small_bins()


def _opcode_starts(data):
  """Byte offsets of every opcode of a pickle (before STOP)."""
  return [pos for op, _, pos in pickletools.genops(data) if op.name != 'STOP']


def insert_fragment(pickled, pos, fragment):
  """`fragment` inserted at the opcode offset `pos`, the enclosing FRAME (protocol 4+) grown to
  hold it, so that the unpickler reaches it as it would in a crafted file."""
  out = bytearray(pickled[:pos] + fragment + pickled[pos:])
  for op, length, start in pickletools.genops(pickled):
    if op.name == 'FRAME' and start < pos <= start + 9 + length:
      out[start + 1:start + 9] = struct.pack('<Q', length + len(fragment))
  return bytes(out)


def _global(module, name, protocol4=False):
  if protocol4:
    return (b'\x8c' + bytes([len(module)]) + module.encode() + b'\x8c' + bytes([len(name)])
            + name.encode() + b'\x93')  # SHORT_BINUNICODE x2, STACK_GLOBAL
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'  # GLOBAL


def _text(value):
  raw = value.encode()
  return b'X' + struct.pack('<I', len(raw)) + raw  # BINUNICODE


def attack_snippets(sentinel):
  """Pickle fragments that each push one value computed by a call that would create `sentinel`
  (or that reaches a code-running global): GLOBAL / STACK_GLOBAL + REDUCE, INST, OBJ."""
  touch = _text(f'touch {sentinel}')
  opens = _text(f'open({str(sentinel)!r}, "w")')
  return [
      _global('posix', 'system') + touch + b'\x85R',  # TUPLE1, REDUCE
      _global('os', 'system') + touch + b'\x85R',
      _global('builtins', 'eval') + opens + b'\x85R',
      _global('builtins', 'exec', protocol4=True) + opens + b'\x85R',
      b'(' + opens + b'ibuiltins\neval\n',  # MARK, args, INST
      b'(' + _global('builtins', 'eval') + opens + b'o',  # MARK, class, args, OBJ
      _global('builtins', 'getattr') + b'(' + _global('builtins', 'open', True) + _text('x')
      + b'tR',
      _global('io', 'open') + _text(str(sentinel)) + _text('w') + b'\x86R',  # TUPLE2, REDUCE
      _global('subprocess', 'call') + b'(' + _text('touch') + _text(str(sentinel)) + b'l\x85R',
  ]


@st.composite
def code_carrying_pickles(draw, sentinel):
  """(pickle, intact): a real pickle with an attack fragment inserted at an opcode boundary, then
  mutated unless `intact` (an intact one is read up to the fragment, which must be refused)."""
  seed = draw(st.sampled_from(BIN_SEEDS))
  starts = _opcode_starts(seed)
  pos = draw(st.sampled_from(starts[1:]))  # after PROTO
  data = insert_fragment(seed, pos, draw(st.sampled_from(attack_snippets(sentinel))))
  if draw(st.booleans()):
    return data, True
  return draw(mutated(data, max_mutations=2)), False


@st.composite
def opcode_level(draw, seeds):
  """A real pickle with whole opcodes deleted, duplicated or moved."""
  data = draw(st.sampled_from(seeds))
  for _ in range(draw(st.integers(1, 3))):
    try:
      starts = _opcode_starts(data) + [len(data) - 1]
    except Exception:  # pylint: disable=broad-except  (an earlier edit broke the stream)
      break
    i = draw(st.integers(0, len(starts) - 2))
    span = data[starts[i]:starts[i + 1]]
    kind = draw(st.sampled_from(('delete', 'duplicate', 'move')))
    if kind == 'delete':
      data = data[:starts[i]] + data[starts[i + 1]:]
    elif kind == 'duplicate':
      data = data[:starts[i]] + span + data[starts[i]:]
    else:
      rest = data[:starts[i]] + data[starts[i + 1]:]
      j = draw(st.integers(0, len(rest) - 1))
      data = rest[:j] + span + rest[j:]
  return data


def _shapes():
  sizes = st.one_of(st.sampled_from(ABSURD_INTS[:-1]), st.integers(-2, 4))
  return st.lists(sizes, max_size=3).map(tuple)


_DTYPES = ('b1', '|b1', 'u1', '<f8', 'f4', '<i8', 'O', 'V8', 'S100', 'U5', '(1000000000,)f8',
           'i4,i4', 'M8[s]', 'c16', '>u4')


def _pickle_value(value):
  """Opcodes pushing a plain value (the arguments of a numpy gadget)."""
  if isinstance(value, tuple):
    return b'(' + b''.join(_pickle_value(v) for v in value) + b't'
  if isinstance(value, bool):
    return b'\x88' if value else b'\x89'
  if isinstance(value, int):
    return b'L' + str(value).encode() + b'L\n'  # LONG: any size
  if isinstance(value, bytes):
    return b'C' + bytes([len(value)]) + value if len(value) < 256 else (
        b'B' + struct.pack('<I', len(value)) + value)
  return _text(value)


@st.composite
def numpy_gadget_pickles(draw):
  """A (bins, issame) pickle whose issame (or an image) is built by calling the numpy helpers the
  loader admits, with absurd shapes, dtypes and buffers."""
  shape = draw(_shapes())
  dtype = draw(st.sampled_from(_DTYPES))
  buffer = draw(st.binary(max_size=64))
  module = draw(st.sampled_from(('numpy.core.multiarray', 'numpy._core.multiarray')))
  gadget = draw(st.sampled_from(('reconstruct', 'reconstruct_build', 'ndarray', 'frombuffer',
                                 'scalar', 'dtype', 'codecs')))
  if gadget.startswith('reconstruct'):
    value = (_global(module, '_reconstruct') + b'(' + _global('numpy', 'ndarray')
             + _pickle_value(shape) + _pickle_value(dtype.encode()) + b'tR')
    if gadget == 'reconstruct_build':
      state = (1, draw(_shapes()))
      value += (b'(' + _pickle_value(1) + _pickle_value(state[1]) + _global('numpy', 'dtype')
                + b'(' + _pickle_value(dtype) + b'\x89\x88tR' + b'\x89' + _pickle_value(buffer)
                + b'tb')  # BUILD: ndarray.__setstate__((1, shape, dtype, False, raw))
  elif gadget == 'ndarray':
    value = (_global('numpy', 'ndarray') + b'(' + _pickle_value(shape)
             + _pickle_value(dtype) + b'tR')
  elif gadget == 'frombuffer':
    value = (_global(module.replace('multiarray', 'numeric'), '_frombuffer') + b'('
             + _pickle_value(buffer) + _global('numpy', 'dtype') + b'(' + _pickle_value(dtype)
             + b'\x89\x88tR' + _pickle_value(shape) + _pickle_value('C') + b'tR')
  elif gadget == 'scalar':
    value = (_global(module, 'scalar') + b'(' + _global('numpy', 'dtype') + b'('
             + _pickle_value(dtype) + b'\x89\x88tR' + _pickle_value(buffer) + b'tR')
  elif gadget == 'dtype':
    value = _global('numpy', 'dtype') + b'(' + _pickle_value(dtype) + b'\x89\x88tR'
  else:
    value = (_global('_codecs', 'encode') + b'(' + _pickle_value(draw(st.text(max_size=8)))
             + _pickle_value(draw(st.sampled_from(('latin1', 'utf-8', 'rot13')))) + b'tR')
  image = _pickle_value(PNG_PAYLOAD)
  if draw(st.booleans()):
    body = b'(' + image + image + b'l' + value + b'\x86'  # ([png, png], gadget)
  else:
    body = b'(' + image + value + b'l' + b'(\x88l' + b'\x86'  # ([png, gadget], [True])
  return b'\x80\x02' + body + b'.'


@fuzzes('verification .bin loader')
@given(data=st.one_of(fuzzed(BIN_SEED), *(fuzzed(seed) for seed in BIN_SEEDS[1:]),
                      opcode_level(BIN_SEEDS), numpy_gadget_pickles()))
# Found in review: a ragged issame made numpy raise a ValueError without the path.
@example(data=pickle.dumps(([PNG_PAYLOAD] * 2, [[1], [1, 2]])))
# Found by the fuzzer: LONG_BINPUT 2**26 made the C unpickler zero a 1 GiB memo array (the
# fuzzer's 680825748 took 10 GiB).
@example(data=b'\x80\x02(' + _pickle_value(PNG_PAYLOAD) * 2 + b'lr\x00\x00\x00\x04(\x88l\x86.')
# Found in review: numpy.ndarray could be called with any shape (issame = ndarray((2**27,)), 1 GiB
# uninitialised, then scanned), and _reconstruct took any shape (an image of 2**28 bytes, copied).
@example(data=b'\x80\x02(' + _pickle_value(PNG_PAYLOAD) * 2 + b'l' + _global('numpy', 'ndarray')
         + b'(L134217728L\ntR\x86.')
@example(data=b'\x80\x02(' + _global('numpy.core.multiarray', '_reconstruct') + b'('
         + _global('numpy', 'ndarray') + b'(L268435456L\nt' + _pickle_value(b'u1') + b'tR'
         + _pickle_value(PNG_PAYLOAD) + b'l(\x88l\x86.')
# An 8000x8000 zlib bomb (64 MB of pixels from 62 KB) was decoded, then tripled to RGB.
@example(data=pickle.dumps(([png_bytes(8000, 8000), PNG_PAYLOAD], [True])))
def test_verification_bin(workdir, data):
  path = _write(workdir / 'set.bin', data)
  with fuzz_example('verification .bin loader', [path],
                    (verification_sets.UnsafePickleError, ValueError)) as ex:
    loaded = ex.attempt(verification_sets.load_bin, path, num_threads=1)
    if loaded is not None:
      faces, issame = loaded
      assert faces.dtype == np.uint8 and faces.ndim == 4 and faces.shape[-1] == 3
      assert issame.dtype == bool and faces.shape[0] == 2 * len(issame) > 0


@fuzzes('verification .bin: code in pickles')
@given(data=st.data())
def test_verification_bin_never_runs_code(workdir, data):
  sentinel = workdir / 'code-ran'
  pickled, intact = data.draw(code_carrying_pickles(sentinel))
  path = _write(workdir / 'evil.bin', pickled)
  with fuzz_example('verification .bin: code in pickles', [path],
                    (verification_sets.UnsafePickleError, ValueError)) as ex:
    loaded = ex.attempt(verification_sets.load_bin, path, num_threads=1)
  assert not sentinel.exists()
  # The injected call is reached and refused, or a mutation broke the pickle before it.
  assert loaded is None
  if intact:
    assert ex.outcome == 'UnsafePickleError'


# ------------------------------------------------------------------------------ .pth import

# torch is optional (requirements-torch.txt): without it only these tests are skipped.
try:
  import torch  # pylint: disable=g-import-not-at-top
  from multiface_jax import import_torch  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = import_torch = None


@functools.lru_cache(maxsize=None)
def pth_seeds():
  """(zip, legacy, zip members): a small state_dict as torch.save writes it, in both formats."""
  generator = torch.Generator().manual_seed(0)
  state_dict = {'conv.weight': torch.randn(4, 3, 3, 3, generator=generator),
                'bn.weight': torch.ones(4), 'bn.running_var': torch.rand(4, generator=generator),
                'bn.num_batches_tracked': torch.tensor(7)}
  seeds = []
  for zip_format in (True, False):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer, _use_new_zipfile_serialization=zip_format)
    seeds.append(buffer.getvalue())
  with zipfile.ZipFile(io.BytesIO(seeds[0])) as archive:
    members = [(info.filename, archive.read(info)) for info in archive.infolist()]
  return seeds[0], seeds[1], members


def rezip(members, compression=zipfile.ZIP_STORED):
  """A well-formed archive of (name, bytes): mutations of a member reach torch's readers."""
  out = io.BytesIO()
  with zipfile.ZipFile(out, 'w', compression) as archive:
    for name, body in members:
      archive.writestr(name, body)
  return out.getvalue()


@st.composite
def pth_member_mutations(draw, sentinel):
  """(archive, attacked): the torch.save archive with one member mutated, or with an attack
  fragment inserted into data.pkl at an opcode boundary (`attacked`; it must be refused)."""
  members = list(pth_seeds()[2])
  if draw(st.booleans()):
    i = next(i for i, (name, _) in enumerate(members) if name.endswith('data.pkl'))
    body = members[i][1]
    pos = draw(st.sampled_from(_opcode_starts(body)[1:]))
    members[i] = (members[i][0],
                  insert_fragment(body, pos, draw(st.sampled_from(attack_snippets(sentinel)))))
    return rezip(members), True
  i = draw(st.integers(0, len(members) - 1))
  members[i] = (members[i][0], draw(mutated(members[i][1])))
  return rezip(members), False


def _check_pth(workdir, pth, sentinel, max_growth=MAX_PEAK_GROWTH):
  """Loads `pth` as one fuzz example; returns its outcome."""
  path = _write(workdir / 'model.pth', pth)
  with fuzz_example('.pth importer', [path],
                    (import_torch.UnsafeCheckpointError, import_torch.StateDictMismatchError,
                     import_torch.UnreadableCheckpointError), max_growth) as ex:
    state_dict = ex.attempt(import_torch.load_torch_state_dict, str(path))
    if state_dict is not None:
      assert all(isinstance(v, torch.Tensor) for v in state_dict.values())
      # Data comes from the file: no tensor can hold more bytes than the file has.
      assert all(v.untyped_storage().nbytes() <= len(pth) for v in state_dict.values())
  assert not sentinel.exists()
  return ex.outcome


@fuzzes('.pth importer')
@given(data=st.data())
def test_pth_importer(workdir, data):
  pytest.importorskip('torch')
  sentinel = workdir / 'pth-code-ran'
  pth_zip, pth_legacy, _ = pth_seeds()
  pth, attacked = data.draw(st.one_of(fuzzed(pth_zip).map(lambda b: (b, False)),
                                      fuzzed(pth_legacy).map(lambda b: (b, False)),
                                      pth_member_mutations(sentinel)))
  outcome = _check_pth(workdir, pth, sentinel)
  if attacked:
    assert outcome == 'UnsafeCheckpointError'


def _pth_regression(name):
  pth_zip, pth_legacy, members = pth_seeds()
  zero_bomb = [(n, bytes(64 << 20) if n.endswith('data/0') else b) for n, b in members]
  return {
      'empty': b'',
      'zip_head': pth_zip[:200],
      'zip_tail_cut': pth_zip[:-10],
      'legacy_head': pth_legacy[:40],
      'short_storage': rezip([(n, b[:-4] if n.endswith('data/0') else b) for n, b in members]),
      'deflate_bomb': rezip(zero_bomb, zipfile.ZIP_DEFLATED),
  }[name]


@pytest.mark.parametrize('name', ['empty', 'zip_head', 'zip_tail_cut', 'legacy_head',
                                  'short_storage', 'deflate_bomb'])
def test_pth_importer_regressions(workdir, name):
  """Damaged files let torch's own errors (RuntimeError, EOFError) escape (found by the fuzzer); a
  64 MiB tensor deflated into 64 KB was inflated before any check (found in review)."""
  pytest.importorskip('torch')
  _check_pth(workdir, _pth_regression(name), workdir / 'pth-code-ran', max_growth=16 << 20)


# ---------------------------------------------------------------------- photos (open_rgb)


def _photo_seeds():
  from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel
  face = skimage_data.astronaut()[40:88:2, 180:220]  # 24 x 40, a real photo
  rgb = Image.fromarray(np.ascontiguousarray(face))
  seeds = {}

  def save(name, image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, **kwargs)
    seeds[name] = buffer.getvalue()

  exif = Image.Exif()
  exif[0x0112] = 6  # EXIF orientation: rotate on reading
  save('exif.jpg', rgb, format='JPEG', quality=90, exif=exif.tobytes())
  save('progressive.jpg', rgb, format='JPEG', progressive=True)
  save('rgb.png', rgb, format='PNG')
  save('palette.png', rgb.convert('P'), format='PNG', transparency=0)
  save('frames.gif', rgb.convert('P'), format='GIF', save_all=True,
       append_images=[rgb.rotate(90).convert('P')])
  save('lzw.tif', rgb, format='TIFF', compression='tiff_lzw')
  save('raw.tif', rgb, format='TIFF')
  save('rgb.bmp', rgb, format='BMP')
  save('lossy.webp', rgb, format='WEBP')
  save('gray.pgm', rgb.convert('L'), format='PPM')
  return seeds


PHOTO_SEEDS = _photo_seeds()
PHOTO_FIELDS = {name: value_fields(data, (24, 40), ('u16le', 'u16be', 'u32le', 'u32be'))
                for name, data in PHOTO_SEEDS.items()}


@st.composite
def photos(draw):
  name = draw(st.sampled_from(sorted(PHOTO_SEEDS)))
  data = draw(fuzzed(PHOTO_SEEDS[name], PHOTO_FIELDS[name]))
  return name, fix_png_crcs(data) if draw(st.booleans()) else data


# The reader admits photos of up to MAX_PIXELS (a 3 KB JPEG may claim 65535x1000 and decode as
# gray); reading one holds a few RGB copies at once. Beyond that, the cap was bypassed.
PHOTO_PEAK_LIMIT = 4 * 3 * images.MAX_PIXELS


def _check_photo(workdir, name, data):
  path = _write(workdir / f'photo{os.path.splitext(name)[1]}', data)
  with fuzz_example('photo reader (open_rgb)', [path], (images.ImageError,),
                    PHOTO_PEAK_LIMIT) as ex:
    pixels = ex.attempt(images.read_rgb, str(path))
    if pixels is not None:
      assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
      assert 0 < pixels.shape[0] * pixels.shape[1] <= images.MAX_PIXELS


@fuzzes('photo reader (open_rgb)')
@given(photo=photos())
def test_photo_reader(workdir, photo):
  _check_photo(workdir, *photo)


def _tiff(width, height):
  """A minimal uncompressed 8-bit grayscale TIFF header claiming width x height (LONG fields)."""
  entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
             (262, 3, 1, 1), (273, 4, 1, 8), (278, 4, 1, height), (279, 4, 1, 16)]
  ifd = struct.pack('<H', len(entries)) + b''.join(
      struct.pack('<HHII', tag, kind, count, value) for tag, kind, count, value in entries)
  return b'II*\x00' + struct.pack('<I', 24) + bytes(16) + ifd + b'\x00' * 4


def _jpeg_with_size(width, height):
  seed = JPEG_PAYLOADS[0]
  return patched(seed, seed.find(b'\xff\xc0') + 5, struct.pack('>HH', height, width))


def _gif(width, height):
  return (b'GIF89a' + struct.pack('<HHBBB', width, height, 0, 0, 0) + b',' +
          struct.pack('<HHHHB', 0, 0, width, height, 0) + b'\x02\x02\x4c\x01\x00;')


def _ico_around(png):
  """An .ico whose directory says 256x256 but whose embedded PNG is `png`."""
  return (struct.pack('<HHH', 0, 1, 1) + struct.pack('<BBBBHHII', 0, 0, 0, 0, 1, 32, len(png), 22)
          + png)


# 9000 x 9000 = 81M pixels: over MAX_PIXELS, under PIL's own bomb limit, under 100 KB as a PNG.
_PNG_BOMB = png_bytes(9000, 9000)
PHOTO_BOMBS = {
    'png_100000.png': png_bytes(100000, 100000, rows=b''),
    'png_zlib_bomb.png': _PNG_BOMB,
    'jpeg_65535.jpg': _jpeg_with_size(65535, 65535),
    'gif_65535.gif': _gif(65535, 65535),
    'tiff_100000.tif': _tiff(100000, 100000),
    'tiff_9000.tif': _tiff(9000, 9000),
    'ico_hiding_a_bomb.ico': _ico_around(_PNG_BOMB),
    'eps_runs_ghostscript.eps': b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n',
}


@pytest.mark.parametrize('name', sorted(PHOTO_BOMBS))
def test_photo_bombs_are_refused_before_decoding(workdir, name):
  """Headers claiming absurd sizes, and a real zlib bomb: refused, fast, with little memory."""
  path = _write(workdir / name, PHOTO_BOMBS[name])
  start = time.perf_counter()
  with fuzz_example('photo reader (open_rgb)', [path], (images.ImageError,), 32 << 20) as ex:
    assert ex.attempt(images.read_rgb, str(path)) is None
  assert ex.outcome == 'ImageError'
  assert time.perf_counter() - start < 5
  if name.endswith(('.ico', '.eps')):  # refused by format, before any of the plugin's code runs
    assert 'photos are read as JPEG, PNG' in str(ex.error)


def test_converter_refuses_a_wrong_size_before_decoding(workdir):
  """An 8000x8000 zlib bomb in a 112x112 folder: the size is read from the header, not decoded."""
  bomb = png_bytes(8000, 8000)
  fuzzing.reset_peak_rss()
  before = fuzzing.peak_rss_bytes()
  reason = convert.check_image(bomb, (112, 112))
  assert reason == 'image is 8000x8000, property says 112x112'
  assert fuzzing.peak_rss_bytes() - before < 32 << 20


# ---------------------------------------------------------------------------- IJB meta files

IJB_TARGET = 'IJBC'
# Lines in the layout insightface distributes (image, template, media / 10 landmarks, faceness /
# template pair, label / 1:N CSVs with a header).
IJB_SEEDS = {
    'face_tid_mid.txt': b'1.jpg 1 69544\n2.jpg 1 69544\n3.jpg 2 69545\n4.jpg 3 69546\n'
                        b'5.jpg 4 69547\n',
    'name_5pts_score.txt': b''.join(
        f'{i}.jpg 38.29 51.69 73.53 51.50 56.02 71.73 41.55 92.37 70.73 92.20 0.99{i}\n'.encode()
        for i in range(1, 6)),
    'template_pair_label.txt': b'1 2 1\n1 3 0\n2 4 0\n3 4 1\n',
    '1N_gallery_G1.csv': b'TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,10,1.jpg\n1,10,2.jpg\n',
    '1N_gallery_G2.csv': b'TEMPLATE_ID,SUBJECT_ID,FILENAME\n2,11,3.jpg\n',
    '1N_probe_mixed.csv': b'TEMPLATE_ID,SUBJECT_ID,FILENAME\n3,10,4.jpg\n4,11,5.jpg\n',
}


@st.composite
def ijb_trees(draw):
  """The meta files with one (sometimes two) mutated; an optional CSV may also be left out."""
  files = dict(IJB_SEEDS)
  for name in draw(st.lists(st.sampled_from(sorted(files)), min_size=1, max_size=2,
                            unique=True)):
    files[name] = draw(fuzzed(files[name], text=True, max_random=512))
  if draw(st.integers(0, 9)) == 0:
    del files[draw(st.sampled_from(sorted(n for n in files if n.endswith('.csv'))))]
  return files


def _write_ijb(root, files):
  meta_dir = root / IJB_TARGET / 'meta'
  shutil.rmtree(root, ignore_errors=True)
  meta_dir.mkdir(parents=True)
  for name, data in files.items():
    _write(ijb_meta.meta_path(str(root), IJB_TARGET, name), data)
  return meta_dir


@fuzzes('IJB meta readers')
@given(files=ijb_trees())
# Found by the fuzzer: bytes that are not UTF-8 (UnicodeDecodeError without the path). Found in
# review: an integer past int64 (OverflowError, then StopIteration looking for the bad line).
@example(files={**IJB_SEEDS, 'template_pair_label.txt': b'1 2 \xff\n'})
@example(files={**IJB_SEEDS, '1N_probe_mixed.csv': b'TEMPLATE_ID\n\xc3,1\n'})
@example(files={**IJB_SEEDS, 'face_tid_mid.txt': b'1.jpg 99999999999999999999 1\n'})
@example(files={**IJB_SEEDS, '1N_gallery_G2.csv': b'TEMPLATE_ID\n2,99999999999999999999\n'})
def test_ijb_meta(workdir, files):
  root = workdir / 'ijb'
  meta_dir = _write_ijb(root, files)
  with fuzz_example('IJB meta readers', [meta_dir], (ijb_meta.IJBError,)) as ex:
    meta = ex.attempt(ijb_meta.read, str(root), IJB_TARGET)
    if meta is not None:
      faces = len(meta.images)
      assert len(meta.templates) == len(meta.medias) == len(meta.faceness) == faces
      assert meta.landmarks.shape == (faces, 5, 2)
      assert meta.pairs.shape == (len(meta.labels), 2)
      assert np.isin(meta.pairs, meta.templates).all()
