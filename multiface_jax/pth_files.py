"""Reading a PyTorch ``.pth`` file that may come from anywhere, without running it.

``torch.load(weights_only=True)`` refuses pickles that hold more than tensors and plain containers
(:class:`UnsafeCheckpointError`); damaged files and zip archives whose members would inflate beyond
the file's own size are refused before torch inflates them (:class:`UnreadableCheckpointError`).
torch is imported only when a file is read.
"""
import os
import re
import zipfile
from typing import Any, Mapping


class StateDictMismatchError(ValueError):
  """The state_dict's keys or shapes do not match the architecture asked for."""


class UnsafeCheckpointError(ValueError):
  """A .pth file whose pickle is not plain tensors (it could run code when loaded)."""


class UnreadableCheckpointError(ValueError):
  """A .pth file torch cannot read: truncated, corrupt, not a checkpoint, or a zip bomb."""


def _unpickling_reason(message: str) -> str:
  """The specific part of torch's weights_only error, without its advice to retry with
  weights_only=False (exactly what must not be done with an untrusted file)."""
  match = re.search(r'WeightsUnpickler error: (.*?)(?: Please use|\n|$)', message)
  if match:
    return match[1].strip()
  paragraphs = [p.strip() for p in message.split('\n\n') if p.strip()]
  specific = [p for p in paragraphs if not p.startswith(('Weights only load failed', 'Check the'))]
  return ' '.join(specific) or message


def _check_archive_sizes(pth_path: str) -> None:
  """Refuses a zip-format .pth whose members would inflate beyond the file's own size.

  torch.save stores members uncompressed, but torch.load inflates deflated ones: a few KB could
  otherwise expand into gigabytes before any check. Legacy (non-zip) files are left to torch.
  """
  with open(pth_path, 'rb') as f:
    if f.read(4) != b'PK\x03\x04':  # how torch itself tells a zip checkpoint
      return
  file_size = os.path.getsize(pth_path)
  try:
    with zipfile.ZipFile(pth_path) as archive:
      inflated = sum(info.file_size for info in archive.infolist())
  except Exception as e:  # pylint: disable=broad-except  (zipfile raises many types on damage)
    raise UnreadableCheckpointError(
        f'Cannot read {pth_path!r}: it starts like a zip-format PyTorch checkpoint but its '
        f'directory is damaged ({type(e).__name__}: {e}); copy it again or re-save it with '
        'torch.save(model.state_dict(), path).') from e
  if inflated > file_size:
    raise UnreadableCheckpointError(
        f'Refused to load {pth_path!r}: its zip members would inflate to {inflated:,} bytes, more '
        f'than the file itself ({file_size:,} bytes). torch.save writes uncompressed archives, so '
        'this is a re-compressed or crafted file (a zip bomb); re-save the state_dict with '
        'torch.save(model.state_dict(), path).')


def load_torch_state_dict(pth_path: str) -> dict[str, Any]:
  """Reads a PyTorch ``state_dict`` .pth with ``torch.load(weights_only=True)`` on the CPU.

  Args:
    pth_path: path of the .pth file.

  Returns:
    The state_dict (key -> torch tensor).

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle holds more than tensors and plain containers (it could run
      code); nothing of it was executed.
    UnreadableCheckpointError: the file is damaged or not a checkpoint (torch's own error is in
      the message), or a zip archive whose members inflate beyond the file's size.
    StateDictMismatchError: the file holds something other than a mapping of tensors.
    ImportError: torch is not installed.
  """
  if not os.path.isfile(pth_path):
    raise FileNotFoundError(f'No PyTorch checkpoint at {pth_path!r}.')
  _check_archive_sizes(pth_path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('Reading .pth files needs torch: pip install -r requirements-torch.txt'
                      ) from e
  import pickle  # pylint: disable=import-outside-toplevel
  try:
    state_dict = torch.load(pth_path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f'Refused to load {pth_path!r}: its pickle holds more than tensors and plain containers, '
        'and unpickling it could run arbitrary code. Only state_dict files are accepted; re-save '
        'it from trusted code with torch.save(model.state_dict(), path).\n'
        f'Reason: {_unpickling_reason(str(e))}') from e
  except Exception as e:  # pylint: disable=broad-except  (torch raises many types on damaged files)
    reason = str(e).strip().split('\n')[0].split('. This is an internal miniz error')[0]
    raise UnreadableCheckpointError(
        f'Cannot read {pth_path!r} as a PyTorch checkpoint ({type(e).__name__}: {reason[:300]}); '
        'the file is truncated or damaged, or not a .pth: copy it again or re-save it with '
        'torch.save(model.state_dict(), path).') from e
  if not isinstance(state_dict, Mapping) or not all(
      isinstance(v, torch.Tensor) for v in state_dict.values()):
    kind = type(state_dict).__name__
    keys = list(state_dict)[:10] if isinstance(state_dict, Mapping) else []
    raise StateDictMismatchError(
        f'{pth_path!r} holds a {kind} (first keys: {keys}), not a state_dict of tensors; save '
        'model.state_dict() (or pass the state_dict inside it to '
        'variables_from_torch_state_dict).')
  return state_dict
