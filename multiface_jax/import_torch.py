"""Imports a PyTorch MultiFace / TreB1eN checkpoint (a ``state_dict`` .pth) as Flax variables.

Command line (torch must be installed: ``pip install -r requirements-torch.txt``)::

  python -m multiface_jax.import_torch --net=ir_se100 --pth=model_ir_se100.pth --out=runs/ir_se100

writes an Orbax checkpoint of ``{'params', 'batch_stats'}`` under ``--out`` (see
:func:`save_variables`). Python::

  variables = variables_from_torch_state_dict(torch.load(path, weights_only=True), 'mobilefacenet')
  embeddings = create_model('mobilefacenet').apply(variables, images_rgb, train=False)

What the conversion does:
- Keys are the original's module names, with or without DataParallel's ``module.`` prefix. Every
  tensor is used exactly once; a missing or unexpected key is a :class:`StateDictMismatchError`
  listing them. BatchNorm's ``num_batches_tracked`` counters are accepted and ignored (inference and
  Flax's BatchNorm do not use them).
- Layouts: conv OIHW -> HWIO (a depthwise ``(C, 1, kh, kw)`` becomes Flax's ``(kh, kw, 1, C)`` by the
  same transpose); Linear ``(out, in)`` -> ``(in, out)``; BatchNorm ``weight``/``bias`` ->
  ``scale``/``bias`` in ``params`` and ``running_mean``/``running_var`` -> ``mean``/``var`` in
  ``batch_stats``; PReLU ``weight`` -> ``negative_slope``. The IR output Linear reads a flattened
  7x7x512 map, which PyTorch flattens as (c, h, w) and Flax as (h, w, c): its input rows are permuted.
- Colour: the original trains on **BGR** images, so its weights expect BGR. Every model here takes
  RGB, so by default the first convolution's input channels are reversed; the imported model then
  gives on RGB images exactly what the PyTorch model gives on the same images in BGR.
- ``.pth`` files are read (``pth_files``) with ``torch.load(weights_only=True)`` only: a pickle that would run code
  is refused (:class:`UnsafeCheckpointError`); a damaged file, or an archive whose members would
  inflate beyond the file's size, is a :class:`UnreadableCheckpointError`.

torch is an optional dependency, imported only to read .pth files; the rest of the project never
imports it.
"""
import functools
import os
import re
import sys
from typing import Any, Iterable, Mapping, Optional

from absl import app
from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from multiface_jax import models
from multiface_jax.inference import loading
from multiface_jax.models import iresnet
# Reading a .pth safely is its own module; its names are part of this one's interface.
from multiface_jax.pth_files import (  # noqa: F401  pylint: disable=unused-import
    StateDictMismatchError, UnreadableCheckpointError, UnsafeCheckpointError,
    load_torch_state_dict)

# Leaf (collection, Flax name) -> PyTorch parameter/buffer name.
_LEAF_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'bias'): 'bias',
    ('params', 'scale'): 'weight',
    ('params', 'negative_slope'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}

# IR / IR-SE: Flax child name -> index inside the original's nn.Sequential, by parent module.
_IR_SEQUENTIAL_INDEX = {
    'input_layer': {'conv': '0', 'bn': '1', 'prelu': '2'},
    'shortcut_layer': {'conv': '0', 'bn': '1'},
    'res_layer': {'bn1': '0', 'conv1': '1', 'prelu': '2', 'conv2': '3', 'bn2': '4', 'se': '5'},
    'output_layer': {'bn2d': '0', 'linear': '3', 'bn1d': '4'},
}

_EMBEDDING_BN_KEY = {'mobilefacenet': 'bn.weight'}  # IR / IR-SE: 'output_layer.4.weight'
_MAX_KEYS_LISTED = 40


def _is_mobilefacenet(net: str) -> bool:
  return net == 'mobilefacenet'


def _torch_module_name(net: str, flax_path: tuple[str, ...]) -> str:
  """Maps a Flax module path, e.g. ('conv_3', 'block_0', 'conv', 'conv'), to the original's
  dotted PyTorch module name, e.g. 'conv_3.model.0.conv.conv'."""
  parts = []
  parent = None
  for name in flax_path:
    block = re.fullmatch(r'(block|body)_(\d+)', name)
    if block:
      # MobileFaceNet's Residual keeps its blocks in `model`; IR's units sit in the flat `body`.
      parts.append(f'model.{block[2]}' if block[1] == 'block' else f'body.{block[2]}')
    elif not _is_mobilefacenet(net) and parent in _IR_SEQUENTIAL_INDEX:
      parts.append(_IR_SEQUENTIAL_INDEX[parent].get(name, name))
    else:
      parts.append(name)
    parent = name
  return '.'.join(parts)


def _first_conv_path(net: str) -> tuple[str, ...]:
  return ('conv1', 'conv') if _is_mobilefacenet(net) else ('input_layer', 'conv')


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any float dtype, any device) or array-like as a float32 numpy array."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16
    value = value.numpy()
  return np.asarray(value, dtype=np.float32)


def _strip_data_parallel(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Removes DataParallel's 'module.' prefix where present; refuses keys that then collide."""
  stripped = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise StateDictMismatchError(f'state_dict keys must be strings, got {key!r}.')
    name = key[len('module.'):] if key.startswith('module.') else key
    if name in stripped:
      raise StateDictMismatchError(
          f"state_dict holds {name!r} both with and without the 'module.' prefix.")
    stripped[name] = value
  return stripped


def guess_net(keys: Iterable[str]) -> str | None:
  """Names the architecture a state_dict's keys look like ('ir_se100', ...), or None.

  Args:
    keys: state_dict keys, with or without the 'module.' prefix.

  Returns:
    A name of ``models.MODEL_NAMES`` or None when the keys match no known layout.
  """
  keys = {k[len('module.'):] if k.startswith('module.') else k for k in keys}
  if 'conv1.conv.weight' in keys and 'conv_6_dw.conv.weight' in keys:
    return 'mobilefacenet'
  if 'input_layer.0.weight' not in keys:
    return None
  units = {int(m[1]) for k in keys if (m := re.match(r'body\.(\d+)\.', k))}
  depth = {sum(u): d for d, u in models.UNITS_BY_DEPTH.items()}.get(len(units))
  if depth is None:
    return None
  se = any('.res_layer.5.fc1.' in k for k in keys)
  return f'{"ir_se" if se else "ir"}{depth}'


def _embedding_size(net: str, state_dict: Mapping[str, Any]) -> int:
  key = _EMBEDDING_BN_KEY.get(net, 'output_layer.4.weight')
  return int(np.shape(state_dict[key])[0]) if key in state_dict else 512


def _natural_order(key: str) -> list[tuple[int, Any]]:
  """Sort key putting 'body.9.' before 'body.10.' (numbers before names at any level)."""
  return [(0, int(part)) if part.isdigit() else (1, part) for part in key.split('.')]


def _mismatch_message(net: str, missing: list[str], unexpected: list[str],
                      keys: Iterable[str]) -> str:
  def listing(names):
    shown = '\n    '.join(names[:_MAX_KEYS_LISTED])
    more = len(names) - _MAX_KEYS_LISTED
    return shown + (f'\n    ... and {more} more' if more > 0 else '')

  lines = [f'The state_dict does not match {net!r}:']
  if missing:
    lines.append(f'  {len(missing)} missing key(s):\n    {listing(missing)}')
  if unexpected:
    lines.append(f'  {len(unexpected)} unexpected key(s):\n    {listing(unexpected)}')
  guess = guess_net(keys)
  if guess and guess != net:
    lines.append(f'  The keys match the layout of {guess!r}: try --net={guess}.')
  return '\n'.join(lines)


def _convert_leaf(module_path: tuple[str, ...], leaf: str, tensor: np.ndarray,
                  expected_shape: tuple[int, ...], key: str) -> np.ndarray:
  """Converts one PyTorch tensor to the Flax layout of `module_path`/`leaf`."""
  if leaf == 'kernel' and tensor.ndim == 4:
    array = tensor.transpose(2, 3, 1, 0)  # OIHW -> HWIO; depthwise (C,1,kh,kw) -> (kh,kw,1,C)
  elif leaf == 'kernel' and tensor.ndim == 2:
    out_features, in_features = tensor.shape
    channels = iresnet.STAGE_WIDTHS[-1]
    if module_path[-2:] == ('output_layer', 'linear') and in_features % channels == 0:
      # PyTorch flattened the (C, H, W) map channel-major; Flax flattens (H, W, C).
      array = tensor.reshape(out_features, channels, -1).transpose(2, 1, 0)
      array = array.reshape(in_features, out_features)
    else:
      array = tensor.T
  else:
    array = tensor
  if array.shape != tuple(expected_shape):
    raise StateDictMismatchError(
        f'{key}: PyTorch shape {tuple(tensor.shape)} gives {array.shape} in the Flax layout, but '
        f'{"/".join(module_path + (leaf,))} needs {tuple(expected_shape)}. '
        'Is --net (or embedding_size) right?')
  return np.ascontiguousarray(array)


@functools.lru_cache(maxsize=None)
def _variable_shapes(net: str, embedding_size: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened variable path -> shape of ``create_model(net)``, traced once (no FLOPs)."""
  model = models.create_model(net, embedding_size=embedding_size)
  images = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
  target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return {path: spec.shape for path, spec in traverse_util.flatten_dict(target).items()}


def variables_from_torch_state_dict(state_dict: Mapping[str, Any], net: str, *,
                                    bgr_to_rgb: bool = True,
                                    embedding_size: int | None = None) -> dict[str, Any]:
  """Converts an original PyTorch ``state_dict`` into Flax variables for ``create_model(net)``.

  Args:
    state_dict: mapping of the original's key names (optionally prefixed by 'module.') to torch
      tensors or numpy arrays.
    net: a name of ``models.MODEL_NAMES``, e.g. 'mobilefacenet' or 'ir_se100'.
    bgr_to_rgb: reverse the first convolution's input channels, so that the imported model takes
      RGB images like every model here (the original's weights expect BGR). False keeps BGR.
    embedding_size: output size; inferred from the embedding BatchNorm when None. Build the model
      with the same value: ``create_model(net, embedding_size=...)``.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of float32 numpy arrays, usable as
    ``create_model(net, embedding_size=...).apply(variables, images_rgb, train=False)``.

  Raises:
    StateDictMismatchError: missing or unexpected keys (all listed), or a tensor of the wrong shape.
    ValueError: unknown `net`.
  """
  if net not in models.MODEL_NAMES:
    raise ValueError(f'Unknown net {net!r}; valid: {", ".join(models.MODEL_NAMES)}.')
  state_dict = _strip_data_parallel(state_dict)
  if embedding_size is None:
    embedding_size = _embedding_size(net, state_dict)
  flat_target = _variable_shapes(net, embedding_size)

  # Names first, so that a wrong --net is reported as a key listing rather than a shape error.
  keys, batchnorm_modules = {}, set()
  for path in flat_target:
    collection, *module_path, leaf = path
    if (collection, leaf) not in _LEAF_NAMES:
      raise NotImplementedError(f'No PyTorch counterpart known for Flax variable {path}.')
    module_name = _torch_module_name(net, tuple(module_path))
    keys[path] = f'{module_name}.{_LEAF_NAMES[collection, leaf]}'
    if collection == 'batch_stats':
      batchnorm_modules.add(module_name)
  if len(set(keys.values())) != len(keys):  # two Flax variables would read one tensor
    raise RuntimeError(f'The name mapping of {net!r} is not one-to-one.')
  ignored = {f'{m}.num_batches_tracked' for m in batchnorm_modules}
  missing = sorted((k for k in keys.values() if k not in state_dict), key=_natural_order)
  unexpected = sorted((k for k in state_dict if k not in ignored and k not in set(keys.values())),
                      key=_natural_order)
  if missing or unexpected:
    raise StateDictMismatchError(_mismatch_message(net, missing, unexpected, state_dict))

  flat_variables = {}
  for path, shape in flat_target.items():
    module_path, leaf = tuple(path[1:-1]), path[-1]
    key = keys[path]
    array = _convert_leaf(module_path, leaf, _to_numpy(state_dict[key]), shape, key)
    if bgr_to_rgb and module_path == _first_conv_path(net) and leaf == 'kernel':
      array = np.ascontiguousarray(array[:, :, ::-1, :])  # HWIO: reverse the input channels
    flat_variables[path] = array
  return traverse_util.unflatten_dict(flat_variables)


def save_variables(out_dir: str, variables: Mapping[str, Any],
                   record: Optional[Mapping[str, Any]] = None) -> str:
  """Writes `variables` as an Orbax StandardCheckpointer checkpoint, with its model record.

  Args:
    out_dir: destination directory; must not exist yet (nothing is overwritten).
    variables: ``{'params': ..., 'batch_stats': ...}``.
    record: the model record (``inference.loading.model_record``) written as ``model.json``,
      so that every command loads the weights with ``--checkpoint`` alone.

  Returns:
    The absolute path written, restorable with ``ocp.StandardCheckpointer().restore(path)``.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(out_dir)
  if os.path.exists(path):
    raise FileExistsError(f'{path!r} already exists; choose a new --out directory.')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {k: dict(v) for k, v in variables.items()})
  checkpointer.wait_until_finished()
  if record is not None:
    loading.write_model_record(path, record)
  return path


def _define_flags() -> None:
  flags.DEFINE_enum('net', None, list(models.MODEL_NAMES), 'Architecture of the checkpoint.')
  flags.DEFINE_string('pth', None, 'PyTorch state_dict .pth file.')
  flags.DEFINE_string('out', None, 'New directory for the Orbax checkpoint.')
  flags.DEFINE_bool('keep_bgr', False,
                    'Keep the original BGR input order instead of converting to RGB.')
  flags.mark_flags_as_required(['net', 'pth', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS
  try:
    state_dict = load_torch_state_dict(config.pth)
    variables = variables_from_torch_state_dict(state_dict, config.net,
                                                bgr_to_rgb=not config.keep_bgr)
    record = loading.model_record(config.net,
                                  embedding_size=_embedding_size(config.net, state_dict))
    path = save_variables(config.out, variables, record)
  except (OSError, ImportError, ValueError) as e:  # the message says what to fix
    sys.exit(f'error: {e}')
  count = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables['params']))
  print(f'Imported {len(state_dict)} tensors ({count:,} parameters) of {config.net} from '
        f'{config.pth} into {path}')


if __name__ == '__main__':
  # Flags are defined only when run as a program, so importing this module adds none.
  _define_flags()
  app.run(main)
