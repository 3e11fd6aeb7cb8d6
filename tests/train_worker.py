"""Subprocess helper of test_train.py / test_multihost.py: trains the tiny config, dumps params.

  python tests/train_worker.py SPEC_JSON

SPEC_JSON: {"devices": 8, "distributed": {"coordinator": "127.0.0.1:PORT", "num_processes": 2,
"process_id": 0} (optional), "runs": [{"workdir": ..., "out": ... .npz, "overrides": {field:
value}}, ...]}. The runs share one process, so JAX starts once. Each run writes the final params
(flattened, as this process sees them) to its "out" file, suffixed with the process index.
"""
import json
import os
import sys


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
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if 'distributed' in spec:
    d = spec['distributed']
    jax.distributed.initialize(d['coordinator'], d['num_processes'], d['process_id'])
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # as main.py: no per-save Orbax INFO lines
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from multiface_jax.training import loop  # pylint: disable=import-outside-toplevel

  for run in spec['runs']:
    config = tiny.get_config()
    config.update_from_flattened_dict(run.get('overrides', {}))
    state = loop.train_and_evaluate(config, run['workdir'])
    flat = {jax.tree_util.keystr(path): _local_value(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                {'params': state.params, 'batch_stats': state.batch_stats})[0]}
    np.savez(f'{run["out"]}.process{jax.process_index()}.npz', **flat)
    print(f'worker: run done at step {int(state.step)} on {jax.device_count()} devices',
          flush=True)


if __name__ == '__main__':
  main(sys.argv[1])
