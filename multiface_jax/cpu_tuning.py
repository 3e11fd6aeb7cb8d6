"""The process-wide half of the CPU tuning: one call, before JAX computes anything.

  from multiface_jax import cpu_tuning
  cpu_tuning.configure()      # first thing in a script that trains or embeds on CPU

Every command of the project (``main.py``, the demo, the bench scripts) calls it; a script of your
own that builds the models and jits them gets the same speed with this one call. It does nothing
where JAX will run on an accelerator, and nothing once JAX's backends have started (it says so).
On the CPU backend it:

- sets XLA:CPU's compile flags of ``models.kernels.XLA_CPU_FLAGS`` (through ``XLA_FLAGS``, which
  XLA reads when the backend starts), so that every ``jax.jit`` gets them;
- runs single-device CPU computations on the calling thread (``jax_cpu_enable_async_dispatch``
  off). XLA:CPU allocates each step's buffers afresh and frees them after it (about 1.7 GB for a
  MobileFaceNet training step of 64 images); from a worker thread's malloc arena those are new
  mappings every step, which the kernel faults in and zeroes again;
- makes glibc's main arena keep freed memory (``mallopt``: no mappings for large blocks, no
  trimming), so each step reuses the pages of the one before.

What each of these buys is measured in bench/RESULTS.md ("CPU process tuning").
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import warnings

_FLAGS_VARIABLE = 'XLA_FLAGS'
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)


def _will_run_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting any backend: JAX
  looks for accelerators among the ``jax_plugins`` entry points (CUDA, ROCm) and ``libtpu``."""
  import jax  # pylint: disable=import-outside-toplevel
  platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  has_plugin = any(True for _ in importlib.metadata.entry_points(group='jax_plugins'))
  return not has_plugin and importlib.util.find_spec('libtpu') is None


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.backends_are_initialized()


def _add_xla_flags(flags: dict[str, str]) -> None:
  """Appends ``--name=value`` to ``XLA_FLAGS`` for each flag the variable does not set already."""
  current = os.environ.get(_FLAGS_VARIABLE, '')
  added = [f'--{name}={value}' for name, value in flags.items() if f'--{name}=' not in current]
  if added:
    os.environ[_FLAGS_VARIABLE] = ' '.join([*current.split(), *added])


def keep_freed_memory() -> bool:
  """Makes glibc's main arena keep memory instead of mapping and unmapping it (``mallopt``).

  Large blocks come from the heap (``M_MMAP_MAX`` = 0) and up to 2 GiB of free heap stays in the
  process (``M_TRIM_THRESHOLD``). Process-wide; other threads' arenas are not affected.

  Returns:
    Whether the settings were applied (False off glibc).
  """
  try:
    name, _ = os.confstr('CS_GNU_LIBC_VERSION').split()
    libc = ctypes.CDLL('libc.so.6')
  except (AttributeError, ValueError, OSError):  # not glibc (musl, macOS, Windows)
    return False
  if name != 'glibc':
    return False
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def configure() -> bool:
  """Tunes this process for XLA:CPU; a no-op where JAX runs on an accelerator.

  Call it before JAX's first computation (creating an array, ``jax.devices()``, a jitted call):
  XLA reads the flags and JAX the dispatch switch when the CPU backend starts. Called later, it
  changes nothing and warns.

  Returns:
    Whether the process was tuned.
  """
  if not _will_run_on_cpu():
    return False
  if _backends_started():
    warnings.warn('cpu_tuning.configure() was called after JAX started its backends, so it '
                  'changes nothing: call it before the first JAX computation.', stacklevel=2)
    return False
  import jax  # pylint: disable=import-outside-toplevel
  from multiface_jax.models.kernels import XLA_CPU_FLAGS  # pylint: disable=import-outside-toplevel
  _add_xla_flags(XLA_CPU_FLAGS)
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  keep_freed_memory()
  return True
