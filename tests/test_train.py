"""Training loop on CPU with the tiny backbone and the emore fixture converted to TFRecords.

One reference run (4 steps, checkpoints at 2 and 4, evaluation at the end) is shared: resume,
NaN, evaluation and the 8-device run are all checked against it. Resuming is checked where it is
hard: mid-epoch after a SIGTERM, mid gradient-accumulation cycle, after a SIGTERM from outside,
from 1 onto 8 devices and back (training on), with the input stream checked batch by batch.
"""
import json
import os
import re
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
from multiface_jax.training import checkpointing, evaluate, inputs, loop, sharding, trainer


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


def _tap_input(monkeypatch, term_at=None):
  """Wraps ``Trainer.input_iter``: records every batch the loop takes, as (step, batch) with
  step = the step it feeds (1-based), and sends this process a SIGTERM as the batch of step
  `term_at` is taken: the loop's handler then lets that step finish, saves it and returns."""
  seen = []
  original = trainer.Trainer.input_iter

  def input_iter(self, start_step):
    for step, batch in enumerate(original(self, start_step), start=start_step + 1):
      seen.append((step, batch))
      if step == term_at:
        # Only with the loop's handler in place: the default action would end pytest.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(trainer.Trainer, 'input_iter', input_iter)
  return seen


def test_sigterm_mid_epoch_then_resume_is_bit_exact_and_continues_the_input_stream(
    reference, tmp_path, monkeypatch):
  """SIGTERM during step 3 (2 steps per epoch: step 3 is the middle of the second epoch); the
  loop saves step 3 and returns, the rerun resumes there. Its whole state at step 4 (parameters,
  momentum, batch_stats, rng, step) is the uninterrupted run's bit for bit, and the batches the
  two halves took are batches 1-4 of the pipeline's uninterrupted stream."""
  config, ref_workdir, _ = reference
  config = lib.tiny_config(data_dir=config.data_dir, eval_during_training=False,
                           **lib.REAL_DATA_OVERRIDES)
  seen = _tap_input(monkeypatch, term_at=3)
  workdir = str(tmp_path / 'run')
  stopped = loop.train_and_evaluate(config, workdir)
  assert int(stopped.step) == 3 and _steps_on_disk(workdir) == [2, 3]
  resumed = loop.train_and_evaluate(config, workdir)
  assert int(resumed.step) == 4
  lib.assert_bit_identical(lib.flat_state(resumed),
                           lib.flat_state(_restore_step(config, ref_workdir, 4)),
                           'SIGTERM at 3 + resume vs 4 uninterrupted steps')
  assert [step for step, _ in seen] == [1, 2, 3, 4]
  stream = inputs.create_input_iter(config, inputs.dataset_facts(config), local_batch_size=8,
                                    start_step=0, process_index=0, process_count=1)
  for (step, batch), expected in zip(seen, stream):
    assert set(batch) == set(expected) == {'image', 'label'}
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], expected[key], err_msg=f'step {step} {key}')


def test_resume_mid_gradient_accumulation_cycle_is_bit_exact(reference, tmp_path):
  """grad_accum_steps=2, checkpoint at step 3: the saved optimizer holds one accumulated
  gradient of the cycle. Resuming from it (what a kill after that save leaves) gives the
  uninterrupted run's state at step 6 bit for bit; a restore that lost the accumulated gradient
  or the cycle position would update at other steps or with another gradient."""
  config = lib.tiny_config(**{**lib.REAL_DATA_OVERRIDES, 'data_dir': reference[0].data_dir,
                              'eval_during_training': False, 'grad_accum_steps': 2,
                              'num_train_steps': 6, 'checkpoint_every_steps': 3,
                              'keep_checkpoints': 5})
  whole_dir = str(tmp_path / 'whole')
  whole = loop.train_and_evaluate(config, whole_dir)
  assert _steps_on_disk(whole_dir) == [3, 6]
  at_3 = _restore_step(config, whole_dir, 3)
  assert int(at_3.opt_state.mini_step) == 1  # mid cycle ...
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(at_3.opt_state.acc_grads))
  cut = tmp_path / 'cut' / checkpointing.CHECKPOINT_SUBDIR
  cut.mkdir(parents=True)
  shutil.copytree(os.path.join(checkpointing.checkpoint_dir(whole_dir), '3'), cut / '3')
  resumed = loop.train_and_evaluate(config, str(tmp_path / 'cut'))
  assert int(resumed.step) == 6
  lib.assert_bit_identical(lib.flat_state(resumed), lib.flat_state(whole),
                           '3 + resume + 3 vs 6 uninterrupted steps, accumulating 2')


@pytest.mark.parametrize('boundary, expected', [
    # lr = inf from step 9 on (boundary 8): the parameters after step 9 are non-finite, so the
    # loss of step 10 is the first non-finite one; the check at step 12 covers steps 9-12.
    (8, 'between steps 9 and 12 (first seen at step 10)'),
    # lr = inf from step 12 on: every loss up to step 12 is finite (step 12's is computed before
    # its update), only the parameters are not; the check before the step-12 checkpoint catches
    # them, last seen finite at the step-6 checkpoint.
    (11, 'between steps 7 and 12 (first seen at step 12)'),
])
def test_non_finite_check_over_pending_steps_names_the_steps_and_keeps_the_good_checkpoint(
    reference, tmp_path, boundary, expected):
  """Logs every 4 steps, checkpoints every 6: several pending steps are checked at once. The
  learning rate becomes inf at a known step (a 'step' schedule whose decay factor is inf), so
  the step range of the error is known exactly."""
  config = lib.tiny_config(**{**lib.REAL_DATA_OVERRIDES, 'data_dir': reference[0].data_dir,
                              'eval_during_training': False, 'num_train_steps': 20,
                              'log_every_steps': 4, 'checkpoint_every_steps': 6,
                              'keep_checkpoints': 10, 'optimizer.boundaries_steps': (boundary,),
                              'optimizer.decay_factor': float('inf')})
  run = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError) as error:
    loop.train_and_evaluate(config, run)
  assert expected in str(error.value), str(error.value)
  assert 'The newest checkpoint (step 6)' in str(error.value)
  assert _steps_on_disk(run) == [6]  # the step-12 checkpoint was never written
  good = _restore_step(config, run, 6)
  assert int(good.step) == 6
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(good))


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


HEAD_KERNEL = "['params']['head']['kernel']"  # in flat_variables
STATE_HEAD_KERNEL = ".params['head']['kernel']"  # in flat_state


def test_eight_devices_class_sharded_head_restore_both_ways_and_train_on(reference, tmp_path):
  """8 devices (4 x 2 mesh, classes over 2) in one worker: an uninterrupted run, and a run
  resumed from the 1-device reference's step-2 checkpoint; then the 8-device step-2 checkpoint
  resumed on this 1-device process.

  Restoring is exact both ways (every leaf of the state, bit for bit). Training on after a
  restore onto another device count is checked against the uninterrupted runs to float32
  rounding only (rtol/atol 1e-4 after 2-4 steps): with the batch split over 8 devices the
  batch's gradient, the BatchNorm statistics and the softmax sums are reduced in another order,
  so bit-exactness across device counts is not expected (nor observed).
  """
  config, ref_workdir, variables = reference
  run8, out8 = str(tmp_path / 'run8'), str(tmp_path / 'run8_out')
  from1, out_from1 = str(tmp_path / 'from1'), str(tmp_path / 'from1_out')
  overrides = {**lib.REAL_DATA_OVERRIDES, 'data_dir': config.data_dir,
               'eval_during_training': False, 'mesh.model_axis_size': 2}
  worker = lib.start_worker({'devices': 8, 'compilation_cache': str(tmp_path / 'jax_cache'),
                             'runs': [
                                 {'workdir': run8, 'out': out8, 'overrides': overrides},
                                 {'workdir': from1, 'out': out_from1, 'overrides': overrides,
                                  'start_from': [ref_workdir, 2], 'dump_restored': True}]},
                            str(tmp_path / 'spec.json'))
  output = lib.finish(worker, timeout=600)
  assert output.count('run done at step 4 on 8 devices') == 2
  assert f'Resumed {from1} at step 2 on 8 devices (saved on 1)' in output
  on_8 = lib.load_npz(out8 + '.process0.npz')
  # Batch split over 4 x 2 devices, classes over 2: the same function up to summation order.
  lib.assert_close_trees(on_8, variables, rtol=1e-4, atol=1e-4, what='8 devices vs 1')

  # The live 8-device state: head kernel and its momentum split over 'model', the rest whole.
  with open(out8 + '.layout.process0.json') as f:
    layout = json.load(f)
  kernel_shape = list(on_8[HEAD_KERNEL].shape)
  head = {name for name, leaf in layout['live'].items() if leaf['shape'] == kernel_shape}
  momentum = head - {STATE_HEAD_KERNEL}
  assert STATE_HEAD_KERNEL in head and len(momentum) == 1, head
  assert re.fullmatch(r"\.opt_state.*\.trace\['head'\]\['kernel'\]", momentum.pop()), head
  assert lib.class_sharding_problems(layout['live'], head, model_axis=2) == []
  # The same state with the head replicated is caught, leaf by leaf.
  problems = lib.class_sharding_problems(layout['replicated'], head, model_axis=2)
  assert sorted(p.split(':')[0] for p in problems) == sorted(head), problems

  # 8 -> 1, restore: every leaf of the 8-device step-4 checkpoint is the worker's live state.
  config1 = lib.tiny_config(**{**overrides, 'mesh.model_axis_size': 1})
  state, meta = _restore(config1, run8)
  assert meta['num_devices'] == 8 and meta['mesh'] == {'data': 4, 'model': 2}
  assert len(jax.devices()) == 1
  lib.assert_bit_identical(lib.flat_state(state), lib.load_npz(out8 + '.state.process0.npz'),
                           '8-device checkpoint restored on 1 device')
  # 8 -> 1, training on: the 8-device step-2 checkpoint resumed here for steps 3-4.
  cut = tmp_path / 'from8' / checkpointing.CHECKPOINT_SUBDIR
  cut.mkdir(parents=True)
  shutil.copytree(os.path.join(checkpointing.checkpoint_dir(run8), '2'), cut / '2')
  resumed = loop.train_and_evaluate(config1, str(tmp_path / 'from8'))
  got = lib.flat_variables(resumed.params, resumed.batch_stats)
  lib.assert_close_trees(got, on_8, rtol=1e-4, atol=1e-4, what='8 -> 1 resumed vs 8 devices')
  lib.assert_close_trees(got, variables, rtol=1e-4, atol=1e-4, what='8 -> 1 resumed vs 1 device')

  # 1 -> 8, restore: the reference's step-2 checkpoint as the 8-device worker restored it.
  lib.assert_bit_identical(lib.load_npz(out_from1 + '.restored.process0.npz'),
                           lib.flat_state(_restore_step(config1, ref_workdir, 2)),
                           '1-device checkpoint restored on 8 devices')
  # 1 -> 8, training on: steps 3-4 on 8 devices vs the uninterrupted 1-device run.
  lib.assert_close_trees(lib.load_npz(out_from1 + '.process0.npz'), variables, rtol=1e-4,
                         atol=1e-4, what='1 -> 8 resumed vs 1 device')


def test_sigterm_saves_a_restorable_checkpoint_and_the_resumed_run_is_bit_exact(tmp_path):
  """A SIGTERM from outside (main.py, bf16 compute, gradient accumulation 2) saves the current
  step S and exits cleanly; resuming that checkpoint for 3 more steps gives, bit for bit, the
  state of S + 3 uninterrupted steps. (The rerun is told to stop at S + 3 instead of the first
  run's 100000: the 'step' schedule is written in steps, so the length changes no value.)"""
  workdir = tmp_path / 'preempted'
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
  config = lib.tiny_config(**{'model.dtype': 'bfloat16', 'grad_accum_steps': 2,
                              'num_train_steps': saved + 3, 'eval_during_training': False})
  state, meta = _restore(config, str(workdir))
  assert int(state.step) == saved == meta['step']
  assert all(x.dtype == np.float32 and np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree.leaves(state.params))  # bf16 compute, float32 parameters
  assert int(state.opt_state.mini_step) == saved % 2  # the accumulation phase is saved too
  resumed = loop.train_and_evaluate(config, str(workdir))
  assert int(resumed.step) == saved + 3
  whole = loop.train_and_evaluate(config, str(tmp_path / 'uninterrupted'))
  lib.assert_bit_identical(lib.flat_state(resumed), lib.flat_state(whole),
                           f'SIGTERM at {saved} + resume vs {saved + 3} uninterrupted steps')


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
