"""Shared pieces of the tests: tiny data, tiny config, subprocesses, compiled-HLO checks."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMORE_FIXTURE = os.path.join(REPO, 'tests', 'data', 'emore')  # 16 images, 4 ids, pairs20.bin
WORKER = os.path.join(REPO, 'tests', 'train_worker.py')

# The tiny config on the converted fixture: batch 8 = 2 steps per epoch. lr 0.01 keeps the
# first steps out of the chaotic regime, so that float rounding (1 vs 8 devices) stays small.
REAL_DATA_OVERRIDES = {
    'synthetic_data': False, 'num_classes': 0, 'num_train_images': 0, 'num_train_steps': 4,
    'checkpoint_every_steps': 2, 'log_every_steps': 2, 'optimizer.lr': 0.01,
    'optimizer.boundaries_steps': (3,), 'eval_every_steps': 0, 'eval_batch_size': 16}


def convert_fixture(dst: str) -> str:
  """The emore fixture as TFRecords (2 shards, so that 2 processes can share it)."""
  from multiface_jax.data import convert  # pylint: disable=import-outside-toplevel
  convert.convert(EMORE_FIXTURE, dst, num_shards=2, progress=False)
  return dst


def tiny_config(**overrides):
  """configs/tiny.py with `overrides` ({'dotted.field': value})."""
  sys.path.insert(0, REPO)
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def library_fused_convolutions(hlo_text: str) -> int:
  """How many of XLA:CPU's library fusions (YNNPACK / XNNPACK) in an optimised HLO module's text
  compute a convolution (see ``models.kernels.XLA_CPU_FLAGS``)."""
  bodies = dict(re.findall(r'^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo_text, re.S | re.M))
  count = 0
  for line in hlo_text.splitlines():
    if re.search(r'"kind":"__[xy]nn_fusion"', line):
      called = re.search(r'calls=%?([\w.\-]+)', line).group(1)
      count += ' convolution(' in bodies.get(called, '')
  return count


def flat_variables(params, batch_stats) -> dict[str, np.ndarray]:
  """{'params': ..., 'batch_stats': ...} flattened to numpy with keystr names (as the worker)."""
  tree = {'params': params, 'batch_stats': batch_stats}
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def flat_state(state, local_value=np.asarray) -> dict[str, np.ndarray]:
  """Every leaf of a train state (step, params, batch_stats, opt_state, rng, head_momentum),
  flattened to numpy with keystr names: what a bit-exact comparison of two states compares."""
  return {jax.tree_util.keystr(path): local_value(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_bit_identical(got: dict, expected: dict, what: str) -> None:
  """The same leaves, each with the same dtype, shape and bytes (NaN payloads and -0.0 too)."""
  assert set(got) == set(expected), (what, sorted(set(got) ^ set(expected)))
  for name, value in expected.items():
    other = np.asarray(got[name])
    assert other.dtype == value.dtype and other.shape == value.shape, (what, name)
    if other.tobytes() != value.tobytes():
      diff = np.max(np.abs(other.astype(np.float64) - value.astype(np.float64)))
      raise AssertionError(f'{what}: {name} differs (max |diff| {diff:.3g})')


def describe_layout(tree) -> dict[str, dict]:
  """How each jax.Array leaf of `tree` lies on its devices, as JSON-able facts: its
  PartitionSpec entries, the mesh's axis sizes, whether it is fully replicated, its global and
  per-device shapes, and how many distinct pieces the devices hold."""
  layout = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    sharding = leaf.sharding
    pieces = {tuple((s.start, s.stop) for s in index)
              for index in sharding.devices_indices_map(leaf.shape).values()}
    spec = getattr(sharding, 'spec', None)
    layout[jax.tree_util.keystr(path)] = {
        'spec': None if spec is None else [list(a) if isinstance(a, tuple) else a for a in spec],
        'mesh': dict(sharding.mesh.shape) if hasattr(sharding, 'mesh') else None,
        'replicated': bool(sharding.is_fully_replicated), 'shape': list(leaf.shape),
        'shard_shape': list(sharding.shard_shape(leaf.shape)), 'pieces': len(pieces)}
  return layout


def class_sharding_problems(layout: dict[str, dict], head_leaves: set[str],
                            model_axis: int) -> list[str]:
  """What in `layout` (``describe_layout``) breaks the promised layout: the leaves `head_leaves`
  split along their class axis (the last) over the mesh's 'model' axis of size `model_axis`
  (PartitionSpec(None, None, 'model'), `model_axis` distinct pieces), every other leaf whole
  on every device. Returns one line per problem (empty: the layout is as promised)."""
  problems = [f'{name}: no such leaf' for name in sorted(head_leaves - set(layout))]
  for name, leaf in sorted(layout.items()):
    if name in head_leaves:
      shape, shard = leaf['shape'], leaf['shard_shape']
      mesh = leaf['mesh'] or {}
      if (leaf['spec'] != [None, None, 'model'] or mesh.get('model') != model_axis or
          leaf['pieces'] != model_axis or leaf['replicated'] or
          shard != [*shape[:-1], shape[-1] // model_axis]):
        problems.append(f'{name}: not class-sharded: {leaf}')
    elif not leaf['replicated'] or leaf['pieces'] != 1:
      problems.append(f'{name}: not replicated: {leaf}')
  return problems


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def worker_env() -> dict[str, str]:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


def start_worker(spec: dict, spec_path: str) -> subprocess.Popen:
  """Starts tests/train_worker.py on `spec` (written to `spec_path`); output goes to
  `spec_path + '.log'` (a file, not a pipe, so that no worker blocks on a full pipe while
  its peers wait for it in a collective)."""
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  with open(spec_path + '.log', 'w') as log:
    process = subprocess.Popen([sys.executable, WORKER, spec_path], cwd=REPO, env=worker_env(),
                               stdout=log, stderr=subprocess.STDOUT, text=True)
  process.log_path = spec_path + '.log'
  return process


def output_of(process: subprocess.Popen) -> str:
  with open(process.log_path) as f:
    return f.read()


def wait_for_output(process: subprocess.Popen, text: str, timeout: float) -> None:
  """Polls the worker's log until `text` appears (raises when it exits or times out first)."""
  deadline = time.time() + timeout
  while text not in output_of(process):
    if process.poll() is not None or time.time() > deadline:
      raise AssertionError(f'worker never printed {text!r}:\n{output_of(process)[-6000:]}')
    time.sleep(0.5)


def finish(process: subprocess.Popen, timeout: float) -> str:
  """Waits for `process`; returns its output, raising with the output when it failed."""
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    raise AssertionError(f'worker timed out after {timeout} s:\n'
                         f'{output_of(process)[-6000:]}') from None
  output = output_of(process)
  assert process.returncode == 0, f'worker failed ({process.returncode}):\n{output[-6000:]}'
  return output


def load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def assert_close_trees(got: dict, expected: dict, *, rtol: float, atol: float, what: str):
  """Every array of `expected` is in `got` and agrees to rtol/atol (relative to its own scale)."""
  assert set(got) == set(expected), (what, set(got) ^ set(expected))
  for name, value in expected.items():
    scale = max(1.0, float(np.max(np.abs(value))))
    np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol * scale,
                               err_msg=f'{what}: {name}')


def write_tiny_weights(path: str, seed: int = 0) -> str:
  """Untrained tiny-backbone weights written as import_torch writes them (with model.json)."""
  from multiface_jax import import_torch, models  # pylint: disable=import-outside-toplevel
  from multiface_jax.inference import loading  # pylint: disable=import-outside-toplevel
  model = models.create_model('tiny')
  variables = jax.device_get(model.init(jax.random.key(seed),
                                        np.zeros((1, 112, 112, 3), np.float32), train=False))
  import_torch.save_variables(path, variables, loading.model_record('tiny'))
  return path
