"""Records/s of the emore -> TFRecord converter.

  .venv/bin/python bench/convert.py [--num_images=20000] [--workers=1 2]

Writes a synthetic emore folder with the project's RecordIO writer (header record, `--num_images`
112x112 JPEGs of quality 90 cut from scikit-learn's sample photos, one record per identity,
`property`), then converts it with `convert.convert` into a fresh folder for each setting:
every image decoded (the default), and without the decode check. Prints records/s (wall clock)
and records per CPU-second (this process and its children), since other programs may share the
machine.
"""
import argparse
import os
import tempfile
import time

import numpy as np

from multiface_jax.data import convert
from multiface_jax.data import recordio
from multiface_jax.data import recordio_writer


def write_emore_folder(path, jpegs, num_images, images_per_identity=50):
  """An emore-layout folder: header record 0, image records 1..n, identity records, property."""
  labels = np.arange(num_images) // images_per_identity
  num_classes = int(labels[-1]) + 1
  identity_start = num_images + 1
  with recordio_writer.RecordIOWriter(os.path.join(path, 'train.rec'),
                               os.path.join(path, 'train.idx')) as writer:
    header = recordio.IRHeader(0, [identity_start, identity_start + num_classes], 0, 0)
    writer.write_idx(0, recordio_writer.pack(header, b''))
    for i in range(num_images):
      header = recordio.IRHeader(0, float(labels[i]), i + 1, 0)
      writer.write_idx(i + 1, recordio_writer.pack(header, jpegs[i % len(jpegs)]))
    for c in range(num_classes):
      first = 1 + c * images_per_identity
      header = recordio.IRHeader(0, [first, min(first + images_per_identity, num_images + 1)],
                                 0, 0)
      writer.write_idx(identity_start + c, recordio_writer.pack(header, b''))
  with open(os.path.join(path, 'property'), 'w') as f:
    f.write(f'{num_classes},112,112')


def cpu_seconds():
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=20_000)
  parser.add_argument('--num_shards', type=int, default=8)
  parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
  args = parser.parse_args()
  # Imported here, not at the top: the converter's spawned workers re-import this script, and
  # this import pulls in TensorFlow, which they must not pay for.
  from input_pipeline import make_face_like_jpegs  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, 'emore')
    os.makedirs(src)
    jpegs = make_face_like_jpegs(1000)
    write_emore_folder(src, jpegs, args.num_images)
    print(f'emore folder: {args.num_images} records of {np.mean([len(j) for j in jpegs]):.0f} '
          f'bytes on average, {args.num_shards} shards; {len(os.sched_getaffinity(0))} core(s)')
    for check_images in (True, False):
      for workers in args.workers:
        dst = os.path.join(tmp, f'out-{check_images}-{workers}')
        wall, cpu = time.perf_counter(), cpu_seconds()
        convert.convert(src, dst, num_shards=args.num_shards, workers=workers,
                        check_images=check_images, progress=False)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        print(f'check_images={check_images!s:5} workers={workers}: '
              f'{args.num_images / wall:,.0f} records/s, '
              f'{args.num_images / cpu:,.0f} records per CPU-second')


if __name__ == '__main__':
  main()
