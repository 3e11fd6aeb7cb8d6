"""Subprocess helper of test_train.py / test_multihost.py / test_sharded_head.py: trains the tiny
config on forced CPU devices and dumps what the tests compare.

  python tests/train_worker.py SPEC_JSON

SPEC_JSON: {"devices": 8, "distributed": {"coordinator": "127.0.0.1:PORT", "num_processes": 2,
"process_id": 0} (optional), "compilation_cache": DIR (optional), "runs": [{"workdir": ...,
"out": ..., "overrides": {field: value}, "start_from": [WORKDIR, STEP], "dump_restored": bool},
...]}. The runs share one process, so JAX starts once; with "compilation_cache", runs of the same
program also compile once (JAX's persistent cache hands back the very executable, so values do
not change). "start_from" first copies that step folder of another run (maybe an earlier run of
the spec) into this run's workdir: what a run killed after that checkpoint leaves.

Each run writes, suffixed with ``.process{index}`` (as this process sees the arrays):
- ``{out}.npz``: the final params and batch_stats, flattened (``keystr`` names);
- ``{out}.state.npz``: every leaf of the final train state (``train_testlib.flat_state``);
- ``{out}.layout.json``: each leaf's layout on the mesh (``train_testlib.describe_layout``), for
  the live final state (``live``) and, with one process, for the same state put whole on every
  device (``replicated``: what a head that is not class-sharded looks like);
- with "dump_restored": ``{out}.restored.npz``, the state restored from the workdir's newest
  checkpoint onto this run's mesh, before any step.
"""
import json
import os
import shutil
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def _local_value(x):
  """The whole value of a jax.Array as this process holds it (its own replica when it spans
  several processes, so that the processes' copies can be compared)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if x.is_fully_addressable:
    return np.asarray(x)
  assert x.sharding.is_fully_replicated, x.sharding
  return np.asarray(x.addressable_data(0))


def main(spec_path):
  with open(spec_path) as f:
    spec = json.load(f)
  # Must precede the first `import jax`.
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={spec["devices"]}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, os.path.dirname(TESTS))
  sys.path.insert(0, TESTS)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if 'distributed' in spec:
    d = spec['distributed']
    jax.distributed.initialize(d['coordinator'], d['num_processes'], d['process_id'])
  if spec.get('compilation_cache'):
    jax.config.update('jax_compilation_cache_dir', spec['compilation_cache'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # as main.py: no per-save Orbax INFO lines
  import train_testlib as lib  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from multiface_jax.training import checkpointing, loop, sharding, trainer  # pylint: disable=import-outside-toplevel

  suffix = f'process{jax.process_index()}'
  for run in spec['runs']:
    config = tiny.get_config()
    config.update_from_flattened_dict(run.get('overrides', {}))
    if run.get('start_from') and jax.process_index() == 0:
      source, step = run['start_from']
      shutil.copytree(os.path.join(checkpointing.checkpoint_dir(source), str(step)),
                      os.path.join(checkpointing.checkpoint_dir(run['workdir']), str(step)))
    if run.get('dump_restored'):
      built = trainer.Trainer(config)
      manager = checkpointing.create_checkpoint_manager(run['workdir'], max_to_keep=10,
                                                        read_only=True)
      try:
        restored, _ = checkpointing.restore_latest(manager, built.abstract_state)
      finally:
        manager.close()
      np.savez(f'{run["out"]}.restored.{suffix}.npz',
               **lib.flat_state(restored, local_value=_local_value))
    state = loop.train_and_evaluate(config, run['workdir'])
    flat = {jax.tree_util.keystr(path): _local_value(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                {'params': state.params, 'batch_stats': state.batch_stats})[0]}
    np.savez(f'{run["out"]}.{suffix}.npz', **flat)
    np.savez(f'{run["out"]}.state.{suffix}.npz', **lib.flat_state(state, local_value=_local_value))
    layouts = {'live': lib.describe_layout(state)}
    if jax.process_count() == 1:
      whole = jax.device_put(state, sharding.replicated(jax.tree.leaves(state)[0].sharding.mesh))
      layouts['replicated'] = lib.describe_layout(whole)
    with open(f'{run["out"]}.layout.{suffix}.json', 'w') as f:
      json.dump(layouts, f)
    print(f'worker: run done at step {int(state.step)} on {jax.device_count()} devices',
          flush=True)


if __name__ == '__main__':
  main(sys.argv[1])
