"""Two local processes with jax.distributed (127.0.0.1, gloo CPU collectives) train together.

One 2-process run (2 CPU devices each) on the converted emore fixture covers the multi-host
promises: each process reads its own TFRecord shard (the pipeline gives process i the shards
[i::2]), the processes agree on every parameter and equal one process fed the same global
batches, they write one checkpoint together that restores onto 1 device, and a SIGTERM to *one*
process makes both save at the same step and exit cleanly (JAX's preemption sync point).
"""
import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

import train_testlib as lib
from multiface_jax.training import checkpointing, inputs, sharding, trainer

# Checkpoints every 4 steps, all kept: step 4 is compared with one process.
OVERRIDES = {**lib.REAL_DATA_OVERRIDES, 'num_train_steps': 100_000, 'checkpoint_every_steps': 4,
             'keep_checkpoints': 100, 'log_every_steps': 2, 'eval_every_steps': 2}
COMPARED_STEP = 4


def _reference(config, steps):
  """The parameters after `steps` steps of one process (1 device) whose global batch k is
  process 0's local batch k followed by process 1's, each from the pipeline as that process
  builds it (its own shards); and the labels each process's stream holds in its first epoch."""
  run = trainer.Trainer(config)
  facts = inputs.dataset_facts(config)
  streams = [inputs.create_input_iter(config, facts, local_batch_size=config.batch_size // 2,
                                      start_step=0, process_index=i, process_count=2)
             for i in range(2)]
  with open(os.path.join(config.data_dir, 'metadata.json')) as f:
    epoch = [shard['num_images'] for shard in json.load(f)['shards']]  # a process's, of 2 shards
  state = run.fresh_state()
  epoch_labels = [[], []]
  for step in range(steps):
    local = [next(stream) for stream in streams]
    for i, batch in enumerate(local):
      if (step + 1) * len(batch['label']) <= epoch[i]:
        epoch_labels[i].extend(batch['label'].tolist())
    batch = {key: np.concatenate([b[key] for b in local]) for key in ('image', 'label')}
    state, _ = run.train_step(state, sharding.make_global_batch(run.mesh, batch))
  return lib.flat_variables(state.params, state.batch_stats), epoch_labels


def _shard_labels(data_dir):
  """The labels stored in each TFRecord shard, read without the project's pipeline."""
  features = {'label': tf.io.FixedLenFeature([], tf.int64)}
  names = sorted(n for n in os.listdir(data_dir) if n.endswith('.tfrecord'))
  return [sorted(int(tf.io.parse_single_example(record, features)['label'])
                 for record in tf.data.TFRecordDataset(os.path.join(data_dir, name)))
          for name in names]


def test_two_processes_on_their_own_files_agree_match_one_process_and_stop_together(tmp_path):
  tfrecords = lib.convert_fixture(str(tmp_path / 'tfrecords'))
  overrides = {**OVERRIDES, 'data_dir': tfrecords}
  workdir, out = str(tmp_path / 'shared_run'), str(tmp_path / 'params')
  coordinator = f'127.0.0.1:{lib.free_port()}'
  workers = [
      lib.start_worker({'devices': 2,
                        'distributed': {'coordinator': coordinator, 'num_processes': 2,
                                        'process_id': i},
                        'runs': [{'workdir': workdir, 'out': out, 'overrides': overrides}]},
                       str(tmp_path / f'spec{i}.json'))
      for i in range(2)]
  try:
    lib.wait_for_output(workers[0], 'step 4/', timeout=400)
    workers[1].send_signal(signal.SIGTERM)  # preempt one host only
    outputs = [lib.finish(worker, timeout=200) for worker in workers]
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  steps = [int(o.split('run done at step ')[1].split()[0]) for o in outputs]
  assert steps[0] == steps[1] >= 4, steps
  stopped_at = steps[0]
  for output in outputs:
    assert f'Preemption signal: saved step {stopped_at}' in output
    assert 'on 4 devices' in output
  # Only process 0 prints the progress lines and the evaluation tables.
  assert 'step 4/' in outputs[0] and '| pairs20' in outputs[0]
  assert 'step 4/' not in outputs[1] and '| pairs20' not in outputs[1]

  process0, process1 = (lib.load_npz(f'{out}.process{i}.npz') for i in range(2))
  lib.assert_close_trees(process1, process0, rtol=0, atol=0, what='process 1 vs process 0')

  # The checkpoint both processes wrote together restores onto this single device.
  config = lib.tiny_config(**{**overrides, 'eval_during_training': False})
  assert checkpointing.latest_step_dir(workdir).split('/')[-1] == str(stopped_at)
  restored, meta = _restore(config, workdir, stopped_at)
  assert meta['num_processes'] == 2 and meta['step'] == stopped_at and len(jax.devices()) == 1
  lib.assert_close_trees(lib.flat_variables(restored.params, restored.batch_stats), process0,
                         rtol=0, atol=0, what='2-process checkpoint on 1 device')
  assert np.all(np.isfinite(process0["['params']['head']['kernel']"]))

  # Each process's stream is its own shard: one epoch of it holds exactly that file's labels.
  single, epoch_labels = _reference(config, COMPARED_STEP)
  assert [sorted(labels) for labels in epoch_labels] == _shard_labels(tfrecords)
  assert _shard_labels(tfrecords)[0] != _shard_labels(tfrecords)[1]  # the shards differ
  # 4 devices over 2 processes vs 1 device, the same global batches: equal up to the order of
  # the sums (compared at step 4: on these 16 images rounding differences grow fast later).
  at_4, _ = _restore(config, workdir, COMPARED_STEP)
  lib.assert_close_trees(lib.flat_variables(at_4.params, at_4.batch_stats), single, rtol=1e-4,
                         atol=1e-4, what='2 processes vs 1 at step 4')


def _restore(config, workdir, step):
  """(state, meta) of checkpoint `step` of `workdir` on this process's single device."""
  manager = checkpointing.create_checkpoint_manager(workdir, max_to_keep=100, read_only=True)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.Trainer(config).abstract_state),
        meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return restored['state'], restored['meta']
