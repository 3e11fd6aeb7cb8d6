"""What the train loop needs to know about its data, and synthetic batches.

``dataset_facts`` reads class and image counts from the converted folder's metadata (or uses
emore's for synthetic data). ``synthetic_batches`` is a stream of random faces whose *global*
batch at step t is the same however many processes share it, so a multi-host run on synthetic
data can be compared with a single-process one, and it continues exactly on resume.
"""
import dataclasses
from typing import Iterator

import ml_collections
import numpy as np

# emore (MS1M-ArcFace), the published training set: the default size of synthetic runs.
EMORE_NUM_CLASSES = 85_742
EMORE_NUM_IMAGES = 5_822_653


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  """Attributes: num_classes, num_images (one epoch), image_size (h, w)."""
  num_classes: int
  num_images: int
  image_size: tuple[int, int]


def dataset_facts(config: ml_collections.ConfigDict) -> DatasetFacts:
  """Class count, epoch size and image size of the configured training data.

  Args:
    config: uses ``synthetic_data``, ``data_dir``, ``num_classes``, ``num_train_images``.

  Returns:
    The facts; config values > 0 override the metadata's.

  Raises:
    ValueError: no data_dir for real data, or num_classes smaller than the data's labels.
  """
  if config.synthetic_data:
    return DatasetFacts(num_classes=config.num_classes or EMORE_NUM_CLASSES,
                        num_images=config.num_train_images or EMORE_NUM_IMAGES,
                        image_size=(112, 112))
  if not config.data_dir:
    raise ValueError('Set --config.data_dir to a folder written by `python -m '
                     'multiface_jax.data.convert` (or --config.synthetic_data=True).')
  from multiface_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  metadata = input_pipeline.read_metadata(config.data_dir)
  num_classes = config.num_classes or int(metadata['num_classes'])
  if num_classes < int(metadata['num_classes']):
    raise ValueError(f'config.num_classes={num_classes} but {config.data_dir} has '
                     f'{metadata["num_classes"]} classes; set 0 to take the data\'s count.')
  height, width = (int(v) for v in metadata['image_size'])
  return DatasetFacts(num_classes=num_classes,
                      num_images=config.num_train_images or int(metadata['num_images']),
                      image_size=(height, width))


def synthetic_batches(global_batch_size: int, *, num_classes: int, image_size: tuple[int, int],
                      seed: int, start_step: int = 0, process_index: int = 0,
                      process_count: int = 1,
                      num_distinct_batches: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Cycles `num_distinct_batches` random global batches; yields this process's slice of each.

  Example i of distinct batch b is drawn from ``default_rng([seed, b, i])``, so the global batch
  does not depend on the process layout and each process only makes its own slice. Making them
  once keeps the stream free for throughput measurements.

  Args:
    global_batch_size: images per step over all processes.
    num_classes: labels are uniform in [0, num_classes).
    image_size: (h, w).
    seed: seed of the pixels and labels.
    start_step: the first batch yielded is that of step `start_step`.
    process_index, process_count: this process yields rows
      ``[index * B / count, (index + 1) * B / count)`` of each global batch.
    num_distinct_batches: batches in the cycle.

  Returns:
    An infinite iterator of ``{'image': uint8 (B/count, h, w, 3), 'label': int32 (B/count,)}``.
  """
  if global_batch_size % process_count:
    raise ValueError(f'batch_size={global_batch_size} is not divisible by the {process_count} '
                     'processes.')
  local = global_batch_size // process_count
  rows = range(process_index * local, (process_index + 1) * local)
  pool = []
  for b in range(num_distinct_batches):
    rngs = [np.random.default_rng([seed, b, i]) for i in rows]
    pool.append({
        'image': np.stack([r.integers(0, 256, (*image_size, 3), dtype=np.uint8) for r in rngs]),
        'label': np.array([r.integers(0, num_classes) for r in rngs], np.int32)})
  step = start_step
  while True:
    yield pool[step % num_distinct_batches]
    step += 1
