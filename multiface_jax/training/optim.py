"""The optimiser of the original recipe: SGD momentum with coupled, grouped weight decay.

``param_groups`` labels every parameter with its weight-decay group, ``create_optimizer`` chains
one masked ``add_decayed_weights`` per group before ``optax.sgd``: the decay is added to the
gradient *before* momentum, exactly like ``torch.optim.SGD(weight_decay=...)`` (coupled L2, not
AdamW-style decoupled decay). The groups and their values are in docs/original.md.
"""
from typing import Any, Callable, Mapping

import jax
import ml_collections
import optax

# Weight-decay groups: convs and PReLU slopes, the backbone's final Linear, the head, BatchNorm.
GROUPS = ('backbone', 'embedding', 'head', 'bn')


# Path of each backbone's final Linear (the 512-d embedding layer), as the models name it.
_EMBEDDING_LAYERS = {'mobilefacenet': 'linear', 'tiny': 'linear'}
_IR_EMBEDDING_LAYER = 'output_layer/linear'


def embedding_layer_of(model_name: str) -> str:
  """Path of the final Linear of backbone `model_name` ('linear' or 'output_layer/linear')."""
  if model_name in _EMBEDDING_LAYERS:
    return _EMBEDDING_LAYERS[model_name]
  if model_name.startswith('ir'):
    return _IR_EMBEDDING_LAYER
  raise ValueError(f'No known final Linear for model {model_name!r}; add it to '
                   '_EMBEDDING_LAYERS in multiface_jax/training/optim.py.')


def param_groups(params: Mapping[str, Any], batch_stats: Mapping[str, Any], *,
                 embedding_layer: str) -> Any:
  """Labels every parameter with its weight-decay group.

  Rules, in order:
  - ``'head'``: everything under ``params['head']`` (the classifier kernels).
  - ``'bn'``: a backbone parameter whose module also owns ``batch_stats`` (running mean/var);
    only BatchNorm layers do, so this finds them whatever they are named.
  - ``'embedding'``: the backbone's final Linear, the module at path `embedding_layer`.
  - ``'backbone'``: every other backbone parameter (convs, PReLU slopes, SE convs ...).

  Args:
    params: ``{'backbone': ..., 'head': ...}``, arrays or ``jax.ShapeDtypeStruct``.
    batch_stats: the backbone's ``batch_stats`` tree.
    embedding_layer: '/'-separated path of the backbone's final Linear module (see
      :func:`embedding_layer_of`).

  Returns:
    A pytree with the structure of `params` whose leaves are group names (see ``GROUPS``).
  """
  bn_modules = {tuple(_key_names(path[:-1]))
                for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats)}
  embedding_path = tuple(embedding_layer.split('/'))
  backbone_modules = {tuple(_key_names(path[:-1]))
                      for path, _ in jax.tree_util.tree_leaves_with_path(params['backbone'])}
  if embedding_path not in backbone_modules:
    raise ValueError(f'The backbone has no module {embedding_layer!r} (its final Linear); '
                     f'modules: {sorted("/".join(m) for m in backbone_modules)}.')

  def group_of(path, _):
    names = _key_names(path)
    if names[0] == 'head':
      return 'head'
    if names[0] != 'backbone':
      raise ValueError(f'Unexpected parameter {"/".join(names)}: expected backbone/ or head/.')
    module = tuple(names[1:-1])
    if module in bn_modules:
      return 'bn'
    if module == embedding_path:
      return 'embedding'
    return 'backbone'

  return jax.tree_util.tree_map_with_path(group_of, params)


def _key_names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def create_optimizer(opt_config: ml_collections.ConfigDict,
                     lr_fn: Callable[[jax.Array], jax.Array],
                     groups: Any,
                     grad_accum_steps: int = 1) -> optax.GradientTransformation:
  """SGD with momentum and coupled per-group weight decay, optionally accumulating gradients.

  Args:
    opt_config: ``config.optimizer`` (``momentum``, ``nesterov``, ``weight_decay_<group>``).
    lr_fn: learning rate per step (from :func:`create_learning_rate_fn`).
    groups: parameter -> group name tree from :func:`param_groups`.
    grad_accum_steps: average the gradients of this many steps before each update
      (``optax.MultiSteps``); 1 = update every step.

  Returns:
    The optax transformation. Its update is, per parameter ``p`` of group ``g``:
    ``d = grad + wd_g * p; buf = momentum * buf + d; p -= lr * buf``.
  """
  decays = {g: float(opt_config[f'weight_decay_{g}']) for g in GROUPS}
  chain = [optax.add_decayed_weights(decays[g], mask=jax.tree.map(lambda x, g=g: x == g, groups))
           for g in GROUPS if decays[g]]
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f'grad_accum_steps={k} must be >= 1.')
  # The inner optimizer counts updates; the schedule is written in steps.
  schedule = (lambda update: lr_fn(update * k)) if k > 1 else lr_fn
  chain.append(optax.sgd(schedule, momentum=float(opt_config.momentum),
                         nesterov=bool(opt_config.nesterov)))
  tx = optax.chain(*chain)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k, use_grad_mean=True).gradient_transformation()
  return tx
