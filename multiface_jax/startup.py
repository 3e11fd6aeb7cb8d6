"""What every command of the project does before its work: quiet library logs, CPU tuning.

Without ``--verbosity`` on the command line, absl logging (Orbax's per-save lines, the
evaluator's file lines) shows warnings and errors only, and TensorFlow is imported with its
import-time notices dropped (it prints them to stderr before its own log level applies);
``--verbosity=0`` (or higher) brings everything back. Then ``cpu_tuning.configure()``.
Call :func:`prepare` first thing in ``main(argv)``, before JAX computes anything.
"""
import contextlib
import os
import sys

from absl import flags, logging

from multiface_jax import cpu_tuning


@contextlib.contextmanager
def _stderr_dropped():
  """Sends file descriptor 2 to /dev/null inside the block (C++ libraries write there directly)."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def prepare(*, tensorflow: bool = True) -> None:
  """Sets the console's log levels (unless ``--verbosity`` was given) and tunes the CPU.

  Args:
    tensorflow: the command uses TensorFlow (tf.data, clu's writers): import it now, quietly.
  """
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
    if tensorflow and 'tensorflow' not in sys.modules:
      with _stderr_dropped():
        import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  cpu_tuning.configure()
