r"""emore folder -> shuffled TFRecord shards + metadata.json, carrying the verification sets along.

    python -m multiface_jax.data.convert --src=faces_emore --dst=emore_tfrecord

Each shard `train-XXXXX-of-YYYYY.tfrecord` holds `tf.train.Example`s with `image` (the record's
encoded bytes, copied, never re-encoded) and `label` (int64). The image keys are permuted once
with `seed` and shard j takes the j-th contiguous block, so reading the shards one after another
already visits the images in random order, and hosts can split the data by file.

Resumable: a shard is written to `NAME.tmp`, renamed, and then its result (count, size, skipped
keys) is stored under `.convert/`; a rerun keeps every shard whose file and result agree.
`metadata.json` is written last (atomically), so a half-converted folder never looks finished.
Records that cannot be used (unreadable, label outside [0, num_classes) of `property`, payload
that is not a decodable JPEG/PNG of property's image size) are skipped and reported by key, or
stop the conversion with `strict=True`.
"""
import filecmp
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys

import numpy as np
from PIL import Image
import tqdm

from multiface_jax.data import emore
from multiface_jax.data import recordio

METADATA_NAME = 'metadata.json'
PROGRESS_DIR = '.convert'
PLAN_VERSION = 1
# ~5.7k images per shard for emore: 1024 files, enough for many hosts to split by file.
MAX_DEFAULT_SHARDS = 1024
MIN_IMAGES_PER_DEFAULT_SHARD = 4096


class ConversionError(ValueError):
  """A record that `strict` refuses, or a destination that holds another conversion."""


def default_num_shards(num_images):
  """Shards of >= 4096 images, at most 1024 of them (emore: 1024 shards of ~5.7k images)."""
  return max(1, min(MAX_DEFAULT_SHARDS, math.ceil(num_images / MIN_IMAGES_PER_DEFAULT_SHARD)))


def shard_name(index, num_shards):
  return f'train-{index:05d}-of-{num_shards:05d}.tfrecord'


def plan_shards(image_keys, num_shards, seed):
  """Assigns the image keys to shards: a seeded permutation cut into contiguous blocks.

  Returns:
    A list of `num_shards` int64 arrays of keys, in writing order; sizes differ by at most 1.
  """
  keys = np.asarray(image_keys, dtype=np.int64)
  permuted = np.random.default_rng(seed).permutation(keys)
  return np.array_split(permuted, num_shards)


def serialize_example(label, encoded):
  """Returns the bytes of a tf.train.Example {'image': encoded bytes, 'label': int64}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (see _check_chunk)
  feature = {
      'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
  }
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  # Deterministic: protobuf maps otherwise serialize in an order that can vary between processes.
  return example.SerializeToString(deterministic=True)


def check_image(encoded, image_size):
  """Decodes `encoded` fully and returns why it is unusable, or None when it is fine.

  PIL's libjpeg decode (integer DCT) is pixel-identical to the pipeline's tf.io.decode_jpeg with
  dct_method='INTEGER_ACCURATE' and about twice as fast from Python. The size is checked from the
  header before decoding, so a record claiming a huge image costs no pixel memory.
  """
  try:
    with Image.open(io.BytesIO(encoded), formats=('JPEG', 'PNG')) as image:
      if image.mode not in ('RGB', 'L'):
        return f'{image.format} image in mode {image.mode} (RGB or grayscale expected)'
      width, height = image.size
      if (height, width) != tuple(image_size):
        return f'image is {height}x{width}, property says {image_size[0]}x{image_size[1]}'
      image.load()
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    return f'image does not decode ({type(e).__name__}: {e})'
  return None


def _write_json_atomically(path, obj):
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1)
    f.write('\n')
  os.replace(tmp, path)


def _result_path(dst, name):
  return os.path.join(dst, PROGRESS_DIR, name + '.json')


def record_problem(folder, key, check_images=True):
  """Why the image record `key` of `folder` cannot be used, or None when it can."""
  try:
    _, encoded = folder.read_image(key)
  except recordio.RecordIOError as e:
    return e.reason
  return check_image(encoded, folder.image_size) if check_images else None


_worker_folder = None


def _open_worker_folder(src):
  global _worker_folder
  _worker_folder = emore.EmoreFolder(src)


def _check_chunk(keys):
  # Runs in a worker process. This module imports TensorFlow only inside the functions that
  # write, so a (spawned) worker starts in a second instead of importing TF.
  return [record_problem(_worker_folder, key) for key in keys]


def _problems_from_workers(pool, blocks, chunk_size=256):
  """record_problem of every key of `blocks`, in order, computed ahead by the worker pool."""
  chunks = [block[i:i + chunk_size] for block in blocks for i in range(0, len(block), chunk_size)]
  return itertools.chain.from_iterable(pool.imap(_check_chunk, chunks))


def write_shard(folder, dst, name, keys, problems, *, strict, on_record=None):
  """Writes the usable records `keys` of `folder` into `dst/name` and stores the shard's result.

  Args:
    folder: an open `EmoreFolder`.
    dst: output folder.
    name: shard file name.
    keys: image keys in writing order.
    problems: iterator of `record_problem(folder, key)` for these keys, in order.
    strict: raise ConversionError on the first unusable record instead of skipping it.
    on_record: called after each record (progress bar).

  Returns:
    {'name', 'num_images', 'num_bytes', 'skipped': [[key, reason], ...]}.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (see _check_chunk)
  path = os.path.join(dst, name)
  tmp = path + '.tmp'
  skipped = []
  written = 0
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for key in keys:
        key = int(key)
        reason = next(problems)
        if reason is not None:
          if strict:
            raise ConversionError(f'{folder.rec_path}: key {key}: {reason} (run without '
                                  '--strict to skip such records and list them)')
          skipped.append([key, reason])
        else:
          writer.write(serialize_example(*folder.read_image(key)))
          written += 1
        if on_record is not None:
          on_record()
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  os.replace(tmp, path)
  result = {'name': name, 'num_images': written, 'num_bytes': os.path.getsize(path),
            'skipped': skipped}
  _write_json_atomically(_result_path(dst, name), result)
  return result


def _finished_result(dst, name, planned_count):
  """The stored result of a shard whose file is complete, or None when it must be (re)written."""
  try:
    with open(_result_path(dst, name), encoding='utf-8') as f:
      result = json.load(f)
    size = os.path.getsize(os.path.join(dst, name))
  except (OSError, ValueError):
    return None
  if (result.get('name') != name or result.get('num_bytes') != size
      or result.get('num_images', -1) + len(result.get('skipped', ())) != planned_count):
    return None
  return result


def _kept_results(dst, names, blocks, *, strict, rec_path):
  """Results of the shards an earlier run finished; removes the partial files of killed runs."""
  results = {}
  for name, keys in zip(names, blocks):
    result = _finished_result(dst, name, len(keys))
    if result is None:
      continue
    if strict and result['skipped']:
      key, reason = result['skipped'][0]
      raise ConversionError(f'{rec_path}: key {key}: {reason} (kept from an earlier run '
                            f'without --strict in {os.path.join(dst, name)})')
    results[name] = result
  for name in names:
    if os.path.exists(os.path.join(dst, name + '.tmp')):
      os.remove(os.path.join(dst, name + '.tmp'))
  return results


def _make_plan(folder, src, num_shards, seed):
  keys = np.asarray(folder.image_keys, dtype=np.int64)
  return {
      'version': PLAN_VERSION,
      'source': src,
      # Size and modification time stand in for the content (hashing 6 GB would take minutes):
      # a re-created source does not get mixed with shards of the old one.
      'train_rec_bytes': os.path.getsize(folder.rec_path),
      'train_rec_mtime_ns': os.stat(folder.rec_path).st_mtime_ns,
      'num_image_keys': int(keys.size),
      'image_keys_sha256': hashlib.sha256(keys.tobytes()).hexdigest(),
      'num_shards': num_shards,
      'seed': seed,
  }


def _claim_destination(dst, plan):
  """Stores `plan` in dst, or checks that dst holds an unfinished run of the same plan."""
  plan_path = os.path.join(dst, PROGRESS_DIR, 'plan.json')
  if os.path.isfile(plan_path):
    with open(plan_path, encoding='utf-8') as f:
      previous = json.load(f)
    if previous != plan:
      changed = sorted(k for k in set(plan) | set(previous) if plan.get(k) != previous.get(k))
      raise ConversionError(
          f'{dst} holds a conversion with other settings or another source (differs in '
          f'{", ".join(changed)}); convert into an empty folder, or delete {dst} to redo it')
    return
  leftovers = [n for n in os.listdir(dst) if n == METADATA_NAME or n.endswith('.tfrecord')]
  if leftovers:
    raise ConversionError(f'{dst} already holds {leftovers[0]} but no {PROGRESS_DIR}/plan.json: '
                          'it was not written by this converter; choose an empty folder')
  os.makedirs(os.path.join(dst, PROGRESS_DIR), exist_ok=True)
  _write_json_atomically(plan_path, plan)


def copy_verification_sets(paths, dst):
  """Copies the `*.bin` files into dst (atomically), skipping identical existing copies."""
  names = []
  for path in paths:
    name = os.path.basename(path)
    target = os.path.join(dst, name)
    if not (os.path.isfile(target) and filecmp.cmp(path, target, shallow=True)):
      shutil.copy2(path, target + '.tmp')
      os.replace(target + '.tmp', target)
    names.append(name)
  return names


def convert(src, dst, *, num_shards=None, seed=0, strict=False, workers=1, check_images=True,
            progress=True):
  """Converts an emore folder into shuffled TFRecord shards (resuming an unfinished run).

  Args:
    src: emore folder (train.rec, train.idx, property, optional *.bin).
    dst: output folder (created; an unfinished conversion of the same plan there is resumed).
    num_shards: number of shard files; default `default_num_shards(num_images)`.
    seed: seed of the global shuffle.
    strict: raise ConversionError on the first unusable record instead of skipping it.
    workers: processes checking images in parallel (with check_images).
    check_images: fully decode every image (slower; catches corrupt payloads now instead of
      mid-training).
    progress: show a tqdm progress bar.

  Returns:
    The metadata dict written to dst/metadata.json: num_images, num_classes, image_size,
    shards [{name, num_images}], source, seed, skipped [keys], skip_reasons {key: reason},
    verification_sets [names].

  Raises:
    FileNotFoundError / RecordIOError: src is missing or not an emore folder.
    ConversionError: a bad record under strict, no usable record at all, or a dst that holds
      another conversion.
  """
  src = os.path.abspath(os.fspath(src))
  dst = os.path.abspath(os.fspath(dst))
  if src == dst:
    raise ConversionError(f'--dst must differ from --src ({src})')
  folder = emore.EmoreFolder(src)
  try:
    if folder.num_images == 0:
      raise ConversionError(f'{src} holds no image records; nothing to convert')
    num_shards = num_shards or default_num_shards(folder.num_images)
    if not 1 <= num_shards <= folder.num_images:
      raise ValueError(f'num_shards must be in [1, {folder.num_images}] (one image per shard at '
                       f'least), got {num_shards}')
    os.makedirs(dst, exist_ok=True)
    plan = _make_plan(folder, src, num_shards, seed)
    _claim_destination(dst, plan)
    blocks = plan_shards(folder.image_keys, num_shards, seed)
    names = [shard_name(j, num_shards) for j in range(num_shards)]
    results = _kept_results(dst, names, blocks, strict=strict, rec_path=folder.rec_path)
    todo = [(name, keys) for name, keys in zip(names, blocks) if name not in results]
    pool = None
    if check_images and workers > 1 and todo:
      # The image check (a full decode) is the slow part and holds the GIL: worker processes do
      # it ahead of this one, which writes the shards in order, so the output is the same.
      pool = multiprocessing.get_context('spawn').Pool(
          workers, initializer=_open_worker_folder, initargs=(src,))
      problems = _problems_from_workers(pool, [keys for _, keys in todo])
    else:
      problems = (record_problem(folder, key, check_images) for _, keys in todo for key in keys)
    try:
      with tqdm.tqdm(total=folder.num_images, unit='img', disable=not progress,
                     desc=f'converting {os.path.basename(src)}') as bar:
        bar.update(folder.num_images - sum(len(keys) for _, keys in todo))
        for name, keys in todo:
          results[name] = write_shard(folder, dst, name, keys, problems, strict=strict,
                                      on_record=lambda: bar.update(1))
    finally:
      if pool is not None:
        pool.terminate()
    metadata = _metadata(folder, src, seed, [results[name] for name in names])
    if metadata['num_images'] == 0:
      raise ConversionError(f'no usable image in {src}: all {folder.num_images} records were '
                            f'skipped (first: key {metadata["skipped"][0]}: '
                            f'{metadata["skip_reasons"][str(metadata["skipped"][0])]})')
    metadata['verification_sets'] = copy_verification_sets(folder.verification_bins(), dst)
    _write_json_atomically(os.path.join(dst, METADATA_NAME), metadata)
    return metadata
  finally:
    folder.close()


def _metadata(folder, src, seed, results):
  skipped = sorted((int(key), reason) for result in results for key, reason in result['skipped'])
  return {
      'num_images': sum(result['num_images'] for result in results),
      'num_classes': folder.num_classes,
      'image_size': list(folder.image_size),
      'shards': [{'name': result['name'], 'num_images': result['num_images']}
                 for result in results],
      'source': src,
      'seed': seed,
      'skipped': [key for key, _ in skipped],
      'skip_reasons': {str(key): reason for key, reason in skipped},
      'verification_sets': [],
  }


def summarize(metadata, dst):
  """A few lines for the terminal: what was written and which records were skipped."""
  lines = [f'wrote {metadata["num_images"]} images of {metadata["num_classes"]} identities into '
           f'{len(metadata["shards"])} shards in {dst}',
           f'verification sets: {", ".join(metadata["verification_sets"]) or "none found"}']
  if metadata['skipped']:
    lines.append(f'skipped {len(metadata["skipped"])} unusable records (all are listed in '
                 f'{os.path.join(dst, METADATA_NAME)}):')
    lines += [f'  key {key}: {metadata["skip_reasons"][str(key)]}'
              for key in metadata['skipped'][:10]]
  return '\n'.join(lines)


def main(argv=None):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()
  flags.DEFINE_string('src', None, 'emore folder (train.rec, train.idx, property, *.bin).',
                      flag_values=flag_values)
  flags.DEFINE_string('dst', None, 'output folder for the TFRecord shards.',
                      flag_values=flag_values)
  flags.DEFINE_integer('num_shards', None, 'shard files (default: ~4k+ images each, <= 1024).',
                       flag_values=flag_values)
  flags.DEFINE_integer('seed', 0, 'seed of the global shuffle.', flag_values=flag_values)
  flags.DEFINE_boolean('strict', False, 'fail on the first unusable record instead of skipping.',
                       flag_values=flag_values)
  flags.DEFINE_integer('workers', 1, 'processes decoding images for the check in parallel.',
                       flag_values=flag_values)
  flags.DEFINE_boolean('check_images', True, 'decode every image to catch corrupt ones.',
                       flag_values=flag_values)
  flags.mark_flags_as_required(['src', 'dst'], flag_values=flag_values)
  try:
    flag_values(sys.argv if argv is None else argv)
  except flags.Error as e:
    print(f'{e}\nusage: python -m multiface_jax.data.convert --src=EMORE_DIR --dst=OUT_DIR '
          '[--num_shards=N] [--seed=0] [--strict] [--workers=1] [--nocheck_images]',
          file=sys.stderr)
    return 2
  try:
    metadata = convert(flag_values.src, flag_values.dst, num_shards=flag_values.num_shards,
                       seed=flag_values.seed, strict=flag_values.strict,
                       workers=flag_values.workers, check_images=flag_values.check_images)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summarize(metadata, os.path.abspath(flag_values.dst)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
