"""The head over the mesh (any class count on any model axis) and PartialFC, on 8 CPU devices.

One worker process (tests/sharded_head_worker.py) runs every step on 8 forced devices; the tests
compare its results with the unsharded head and with numpy. A second one (tests/train_worker.py)
trains the tiny config over 1001 classes: resumes on the same and on other model-axis sizes
(with and without class sampling), and the layout of the live train state on the mesh.
"""
import json
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
FULL = {**SAMPLED, 'head.sample_rate': 1.0}
KERNEL, MOMENTUM = ".params['head']['kernel']", '.head_momentum'  # flat_state names


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The trainer on 8 devices, 1001 classes, in one worker (JAX starts once; runs of the same
  program compile once through a persistent compilation cache):

  - sampled (rate 0.5, model axis 8 = 1008 padded classes): 4 steps ('cut4'), resumed to 6 in
    the same workdir ('cut6'), and 6 uninterrupted steps ('whole6');
  - 'axis4': cut4's step-4 checkpoint resumed with model axis 4 (1004 padded) to step 6;
  - full softmax, model axis 8: 4 steps ('full4'), resumed to 6 ('full6');
  - 'axis2': full4's step-4 checkpoint resumed with model axis 2 (1002 padded) to step 6.

  Returns ``(tmp folder, name -> output prefix, worker output)``.
  """
  tmp = tmp_path_factory.mktemp('trainer8')
  out = {name: str(tmp / name) for name in
         ('cut4', 'cut6', 'whole6', 'axis4', 'full4', 'full6', 'axis2')}
  spec = {'devices': 8, 'compilation_cache': str(tmp / 'jax_cache'), 'runs': [
      {'workdir': str(tmp / 'cut'), 'out': out['cut4'],
       'overrides': {**SAMPLED, 'num_train_steps': 4}},
      {'workdir': str(tmp / 'cut'), 'out': out['cut6'],
       'overrides': {**SAMPLED, 'num_train_steps': 6}},
      {'workdir': str(tmp / 'whole'), 'out': out['whole6'],
       'overrides': {**SAMPLED, 'num_train_steps': 6}},
      {'workdir': str(tmp / 'axis4'), 'out': out['axis4'], 'start_from': [str(tmp / 'cut'), 4],
       'dump_restored': True,
       'overrides': {**SAMPLED, 'mesh.model_axis_size': 4, 'num_train_steps': 6}},
      {'workdir': str(tmp / 'full'), 'out': out['full4'],
       'overrides': {**FULL, 'num_train_steps': 4}},
      {'workdir': str(tmp / 'full'), 'out': out['full6'],
       'overrides': {**FULL, 'num_train_steps': 6}},
      {'workdir': str(tmp / 'axis2'), 'out': out['axis2'], 'start_from': [str(tmp / 'full'), 4],
       'dump_restored': True,
       'overrides': {**FULL, 'mesh.model_axis_size': 2, 'num_train_steps': 6}}]}
  worker = lib.start_worker(spec, str(tmp / 'spec.json'))
  output = lib.finish(worker, timeout=900)
  assert output.count('worker: run done') == len(spec['runs'])
  return tmp, out, output


def _state(prefix, kind='state'):
  return lib.load_npz(f'{prefix}.{kind}.process0.npz')


def _layout(prefix):
  with open(f'{prefix}.layout.process0.json') as f:
    return json.load(f)


def test_sampled_run_on_8_devices_resumes_exactly_and_restores_on_1(runs):
  tmp, out, output = runs
  assert 'Resumed' in output
  resumed = lib.load_npz(out['cut6'] + '.process0.npz')
  whole = lib.load_npz(out['whole6'] + '.process0.npz')
  lib.assert_close_trees(resumed, whole, rtol=0, atol=0, what='resumed vs uninterrupted')
  lib.assert_bit_identical(_state(out['cut6']), _state(out['whole6']), 'resumed vs uninterrupted')
  # The 8-device checkpoint (1008 padded classes) restores on this 1-device process (1001).
  from multiface_jax.training import checkpointing, trainer  # pylint: disable=import-outside-toplevel
  config = lib.tiny_config(**{**SAMPLED, 'mesh.model_axis_size': 1, 'num_train_steps': 6})
  run = trainer.Trainer(config)
  manager = checkpointing.create_checkpoint_manager(str(tmp / 'whole'), max_to_keep=5,
                                                    read_only=True)
  try:
    state, _ = checkpointing.restore_latest(manager, run.abstract_state)
  finally:
    manager.close()
  kernel = np.asarray(state.params['head']['kernel'])
  saved = whole["['params']['head']['kernel']"]
  assert kernel.shape[-1] == CLASSES and saved.shape[-1] == 1008
  np.testing.assert_array_equal(kernel, saved[..., :CLASSES])
  np.testing.assert_array_equal(np.asarray(state.head_momentum),
                                _state(out['whole6'])[MOMENTUM][..., :CLASSES])


def _assert_restored_onto_another_padding(restored, saved, padded, what):
  """`restored` (padded to `padded` classes) holds `saved`'s values bit for bit: the real
  classes' columns of the class-axis leaves, every other leaf whole; padding columns zero."""
  assert set(restored) == set(saved), (what, set(restored) ^ set(saved))
  class_leaves = {name for name, value in saved.items() if value.shape[-1:] == (1008,)}
  for name in sorted(saved):
    got, want = restored[name], saved[name]
    if name in class_leaves:
      assert got.shape == (*want.shape[:-1], padded), (what, name, got.shape)
      assert got[..., :CLASSES].tobytes() == want[..., :CLASSES].tobytes(), (what, name)
      assert not np.any(got[..., CLASSES:]) and not np.any(want[..., CLASSES:]), (what, name)
    else:
      assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (what, name)
  return class_leaves


def test_sampled_checkpoint_resumes_on_another_model_axis(runs):
  """Model axis 8 -> 4 with PartialFC sampling: the kernel and the head's own momentum
  (``TrainState.head_momentum``) are restored exactly, stripped of the padding columns the
  other axis needed; training on keeps the padding zero. (The steps after the restore are not
  compared with the axis-8 run: the classes of the sample are drawn per class shard, so another
  model axis samples other classes.)"""
  _, out, output = runs
  assert 'at step 4 on 8 devices' in output
  saved = _state(out['cut4'])
  restored = _state(out['axis4'], 'restored')
  class_leaves = _assert_restored_onto_another_padding(restored, saved, 1004, 'axis 8 -> 4')
  assert class_leaves == {KERNEL, MOMENTUM}
  assert np.any(saved[MOMENTUM][..., :CLASSES])  # there is momentum to lose
  final = _state(out['axis4'])
  assert int(final['.step']) == 6
  for name in class_leaves:
    assert final[name].shape[-1] == 1004 and not np.any(final[name][..., CLASSES:])
  assert np.any(final[KERNEL] != restored[KERNEL])  # and it trained on
  assert all(np.all(np.isfinite(v)) for v in final.values())


def test_full_softmax_checkpoint_resumes_on_another_model_axis_and_trains_on(runs):
  """Model axis 8 -> 2 with the full softmax: the restore is exact (the kernel and its momentum
  in the optimizer state, stripped of 6 padding columns); steps 5-6 on the new axis match the
  axis-8 run to float32 rounding (the softmax sums over classes are reduced over 2 shards
  instead of 8, so bit-exactness is not expected). The axis-8 run itself resumed at step 4 on
  its own axis, which is exact (as the sampled run shows)."""
  _, out, _ = runs
  saved = _state(out['full4'])
  restored = _state(out['axis2'], 'restored')
  class_leaves = _assert_restored_onto_another_padding(restored, saved, 1002, 'axis 8 -> 2')
  assert KERNEL in class_leaves and len(class_leaves) == 2
  momentum = (class_leaves - {KERNEL}).pop()
  assert momentum.startswith('.opt_state') and np.any(saved[momentum][..., :CLASSES])
  final, reference = _state(out['axis2']), _state(out['full6'])
  assert int(final['.step']) == int(reference['.step']) == 6
  trimmed = {name: value[..., :CLASSES] if name in class_leaves else value
             for name, value in final.items()}
  expected = {name: value[..., :CLASSES] if name in class_leaves else value
              for name, value in reference.items()}
  floats = lambda tree: {k: v for k, v in tree.items() if v.dtype.kind == 'f'}
  lib.assert_close_trees(floats(trimmed), floats(expected), rtol=1e-4, atol=1e-4,
                         what='axis 8 -> 2 resumed vs axis 8')
  for name in ('.step', '.rng'):
    np.testing.assert_array_equal(final[name], reference[name])
  assert not np.any(final[KERNEL][..., CLASSES:])


@pytest.mark.parametrize('run, model_axis, head', [
    ('whole6', 8, {KERNEL, MOMENTUM}),  # sampling: the head's own momentum
    ('full6', 8, {KERNEL, 'momentum'}),  # full softmax: the momentum in opt_state
    ('axis4', 4, {KERNEL, MOMENTUM}),
    ('axis2', 2, {KERNEL, 'momentum'}),
])
def test_live_state_shards_the_head_and_its_momentum_and_replicates_the_rest(runs, run,
                                                                           model_axis, head):
  """On the live arrays the runs return: the head kernel and its momentum split along the class
  axis over 'model' (PartitionSpec(None, None, 'model'), one piece per model-axis device),
  every other leaf whole on every device. The same state with the head replicated fails."""
  _, out, _ = runs
  layout = _layout(out[run])
  shape = layout['live'][KERNEL]['shape']
  found = {name for name, leaf in layout['live'].items() if leaf['shape'] == shape}
  if 'momentum' in head:  # the optimizer's copy: the only other leaf shaped like the kernel
    momentum = found - {KERNEL}
    assert len(momentum) == 1 and momentum.pop().startswith('.opt_state'), found
    head = found
  assert found == head
  assert shape[-1] == -(-CLASSES // model_axis) * model_axis
  assert lib.class_sharding_problems(layout['live'], head, model_axis) == []
  problems = lib.class_sharding_problems(layout['replicated'], head, model_axis)
  assert sorted(p.split(':')[0] for p in problems) == sorted(head), problems
