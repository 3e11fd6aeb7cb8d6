"""Every IJB face embedded once, cached on disk so that a killed run continues where it stopped.

The faces are read from ``loose_crop``, aligned with their five landmarks (``inference.align``)
and embedded with their mirror image; the raw per-view embeddings (2, n, D) are kept, so that the
recipe's switches (flip, norm score, detector score) never need the network again. The cache is
one ``.npy`` a chunk of faces in ``OUT/cache/<target>_<checkpoint>/``, each written under a
temporary name and renamed when complete; a chunk whose file exists is not embedded again.
"""
import concurrent.futures
import hashlib
import os

import numpy as np

from multiface_jax.evaluation.ijb import meta as meta_lib
from multiface_jax.inference import align, images

FACES_PER_CHUNK = 4096


def cache_dir(out_dir: str, target: str, checkpoint_path: str, step: int) -> str:
  """The cache folder of one checkpoint on one target."""
  tag = hashlib.sha1(f'{os.path.abspath(checkpoint_path)}:{step}'.encode()).hexdigest()[:12]
  return os.path.join(out_dir, 'cache', f'{target.lower()}_{tag}')


def _aligned(meta: meta_lib.IJBMeta, index: int) -> np.ndarray:
  path = os.path.join(meta.image_dir, meta.images[index])
  if not os.path.isfile(path):
    raise meta_lib.IJBError(f'{path} is listed in the meta files but missing: copy the whole '
                            'loose_crop folder.')
  return align.align_face(images.read_rgb(path), meta.landmarks[index])


def embed_faces(embedder, meta: meta_lib.IJBMeta, directory: str, *, threads: int = 4,
                progress: bool = True) -> np.ndarray:
  """The raw view embeddings float32 (2, n, D) of every face of `meta`, from the cache or made.

  Args:
    embedder: an ``inference.embedder.FaceEmbedder`` (its backbone, batch size and devices).
    meta: the target's meta.
    directory: the cache folder (:func:`cache_dir`), created if needed.
    threads: threads reading and aligning images (PIL and OpenCV release the GIL).
    progress: show a progress bar.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from multiface_jax.evaluation import embed  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  count = len(meta.images)
  starts = range(0, count, FACES_PER_CHUNK)
  chunks = []
  with concurrent.futures.ThreadPoolExecutor(threads) as pool, \
      tqdm(total=count, desc=f'{meta.target} faces', unit='face', disable=not progress) as bar:
    for start in starts:
      stop = min(start + FACES_PER_CHUNK, count)
      path = os.path.join(directory, f'faces_{start:08d}_{stop:08d}.npy')
      if os.path.isfile(path):
        chunks.append(np.load(path))
      else:
        crops = np.stack(list(pool.map(lambda i: _aligned(meta, i), range(start, stop))))
        views = embed.raw_embeddings(embedder.apply_fn, embedder.backbone.variables, crops,
                                     batch_size=embedder.batch_size, mesh=embedder.mesh)
        tmp = path + '.tmp.npy'
        np.save(tmp, views.astype(np.float32))
        os.replace(tmp, path)
        chunks.append(views)
      bar.update(stop - start)
  return np.concatenate(chunks, axis=1)
