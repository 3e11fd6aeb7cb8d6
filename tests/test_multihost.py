"""Two local processes with jax.distributed (127.0.0.1, gloo CPU collectives) train together."""
import jax
import numpy as np

import train_testlib as lib
from multiface_jax import checkpointing, train

OVERRIDES = {'num_train_steps': 4, 'checkpoint_every_steps': 2, 'log_every_steps': 2,
             'optimizer.lr': 0.01, 'optimizer.boundaries_steps': (3,), 'eval_every_steps': 0,
             'eval_batch_size': 16}


def test_two_processes_agree_match_one_process_and_share_a_checkpoint(tmp_path):
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
  outputs = [lib.finish(worker, timeout=400) for worker in workers]
  for output in outputs:
    assert 'run done at step 4 on 4 devices' in output
  # Only process 0 prints the progress lines and the evaluation table.
  assert 'step 4/4' in outputs[0] and '| pairs20' in outputs[0]
  assert 'step 4/4' not in outputs[1] and '| pairs20' not in outputs[1]

  process0, process1 = (lib.load_npz(f'{out}.process{i}.npz') for i in range(2))
  lib.assert_close_trees(process1, process0, rtol=0, atol=0, what='process 1 vs process 0')

  config = lib.tiny_config(**{**overrides, 'eval_during_training': False})
  state = train.train_and_evaluate(config, str(tmp_path / 'single'))
  single = lib.flat_variables(state.params, state.batch_stats)
  lib.assert_close_trees(process0, single, rtol=1e-4, atol=1e-4, what='2 processes vs 1')

  # The checkpoint both processes wrote together restores onto this single device.
  trainer = train.Trainer(config)
  manager = checkpointing.create_checkpoint_manager(workdir, max_to_keep=2, read_only=True)
  restored, meta = checkpointing.restore_latest(manager, trainer.abstract_state)
  manager.close()
  assert meta['num_processes'] == 2 and meta['step'] == 4 and len(jax.devices()) == 1
  lib.assert_close_trees(lib.flat_variables(restored.params, restored.batch_stats), process0,
                         rtol=0, atol=0, what='2-process checkpoint on 1 device')
  assert np.all(np.isfinite(process0["['params']['head']['kernel']"]))
