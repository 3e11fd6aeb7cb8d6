"""The head over the mesh (any class count on any model axis) and PartialFC, on 8 CPU devices.

One worker process (tests/sharded_head_worker.py) runs every step on 8 forced devices; the tests
compare its results with the unsharded head and with numpy.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import train_testlib as lib

CLASSES, MARGIN, SCALE = 1001, 0.5, 64.0


@pytest.fixture(scope='module')
def worker(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sharded') / 'out.npz')
  done = subprocess.run([sys.executable, os.path.join(lib.REPO, 'tests', 'sharded_head_worker.py'),
                         out], cwd=lib.REPO, env=lib.worker_env(), capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  return lib.load_npz(out)


def test_the_sharded_head_on_8_devices(worker):
  """One worker process (8 devices) for all the checks below: it compiles every variant once."""
  for kind in ('softmax', 'arcface', 'cosface'):
    for spheres in (1, 4):
      check_any_model_axis_gives_the_unsharded_loss_and_update(worker, kind, spheres)
  check_partial_fc_keeps_the_batch_s_classes_and_computes_the_loss_on_the_sample(worker)
  check_partial_fc_keeping_every_column_is_the_full_softmax(worker)
  check_no_device_holds_the_whole_logits_or_kernel(worker)


def check_any_model_axis_gives_the_unsharded_loss_and_update(worker, kind, spheres):
  ref_loss, ref_kernel = worker[f'ref_{kind}_{spheres}_loss'], worker[f'ref_{kind}_{spheres}_kernel']
  for axis in (1, 2, 4, 8):
    kernel = worker[f'{kind}_{spheres}_{axis}_kernel']
    padded = math.ceil(CLASSES / axis) * axis
    assert kernel.shape[-1] == padded
    np.testing.assert_allclose(worker[f'{kind}_{spheres}_{axis}_loss'], ref_loss, rtol=2e-6)
    np.testing.assert_allclose(kernel[..., :CLASSES], ref_kernel, rtol=1e-5, atol=1e-6)
    assert not np.any(kernel[..., CLASSES:])  # padding columns stay zero
    assert worker[f'{kind}_{spheres}_{axis}_spec'] == "P(None, None, 'model')"


def _arcface_numpy(cos, target):
  with_margin = cos * math.cos(MARGIN) - np.sqrt(np.clip(1 - cos**2, 0, 1)) * math.sin(MARGIN)
  return np.where(cos <= math.cos(math.pi - MARGIN), cos - MARGIN * math.sin(MARGIN),
                  with_margin) if target else cos


def check_partial_fc_keeps_the_batch_s_classes_and_computes_the_loss_on_the_sample(worker):
  embeddings, labels = _data()
  ids, columns = worker['pfc0.1_ids'], worker['pfc0.1_columns']
  slots, local = int(worker['pfc0.1_slots']), math.ceil(CLASSES / 8)
  assert ids.shape == (8 * slots,) and slots == max(math.ceil(0.1 * local), 32)
  sampled = ids[ids >= 0]
  assert set(labels) <= set(sampled)  # every label of the batch is kept
  assert len(set(sampled)) == len(sampled)
  per_shard = [np.sum(ids[s * slots:(s + 1) * slots] >= 0) for s in range(8)]
  positives = [len({l for l in labels if s * local <= l < (s + 1) * local}) for s in range(8)]
  assert per_shard == [max(math.ceil(0.1 * local), p) for p in positives]
  # The loss, written in numpy over the sampled columns only.
  kernel = worker['pfc0.1_kernel']
  total = 0.0
  for sphere in range(4):
    part = embeddings[:, sphere * 128:(sphere + 1) * 128].astype(np.float64)
    weights = kernel[sphere][:, sampled].astype(np.float64)
    cos = np.clip(part @ (weights / np.linalg.norm(weights, axis=0)), -1, 1)
    targets = labels[:, None] == sampled[None, :]
    logits = SCALE * np.where(targets, _arcface_numpy(cos, True), cos)
    logz = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    total += np.mean(logz - logits[targets])
  np.testing.assert_allclose(worker['pfc0.1_loss'], total, rtol=1e-5)
  # Unsampled columns (and their momentum) do not move; sampled ones do; padding stays zero.
  new_kernel, new_momentum = worker['pfc0.1_new_kernel'], worker['pfc0.1_new_momentum']
  unsampled = np.setdiff1d(np.arange(CLASSES), sampled)
  np.testing.assert_array_equal(new_kernel[..., unsampled], kernel[..., unsampled])
  np.testing.assert_array_equal(new_momentum[..., unsampled], worker['pfc0.1_momentum'][
      ..., unsampled])
  assert np.all(np.any(new_kernel[..., sampled] != kernel[..., sampled], axis=(0, 1)))
  assert not np.any(new_kernel[..., CLASSES:]) and not np.any(new_momentum[..., CLASSES:])
  del columns


def check_partial_fc_keeping_every_column_is_the_full_softmax(worker):
  assert set(worker['pfc0.999_ids'][worker['pfc0.999_ids'] >= 0]) == set(range(CLASSES))
  np.testing.assert_allclose(worker['pfc0.999_loss'], worker['pfc_full_loss'], rtol=1e-6)


def check_no_device_holds_the_whole_logits_or_kernel(worker):
  """Compiled memory per device of the loss gradient, 8 x 4096 classes, batch 64, 4 spheres,
  model axis 8: the whole (4, 64, 32768) float32 logits would be 32 MiB, the whole kernel too."""
  whole = 4 * 64 * 8 * 4096 * 4
  assert worker['memory_temp'] < whole, (worker['memory_temp'], whole)
  # Arguments: the kernel's own shard (8 MiB), the batch's and the label's.
  assert worker['memory_arguments'] < 4 * 128 * 4096 * 4 + 2**20, worker['memory_arguments']


def _data(seed=0):
  rng = np.random.default_rng(seed)
  embeddings = rng.normal(size=(32, 512)).astype(np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
  return embeddings, rng.integers(0, CLASSES, 32).astype(np.int32)


# ------------------------------------------------------------------ the trainer, end to end

SAMPLED = {'num_classes': CLASSES, 'mesh.model_axis_size': 8, 'head.sample_rate': 0.5,
           'log_every_steps': 2, 'checkpoint_every_steps': 2}


def test_sampled_run_on_8_devices_resumes_exactly_and_restores_on_1(tmp_path):
  runs = [{'workdir': str(tmp_path / 'cut'), 'out': str(tmp_path / 'cut4'),
           'overrides': {**SAMPLED, 'num_train_steps': 4}},
          {'workdir': str(tmp_path / 'cut'), 'out': str(tmp_path / 'cut6'),
           'overrides': {**SAMPLED, 'num_train_steps': 6}},
          {'workdir': str(tmp_path / 'whole'), 'out': str(tmp_path / 'whole6'),
           'overrides': {**SAMPLED, 'num_train_steps': 6}}]
  worker = lib.start_worker({'devices': 8, 'runs': runs}, str(tmp_path / 'spec.json'))
  output = lib.finish(worker, timeout=900)
  assert 'Resumed' in output and output.count('worker: run done') == 3
  resumed = lib.load_npz(str(tmp_path / 'cut6') + '.process0.npz')
  whole = lib.load_npz(str(tmp_path / 'whole6') + '.process0.npz')
  lib.assert_close_trees(resumed, whole, rtol=0, atol=0, what='resumed vs uninterrupted')
  # The 8-device checkpoint (1008 padded classes) restores on this 1-device process (1001).
  from multiface_jax.training import checkpointing, trainer  # pylint: disable=import-outside-toplevel
  config = lib.tiny_config(**{**SAMPLED, 'mesh.model_axis_size': 1, 'num_train_steps': 6})
  run = trainer.Trainer(config)
  manager = checkpointing.create_checkpoint_manager(str(tmp_path / 'whole'), max_to_keep=5,
                                                    read_only=True)
  try:
    state, _ = checkpointing.restore_latest(manager, run.abstract_state)
  finally:
    manager.close()
  kernel = np.asarray(state.params['head']['kernel'])
  saved = whole["['params']['head']['kernel']"]
  assert kernel.shape[-1] == CLASSES and saved.shape[-1] == 1008
  np.testing.assert_array_equal(kernel, saved[..., :CLASSES])
  np.testing.assert_array_equal(np.asarray(state.head_momentum).shape, kernel.shape)
