"""What the train loop needs of its data: the dataset's facts and this process's batches.

``dataset_facts`` reads class and image counts from the converted folder's metadata (or uses
emore's for synthetic data); ``create_input_iter`` returns the stream of batches of one process
from the tf.data pipeline (``data.pipeline``) or from ``data.synthetic``.
"""
import dataclasses
from typing import Iterator

import ml_collections
import numpy as np

from multiface_jax.data import synthetic

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
  from multiface_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  metadata = pipeline.read_metadata(config.data_dir)
  num_classes = config.num_classes or int(metadata['num_classes'])
  if num_classes < int(metadata['num_classes']):
    raise ValueError(f'config.num_classes={num_classes} but {config.data_dir} has '
                     f'{metadata["num_classes"]} classes; set 0 to take the data\'s count.')
  height, width = (int(v) for v in metadata['image_size'])
  return DatasetFacts(num_classes=num_classes,
                      num_images=config.num_train_images or int(metadata['num_images']),
                      image_size=(height, width))


def create_input_iter(config: ml_collections.ConfigDict, facts: DatasetFacts, *,
                      local_batch_size: int, start_step: int, process_index: int,
                      process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's training batches, starting at batch `start_step` of the uninterrupted stream.

  Args:
    config: uses ``synthetic_data``, ``data_dir``, ``batch_size`` (global), ``seed`` and
      ``augment`` (real data only).
    facts: the data's facts (class count and image size of synthetic batches).
    local_batch_size: images per batch of this process.
    start_step: the first batch is that of this step.
    process_index, process_count: this process's place among all of them.

  Returns:
    An infinite iterator of ``{'image': uint8 (B, h, w, 3), 'label': int32 (B,)}``.
  """
  if config.synthetic_data:
    return synthetic.synthetic_batches(
        config.batch_size, num_classes=facts.num_classes, image_size=facts.image_size,
        seed=config.seed, start_step=start_step, process_index=process_index,
        process_count=process_count)
  from multiface_jax.data import augment, pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.create_input_iter(
      config.data_dir, local_batch_size, seed=config.seed, train=True, start_step=start_step,
      process_index=process_index, process_count=process_count,
      augment=augment.Augment(**config.augment.to_dict()))
