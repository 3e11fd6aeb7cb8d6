"""Turns a folder of face images (one sub-folder per identity) into an emore folder.

  python -m multiface_jax.data.from_folder --src=ROOT --dst=DIR [--image_size=112] [--align]

Identities are the sub-folders of ROOT in sorted order (labels 0..K-1); every file PIL can open is
an image. Each image is turned upright (EXIF) and converted to RGB (gray gets 3 channels). Then
either, for faces that are aligned already (as in emore), it is scaled so that the whole image
fits an image_size x image_size square (the longer side becomes image_size, bicubic; small images
are enlarged) and centred on a black square; or, with --align (raw photos), its largest face is
detected (YuNet) and aligned onto the ArcFace template (``inference.align``), and a photo without
a face is skipped. The square is JPEG-encoded at quality 95.

Output (the emore layout `EmoreFolder` reads): `train.rec`/`train.idx` with record 0 a header
(label = (num_images + 1, num_images + 1 + K)), image records 1..num_images (label = identity),
then one record per identity (label = (first image key, last + 1)); `property`
(`K,image_size,image_size`); `labels.txt` (`label<TAB>identity folder name`). Everything is
written under temporary names and renamed at the end, so an interrupted run leaves no folder that
looks complete.
"""
import concurrent.futures
import io
import os
import threading

from absl import app
from absl import flags
from absl import logging
from PIL import Image
from PIL import ImageOps
from PIL import UnidentifiedImageError

from multiface_jax.data import recordio
from multiface_jax.data import recordio_writer
from multiface_jax.inference import images

IMAGE_SIZE = 112
JPEG_QUALITY = 95
_FLOAT32_EXACT_INTEGERS = 1 << 24
_OUTPUT_FILES = ('train.idx', 'train.rec', 'labels.txt', 'property')  # property is renamed last.


def list_identity_dirs(root):
  """Returns the sorted paths of the non-hidden sub-folders of `root` (one per identity)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'{root} is not a folder; expected one sub-folder of images per '
                            'identity')
  dirs = sorted(entry.path for entry in os.scandir(root)
                if entry.is_dir() and not entry.name.startswith('.'))
  if not dirs:
    raise ValueError(f'{root} has no sub-folders; expected one sub-folder of images per identity')
  return dirs


def list_images(identity_dir):
  """Returns the sorted paths of the files in `identity_dir` whose extension PIL can open."""
  extensions = Image.registered_extensions()
  if not extensions:
    Image.init()
    extensions = Image.registered_extensions()
  return sorted(entry.path for entry in os.scandir(identity_dir)
                if entry.is_file() and not entry.name.startswith('.')
                and os.path.splitext(entry.name)[1].lower() in extensions)


def load_face(path, image_size=IMAGE_SIZE):
  """Reads an image as an RGB `image_size` square (fit inside, centred on black; see module doc).

  Args:
    path: an image file PIL reads.
    image_size: side of the output square.

  Returns:
    PIL.Image in mode RGB of size (image_size, image_size).
  """
  image = images.open_rgb(path)
  if image.size == (image_size, image_size):
    return image
  return ImageOps.pad(image, (image_size, image_size), method=Image.Resampling.BICUBIC,
                      color=(0, 0, 0), centering=(0.5, 0.5))


def encode_jpeg(image, quality=JPEG_QUALITY):
  """Returns the JPEG bytes of a PIL image."""
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


class AlignedFace:
  """``load_face`` for raw photos: the largest face, detected and aligned (one YuNet per thread).

  Raises ValueError for a photo without a face.
  """

  def __init__(self):
    self._local = threading.local()

  def __call__(self, path, image_size=IMAGE_SIZE):
    from multiface_jax.inference import align, detect  # pylint: disable=import-outside-toplevel
    if not hasattr(self._local, 'detector'):
      self._local.detector = detect.YuNet()
    image = images.read_rgb(path)
    faces = self._local.detector(image, path)
    if not faces:
      raise ValueError(f'{path}: no face found')
    return Image.fromarray(align.align_face(image, faces[0].landmarks, image_size))


def _encode_or_none(path, image_size, quality, load=load_face):
  try:
    return encode_jpeg(load(path, image_size), quality)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    logging.warning('skipping %s (%s)', path, e)
    return None


def write_emore_folder(identity_dirs, dst_dir, *, image_size=IMAGE_SIZE, quality=JPEG_QUALITY,
                       overwrite=False, num_threads=4, align=False):
  """Writes the images of `identity_dirs` as an emore folder.

  Args:
    identity_dirs: one folder per identity; label i is identity_dirs[i] (pass them sorted for
      the CLI's numbering; a subset is fine).
    dst_dir: output folder (created if needed).
    image_size: side of the square images.
    quality: JPEG quality.
    overwrite: replace an emore folder already in `dst_dir`.
    num_threads: threads decoding and encoding images (PIL releases the GIL).
    align: the images are raw photos: detect and align each one's largest face.

  Returns:
    dict with num_images, num_classes, image_size, names (identity folder name per label) and
    skipped (files that could not be read, or without a face with `align`).

  Raises:
    FileExistsError: `dst_dir` already holds an emore folder and overwrite is False.
    ValueError: no identity, or an identity without a readable image.
  """
  identity_dirs = [os.fspath(d) for d in identity_dirs]
  if not identity_dirs:
    raise ValueError('no identity folders given')
  os.makedirs(dst_dir, exist_ok=True)
  existing = [n for n in _OUTPUT_FILES if os.path.exists(os.path.join(dst_dir, n))]
  if existing and not overwrite:
    raise FileExistsError(f'{dst_dir} already holds {", ".join(existing)}; choose another '
                          'destination or pass overwrite=True (--overwrite)')
  final = {n: os.path.join(dst_dir, n) for n in _OUTPUT_FILES}
  tmp = {n: os.path.join(dst_dir, f'.{n}.tmp') for n in _OUTPUT_FILES}
  try:
    summary = _write_tmp_files(identity_dirs, tmp, image_size, quality, num_threads,
                               AlignedFace() if align else load_face)
    for name in _OUTPUT_FILES:
      os.replace(tmp[name], final[name])
  finally:
    for path in tmp.values():
      if os.path.exists(path):
        os.remove(path)
  logging.info('wrote %d images of %d identities to %s', summary['num_images'],
               summary['num_classes'], dst_dir)
  return summary


def _write_tmp_files(identity_dirs, tmp, image_size, quality, num_threads, load):
  names = [os.path.basename(os.path.normpath(d)) for d in identity_dirs]
  skipped = []
  identity_ranges = []
  # Record 0 needs the image count, known only at the end: write a placeholder of the same size
  # (two float labels) now and overwrite it in place once the count is known.
  placeholder = recordio_writer.pack(recordio.IRHeader(0, (0.0, 0.0), 0, 0), b'')
  key = 1
  with recordio_writer.RecordIOWriter(tmp['train.rec'], tmp['train.idx']) as writer, \
      concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    writer.write_idx(0, placeholder)
    for label, identity_dir in enumerate(identity_dirs):
      paths = list_images(identity_dir)
      first = key
      for path, encoded in zip(paths, pool.map(
          lambda p: _encode_or_none(p, image_size, quality, load), paths)):
        if encoded is None:
          skipped.append(path)
          continue
        writer.write_idx(key, recordio_writer.pack(recordio.IRHeader(0, float(label), key, 0), encoded))
        key += 1
      if key == first:
        raise ValueError(f'identity folder {identity_dir} (label {label}) has no usable image '
                         '(none readable, or none with a face); add images or leave the folder '
                         'out')
      identity_ranges.append((first, key))
    num_images = key - 1
    if key + len(identity_ranges) > _FLOAT32_EXACT_INTEGERS:
      raise ValueError(f'{num_images} images: the emore header stores record keys as float32 '
                       'labels, exact only up to 2**24; split the identities into several '
                       'folders')
    for first, end in identity_ranges:
      writer.write_idx(key, recordio_writer.pack(recordio.IRHeader(0, (first, end), key, 0), b''))
      key += 1
  header = recordio_writer.pack(recordio.IRHeader(0, (num_images + 1, key), 0, 0), b'')
  framed = recordio_writer.frame(header)
  assert len(framed) == len(recordio_writer.frame(placeholder))
  with open(tmp['train.rec'], 'r+b') as f:
    f.write(framed)
  with open(tmp['property'], 'w', encoding='ascii') as f:
    f.write(f'{len(identity_dirs)},{image_size},{image_size}\n')
  with open(tmp['labels.txt'], 'w', encoding='utf-8') as f:
    f.writelines(f'{label}\t{name}\n' for label, name in enumerate(names))
  return {'num_images': num_images, 'num_classes': len(identity_dirs),
          'image_size': image_size, 'names': names, 'skipped': skipped}


def _define_flags():
  # Defined only when run as a program, so importing write_emore_folder (the demo does) cannot
  # collide with the importer's own flags.
  flags.DEFINE_string('src', None, 'Folder with one sub-folder of images per identity.')
  flags.DEFINE_string('dst', None, 'Output emore folder.')
  flags.DEFINE_integer('image_size', IMAGE_SIZE, 'Side of the square output images.')
  flags.DEFINE_integer('quality', JPEG_QUALITY, 'JPEG quality.')
  flags.DEFINE_bool('overwrite', False, 'Replace an emore folder already in --dst.')
  flags.DEFINE_bool('align', False, 'Raw photos: detect and align the largest face of each.')
  flags.mark_flags_as_required(['src', 'dst'])


def main(argv):
  del argv
  flags_ = flags.FLAGS
  summary = write_emore_folder(list_identity_dirs(flags_.src), flags_.dst,
                               image_size=flags_.image_size, quality=flags_.quality,
                               overwrite=flags_.overwrite, align=flags_.align)
  print(f'{summary["num_images"]} images, {summary["num_classes"]} identities -> {flags_.dst}'
        + (f' ({len(summary["skipped"])} files skipped)' if summary['skipped'] else ''))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
