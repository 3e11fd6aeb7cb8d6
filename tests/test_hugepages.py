"""The huge-pages re-execution of the entry points (multiface_jax/hugepages.py)."""
import os
import subprocess
import sys

import pytest

from multiface_jax import hugepages

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child: prints a line before and after the call, then the page faults of filling a
# 256 MiB buffer from glibc's malloc, as XLA:CPU allocates its buffers (not numpy's allocator,
# which asks for huge pages itself).
_CHILD = r'''
import ctypes, os, resource, sys
from multiface_jax import hugepages
print('before', os.getpid(), flush=True)
if sys.argv[1] == 'reexec':
  hugepages.reexec_with_huge_pages()
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
  assert not hugepages.active()
  env = hugepages.environment()
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')
  assert hugepages.active()  # set by the user, to any value: never re-executed


@pytest.mark.skipif(not hugepages.supported(),
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
