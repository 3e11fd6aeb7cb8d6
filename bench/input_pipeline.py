"""Images/s of the tf.data training pipeline (read, shuffle, decode, flip, batch, to numpy).

  taskset -c 0 .venv/bin/python bench/pipeline.py --num_parallel_calls=1   # one core
  .venv/bin/python bench/pipeline.py                                       # AUTOTUNE

Writes `--num_images` 112x112 JPEGs (quality 90, like emore's) into TFRecord shards in a temp
folder, the images cut from the two real photos that ship with scikit-learn (random crops,
resized: face-like content, ~4 KB each). Then times `create_input_iter` over several epochs
(shuffle-buffer refills included) and, as the baseline, a bare tf.data decode_jpeg + batch over
the same bytes, the two timed in alternating phases. Prints images/s (wall clock; best and
median phase) and images per CPU-second of this process: the second is what one core can do even
when other programs share the machine.
"""
import argparse
import gc
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images
import tensorflow as tf

from multiface_jax.data import pipeline
from multiface_jax.data import convert


def make_face_like_jpegs(num_distinct, seed=0, size=112, quality=90):
  """Random 224px crops of scikit-learn's sample photos, resized to `size`, as JPEG bytes."""
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  jpegs = []
  for i in range(num_distinct):
    photo = photos[i % len(photos)]
    top = rng.integers(0, photo.shape[0] - 2 * size)
    left = rng.integers(0, photo.shape[1] - 2 * size)
    crop = Image.fromarray(photo[top:top + 2 * size, left:left + 2 * size])
    buffer = io.BytesIO()
    crop.resize((size, size), Image.BILINEAR).save(buffer, 'JPEG', quality=quality)
    jpegs.append(buffer.getvalue())
  return jpegs


def write_tfrecord_folder(data_dir, jpegs, num_images, num_shards, num_classes=1000):
  """A folder in the converter's output format (shards + metadata.json)."""
  shards = []
  for j, indices in enumerate(np.array_split(np.arange(num_images), num_shards)):
    name = convert.shard_name(j, num_shards)
    with tf.io.TFRecordWriter(os.path.join(data_dir, name)) as writer:
      for i in indices:
        writer.write(convert.serialize_example(i % num_classes, jpegs[i % len(jpegs)]))
    shards.append({'name': name, 'num_images': len(indices)})
  metadata = {'num_images': num_images, 'num_classes': num_classes, 'image_size': [112, 112],
              'shards': shards, 'source': 'bench', 'seed': 0, 'verification_sets': []}
  with open(os.path.join(data_dir, 'metadata.json'), 'w') as f:
    json.dump(metadata, f)


def measure(make_iterators, num_batches, batch_size, phases=3, warmup=5):
  """Times each pipeline in `phases` alternating phases, each on a fresh iterator.

  Alternating phases let both pipelines see similar machine load; a fresh iterator per phase
  keeps the idle one from prefetching (and being billed) during the other's phase.

  Returns:
    {name: (best phase images/s, median phase images/s, images per CPU-second overall)}.
  """
  per_phase = max(1, num_batches // phases)
  rates = {name: [] for name in make_iterators}
  cpu_seconds = dict.fromkeys(make_iterators, 0.0)
  for _ in range(phases):
    for name, make in make_iterators.items():
      batches = make()
      for _ in range(warmup):  # includes filling the shuffle buffer
        next(batches)
      start, cpu = time.perf_counter(), time.process_time()
      for _ in range(per_phase):
        next(batches)
      rates[name].append(per_phase * batch_size / (time.perf_counter() - start))
      cpu_seconds[name] += time.process_time() - cpu
      del batches
      gc.collect()
  images = phases * per_phase * batch_size
  return {name: (max(r), float(np.median(r)), images / cpu_seconds[name])
          for name, r in rates.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=20_000)
  parser.add_argument('--num_shards', type=int, default=8)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--epochs', type=float, default=3.0, help='images timed per pipeline')
  parser.add_argument('--phases', type=int, default=3, help='alternating timed phases')
  parser.add_argument('--num_parallel_calls', type=int, default=tf.data.AUTOTUNE,
                      help='parallel decodes; -1 = AUTOTUNE')
  args = parser.parse_args()
  cores = len(os.sched_getaffinity(0))
  num_batches = int(args.epochs * args.num_images) // args.batch_size
  with tempfile.TemporaryDirectory() as data_dir:
    jpegs = make_face_like_jpegs(1000)
    write_tfrecord_folder(data_dir, jpegs, args.num_images, args.num_shards)
    print(f'{args.num_images} JPEGs of {np.mean([len(j) for j in jpegs]):.0f} bytes on average, '
          f'{args.num_shards} shards; {cores} core(s) usable; batch {args.batch_size}; '
          f'num_parallel_calls={args.num_parallel_calls}')

    def decode(record):
      example = tf.io.parse_single_example(
          record, {'image': tf.io.FixedLenFeature([], tf.string)})
      return tf.io.decode_jpeg(example['image'], channels=3, dct_method='INTEGER_ACCURATE')
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, '*.tfrecord')))
    baseline = (tf.data.TFRecordDataset(files).repeat()
                .map(decode, num_parallel_calls=args.num_parallel_calls)
                .batch(args.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    def training_iter():
      return pipeline.create_input_iter(data_dir, args.batch_size, seed=0,
                                        num_parallel_calls=args.num_parallel_calls)
    make_iterators = {'decode + batch only (baseline)': baseline.as_numpy_iterator,
                      'create_input_iter (shuffle, decode, flip, batch)': training_iter}
    rates = measure(make_iterators, num_batches, args.batch_size, phases=args.phases)
  for name, (best, median, per_cpu_second) in rates.items():
    print(f'{name}: {best:,.0f} images/s (best phase), {median:,.0f} (median phase), '
          f'{per_cpu_second:,.0f} images per CPU-second')


if __name__ == '__main__':
  main()
