"""Optimiser: weight-decay groups, torch-style SGD, schedules, step plans, gradient accumulation."""
import jax
import jax.numpy as jnp

import numpy as np
import optax
import pytest

from configs import default
from multiface_jax import heads, models
from multiface_jax.training import optim
from multiface_jax.training import schedule as schedules


def _opt_config(**overrides):
  config = default.get_config().optimizer
  config.unlock()
  config.update(overrides)
  return config


def _plan(total=100, warmup=0, boundaries=(), spe=10, eval_every=0):
  return schedules.StepPlan(steps_per_epoch=spe, total_steps=total, warmup_steps=warmup,
                        boundaries=tuple(boundaries), eval_every=eval_every)


def _abstract_params(model_name, num_classes=10, num_spheres=2):
  model = models.create_model(model_name)
  head = heads.MultiSphereHead(num_classes=num_classes, num_spheres=num_spheres)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, 112, 112, 3)), train=False)
    head_params = head.init(rng, jnp.zeros((1, 512)), jnp.zeros((1,), jnp.int32))['params']
    return {'backbone': variables['params'], 'head': head_params}, variables['batch_stats']

  return jax.eval_shape(init, jax.random.PRNGKey(0))


def _flat_groups(groups):
  return {'/'.join(k.key for k in path): g
          for path, g in jax.tree_util.tree_flatten_with_path(groups)[0]}


def test_groups_of_mobilefacenet_follow_the_original():
  params, batch_stats = _abstract_params('mobilefacenet')
  groups = _flat_groups(optim.param_groups(params, batch_stats,
                                           embedding_layer=optim.embedding_layer_of('mobilefacenet')))
  # Independent rule, by module names: BatchNorm modules are called 'bn' in MobileFaceNet.
  for path, group in groups.items():
    modules = path.split('/')[:-1]
    if path.startswith('head/'):
      expected = 'head'
    elif 'bn' in modules:
      expected = 'bn'
    elif path == 'backbone/linear/kernel':
      expected = 'embedding'
    else:
      expected = 'backbone'
    assert group == expected, path
  counts = {g: sum(1 for v in groups.values() if v == g) for g in optim.GROUPS}
  assert counts['embedding'] == 1 and counts['head'] == 1
  # PReLU slopes are decayed with the backbone (4e-5), as in the original.
  slopes = [p for p in groups if p.endswith('negative_slope')]
  assert slopes and all(groups[p] == 'backbone' for p in slopes)
  assert groups['backbone/bn/scale'] == 'bn' and groups['backbone/conv_6_dw/bn/bias'] == 'bn'
  assert groups['backbone/conv1/conv/kernel'] == 'backbone'


def test_groups_of_ir_se_find_every_batchnorm_and_the_final_linear():
  params, batch_stats = _abstract_params('ir_se50')
  groups = _flat_groups(optim.param_groups(params, batch_stats,
                                           embedding_layer=optim.embedding_layer_of('ir_se50')))
  for path, group in groups.items():
    module = path.split('/')[-2]
    if path.startswith('head/'):
      assert group == 'head'
    elif module.startswith('bn'):  # bn, bn1, bn2, bn2d, bn1d in the IR code
      assert group == 'bn', path
    elif path.startswith('backbone/output_layer/linear/'):
      assert group == 'embedding', path
    else:
      assert group == 'backbone', path
  assert groups['backbone/output_layer/linear/bias'] == 'embedding'
  assert groups['backbone/body_0/res_layer/se/fc1/kernel'] == 'backbone'


def test_unknown_embedding_layer_is_an_error():
  params, batch_stats = _abstract_params('mobilefacenet')
  with pytest.raises(ValueError, match='no module'):
    optim.param_groups(params, batch_stats, embedding_layer='fc')


def _toy_tree(rng):
  shapes = {'backbone': {'conv': {'kernel': (3, 3, 2, 4)}, 'bn': {'scale': (4,), 'bias': (4,)},
                         'prelu': {'negative_slope': (4,)}, 'linear': {'kernel': (4, 6)}},
            'head': {'kernel': (2, 3, 5)}}
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


TOY_BATCH_STATS = {'bn': {'mean': np.zeros(4), 'var': np.ones(4)}}
TOY_DECAY = {'conv': 4e-5, 'prelu': 4e-5, 'linear': 4e-4, 'head': 4e-4, 'bn': 0.0}


def _torch_sgd(params, grads_per_step, lrs, momentum=0.9):
  """torch.optim.SGD(weight_decay=wd, momentum=0.9) written out in numpy, per parameter."""
  params = {k: {n: v.astype(np.float64).copy() for n, v in m.items()} for k, m in params.items()}
  buffers = {}
  for grads, lr in zip(grads_per_step, lrs):
    for module, leaves in params.items():
      for name, p in leaves.items():
        d = grads[module][name] + TOY_DECAY[module] * p
        key = (module, name)
        buffers[key] = d if key not in buffers else momentum * buffers[key] + d
        leaves[name] = p - lr * buffers[key]
  return params


def _flatten_toy(tree):
  backbone = tree['backbone']
  return {**{k: dict(v) for k, v in backbone.items()}, 'head': dict(tree['head'])}


def test_steps_equal_torch_sgd_with_weight_decay_groups():
  rng = np.random.default_rng(0)
  params = _toy_tree(rng)
  grads = [_toy_tree(rng) for _ in range(3)]
  config = _opt_config(lr=0.1, boundaries_steps=(2,), decay_factor=0.1)
  lr_fn = schedules.create_learning_rate_fn(config, _plan(total=10, boundaries=(2,)))
  groups = optim.param_groups(params, TOY_BATCH_STATS, embedding_layer='linear')
  tx = optim.create_optimizer(config, lr_fn, groups)
  state = tx.init(params)
  got = params
  for g in grads:
    updates, state = tx.update(g, state, got)
    got = optax.apply_updates(got, updates)
  expected = _torch_sgd(_flatten_toy(params), [_flatten_toy(g) for g in grads], [0.1, 0.1, 0.01])
  got = _flatten_toy(jax.device_get(got))
  for module in expected:
    for name in expected[module]:
      np.testing.assert_allclose(got[module][name], expected[module][name], rtol=1e-5, atol=1e-6,
                                 err_msg=f'{module}/{name}')


def test_gradient_accumulation_averages_then_updates_once():
  rng = np.random.default_rng(1)
  params = _toy_tree(rng)
  grads = [_toy_tree(rng) for _ in range(4)]
  config = _opt_config(lr=0.1)
  lr_fn = schedules.create_learning_rate_fn(config, _plan(total=10, boundaries=(2,)))
  groups = optim.param_groups(params, TOY_BATCH_STATS, embedding_layer='linear')
  tx = optim.create_optimizer(config, lr_fn, groups, grad_accum_steps=2)
  state = tx.init(params)
  got = params
  after = []
  for g in grads:
    updates, state = tx.update(g, state, got)
    got = optax.apply_updates(got, updates)
    after.append(_flatten_toy(jax.device_get(got)))
  mean = lambda a, b: jax.tree.map(lambda x, y: (x + y) / 2, a, b)
  # Update 0 covers steps 0-1 (lr at step 0), update 1 steps 2-3 (lr at step 2, after the drop).
  expected = _torch_sgd(_flatten_toy(params),
                        [_flatten_toy(mean(grads[0], grads[1])),
                         _flatten_toy(mean(grads[2], grads[3]))], [0.1, 0.01])
  np.testing.assert_array_equal(after[0]['conv']['kernel'], params['backbone']['conv']['kernel'])
  for module in expected:
    for name in expected[module]:
      np.testing.assert_allclose(after[3][module][name], expected[module][name], rtol=1e-5,
                                 atol=1e-6, err_msg=f'{module}/{name}')


def test_plan_converts_epochs_to_steps_in_one_place():
  config = default.get_config()
  config.batch_size = 10
  plan = schedules.plan_steps(config, num_images=1005)
  assert plan.steps_per_epoch == 100  # the partial last batch is dropped
  assert plan.total_steps == 2000 and plan.boundaries == (1200, 1500, 1800)
  assert plan.warmup_steps == 0 and plan.eval_every == 10  # ten evaluations per epoch
  config.num_train_steps = 77
  config.optimizer.warmup_epochs = 0.5
  config.optimizer.boundaries_steps = (5, 9)
  config.eval_every_steps = 0
  plan = schedules.plan_steps(config, num_images=1005)
  assert (plan.total_steps, plan.warmup_steps, plan.boundaries, plan.eval_every) == (77, 50,
                                                                                     (5, 9), 0)
  config.optimizer.warmup_steps = 3
  assert schedules.plan_steps(config, num_images=1005).warmup_steps == 3
  with pytest.raises(ValueError, match='fewer than one global batch'):
    schedules.plan_steps(config, num_images=9)


def test_step_schedule_drops_at_the_first_step_of_epochs_12_15_18():
  config = default.get_config()
  config.batch_size = 10
  plan = schedules.plan_steps(config, num_images=1000)
  lr_fn = schedules.create_learning_rate_fn(config.optimizer, plan)
  lrs = {s: float(lr_fn(s)) for s in (0, 1199, 1200, 1499, 1500, 1800, 1999)}
  assert lrs[0] == pytest.approx(0.05) and lrs[1199] == pytest.approx(0.05)
  assert lrs[1200] == pytest.approx(0.005) and lrs[1499] == pytest.approx(0.005)
  assert lrs[1500] == pytest.approx(5e-4) and lrs[1800] == pytest.approx(5e-5)
  assert lrs[1999] == pytest.approx(5e-5)


@pytest.mark.parametrize('schedule,mid', [('cosine', 0.5), ('poly', 0.25), ('constant', 1.0)])
def test_warmup_then_decay(schedule, mid):
  config = _opt_config(lr=2.0, schedule=schedule, end_lr=0.0, poly_power=2.0)
  lr_fn = schedules.create_learning_rate_fn(config, _plan(total=110, warmup=10))
  assert float(lr_fn(0)) == pytest.approx(0.2)  # (0 + 1) / 10 of the peak
  assert float(lr_fn(9)) == pytest.approx(2.0)
  assert float(lr_fn(10)) == pytest.approx(2.0)
  assert float(lr_fn(60)) == pytest.approx(2.0 * mid)
  assert float(lr_fn(110)) == pytest.approx(2.0 if schedule == 'constant' else 0.0, abs=1e-6)


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match='schedule'):
    schedules.create_learning_rate_fn(_opt_config(schedule='linear'), _plan())
