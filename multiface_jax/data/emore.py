"""An insightface "emore" training folder: `train.rec`, `train.idx`, `property`, `*.bin`.

`property` is the text `num_classes,height,width`. Record 0 of `train.rec` is a header record
(flag > 0) whose label[0] is one past the last image key, so the images are keys
1..label[0]-1 and the records from label[0] to label[1]-1 describe one identity each
(label = (first image key, last + 1)). Folders written without that header (record 0 is an image,
flag 0) hold only image records.
"""
import glob
import math
import os

from multiface_jax.data import recordio

_JPEG_MAGIC = b'\xff\xd8\xff'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

_LAYOUT = ('an emore folder holds train.rec, train.idx and property (text "num_classes,h,w"), '
           'plus verification sets *.bin; create one from a folder of images with '
           '`python -m multiface_jax.data.from_folder --src=ROOT --dst=DIR`')


def is_encoded_image(payload):
  """True when `payload` starts like a JPEG or PNG file (a cheap check, nothing is decoded)."""
  return payload.startswith(_JPEG_MAGIC) or payload.startswith(_PNG_MAGIC)


def read_property(path):
  """Parses a `property` file.

  Args:
    path: the file, holding `num_classes,height,width`.

  Returns:
    (num_classes, (height, width)).
  """
  with open(path, encoding='ascii', errors='replace') as f:
    text = f.read().strip()
  try:
    num_classes, height, width = (int(v) for v in text.split(','))
  except ValueError:
    raise ValueError(f'{path}: expected "num_classes,height,width" (e.g. 85742,112,112), '
                     f'found {text[:80]!r}') from None
  if num_classes <= 0 or height <= 0 or width <= 0:
    raise ValueError(f'{path}: num_classes, height and width must be positive, found {text!r}')
  return num_classes, (height, width)


def _integer_labels(header, rec_path, where):
  """The labels of a header or identity record as ints; RecordIOError when one is not an integer."""
  labels = [float(header.label)] if header.flag == 0 else [float(v) for v in header.label]
  for value in labels:
    if not (math.isfinite(value) and value.is_integer()):
      raise recordio.RecordIOError(
          rec_path, where, f'label {value} is not an integer key (labels {labels[:4]}): the '
          'record is corrupt; re-create the folder')
  return [int(v) for v in labels]


class EmoreFolder:
  """Reads the images and labels of an emore folder by key.

  Attributes:
    src_dir: the folder.
    num_classes: identities, from `property`.
    image_size: (height, width), from `property`.
    image_keys: keys of the image records (a `range` when the folder has a header record).
    identity_keys: keys of the per-identity records (empty when there is no header record).
    reader: the underlying `recordio.RecordIOReader`.
  """

  def __init__(self, src_dir):
    """Opens `src_dir`.

    Raises:
      FileNotFoundError: train.rec, train.idx or property is missing.
      RecordIOError / ValueError: the files are corrupt.
    """
    self.src_dir = os.fspath(src_dir)
    if not os.path.isdir(self.src_dir):
      raise FileNotFoundError(f'emore folder {self.src_dir} does not exist; {_LAYOUT}')
    paths = {name: os.path.join(self.src_dir, name)
             for name in ('train.rec', 'train.idx', 'property')}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if missing:
      raise FileNotFoundError(f'{self.src_dir} lacks {", ".join(missing)}; {_LAYOUT}')
    self.num_classes, self.image_size = read_property(paths['property'])
    self.rec_path = paths['train.rec']
    self.reader = recordio.RecordIOReader(paths['train.rec'], paths['train.idx'])
    self.image_keys, self.identity_keys = self._layout()

  def _layout(self):
    if len(self.reader) == 0:
      raise recordio.RecordIOError(self.rec_path, 'file', f'no records; {_LAYOUT}')
    first_key = 0 if 0 in self.reader else self.reader.keys()[0]
    header, _ = self._unpack(first_key)
    if header.flag == 0:
      return self.reader.keys(), range(0)
    labels = _integer_labels(header, self.rec_path, f'key {first_key} (header record)')
    end_images = labels[0]
    end_identities = labels[1] if len(labels) > 1 else end_images
    if not 1 <= end_images <= len(self.reader):
      raise recordio.RecordIOError(
          self.rec_path, f'key {first_key} (header record)',
          f'label[0] = {end_images} should be one past the last image key, but the file holds '
          f'{len(self.reader)} records: the header record is corrupt; re-create the folder')
    # The identity records follow the images; a label past the file would list keys that do not
    # exist (up to 2**127 of them from one float).
    if end_identities > len(self.reader):
      raise recordio.RecordIOError(
          self.rec_path, f'key {first_key} (header record)',
          f'label[1] = {end_identities} should be one past the last identity key, but the file '
          f'holds {len(self.reader)} records: the header record is corrupt; re-create the folder')
    return range(1, end_images), range(end_images, max(end_images, end_identities))

  def _unpack(self, key):
    record = self.reader.read(key)
    try:
      return recordio.unpack(record)
    except ValueError as e:
      raise recordio.RecordIOError(self.rec_path, f'key {key}', f'{e}; the record is corrupt') \
          from None

  @property
  def num_images(self):
    return len(self.image_keys)

  def read_image(self, key):
    """Returns (label: int, encoded image bytes) of the image record `key`.

    Raises:
      RecordIOError: unknown key, corrupt record, label outside [0, num_classes) or a payload
        that is not a JPEG/PNG.
    """
    header, payload = self._unpack(key)
    # Some sets (glint, webface) store a label vector whose first entry is the identity.
    label = float(header.label[0]) if header.flag > 0 else float(header.label)
    if not (label == label and label.is_integer() and 0 <= label < self.num_classes):
      raise recordio.RecordIOError(
          self.rec_path, f'key {key}',
          f'label {label} is not an identity in [0, {self.num_classes}) (num_classes from '
          f'{os.path.join(self.src_dir, "property")}); is this an image record and does property '
          'match train.rec?')
    if not is_encoded_image(payload):
      raise recordio.RecordIOError(
          self.rec_path, f'key {key}',
          f'payload of {len(payload)} bytes starting {payload[:8]!r} is not a JPEG or PNG image; '
          'the record is corrupt or not an image record')
    return int(label), payload

  def identity_range(self, key):
    """Returns (first image key, last + 1) stored in the identity record `key`.

    Raises:
      RecordIOError: unknown key, corrupt record, or a record without two integer labels.
    """
    header, _ = self._unpack(key)
    labels = _integer_labels(header, self.rec_path, f'key {key}')
    if len(labels) < 2:
      raise recordio.RecordIOError(
          self.rec_path, f'key {key}',
          f'an identity record holds two labels (first image key, last + 1), this one holds '
          f'{len(labels)}; is it an identity record?')
    return labels[0], labels[1]

  def verification_bins(self):
    """Returns the sorted paths of the verification sets (`*.bin`) in the folder."""
    return sorted(glob.glob(os.path.join(glob.escape(self.src_dir), '*.bin')))

  def close(self):
    self.reader.close()
