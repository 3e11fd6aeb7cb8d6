"""Images/s of the tf.data training pipeline (read, shuffle, decode, flip, batch, to numpy).

  taskset -c 0 .venv/bin/python bench/input_pipeline.py --num_parallel_calls=1   # one core
  .venv/bin/python bench/input_pipeline.py                                       # AUTOTUNE

Writes `--num_images` 112x112 JPEGs (quality 90, like emore's) into TFRecord shards in a temp
folder, the images cut from the two real photos that ship with scikit-learn (random crops,
resized: face-like content, ~4 KB each). Then times `create_input_iter` over several epochs
(shuffle-buffer refills included) and, as the baseline, a bare tf.data decode_jpeg + batch over
the same bytes. Prints images/s (wall clock) and images per CPU-second of this process: the
second is what one core can do even when other programs share the machine, the best round what
it does when they leave it alone for a moment.
"""
import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image
from sklearn.datasets import load_sample_images
import tensorflow as tf

from multiface_jax import input_pipeline
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


def measure(batches, num_batches, batch_size, rounds=10, warmup=5):
  """Times `rounds` equal runs of batches: returns (best, median) images/s and images/CPU-s."""
  for _ in range(warmup):  # includes filling the shuffle buffer
    next(batches)
  per_round = max(1, num_batches // rounds)
  rates = []
  cpu = time.process_time()
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(per_round):
      next(batches)
    rates.append(per_round * batch_size / (time.perf_counter() - start))
  per_cpu_second = rounds * per_round * batch_size / (time.process_time() - cpu)
  return max(rates), float(np.median(rates)), per_cpu_second


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=20_000)
  parser.add_argument('--num_shards', type=int, default=8)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--epochs', type=float, default=3.0, help='how much to time')
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
    rates = {'decode + batch only (baseline)': measure(
        baseline.as_numpy_iterator(), num_batches, args.batch_size)}
    batches = input_pipeline.create_input_iter(
        data_dir, args.batch_size, seed=0, num_parallel_calls=args.num_parallel_calls)
    rates['create_input_iter (shuffle, decode, flip, batch)'] = measure(
        batches, num_batches, args.batch_size)
  for name, (best, median, per_cpu_second) in rates.items():
    print(f'{name}: {best:,.0f} images/s (best of 10 rounds), {median:,.0f} (median round), '
          f'{per_cpu_second:,.0f} images per CPU-second')

if __name__ == '__main__':
  main()
