"""Training loop on CPU with the tiny backbone and the emore fixture converted to TFRecords.

One reference run (4 steps, checkpoints at 2 and 4, evaluation at the end) is shared: resume,
NaN, evaluation and the 8-device run are all checked against it.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_testlib as lib
from multiface_jax.data import synthetic
from multiface_jax.inference import loading
from multiface_jax.training import checkpointing, evaluate, loop, sharding, trainer


@pytest.fixture(scope='module')
def tfrecords(tmp_path_factory):
  return lib.convert_fixture(str(tmp_path_factory.mktemp('fixture') / 'tfrecords'))


@pytest.fixture(scope='module')
def reference(tfrecords, tmp_path_factory):
  """A 4-step run on 1 device: (config, workdir, final variables as flat numpy)."""
  config = lib.tiny_config(data_dir=tfrecords, **lib.REAL_DATA_OVERRIDES)
  workdir = str(tmp_path_factory.mktemp('reference'))
  state = loop.train_and_evaluate(config, workdir)
  assert int(state.step) == 4
  return config, workdir, lib.flat_variables(state.params, state.batch_stats)


def _restore(config, workdir):
  """(state, meta) of the newest checkpoint of `workdir`, restored onto this process's mesh."""
  run = trainer.Trainer(config)
  manager = checkpointing.create_checkpoint_manager(workdir, max_to_keep=10, read_only=True)
  try:
    return checkpointing.restore_latest(manager, run.abstract_state)
  finally:
    manager.close()


def _steps_on_disk(workdir):
  directory = checkpointing.checkpoint_dir(workdir)
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_end_to_end_run_writes_checkpoints_metrics_and_evaluation(reference):
  config, workdir, variables = reference
  assert _steps_on_disk(workdir) == [2, 4]  # keep_checkpoints = 2
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  with open(os.path.join(workdir, 'eval', 'results_step4.json')) as f:
    results = json.load(f)['results']
  assert set(results) == {'pairs20'} and 0.0 <= results['pairs20']['accuracy_mean'] <= 1.0
  assert len(results['pairs20']['spheres']) == 2  # the 2-sphere head is evaluated per sphere
  assert all(np.all(np.isfinite(v)) for v in variables.values())
  with open(os.path.join(checkpointing.checkpoint_dir(workdir), '4', 'meta', 'metadata')) as f:
    meta = json.load(f)
  assert (meta['step'], meta['num_classes'], meta['num_spheres']) == (4, 4, 2)
  assert meta[loading.RECORD_KEY] == loading.model_record('tiny')  # the checkpoint knows its model
  state, _ = _restore(config, workdir)
  restored = lib.flat_variables(state.params, state.batch_stats)
  lib.assert_close_trees(restored, variables, rtol=0, atol=0, what='checkpoint 4 vs final state')
  # The run folder alone loads the newest step's backbone, as the photo commands take it.
  backbone = loading.load_backbone(workdir)
  assert backbone.step == 4 and backbone.record['model'] == 'tiny'
  lib.assert_close_trees(lib.flat_variables(backbone.variables['params'],
                                            backbone.variables['batch_stats']),
                         lib.flat_variables(state.params['backbone'], state.batch_stats),
                         rtol=0, atol=0, what='load_backbone(workdir)')


def test_resume_after_a_kill_gives_the_parameters_of_an_uninterrupted_run(reference, tmp_path):
  config, workdir, variables = reference
  # What a kill between steps 2 and 4 leaves on disk: the step-2 checkpoint, and maybe a
  # half-written step that Orbax ignores.
  resumed = tmp_path / 'resumed'
  ckpt = resumed / checkpointing.CHECKPOINT_SUBDIR
  ckpt.mkdir(parents=True)
  shutil.copytree(os.path.join(checkpointing.checkpoint_dir(workdir), '2'), ckpt / '2')
  (ckpt / '3.orbax-checkpoint-tmp-1234').mkdir()
  config = lib.tiny_config(data_dir=config.data_dir, eval_during_training=False,
                           **lib.REAL_DATA_OVERRIDES)
  state = loop.train_and_evaluate(config, str(resumed))
  assert int(state.step) == 4
  got = lib.flat_variables(state.params, state.batch_stats)
  # Same data order, same dropout keys, same updates: bit-identical on the same device.
  lib.assert_close_trees(got, variables, rtol=0, atol=0, what='2 + resume + 2 vs 4 steps')


def test_non_finite_loss_stops_with_the_step_range_and_keeps_good_checkpoints(reference,
                                                                             tmp_path):
  config, workdir, variables = reference
  run = tmp_path / 'nan'
  shutil.copytree(workdir, run)
  # Resume at step 4 with an absurd learning rate; checkpoint every step so that a missing
  # guard would write a corrupt checkpoint.
  config = lib.tiny_config(**{**lib.REAL_DATA_OVERRIDES, 'data_dir': config.data_dir,
                              'eval_during_training': False, 'optimizer.lr': 1e9,
                              'optimizer.boundaries_steps': (), 'num_train_steps': 40,
                              'checkpoint_every_steps': 1, 'log_every_steps': 3,
                              'keep_checkpoints': 100})
  with pytest.raises(FloatingPointError, match=r'between steps (\d+) and (\d+)') as error:
    loop.train_and_evaluate(config, str(run))
  message = str(error.value)
  steps = _steps_on_disk(str(run))
  first_bad = int(message.split('first seen at step ')[1].split(')')[0])
  assert steps[-1] < first_bad and f'({"step " + str(steps[-1])})' in message
  for step in steps:  # every checkpoint left on disk restores and is finite
    trainer_state = _restore_step(config, str(run), step)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(trainer_state))
  # The reference's last checkpoint is untouched.
  original = _restore_step(config, str(run), 4)
  lib.assert_close_trees(lib.flat_variables(original.params, original.batch_stats), variables,
                         rtol=0, atol=0, what='step 4 after the NaN run')


def _restore_step(config, workdir, step):
  run = trainer.Trainer(config)
  manager = checkpointing.create_checkpoint_manager(workdir, max_to_keep=100, read_only=True)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(run.abstract_state)))
    return restored['state']
  finally:
    manager.close()


def test_eval_mode_restores_the_latest_checkpoint_or_imported_weights(reference, tmp_path):
  config, workdir, _ = reference
  from_run = evaluate.evaluate(config, workdir)
  with open(os.path.join(workdir, 'eval', 'results_step4.json')) as f:
    during_training = json.load(f)['results']
  assert from_run['pairs20']['accuracy_mean'] == during_training['pairs20']['accuracy_mean']
  # The same backbone saved the way import_torch saves weights: {params, batch_stats} only.
  state, _ = _restore(config, workdir)
  weights = tmp_path / 'imported'
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(weights, {'params': state.params['backbone'],
                              'batch_stats': state.batch_stats})
  checkpointer.wait_until_finished()
  from_weights = evaluate.evaluate(config, str(tmp_path / 'eval_run'), checkpoint=str(weights))
  assert from_weights['pairs20']['accuracy_mean'] == from_run['pairs20']['accuracy_mean']
  assert from_weights['pairs20']['xnorm'] == pytest.approx(from_run['pairs20']['xnorm'])
  # Fine-tuning from imported weights: the backbone is theirs, the head is new.
  finetune = lib.tiny_config(**{**lib.REAL_DATA_OVERRIDES, 'data_dir': config.data_dir,
                                'init_checkpoint': str(weights)})
  fresh = trainer.Trainer(finetune).fresh_state()
  lib.assert_close_trees(lib.flat_variables(fresh.params['backbone'], fresh.batch_stats),
                         lib.flat_variables(state.params['backbone'], state.batch_stats),
                         rtol=0, atol=0, what='init_checkpoint backbone')
  assert int(fresh.step) == 0
  assert not np.allclose(fresh.params['head']['kernel'], state.params['head']['kernel'])
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    evaluate.evaluate(config, str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='no checkpoint there'):
    evaluate.evaluate(config, workdir, checkpoint=str(tmp_path / 'missing'))
  wrong = lib.tiny_config(data_dir=config.data_dir)
  wrong.model.name = 'mobilefacenet'
  with pytest.raises(ValueError, match='do not fit the configured backbone'):
    evaluate.evaluate(wrong, workdir)


def test_eight_devices_with_a_class_sharded_head_match_one_device(reference, tmp_path):
  config, _, variables = reference
  workdir, out = str(tmp_path / 'run8'), str(tmp_path / 'run8_params')
  overrides = {**lib.REAL_DATA_OVERRIDES, 'data_dir': config.data_dir,
               'eval_during_training': False, 'mesh.model_axis_size': 2}
  worker = lib.start_worker({'devices': 8, 'runs': [
      {'workdir': workdir, 'out': out, 'overrides': overrides}]}, str(tmp_path / 'spec.json'))
  output = lib.finish(worker, timeout=400)
  assert 'run done at step 4 on 8 devices' in output
  on_8 = lib.load_npz(out + '.process0.npz')
  # Batch split over 4 x 2 devices, classes over 2: the same function up to summation order.
  lib.assert_close_trees(on_8, variables, rtol=1e-4, atol=1e-4, what='8 devices vs 1')
  # Its checkpoint (head kernel saved in 2 class shards) restores onto this 1-device process.
  state, meta = _restore(lib.tiny_config(**{**overrides, 'mesh.model_axis_size': 1}), workdir)
  assert meta['num_devices'] == 8 and meta['mesh'] == {'data': 4, 'model': 2}
  assert len(jax.devices()) == 1
  lib.assert_close_trees(lib.flat_variables(state.params, state.batch_stats), on_8, rtol=0,
                         atol=0, what='8-device checkpoint restored on 1 device')


def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'preempted'
  # Through main.py, with bf16 compute and gradient accumulation on the way.
  command = [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}',
             '--config.num_train_steps=100000', '--config.log_every_steps=1',
             '--config.checkpoint_every_steps=100000', '--config.model.dtype=bfloat16',
             '--config.grad_accum_steps=2']
  process = subprocess.Popen(command, cwd=lib.REPO, env=lib.worker_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    for line in process.stdout:  # wait until training runs
      if line.startswith('step 2/') or time.time() > deadline:
        break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 0, stderr[-4000:]
  assert 'Preemption signal: saved step' in stderr
  saved = int(stderr.split('Preemption signal: saved step ')[1].split()[0])
  assert saved >= 2 and _steps_on_disk(str(workdir)) == [saved]
  config = lib.tiny_config(**{'model.dtype': 'bfloat16', 'grad_accum_steps': 2})
  state, meta = _restore(config, str(workdir))
  assert int(state.step) == saved == meta['step']
  assert all(x.dtype == np.float32 and np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree.leaves(state.params))  # bf16 compute, float32 parameters
  assert int(state.opt_state.mini_step) == saved % 2  # the accumulation phase is saved too


def test_synthetic_batches_do_not_depend_on_the_process_layout():
  common = dict(num_classes=5, image_size=(4, 4), seed=3)
  whole = synthetic.synthetic_batches(8, **common, start_step=1)
  halves = [synthetic.synthetic_batches(8, **common, start_step=1, process_index=i, process_count=2)
            for i in range(2)]
  for _ in range(5):  # wraps around the 4 distinct batches
    expected = next(whole)
    parts = [next(h) for h in halves]
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
  restarted = synthetic.synthetic_batches(8, **common, start_step=6)
  np.testing.assert_array_equal(next(restarted)['image'], next(whole)['image'])


def test_mesh_and_batch_errors_name_the_fix():
  with pytest.raises(ValueError, match='model_axis_size=2 must be >= 1 and divide the 1 devices'):
    sharding.create_mesh(2)
  mesh = sharding.create_mesh(1)
  assert sharding.check_batch_size(8, mesh) == 8
  abstract = {'head': {'kernel': jax.ShapeDtypeStruct((2, 4, 7), np.float32)}}
  layout = sharding.state_shardings(mesh, abstract)['head']['kernel']
  assert layout.spec == jax.sharding.PartitionSpec()  # no model axis: replicated
  # 7 classes cannot be split over a model axis of 2 (shape-only mesh: no devices needed).
  two_way = jax.sharding.AbstractMesh((1, 2), ('data', 'model'))
  with pytest.raises(ValueError, match=r'7 classes.*model_axis_size=2.*\[1, 7\]'):
    sharding.state_shardings(two_way, abstract)
