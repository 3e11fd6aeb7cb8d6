"""The harness of ``test_fuzz.py``: hypothesis profiles, the guards and outcome counts around
every example (hang watchdog, peak-memory check, documented errors only), and the mutation
strategies that turn a real-format file into thousands of damaged ones."""
import collections
import contextlib
import ctypes
import datetime
import faulthandler
import os
import re
import resource
import struct
import tempfile
import zlib

from hypothesis import configuration as hypothesis_configuration
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_COMMON = dict(
    database=None,  # nothing written into the repository
    deadline=datetime.timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
    print_blob=True,
)
# Hypothesis also caches constants and Unicode tables on disk: keep them out of the checkout too.
hypothesis_configuration.set_hypothesis_home_dir(
    os.path.join(tempfile.gettempdir(), 'multiface-fuzz-hypothesis'))
settings.register_profile('ci', max_examples=40, derandomize=True, **_COMMON)
settings.register_profile('thorough', max_examples=2000, derandomize=True, **_COMMON)
PROFILE = os.environ.get('MULTIFACE_FUZZ_PROFILE', 'ci')
settings.load_profile(PROFILE)

# A real hang (a C loop that never returns to Python) is ended by faulthandler's watchdog thread:
# it prints every thread's stack and exits, which fails the run loudly.
HANG_SECONDS = float(os.environ.get('MULTIFACE_FUZZ_HANG_SECONDS', 60))
# Every seed input is at most ~75 KB and decodes to a few MB; a parser that allocates after an
# absurd header field instead of refusing it shows up as a jump far beyond that.
MAX_PEAK_GROWTH = 128 << 20

# ------------------------------------------------------------------------ outcome bookkeeping

COUNTS = collections.defaultdict(collections.Counter)  # parser -> outcome -> examples
SECONDS = collections.Counter()  # parser -> wall seconds of its tests


def peak_rss_bytes():
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      return int(re.search(r'VmHWM:\s+(\d+) kB', f.read())[1]) << 10
  except OSError:  # not Linux: the process-wide peak (cannot be reset, so weaker)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


try:
  _malloc_trim = ctypes.CDLL('libc.so.6').malloc_trim
except (OSError, AttributeError):  # not glibc
  _malloc_trim = None


def reset_peak_rss():
  """Resets the high-water mark so the next reading is this example's peak; False if unsupported.

  Freed heap memory is first handed back to the system: memory the allocator still holds would be
  reused without raising the mark, hiding an allocation.
  """
  if _malloc_trim is not None:
    _malloc_trim(0)
  try:
    with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
      f.write('5')
    return True
  except OSError:
    return False


WATCHDOG = []  # the terminal's stderr, copied while pytest's capture was off


class _Example:
  """One fuzz example: the calls it makes and the first documented error it met."""

  def __init__(self, paths, errors):
    self.paths = [os.fspath(p) for p in paths]
    self.errors = tuple(errors)
    self.outcome = 'result'
    self.error = None

  def attempt(self, function, *args, **kwargs):
    """Calls function; returns its value, or None after a documented error naming the file.

    Any other exception (an undocumented type, or a message that names none of the files)
    propagates and fails the property.
    """
    try:
      return function(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if type(e) not in self.errors:
        raise AssertionError(f'{type(e).__name__} is not one of the documented errors '
                             f'{[c.__name__ for c in self.errors]}: {e}') from e
      if not any(path in str(e) for path in self.paths):
        raise AssertionError(f'{type(e).__name__} message names none of {self.paths}: {e}') from e
      if self.outcome == 'result':
        self.outcome, self.error = type(e).__name__, e
      return None

  def note(self, outcome):
    """Records an outcome other than a result or an error (e.g. a record the converter skips)."""
    if self.outcome == 'result':
      self.outcome = outcome


@contextlib.contextmanager
def fuzz_example(parser, paths, errors, max_growth=MAX_PEAK_GROWTH):
  """Runs one example under the hang and memory guards and counts its outcome."""
  example_ = _Example(paths, errors)
  measured = reset_peak_rss()
  before = peak_rss_bytes()
  if WATCHDOG:
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=WATCHDOG[0])
  try:
    yield example_
  except BaseException:
    COUNTS[parser]['crash'] += 1
    raise
  finally:
    if WATCHDOG:
      faulthandler.cancel_dump_traceback_later()
  growth = peak_rss_bytes() - before
  if measured and growth > max_growth:
    COUNTS[parser]['crash'] += 1
    raise AssertionError(f'{parser}: peak memory grew by {growth >> 20} MiB on one input')
  COUNTS[parser][example_.outcome] += 1


def fuzzes(parser):
  """Marks a test as fuzzing `parser`, so its wall time is counted for it."""
  def mark(function):
    function.fuzz_parser = parser
    return function
  return mark


def count_table():
  """The outcome counts per parser, as written to MULTIFACE_FUZZ_COUNTS."""
  table = {}
  for parser in sorted(set(COUNTS) | set(SECONDS)):
    outcomes = COUNTS[parser]
    errors = {k: v for k, v in sorted(outcomes.items())
              if k not in ('result', 'crash', 'skipped')}
    table[parser] = {
        'examples': sum(outcomes.values()),
        'results': outcomes['result'],
        'skipped': outcomes['skipped'],
        'errors': errors,
        'crashes': outcomes['crash'],
        'wall_seconds': round(SECONDS[parser], 1),
    }
  return table


def format_table(table):
  lines = [f'fuzz counts (profile {PROFILE}):',
           f'{"parser":<36}{"examples":>9}{"results":>9}{"skipped":>9}{"crashes":>9}{"wall s":>8}'
           '  errors by class']
  for parser, row in table.items():
    errors = ', '.join(f'{k} {v}' for k, v in row['errors'].items()) or '-'
    lines.append(f'{parser:<36}{row["examples"]:>9}{row["results"]:>9}{row["skipped"]:>9}'
                 f'{row["crashes"]:>9}{row["wall_seconds"]:>8.1f}  {errors}')
  return '\n'.join(lines)


# -------------------------------------------------------------------------------- mutations

# Values that break length and count arithmetic: around the 2**29 RecordIO limit, the int32,
# uint32 and int64 edges, and 100000 (an image side no header should be trusted with).
ABSURD_INTS = (0, 1, 2, 3, 7, 255, 256, 65535, 65536, 100000, (1 << 29) - 1, 1 << 29,
               (1 << 29) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1)
ABSURD_FLOATS = (float('nan'), float('inf'), float('-inf'), -1.0, 0.5, 1e30, 2.0 ** 31, 3e38)
# What a hand-edited or damaged text file may hold where a number should be.
ODD_TOKENS = (b'', b'0', b'-1', b'1.5', b'nan', b'inf', b'-inf', b'1e400', b'0x10', b'1_0',
              b'99999999999999999999', str(1 << 63).encode(), b'\xd9\xa3', b'\xff\xfe',
              b'\xc3', b'\x00', b' ', b'\t', b',', b'\n', b'\r\n', b'abc')
_FIELD_FORMATS = {'u16le': '<H', 'u16be': '>H', 'u32le': '<I', 'u32be': '>I', 'u64le': '<Q',
                  'f32le': '<f'}
_MUTATIONS = ('flip', 'byte', 'truncate', 'insert', 'delete', 'duplicate', 'integer')
_TEXT_MUTATIONS = ('token', 'dup_line', 'del_line')


def _field_bytes(kind, value):
  fmt = _FIELD_FORMATS[kind]
  if kind.startswith('f'):
    return struct.pack(fmt, value)
  return struct.pack(fmt, value % (1 << (8 * struct.calcsize(fmt))))


@st.composite
def mutated(draw, seed, fields=(), text=False, max_mutations=4):
  """A copy of `seed` with 1..max_mutations mutations.

  Args:
    seed: the real-format bytes.
    fields: (offset, kind) of header fields worth hitting ('u32le', 'f32le', ...): an absurd value
      is written there in the format the parser reads.
    text: also mutate whole lines and whitespace/comma-separated tokens.
    max_mutations: at most this many mutations.
  """
  data = bytearray(seed)
  kinds = _MUTATIONS + (_TEXT_MUTATIONS if text else ()) + (('field',) * 3 if fields else ())
  for _ in range(draw(st.integers(1, max_mutations))):
    kind = draw(st.sampled_from(kinds))
    n = len(data)
    pos = draw(st.integers(0, max(n - 1, 0)))
    if kind == 'field':
      offset, field = draw(st.sampled_from(fields))
      values = ABSURD_FLOATS if field.startswith('f') else ABSURD_INTS
      value = draw(st.sampled_from(values))
      raw = _field_bytes(field, value)
      if offset + len(raw) <= n:
        data[offset:offset + len(raw)] = raw
    elif kind == 'flip' and n:
      data[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == 'byte' and n:
      data[pos] = draw(st.integers(0, 255))
    elif kind == 'truncate':
      del data[pos:]
    elif kind == 'insert':
      data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    elif kind == 'delete':
      del data[pos:pos + draw(st.integers(1, 64))]
    elif kind == 'duplicate':
      data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))]
    elif kind == 'integer':
      field = draw(st.sampled_from(sorted(_FIELD_FORMATS)))
      raw = _field_bytes(field, draw(st.sampled_from(
          ABSURD_FLOATS if field.startswith('f') else ABSURD_INTS)))
      data[pos:pos + len(raw)] = raw
    elif kind == 'token':
      start, end = pos, pos
      while start > 0 and data[start - 1] not in b' \t\n,':
        start -= 1
      while end < n and data[end] not in b' \t\n,':
        end += 1
      data[start:end] = draw(st.sampled_from(ODD_TOKENS))
    elif kind in ('dup_line', 'del_line'):
      lines = bytes(data).split(b'\n')
      i = draw(st.integers(0, len(lines) - 1))
      if kind == 'dup_line':
        lines.insert(i, lines[i])
      else:
        del lines[i]
      data = bytearray(b'\n'.join(lines))
  return bytes(data)


def fuzzed(seed, fields=(), text=False, max_random=2048):
  """Mostly mutations of `seed` (its real format), sometimes fully random bytes."""
  mutation = mutated(seed, fields, text)
  return st.one_of(mutation, mutation, mutation, st.binary(max_size=max_random))


def value_fields(data, values, kinds):
  """(offset, kind) of every place `data` holds one of `values` encoded as one of `kinds`: how the
  dimension fields of an image are found whatever its format."""
  found = set()
  for kind in kinds:
    for value in values:
      raw = _field_bytes(kind, value)
      start = data.find(raw)
      while start >= 0:
        found.add((start, kind))
        start = data.find(raw, start + 1)
  return tuple(sorted(found))


def patched(data, offset, raw):
  """`data` with `raw` written at `offset` (the regression examples below)."""
  return data[:offset] + raw + data[offset + len(raw):]


def _png_chunk(kind, body):
  return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


def fix_png_crcs(data):
  """Recomputes the CRC of every PNG chunk, so that mutations reach past PIL's CRC check."""
  if not data.startswith(b'\x89PNG\r\n\x1a\n'):
    return data
  out, pos = bytearray(data[:8]), 8
  while pos + 8 <= len(data):
    length = struct.unpack('>I', data[pos:pos + 4])[0]
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
    if pos + 12 + length > len(data):
      out += data[pos:]
      return bytes(out)
    out += _png_chunk(kind, body)
    pos += 12 + length
  return bytes(out + data[pos:])


def png_bytes(width, height, rows=None):
  """An 8-bit grayscale PNG whose filtered rows are `rows` (zeros by default: a zlib bomb)."""
  raw = rows if rows is not None else b'\x00' * ((width + 1) * height)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8,
                                                                     0, 0, 0, 0))
          + _png_chunk(b'IDAT', zlib.compress(raw, 9)) + _png_chunk(b'IEND', b''))
