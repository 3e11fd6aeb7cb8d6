"""Transparent huge pages for this process's malloc (Linux, glibc >= 2.35), by re-executing it.

XLA:CPU allocates every step's buffers afresh. glibc serves allocations above its mmap threshold
(at most 32 MiB, so every large activation) with new mappings that the kernel fills one 4 KiB
page at a time: ~443,000 page faults and ~1.4 s of kernel time per MobileFaceNet training step
(batch 64, 2 cores; bench/RESULTS.md). With the glibc tunable ``glibc.malloc.hugetlb=1`` malloc
asks the kernel for transparent huge pages on those mappings (``madvise``): ~1,500 faults per
step, 20.5 -> 24.7 images/s on the same step. ``mallopt`` cannot do this (no thresholds above
32 MiB, no huge pages), and glibc reads tunables only when a process starts, so an entry point
that wants them re-executes itself once with the tunable added to ``GLIBC_TUNABLES``.

Only entry points call this (``main.py``, which the demo runs for training, and the bench
scripts), first thing after flag parsing, before anything is written. The library itself never
re-executes.
"""
import os
import sys

TUNABLE = 'glibc.malloc.hugetlb'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_version() -> tuple[int, ...]:
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()  # e.g. 'glibc 2.36'
  except (AttributeError, ValueError, OSError):  # not glibc (musl, macOS, Windows)
    return ()
  if name != 'glibc':
    return ()
  return tuple(int(part) for part in version.split('.') if part.isdigit())


def _transparent_huge_pages_enabled() -> bool:
  """False when the kernel has them switched off ('[never]') or does not have them."""
  try:
    with open(_THP_SETTING) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def supported() -> bool:
  """Whether the tunable would have an effect here: Linux, glibc >= 2.35, THP not disabled."""
  return (sys.platform.startswith('linux') and _glibc_version() >= (2, 35) and
          _transparent_huge_pages_enabled())


def active() -> bool:
  """Whether this process started with the tunable set (to any value)."""
  return TUNABLE in os.environ.get('GLIBC_TUNABLES', '')


def environment() -> dict[str, str]:
  """This process's environment with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES``
  (other tunables kept)."""
  tunables = [t for t in os.environ.get('GLIBC_TUNABLES', '').split(':') if t]
  return dict(os.environ, GLIBC_TUNABLES=':'.join([*tunables, f'{TUNABLE}=1']))


def reexec_with_huge_pages() -> None:
  """Re-executes this process (same interpreter, arguments, working directory) with the tunable,
  unless it is already set, in which case it returns, as it does where it would have no effect.

  The new process sees the tunable and returns from this call, so it runs once. Call it before
  the process writes anything: nothing after the call survives in the process that made it.
  """
  if active() or not supported():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment())
  except OSError as error:  # e.g. an interpreter path that no longer exists: run on without
    print(f'Could not re-run {sys.executable} with {TUNABLE}=1 ({error}); continuing without '
          'huge pages (set GLIBC_TUNABLES yourself, or pass --nohuge_pages to skip this).',
          file=sys.stderr, flush=True)
