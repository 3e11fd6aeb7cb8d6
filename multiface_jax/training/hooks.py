"""Things the train loop does between steps: progress reports, NaN checks, preemption.

- :class:`ProgressLog`: averages the metrics of a log interval, writes TensorBoard scalars and
  prints one progress line (step, loss per sphere, accuracy, learning rate, images/s, ETA).
- :func:`first_non_finite`: the first step of an interval whose loss was NaN/inf.
- :class:`PreemptionWatcher`: SIGTERM -> "save and stop" at a step every process agrees on.
"""
import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from multiface_jax.training.schedule import StepPlan


def first_non_finite(history: Sequence[tuple[int, Any]]) -> Optional[int]:
  """The first step whose metrics hold a NaN or inf, or None.

  Args:
    history: ``(step, metrics)`` pairs; metrics may still be on device (they are fetched).
  """
  for step, metrics in jax.device_get(list(history)):
    if not all(np.all(np.isfinite(v)) for v in jax.tree.leaves(metrics)):
      return step
  return None


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


class ProgressLog:
  """Writes the averaged metrics of each log interval; only process 0 prints and writes."""

  def __init__(self, config: ml_collections.ConfigDict, plan: StepPlan,
               lr_fn: Callable[[Any], Any], writer: Any, start_step: int):
    self.batch_size = config.batch_size
    self.plan = plan
    self.lr_fn = lr_fn
    self.writer = writer
    self.last_step = start_step
    self.last_time = time.perf_counter()

  def log(self, step: int, metrics: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Reports the mean of `metrics` (one dict per step since the last call) at `step`.

    Returns:
      The scalars written.
    """
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    loss = float(np.mean([m['loss'] for m in metrics]))
    loss_per_sphere = np.mean([m['loss_per_sphere'] for m in metrics], axis=0)
    accuracy = np.mean([m['accuracy_per_sphere'] for m in metrics], axis=0)
    lr = float(self.lr_fn(step - 1))
    scalars = {'train/loss': loss, 'train/lr': lr, 'train/epoch': step / self.plan.steps_per_epoch,
               'train/images_per_sec': steps_per_sec * self.batch_size}
    for k, (sphere_loss, sphere_acc) in enumerate(zip(loss_per_sphere, accuracy)):
      scalars[f'train/loss_sphere{k + 1}'] = float(sphere_loss)
      scalars[f'train/accuracy_sphere{k + 1}'] = float(sphere_acc)
    if jax.process_index() == 0:
      self.writer.write_scalars(step, scalars)
      eta = (self.plan.total_steps - step) / max(steps_per_sec, 1e-9)
      spheres = ' '.join(f'{x:.3f}' for x in loss_per_sphere)
      accs = ' '.join(f'{x:.3f}' for x in accuracy)
      print(f'step {step}/{self.plan.total_steps} (epoch {scalars["train/epoch"]:.2f}) | '
            f'loss {loss:.4f} [{spheres}] | acc {accs} | lr {lr:.4g} | '
            f'{scalars["train/images_per_sec"]:.0f} img/s | ETA {_duration(eta)}', flush=True)
    return scalars


class PreemptionWatcher:
  """Turns SIGTERM into "save and stop" at a step every process agrees on.

  One process: a SIGTERM handler sets a flag, checked after every step. Several processes
  (``jax.distributed`` initialised): JAX's preemption sync manager already listens for SIGTERM
  on every process and picks a common step, queried through
  ``multihost_utils.reached_preemption_sync_point``, which must then be called at every step.
  """

  def __init__(self):
    self._stop = False
    self._previous = None
    self._multihost = jax.process_count() > 1
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after the current step.')
    self._stop = True

  def should_stop(self, step: int) -> bool:
    """True once a stop was requested (called after each step, on every process)."""
    if self._multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._stop

  def close(self) -> None:
    """Restores the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
