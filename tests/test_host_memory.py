"""How the entry points make malloc serve XLA:CPU's step buffers (multiface_jax/host_memory.py):
the huge-pages re-execution and the reuse of freed memory."""
import os
import subprocess
import sys

import pytest

from multiface_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child: prints a line before and after the call, then the page faults of filling a
# 256 MiB buffer from glibc's malloc, as XLA:CPU allocates its buffers (not numpy's allocator,
# which asks for huge pages itself).
_CHILD = r'''
import ctypes, os, resource, sys
from multiface_jax import host_memory
print('before', os.getpid(), flush=True)
if sys.argv[1] == 'reexec':
  host_memory.reexec_with_huge_pages()
print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), flush=True)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(256 << 20)
ctypes.memset(address, 1, 256 << 20)
print('faults', resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start, flush=True)
'''


def _run_child(mode, env):
  result = subprocess.run([sys.executable, '-c', _CHILD, mode], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
  return result.stdout.split('\n')


def _child_env(**extra):
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT, env.get('PYTHONPATH', '')])
  env.update(extra)
  return env


def test_environment_appends_the_tunable_and_keeps_others(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2')
  assert not host_memory.active()
  env = host_memory.environment()
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')
  assert host_memory.active()  # set by the user, to any value: never re-executed


@pytest.mark.skipif(not host_memory.supported(),
                    reason='needs Linux, glibc >= 2.35 and transparent huge pages not disabled')
def test_reexec_runs_once_with_the_tunable_and_cuts_page_faults():
  lines = _run_child('reexec', _child_env())
  befores = [line for line in lines if line.startswith('before')]
  afters = [line.split() for line in lines if line.startswith('after')]
  # The code before the call ran in both images of the process (same pid), after it once.
  assert len(befores) == 2 and len(set(befores)) == 1
  assert len(afters) == 1 and afters[0][1] == befores[0].split()[1]
  assert 'glibc.malloc.hugetlb=1' in afters[0][2]
  faults_with = int(next(line for line in lines if line.startswith('faults')).split()[1])

  plain = _run_child('plain', _child_env())
  assert sum(line.startswith('before') for line in plain) == 1
  faults_without = int(next(line for line in plain if line.startswith('faults')).split()[1])
  # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB huge pages about 128.
  assert faults_without > 30_000
  assert faults_with < faults_without / 8, (faults_with, faults_without)


def test_no_reexec_when_the_tunable_is_already_set():
  lines = _run_child('reexec', _child_env(GLIBC_TUNABLES='glibc.malloc.hugetlb=0'))
  assert sum(line.startswith('before') for line in lines) == 1


# Runs in a child: the page faults of a jitted convolution whose 64 MiB output XLA allocates on
# every call (then reduces), with or without reuse_step_memory(); the median of 7 calls after 3
# warm-up calls (now and then a call's memory is freed only after the next call has allocated,
# and the heap grows once more).
_STEP_CHILD = r'''
import resource, sys
from multiface_jax import host_memory
if sys.argv[1] == 'reuse':
  print('kept', host_memory.reuse_step_memory(), flush=True)
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
  env = _child_env()
  env.pop('XLA_FLAGS', None)  # one CPU device: JAX runs only single-device computations inline
  result = subprocess.run([sys.executable, '-c', _STEP_CHILD, mode], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=True)
  return dict(line.split(' ', 1) for line in result.stdout.splitlines() if ' ' in line)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='needs Linux with glibc (mallopt)')
def test_reuse_step_memory_makes_steps_reuse_their_pages():
  plain, reused = _step_child('plain'), _step_child('reuse')
  assert reused['kept'] == 'True'
  # Output channel 0 summed over the image: each position adds (in-image taps) x 16 / 144, and the
  # taps in-image over a 256-wide axis sum to 3 x 256 - 2 = 766 per axis. Bit-identical either
  # way: only where the memory comes from changes.
  assert float(plain['value']) == pytest.approx(766**2 * 16 / 144, rel=1e-5)
  assert plain['value'] == reused['value']
  # Without: the 64 MiB output is mapped afresh on every call, 16,384 faults in 4 KiB pages.
  assert int(plain['faults']) > 8_000, plain
  assert int(reused['faults']) < 500, reused
