"""How this process's malloc serves the buffers XLA:CPU allocates for every step (Linux, glibc).

XLA:CPU allocates each step's buffers afresh and frees them after it: for a MobileFaceNet training
step (batch 64) one block of ~1.7 GB. glibc serves such blocks with new mappings (``mmap``) and
unmaps them on ``free``, so the kernel faults every page of every step in again and zeroes it.
Two mechanisms, both for entry points only (``main.py``, which the demo runs for training, and the
bench scripts); the library itself never changes process-wide settings:

* :func:`reexec_with_huge_pages`: transparent huge pages for malloc. With the glibc tunable
  ``glibc.malloc.hugetlb=1`` malloc asks the kernel for transparent huge pages (``madvise``):
  ~443,000 -> ~1,500 page faults and 20.5 -> 24.7 images/s on the same step (2 cores;
  bench/RESULTS.md). glibc reads tunables only when a process starts, so the entry point
  re-executes itself once with the tunable added to ``GLIBC_TUNABLES``.
* :func:`reuse_step_memory`: no fresh pages at all. JAX dispatches CPU computations to a worker
  thread, whose malloc arena maps large blocks whatever ``mallopt`` says; run inline, on the
  calling (main) thread, they come from the main arena, where ``mallopt`` can forbid mappings
  (``M_MMAP_MAX`` = 0: the heap grows instead) and keep the freed heap (``M_TRIM_THRESHOLD``).
  Every step then reuses the pages of the step before: ~1,100 -> ~10 faults and 0.33 -> 0.02 s
  of kernel time per MobileFaceNet step, 28.2 -> 32.2 images/s (2 cores, with huge pages;
  bench/RESULTS.md). Together with huge pages, since the heap's pages are huge pages too.
"""
import ctypes
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


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)


def keep_freed_memory() -> bool:
  """Makes glibc's main arena keep memory instead of mapping and unmapping it (``mallopt``):
  large blocks come from the heap (``M_MMAP_MAX`` = 0), and up to 2 GiB of free heap stays in
  the process (``M_TRIM_THRESHOLD``). Process-wide; allocations of other threads' arenas are not
  affected. Returns whether the settings were applied (False off glibc)."""
  if not _glibc_version():
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def reuse_step_memory() -> bool:
  """Runs XLA:CPU computations on the calling thread and keeps their freed memory for the next.

  Call it before JAX's first computation: the switch (``jax_cpu_enable_async_dispatch``) is read
  when the CPU backend starts. Computations over several CPU devices stay asynchronous (JAX runs
  only single-device ones inline); accelerators are not affected. The cost: Python no longer
  queues the next step while one runs; the input pipeline (tf.data) prefetches on its own
  threads either way.

  Returns:
    whether malloc keeps freed memory (:func:`keep_freed_memory`).
  """
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return keep_freed_memory()
