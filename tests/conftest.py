"""Shared test set-up: TensorFlow off any GPU, JAX on the CPU and tuned as every command tunes
it (cpu_tuning.configure(), before any test computes), quiet logs."""
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from multiface_jax import cpu_tuning  # pylint: disable=wrong-import-position

cpu_tuning.configure()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
  """Says last, and loudly, how many tests did not run and the one command that runs them."""
  yield
  skipped = terminalreporter.stats.get('skipped', [])
  if not skipped:
    return
  reasons = sorted({str(report.longrepr[-1]) if isinstance(report.longrepr, tuple)
                    else str(report.longrepr) for report in skipped})
  terminalreporter.write_sep('!', f'{len(skipped)} test(s) SKIPPED', yellow=True, bold=True)
  for reason in reasons:
    terminalreporter.write_line(f'  {reason}')
  if any('MULTIFACE_SLOW_TESTS' in reason for reason in reasons):
    terminalreporter.write_line('  run them too: MULTIFACE_SLOW_TESTS=1 make test')
  if any('torch' in reason for reason in reasons):
    terminalreporter.write_line('  torch is missing: `make venv-torch` (make test installs it)')
