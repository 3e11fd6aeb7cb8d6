"""Any checkpoint of the project as a backbone: its variables, and the record of which model it is.

A checkpoint knows its model. Training writes a *model record* into the meta of every step
(``checkpoints/<step>/meta``); ``import_torch`` writes it as ``model.json`` beside the weights::

  {"model": "mobilefacenet", "embedding_size": 512, "dtype": "float32", "options": {},
   "input": {"layout": "NHWC", "dtype": "uint8", "colour": "RGB", "size": [112, 112],
             "normalization": "(x / 255 - 0.5) / 0.5, on device"}}

so that ``load_backbone(path)`` needs nothing else. Accepted paths: a run folder (its newest
step), a step folder, its ``state`` item, or a weights-only folder from ``import_torch``.
"""
import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from multiface_jax import models

RECORD_KEY = 'model_record'
RECORD_FILE = 'model.json'
STATE_ITEM, META_ITEM = 'state', 'meta'  # the items of a training step folder
INPUT_CONVENTION = {'layout': 'NHWC', 'dtype': 'uint8', 'colour': 'RGB', 'size': [112, 112],
                    'normalization': '(x / 255 - 0.5) / 0.5, on device'}
_CONFIG_HINT = ('pass --config=CONFIG (the config the weights were trained or imported with: its '
                'model fields are used), or re-import them with `python -m '
                'multiface_jax.import_torch`, which records the model')


def model_record(name: str, *, embedding_size: int = 512, dtype: str = 'float32',
                 options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """What a checkpoint records about its backbone (see the module docstring)."""
  return {'model': name, 'embedding_size': int(embedding_size), 'dtype': str(dtype),
          'options': dict(options or {}), 'input': dict(INPUT_CONVENTION)}


def record_from_config(config: Any, embedding_size: int = 512) -> dict[str, Any]:
  """The model record of a run's config (``config.model``)."""
  model = config['model']
  options = model['options']
  options = options.to_dict() if hasattr(options, 'to_dict') else dict(options)
  return model_record(model['name'], embedding_size=embedding_size, dtype=model['dtype'],
                      options=options)


def create_backbone(record: Mapping[str, Any], kernel_set: str = 'auto') -> nn.Module:
  """The backbone module a model record describes."""
  return models.create_model(record['model'], dtype=jnp.dtype(record['dtype']),
                             embedding_size=record['embedding_size'], kernel_set=kernel_set,
                             **record.get('options', {}))


def write_model_record(directory: str, record: Mapping[str, Any]) -> str:
  """Writes ``model.json`` into `directory` (a weights-only checkpoint); returns its path."""
  path = os.path.join(directory, RECORD_FILE)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(dict(record), f, indent=2)
  return path


def resolve(path: str) -> str:
  """The checkpoint folder `path` names: a run folder's newest complete step, else `path`."""
  path = os.path.abspath(path)
  runs = os.path.join(path, 'checkpoints')
  if os.path.isdir(runs):
    steps = ocp.path.step.checkpoint_steps(runs)
    if not steps:
      raise FileNotFoundError(f'{runs} holds no complete checkpoint yet.')
    return os.path.join(runs, str(max(steps)))
  if os.path.basename(path) == STATE_ITEM and os.path.isdir(os.path.join(path, '..', META_ITEM)):
    return os.path.dirname(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no checkpoint there. Pass a run folder, a step folder '
                            '(workdir/checkpoints/<step>) or weights written by python -m '
                            'multiface_jax.import_torch.')
  return path


def read_meta(path: str) -> dict[str, Any]:
  """The JSON meta of a training step folder, or {} for other checkpoints."""
  meta_file = os.path.join(path, META_ITEM, 'metadata')
  if not os.path.isfile(meta_file):
    return {}
  with open(meta_file, encoding='utf-8') as f:
    return json.load(f)


def read_model_record(path: str) -> dict[str, Any]:
  """The model record of checkpoint `path` (resolved), from its meta or its ``model.json``.

  A step folder written before the meta carried a record still has the run's config, which
  says the same. Raises ValueError naming what to pass when there is neither.
  """
  path = resolve(path)
  meta = read_meta(path)
  if RECORD_KEY in meta:
    return meta[RECORD_KEY]
  if 'config' in meta:
    return record_from_config(json.loads(meta['config']))
  record_file = os.path.join(path, RECORD_FILE)
  if os.path.isfile(record_file):
    with open(record_file, encoding='utf-8') as f:
      return json.load(f)
  raise ValueError(f'{path}: the checkpoint does not record which model it holds; {_CONFIG_HINT}.')


def step_of(path: str) -> int:
  """The step recorded in a training checkpoint's meta, or 0 (imported weights)."""
  return int(read_meta(resolve(path)).get('step', 0))


def evaluated_thresholds(checkpoint_path: str, step: int) -> tuple[Optional[str], dict]:
  """(results file, {set: best threshold on the squared distance}) the evaluator wrote for the
  checkpoint at `checkpoint_path` (a step folder of a run: the run's eval/results_step<step>.json)."""
  run = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))
  path = os.path.join(run, 'eval', f'results_step{step}.json')
  if not os.path.isfile(path):
    return None, {}
  with open(path, encoding='utf-8') as f:
    results = json.load(f)['results']
  return path, {name: float(r['best_threshold']) for name, r in results.items()}


def abstract_variables(model: nn.Module, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
  """``{'params', 'batch_stats'}`` of `model` as ``ShapeDtypeStruct`` (with `sharding`)."""
  shapes = jax.eval_shape(
      lambda rng: model.init(rng, jnp.zeros((1, 112, 112, 3), jnp.float32), train=False),
      jax.random.PRNGKey(0))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      dict(shapes))


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A loaded backbone: ``model.apply(variables, images, train=False)``."""
  model: nn.Module
  variables: Any
  record: dict[str, Any]
  path: str
  step: int


def load_backbone(path: str, record: Optional[Mapping[str, Any]] = None, *,
                  sharding: Optional[jax.sharding.Sharding] = None) -> Backbone:
  """The backbone of checkpoint `path` and its variables.

  Args:
    path: a run folder, a step folder, its ``state`` item or an imported-weights folder.
    record: overrides the checkpoint's own model record (e.g. :func:`record_from_config`).
    sharding: where to put the variables (default: the first device).
  """
  path = resolve(path)
  record = dict(record or read_model_record(path))
  model = create_backbone(record)
  variables = load_backbone_variables(path, abstract_variables(model, sharding))
  return Backbone(model=model, variables=variables, record=record, path=path, step=step_of(path))


def load_backbone_variables(path: str, abstract: Mapping[str, Any]) -> dict[str, Any]:
  """Loads backbone ``{params, batch_stats}`` from any checkpoint this project writes.

  Accepted `path` forms:
  - a weights-only checkpoint ``{params, batch_stats}`` (``import_torch``, or
    ``ocp.StandardCheckpointer().save(path, variables)``);
  - a training checkpoint's step folder (``.../checkpoints/1000``) or its ``state`` item: the
    backbone is ``params['backbone']``; the head and the optimizer state are not read.

  Args:
    path: one of the above.
    abstract: ``{'params', 'batch_stats'}`` of ``jax.ShapeDtypeStruct`` with shardings
      (the backbone of the current config on the current mesh).

  Returns:
    ``{'params', 'batch_stats'}`` as sharded arrays.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: the checkpoint's variables do not fit the configured backbone (checked on
      its metadata before anything is read).
  """
  path = os.path.abspath(path)
  item_dir = os.path.join(path, STATE_ITEM) if os.path.isdir(os.path.join(path, STATE_ITEM)) else path
  if not os.path.isdir(item_dir):
    raise FileNotFoundError(f'{path}: no checkpoint there. Pass a step folder '
                            '(workdir/checkpoints/<step>) or a {params, batch_stats} checkpoint '
                            'written by python -m multiface_jax.import_torch.')
  try:
    # The handler reads the item's own tree metadata (the checkpointer would also look for
    # step-level metadata, which an item folder of a training checkpoint does not hold).
    saved_tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree
  except Exception as e:  # Orbax raises several types for "not a checkpoint".
    raise FileNotFoundError(f'{item_dir}: not an Orbax checkpoint ({e}).') from e
  if not isinstance(saved_tree, Mapping) or not {'params', 'batch_stats'} <= set(saved_tree):
    keys = sorted(saved_tree) if isinstance(saved_tree, Mapping) else type(saved_tree).__name__
    raise ValueError(f'{item_dir}: expected a checkpoint with params and batch_stats, found {keys}.')
  nested = 'backbone' in saved_tree['params']
  saved = {'params': saved_tree['params']['backbone'] if nested else saved_tree['params'],
           'batch_stats': saved_tree['batch_stats']}
  # Checked on the metadata, before Orbax starts reading, so that a mismatch is one clear error.
  _check_fits(item_dir, abstract, saved)
  target = {'params': {'backbone': abstract['params']} if nested else abstract['params'],
            'batch_stats': abstract['batch_stats']}
  restored = ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  params = restored['params']['backbone'] if nested else restored['params']
  logging.info('Loaded backbone variables from %s', item_dir)
  return {'params': params, 'batch_stats': restored['batch_stats']}


def _check_fits(path: str, expected: Any, saved: Any) -> None:
  """Raises ValueError naming the first leaf of `expected` that `saved` lacks or shapes
  differently (`saved` may hold more)."""
  saved_leaves = {jax.tree_util.keystr(k): v
                  for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  hint = 'check config.model.name and config.model.options'
  for key, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    name = jax.tree_util.keystr(key)
    if name not in saved_leaves:
      raise ValueError(f'{path}: the checkpoint lacks {name}, so its variables do not fit the '
                       f'configured backbone ({hint}).')
    shape = tuple(getattr(saved_leaves[name], 'shape', ()))
    if shape != tuple(leaf.shape):
      raise ValueError(f'{path}: {name} has shape {shape}, the configured backbone expects '
                       f'{tuple(leaf.shape)} ({hint}).')
