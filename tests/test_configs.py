"""Configs: every published row parses, says what it is, and builds; overrides are checked."""
import importlib
import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from multiface_jax.training import inputs, optim, schedule, sharding, step, trainer

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# Row of the MultiFace table -> (backbone, head kind, spheres, margin, CFP-FP as published).
ROWS = {
    'mfn_softmax_n1': ('mobilefacenet', 'softmax', 1, None, '92.84'),
    'mfn_softmax_n4': ('mobilefacenet', 'softmax', 4, None, '95.46'),
    'mfn_arcface_n1': ('mobilefacenet', 'arcface', 1, 0.5, '92.27'),
    'mfn_arcface_n2': ('mobilefacenet', 'arcface', 2, 0.3, '93.41'),
    'mfn_cosface_n1': ('mobilefacenet', 'cosface', 1, 0.35, '92.83'),
    'mfn_cosface_n2': ('mobilefacenet', 'cosface', 2, 0.3, '93.58'),
    'mfn_cosface_n4': ('mobilefacenet', 'cosface', 4, 0.3, '94.11'),
    'irse100_arcface_n2': ('ir_se100', 'arcface', 2, 0.3, '98.30'),
    'irse100_cosface_n2': ('ir_se100', 'cosface', 2, 0.3, '98.40'),
}


def _load(name):
  return importlib.import_module(f'configs.{name}')


@pytest.mark.parametrize('name', sorted(ROWS))
def test_row_config_is_the_published_recipe(name):
  module = _load(name)
  config = module.get_config()
  backbone, kind, spheres, margin, cfp_fp = ROWS[name]
  assert (config.model.name, config.head.kind, config.head.num_spheres) == (backbone, kind, spheres)
  if margin is not None:
    assert config.head.margin == pytest.approx(margin)
  assert config.head.scale == 64.0 and config.num_epochs == 20
  assert config.optimizer.lr == 0.05 and config.optimizer.momentum == 0.9
  assert tuple(config.optimizer.boundaries_epochs) == (12, 15, 18)
  decays = [config.optimizer[f'weight_decay_{g}'] for g in optim.GROUPS]
  assert decays == ([4e-5, 4e-4, 4e-4, 0.0] if backbone == 'mobilefacenet' else
                    [5e-4, 5e-4, 5e-4, 0.0])
  doc = module.__doc__
  assert f'python main.py --config=configs/{name}.py' in doc
  assert cfp_fp in doc  # the expected numbers are stated
  if margin is not None:
    assert f'm = {margin}' in doc  # and the margin is explained


@pytest.mark.parametrize('name', sorted(ROWS) + ['tiny', 'default'])
def test_config_builds_model_head_and_optimizer(name):
  config = _load(name).get_config()
  config.synthetic_data = True  # emore-sized head (85,742 classes), built abstractly
  facts = inputs.dataset_facts(config)
  model = trainer.create_backbone(config)
  head = trainer.create_head(config, facts.num_classes, sharding.create_mesh(1))
  params, batch_stats = jax.eval_shape(
      lambda rng: step.init_variables(rng, model, head, facts.image_size), jax.random.PRNGKey(0))
  assert params['head']['kernel'].shape == (config.head.num_spheres,
                                            512 // config.head.num_spheres, facts.num_classes)
  plan = schedule.plan_steps(config, facts.num_images)
  groups = optim.param_groups(params, batch_stats,
                              embedding_layer=optim.embedding_layer_of(config.model.name))
  tx = optim.create_optimizer(config.optimizer, schedule.create_learning_rate_fn(config.optimizer,
                                                                             plan), groups)
  opt_state = jax.eval_shape(tx.init, params)
  assert jax.tree.leaves(opt_state)
  if name in ROWS:
    assert plan.total_steps == 20 * (5_822_653 // config.batch_size)


def _parse(argv):
  """Parses a command line with main.py's config flag (fresh flags, no global state)."""
  argv = ['main.py'] + argv
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_command_line_overrides_reach_the_config():
  config = _parse([f'--config={CONFIG_DIR}/mfn_arcface_n2.py', '--config.batch_size=512',
                   '--config.optimizer.lr=0.2', '--config.model.dtype=bfloat16',
                   '--config.mesh.model_axis_size=2', '--config.head.margin=0.4'])
  assert (config.batch_size, config.optimizer.lr, config.model.dtype) == (512, 0.2, 'bfloat16')
  assert (config.mesh.model_axis_size, config.head.margin, config.head.num_spheres) == (2, 0.4, 2)


@pytest.mark.parametrize('typo,name', [('--config.batchsize=512', 'batchsize'),
                                       ('--config.optimizer.learning_rate=1', 'learning_rate'),
                                       ('--config.head.margn=0.1', 'margn')])
def test_misspelled_override_fails(typo, name):
  # A locked config refuses new fields instead of silently adding one.
  with pytest.raises((flags.Error, AttributeError, KeyError), match=name):
    _parse([f'--config={CONFIG_DIR}/mfn_arcface_n2.py', typo])


def test_wrongly_typed_override_fails():
  with pytest.raises(flags.Error):
    _parse([f'--config={CONFIG_DIR}/mfn_arcface_n2.py', '--config.batch_size=lots'])


def test_every_default_field_is_commented():
  source = open(os.path.join(CONFIG_DIR, 'default.py')).read().splitlines()
  for i, line in enumerate(source):
    stripped = line.strip()
    if stripped.startswith('config.') and ' = ' in stripped and 'ConfigDict()' not in stripped:
      assert source[i - 1].strip().startswith('#'), f'default.py:{i + 1} has no comment: {line}'


@pytest.mark.parametrize('field,value,message', [
    ('model.dtype', 'float16', 'model.dtype'), ('log_every_steps', 0, 'log_every_steps'),
    ('head.num_spheres', 3, 'num_spheres=3 must divide')])
def test_unusable_values_are_rejected_by_name(field, value, message):
  config = _load('tiny').get_config()
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=message):
    trainer.check_config(config)
