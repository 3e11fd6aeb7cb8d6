"""Photos from disk: every image file of a folder tree, read upright as RGB, or a clear reason why
not. Used by the photo commands and by ``data.from_folder``."""
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are refused before they are decoded (a decompression bomb would take all memory).
MAX_PIXELS = 80_000_000
# The formats read as photos. Others are refused: in ICO/ICNS/CUR the size checked above is only a
# directory entry (the embedded image, of any size, is decoded first), and EPS runs Ghostscript.
PHOTO_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP', 'TIFF', 'WEBP', 'AVIF', 'PPM')
# Register every PIL plugin now: PIL does it lazily on the first open of a format it has not
# loaded, and threads that open files at once (from_folder) can race there (KeyError 'MPO').
Image.init()


class ImageError(ValueError):
  """A file that is not a readable image; the message names the file and why."""


def image_extensions() -> set[str]:
  """The file extensions of PHOTO_FORMATS (lower case, with the dot)."""
  Image.init()
  formats = PHOTO_FORMATS + ('MPO',)  # a JPEG with more frames, opened as JPEG
  return {ext for ext, fmt in Image.registered_extensions().items() if fmt in formats}


def list_images(root: str) -> list[str]:
  """Every image file under `root` (a file or a folder, searched recursively), sorted; hidden files
  and folders are left out."""
  if os.path.isfile(root):
    return [root]
  if not os.path.isdir(root):
    raise FileNotFoundError(f'{root}: no such file or folder of images.')
  extensions = image_extensions()
  found = []
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
    found += [os.path.join(folder, f) for f in files
              if not f.startswith('.') and os.path.splitext(f)[1].lower() in extensions]
  return sorted(found)


def open_rgb(path: str) -> Image.Image:
  """The image at `path` as an upright (EXIF orientation applied) RGB PIL image.

  Raises:
    FileNotFoundError: no such file.
    ImageError: not one of PHOTO_FORMATS, PIL cannot decode it, or it has more than MAX_PIXELS
      pixels.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file.')
  try:
    with Image.open(path, formats=PHOTO_FORMATS) as image:
      width, height = image.size
      if width * height > MAX_PIXELS:
        raise ImageError(f'{path}: {width}x{height} pixels is more than the {MAX_PIXELS:,} '
                         'this reads; scale the photo down first.')
      return ImageOps.exif_transpose(image).convert('RGB')
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    if isinstance(e, ImageError):
      raise
    raise ImageError(f'{path}: not a readable image ({e}); photos are read as '
                     f'{", ".join(PHOTO_FORMATS)}.') from None


def read_rgb(path: str) -> np.ndarray:
  """The image at `path` as RGB uint8 (H, W, 3) (see :func:`open_rgb`)."""
  return np.asarray(open_rgb(path), np.uint8)
