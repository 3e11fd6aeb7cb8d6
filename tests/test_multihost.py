"""Two local processes with jax.distributed (127.0.0.1, gloo CPU collectives) train together.

One 2-process run (2 CPU devices each) covers the multi-host promises: the processes agree on
every parameter, equal a single-process run of the same steps, write one checkpoint together
that restores onto 1 device, and a SIGTERM to *one* process makes both save at the same step
and exit cleanly (JAX's preemption sync point).
"""
import signal

import jax
import numpy as np

import train_testlib as lib
from multiface_jax.training import checkpointing, loop, trainer

OVERRIDES = {'num_train_steps': 100_000, 'checkpoint_every_steps': 100_000,
             'log_every_steps': 2, 'eval_every_steps': 2, 'optimizer.lr': 0.01,
             'optimizer.boundaries_steps': (3,), 'eval_batch_size': 16}


def test_two_processes_agree_match_one_process_and_stop_together(tmp_path):
  # Synthetic batches are defined globally (each process makes its own half), so the
  # 2-process run sees exactly the single-process data; the converted fixture only provides
  # the verification set for the evaluation hook.
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

  config = lib.tiny_config(**{**overrides, 'eval_during_training': False,
                              'num_train_steps': stopped_at})
  state = loop.train_and_evaluate(config, str(tmp_path / 'single'))
  single = lib.flat_variables(state.params, state.batch_stats)
  lib.assert_close_trees(process0, single, rtol=1e-4, atol=1e-4, what='2 processes vs 1')

  # The checkpoint both processes wrote together restores onto this single device.
  assert [int(s) for s in checkpointing.latest_step_dir(workdir).split('/')[-1:]] == [stopped_at]
  manager = checkpointing.create_checkpoint_manager(workdir, max_to_keep=1, read_only=True)
  restored, meta = checkpointing.restore_latest(manager, trainer.Trainer(config).abstract_state)
  manager.close()
  assert meta['num_processes'] == 2 and meta['step'] == stopped_at and len(jax.devices()) == 1
  lib.assert_close_trees(lib.flat_variables(restored.params, restored.batch_stats), process0,
                         rtol=0, atol=0, what='2-process checkpoint on 1 device')
  assert np.all(np.isfinite(process0["['params']['head']['kernel']"]))
