"""Verification sets (`lfw.bin`, `cfp_fp.bin`, ...): safe loading and atomic saving.

A `.bin` is a pickle of `(bins, issame_list)`: 2P encoded images (pair i = images 2i, 2i+1) and
P booleans. Unpickling runs whatever callables the file names, so `load_bin` uses an unpickler
that admits only what such files hold: lists/tuples of bytes and bools (no global at all), plus
the two harmless helpers some writers need: `_codecs.encode` (how Python 3 writes bytes under
pickle protocol <= 2) and numpy's plain-array reconstruction, limited to bool/int/float dtypes.
Anything else raises `UnsafePickleError` before it can run.

Untrusted files cannot make the loader allocate much beyond what they hold: the unpickler keeps its
memo in a dict (the C unpickler sizes an array by the largest memo index a file names), numpy arrays
are only rebuilt the way numpy pickles them, and images are JPEG/PNG whose header size is checked
(at most MAX_IMAGE_PIXELS, all alike) before any pixel is decoded.

Images are decoded as stored, into RGB (PIL's order): the original MultiFace code swapped
channels to BGR when loading; this project is RGB throughout.
"""
import concurrent.futures
import io
import os
import pickle
import tempfile

import numpy as np
from PIL import Image

from multiface_jax.data import emore

_SAFE_DTYPE_KINDS = 'biuf'  # bool, signed and unsigned integers, floats
# A face crop: insightface's sets hold 112x112 images. Bigger headers are refused before decoding.
MAX_IMAGE_PIXELS = 1024 * 1024
_IMAGE_FORMATS = ('JPEG', 'PNG')


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle names a global that a verification set never needs; nothing was executed."""

  def __init__(self, path, global_name):
    self.path = str(path)
    self.global_name = global_name
    super().__init__(
        f'{self.path}: refused to load global {global_name!r}: a verification .bin holds only '
        'lists of encoded images and booleans, so this file is not one (or was crafted to run '
        'code); nothing from it was executed. Re-create it with save_bin / '
        '`python -m multiface_jax.data.make_pairs`, or get the file from a trusted source')

  def __reduce__(self):
    return type(self), (self.path, self.global_name)


def _numpy_multiarray():
  try:
    from numpy._core import multiarray  # numpy >= 2
  except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray
  return multiarray


class _SafeUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Resolves only the few globals listed in `_allowed`; every other name is refused.

  The pure-Python unpickler: its memo is a dict, where the C one grows an array to twice the
  largest index a PUT names (one 5-byte LONG_BINPUT of 2**30 makes it zero 16 GiB). Files hold few
  opcodes (a few per image), so the speed difference does not show.
  """

  def __init__(self, file, path):
    super().__init__(file, encoding='bytes')  # Python 2 `str` images become bytes.
    self._path = path
    multiarray = _numpy_multiarray()

    def refuse(what):
      raise UnsafePickleError(path, what)

    def encode_latin1(text, encoding='latin1'):
      if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        refuse(f'_codecs.encode({type(text).__name__}, {encoding!r})')
      return text.encode('latin1')

    def safe_dtype(spec, align=False, copy=False):
      if isinstance(spec, bytes):
        spec = spec.decode('ascii')
      if not isinstance(spec, str):
        refuse(f'numpy.dtype({type(spec).__name__})')
      dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
      if dtype.kind not in _SAFE_DTYPE_KINDS:
        refuse(f'numpy.dtype({spec!r})')
      return dtype

    def ndarray_type(*args, **kwargs):  # what ('numpy', 'ndarray') resolves to
      refuse(f'numpy.ndarray{args}: numpy pickles arrays through _reconstruct, never by calling '
             'ndarray')

    def safe_reconstruct(subtype, shape, dtype_spec):
      if subtype is not ndarray_type:
        refuse(f'numpy array of type {subtype!r}')
      # numpy pickles an array as an empty one plus a state holding the shape and the bytes
      # (checked against each other by __setstate__); a shape here would be allocated unfilled.
      if not isinstance(shape, tuple) or 0 not in shape:
        refuse(f'numpy _reconstruct of shape {shape!r} (numpy writes (0,))')
      return multiarray._reconstruct(np.ndarray, shape, safe_dtype(dtype_spec))

    def safe_scalar(dtype, *args):
      if not isinstance(dtype, np.dtype) or dtype.kind not in _SAFE_DTYPE_KINDS:
        refuse(f'numpy scalar of dtype {dtype!r}')
      return multiarray.scalar(dtype, *args)

    def safe_frombuffer(buffer, dtype, shape, order):  # how pickle protocol 5 stores arrays
      if not isinstance(dtype, np.dtype) or dtype.kind not in _SAFE_DTYPE_KINDS:
        refuse(f'numpy array of dtype {dtype!r}')
      return np.frombuffer(buffer, dtype).reshape(shape, order=order).copy()

    self._allowed = {
        ('_codecs', 'encode'): encode_latin1,
        ('numpy', 'dtype'): safe_dtype,
        ('numpy', 'ndarray'): ndarray_type,
        ('numpy.core.multiarray', '_reconstruct'): safe_reconstruct,
        ('numpy._core.multiarray', '_reconstruct'): safe_reconstruct,
        ('numpy.core.multiarray', 'scalar'): safe_scalar,
        ('numpy._core.multiarray', 'scalar'): safe_scalar,
        ('numpy.core.numeric', '_frombuffer'): safe_frombuffer,
        ('numpy._core.numeric', '_frombuffer'): safe_frombuffer,
    }

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(self._path, f'{module}.{name}') from None


def _as_encoded_bytes(item, index, path):
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
    return item.tobytes()
  raise ValueError(f'{path}: image {index} is a {type(item).__name__}, expected encoded image '
                   'bytes; not a verification .bin')


def _as_issame(issame, num_images, path):
  try:
    values = np.asarray(issame)
    flat_bools = values.ndim == 1 and (values.dtype == bool or bool(np.isin(values, (0, 1)).all()))
    found = f'{values.dtype} of shape {values.shape}'
  except (ValueError, TypeError, RecursionError):  # ragged, self-containing or odd contents
    flat_bools, found = False, f'a {type(issame).__name__} numpy cannot read as an array'
  if not flat_bools:
    raise ValueError(f'{path}: issame_list must be a flat list of booleans, got {found}; not a '
                     'verification .bin')
  if num_images != 2 * len(values):
    raise ValueError(f'{path}: {num_images} images for {len(values)} pairs (need exactly 2 per '
                     'pair): the file is truncated or not a verification .bin')
  return values.astype(bool)


def read_bin(path):
  """Safely unpickles a `.bin` without decoding its images.

  Args:
    path: the `.bin` file.

  Returns:
    (list of 2P encoded images as bytes, issame bool ndarray (P,)).

  Raises:
    UnsafePickleError: the pickle names a global outside the admitted few.
    ValueError: the file is not a `(bins, issame_list)` pickle.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    try:
      data = _SafeUnpickler(f, path).load()
    except UnsafePickleError:
      raise
    except Exception as e:  # pickle raises many types on garbage input.
      raise ValueError(f'{path}: not a readable pickle ({type(e).__name__}: {e}); is it a '
                       'verification .bin?') from None
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise ValueError(f'{path}: expected a pickled (bins, issame_list) pair, got '
                     f'{type(data).__name__}; not a verification .bin')
  bins, issame = data
  if not isinstance(bins, (list, tuple)):
    raise ValueError(f'{path}: bins is a {type(bins).__name__}, expected a list of encoded images')
  encoded = [_as_encoded_bytes(item, i, path) for i, item in enumerate(bins)]
  return encoded, _as_issame(issame, len(encoded), path)


class ImageSizeError(ValueError):
  """An image whose header size is refused (read before decoding it)."""

  def __init__(self, size, message=None):
    self.size = tuple(size)
    super().__init__(message or f'image is {self.size}')


def decode_image(encoded, size=None):
  """Decodes JPEG/PNG bytes to an RGB uint8 (H, W, 3) array (gray images get 3 channels).

  Args:
    encoded: the image bytes.
    size: the (height, width) the image must have, or None for any size up to MAX_IMAGE_PIXELS.

  Raises:
    ImageSizeError: the header gives another size (or too many pixels); nothing was decoded.
    OSError, ValueError, ...: PIL's errors for bytes that are not a decodable JPEG/PNG.
  """
  with Image.open(io.BytesIO(encoded), formats=_IMAGE_FORMATS) as image:
    width, height = image.size
    if size is not None and (height, width) != tuple(size):
      raise ImageSizeError((height, width))
    if width * height > MAX_IMAGE_PIXELS:
      raise ImageSizeError((height, width), f'{width}x{height} pixels is more than the '
                           f'{MAX_IMAGE_PIXELS:,} a face crop of a verification set may have')
    return np.asarray(image.convert('RGB'))


def load_bin(path, *, num_threads=4):
  """Loads a verification set.

  Args:
    path: the `.bin` file.
    num_threads: decoding threads (PIL releases the GIL while decoding).

  Returns:
    (images uint8 (2P, H, W, 3) RGB, issame bool (P,)).

  Raises:
    UnsafePickleError: the pickle names a disallowed global (nothing was executed).
    ValueError: malformed content, an undecodable image, or images of different sizes.
  """
  path = os.fspath(path)
  encoded, issame = read_bin(path)
  if not encoded:
    raise ValueError(f'{path}: holds no pairs')

  def decode(index, size=None):
    try:
      return decode_image(encoded[index], size)
    except ImageSizeError as e:
      if size is None:
        raise ValueError(f'{path}: image {index} (pair {index // 2}): {e}; not a verification '
                         'set (or one of uncropped photos: crop the faces first)') from None
      raise ValueError(f'{path}: image {index} is {e.size}, image 0 is {size}; all images of a '
                       'set must have one size') from None
    except Exception as e:
      raise ValueError(f'{path}: image {index} (pair {index // 2}) cannot be decoded '
                       f'({type(e).__name__}: {e}); the file is corrupt') from None

  first = decode(0)
  images = np.empty((len(encoded),) + first.shape, np.uint8)
  images[0] = first

  def decode_into(index):
    # The header's size is checked before decoding: a mismatch costs no pixel memory.
    images[index] = decode(index, first.shape[:2])

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for _ in pool.map(decode_into, range(1, len(encoded))):
      pass
  return images, issame


def _default_file_mode():
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def save_bin(path, encoded_images, issame):
  """Writes a verification set the way insightface does, atomically.

  The pickle goes to a hidden temporary file in the same folder (not matching `*.bin`) that
  replaces `path` only once complete, so a crash never leaves a half-written set behind.

  Args:
    path: destination `.bin`.
    encoded_images: 2P JPEG/PNG byte strings; pair i is images 2i and 2i+1.
    issame: P booleans.
  """
  path = os.fspath(path)
  encoded = [_as_encoded_bytes(item, i, path) for i, item in enumerate(encoded_images)]
  issame = _as_issame(list(issame), len(encoded), path)
  for i, item in enumerate(encoded):
    if not emore.is_encoded_image(item):
      raise ValueError(f'{path}: image {i} is not JPEG or PNG bytes (starts {item[:8]!r})')
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.',
                                  suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      pickle.dump((encoded, [bool(v) for v in issame]), f, protocol=4)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp_path, _default_file_mode())  # mkstemp's 0600 would hide the set from others.
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
