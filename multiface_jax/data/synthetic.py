"""Synthetic training batches: random faces whose *global* batch at step t is the same however
many processes share it, so that a multi-host run on synthetic data can be compared with a
single-process one, and so that it continues exactly on resume. For throughput runs and tests.
"""
from typing import Iterator

import numpy as np


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
