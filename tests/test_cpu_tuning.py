"""cpu_tuning.configure(): what it changes in a fresh process, and what it leaves alone.

Every check runs in a child process: the tuning applies only before JAX starts its backends,
and this test process has been configured already (conftest.py), as every command is.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_testlib as lib

# Prints, as JSON, what XLA:CPU gives its library (YNNPACK) in the compiled code of a 3x3
# convolution, a matmul, a per-channel sum, and of a user's own jax.jit of the tiny model's train
# step built with create_model; and the convolution's value, to compare against numpy.
_COMPILE_CHILD = r'''
import functools, json, sys
import numpy as np
from multiface_jax import cpu_tuning
tuned = cpu_tuning.configure() if sys.argv[1] == 'tuned' else False
import jax, jax.numpy as jnp, optax
from multiface_jax import heads, models
from multiface_jax.training import sharded_head, sharding, step
sys.path.insert(0, 'tests')
import train_testlib as lib

def fused(fn, *args):
  return '__ynn_fusion' in jax.jit(fn).lower(*args).compile().as_text()

rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(2, 14, 14, 32)), jnp.float32)  # big enough for YNNPACK
kernel = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
conv_text = jax.jit(conv).lower(x, kernel).compile().as_text()

model = models.create_model('tiny')
head = sharded_head.ShardedHead(heads.MultiSphereHead(num_classes=16, num_spheres=2),
                                sharding.create_mesh(1), global_batch=8)
tx = optax.sgd(0.1)
state = step.create_train_state(jax.random.key(0), model=model, head=head, tx=tx,
                                image_size=(112, 112))
batch = {'image': jnp.zeros((8, 112, 112, 3), jnp.uint8), 'label': jnp.zeros((8,), jnp.int32)}
train_step = jax.jit(functools.partial(step.train_step, model=model, head=head, tx=tx,
                                       head_lr_fn=lambda _: 0.1,
                                       head_sgd=dict(momentum_decay=0.0, weight_decay=0.0)))
step_text = train_step.lower(state, batch).compile().as_text()
print(json.dumps({
    'tuned': tuned,
    'async': jax.config.values['jax_cpu_enable_async_dispatch'],
    'conv': lib.library_fused_convolutions(conv_text),
    'conv_value': np.asarray(jax.jit(conv)(x, kernel))[1, 5, 7, :4].tolist(),
    'matmul': fused(jnp.matmul, x.reshape(-1, 32), kernel[0, 0]),
    'sum': fused(functools.partial(jnp.sum, axis=(0, 1, 2)), x),
    'step_convolutions': step_text.count(' convolution('),
    'step_library_convolutions': lib.library_fused_convolutions(step_text),
}))
'''


def _child(code, *args, **env_changes):
  env = lib.worker_env()
  env.update(env_changes)
  result = subprocess.run([sys.executable, '-c', code, *args], env=env, cwd=lib.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def _conv_numpy(x, kernel, index):
  """Output pixel `index` (b, h, w) of a 3x3 stride-1 'same' convolution, first 4 channels."""
  b, h, w = index
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patch = padded[b, h:h + 3, w:w + 3, :]
  return np.einsum('ijc,ijco->o', patch, kernel)[:4]


def test_configure_keeps_convolutions_and_dots_xla_s_in_any_jit():
  plain = json.loads(_child(_COMPILE_CHILD, 'plain'))
  tuned = json.loads(_child(_COMPILE_CHILD, 'tuned'))
  # XLA's defaults give YNNPACK the convolution and the matmul (if this fails, XLA changed its
  # defaults: revisit models.kernels.XLA_CPU_FLAGS) ...
  assert not plain['tuned'] and plain['async']
  assert plain['conv'] == 1 and plain['matmul'] and plain['sum']
  assert plain['step_library_convolutions'] > 0
  # ... configure() leaves it the reductions only, for a plain jax.jit of anything, the train
  # step of a model from create_model included, and runs CPU computations inline.
  assert tuned['tuned'] and not tuned['async']
  assert tuned['conv'] == 0 and not tuned['matmul'] and tuned['sum']
  assert tuned['step_convolutions'] > 0 and tuned['step_library_convolutions'] == 0
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 14, 14, 32)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  expected = _conv_numpy(x, kernel, (1, 5, 7))
  for values in (plain['conv_value'], tuned['conv_value']):  # sums of 288 products ~1
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-4)


_LATE_OR_ELSEWHERE_CHILD = r'''
import os, sys, warnings
import jax
from multiface_jax import cpu_tuning
if sys.argv[1] == 'late':
  jax.numpy.ones(3).block_until_ready()  # starts the backends
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  applied = cpu_tuning.configure()
print(applied, os.environ.get('XLA_FLAGS', ''), jax.config.values['jax_cpu_enable_async_dispatch'],
      [str(w.message)[:70] for w in caught])
'''


def test_configure_changes_nothing_after_the_backends_started():
  out = _child(_LATE_OR_ELSEWHERE_CHILD, 'late')
  assert out.startswith('False  True') and 'after JAX started its backends' in out, out


def test_configure_is_a_no_op_where_jax_will_use_an_accelerator():
  # JAX_PLATFORMS names the accelerator first; the backend is never started here.
  out = _child(_LATE_OR_ELSEWHERE_CHILD, 'early', JAX_PLATFORMS='cuda,cpu')
  assert out.strip() == 'False  True []', out


def test_configure_keeps_flags_the_user_set(monkeypatch):
  from multiface_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_'
                     'INDIVIDUAL_DOT --xla_force_host_platform_device_count=2')
  cpu_tuning._add_xla_flags({'xla_cpu_experimental_ynn_fusion_type': 'X', 'xla_other': 'Y'})
  assert os.environ['XLA_FLAGS'].split() == [
      '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
      '--xla_force_host_platform_device_count=2', '--xla_other=Y']


# The page faults of a jitted convolution whose 64 MiB output XLA allocates on every call (then
# reduces), with or without configure(); the median of 7 calls after 3 warm-up calls (now and
# then a call's memory is freed only after the next call has allocated, and the heap grows once
# more).
_STEP_CHILD = r'''
import resource, sys
from multiface_jax import cpu_tuning
if sys.argv[1] == 'tuned':
  print('tuned', cpu_tuning.configure(), flush=True)
import jax, jax.numpy as jnp
images = jnp.ones((16, 256, 256, 16), jnp.float32)  # its convolution: 64 MiB = 16,384 pages
kernel = jnp.full((3, 3, 16, 16), 1 / 144, jnp.float32)
step = jax.jit(lambda x, k: jnp.sum(jax.lax.conv_general_dilated(
    x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')), axis=(1, 2)))
for _ in range(3):
  out = step(images, kernel).block_until_ready()
faults = []
for _ in range(7):
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  out = step(images, kernel).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print('faults', sorted(faults)[3], flush=True)  # the median call
print('value', float(out[0, 0]), flush=True)
'''


def _step_child(mode):
  out = _child(_STEP_CHILD, mode)
  return dict(line.split(' ', 1) for line in out.splitlines() if ' ' in line)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='needs Linux with glibc (mallopt)')
def test_configured_steps_reuse_their_pages():
  plain, tuned = _step_child('plain'), _step_child('tuned')
  assert tuned['tuned'] == 'True'
  # Output channel 0 summed over the image: each position adds (in-image taps) x 16 / 144, and the
  # taps in-image over a 256-wide axis sum to 3 x 256 - 2 = 766 per axis.
  assert float(plain['value']) == pytest.approx(766**2 * 16 / 144, rel=1e-5)
  assert float(tuned['value']) == pytest.approx(766**2 * 16 / 144, rel=1e-5)
  # Without: the 64 MiB output is mapped afresh on every call, 16,384 faults in 4 KiB pages.
  assert int(plain['faults']) > 8_000, plain
  assert int(tuned['faults']) < 500, tuned
