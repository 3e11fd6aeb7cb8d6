"""Importing original PyTorch checkpoints: numeric parity against the PyTorch reference models.

The PyTorch side (multiface_jax/torch_reference.py) is written from docs/original.md, has random weights
and non-trivial BatchNorm statistics, runs in eval mode on BGR images; the imported Flax model runs
on the same images in RGB. IR-SE100 / IR50 parity is slow: set MULTIFACE_SLOW_TESTS=1.
"""
import functools
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from multiface_jax.inference import loading  # pylint: disable=g-import-not-at-top
from multiface_jax import import_torch  # pylint: disable=g-import-not-at-top
from multiface_jax import models  # pylint: disable=g-import-not-at-top

from multiface_jax import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

PARITY_TOLERANCE = 1e-4
SLOW = pytest.mark.skipif(os.environ.get('MULTIFACE_SLOW_TESTS') != '1',
                          reason='slow: set MULTIFACE_SLOW_TESTS=1')


@functools.lru_cache(maxsize=None)
def torch_model(net):
  """Eval-mode reference model with random weights and BN statistics (built once per net)."""
  generator = torch.Generator().manual_seed(sum(map(ord, net)))
  return torch_reference.randomize_(torch_reference.create_torch_model(net), generator).eval()


@functools.lru_cache(maxsize=None)
def jax_embed(net):
  """Jitted eval-mode apply; variables are an argument so each net compiles once."""
  model = models.create_model(net)
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def face_images_uint8(batch=2, seed=0):
  """Smooth random RGB images (a blurred noise field plus a gradient), uint8 NHWC."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (batch, 14, 14, 3))
  images = coarse.repeat(8, axis=1).repeat(8, axis=2)
  images += np.linspace(-40, 40, 112)[None, :, None, None]
  images += rng.normal(0, 12, images.shape)
  return np.clip(images, 0, 255).astype(np.uint8)


def torch_embeddings(net, images_rgb_uint8):
  """The PyTorch reference on the same images in BGR (the original's colour order), NCHW."""
  x = (images_rgb_uint8.astype(np.float32) / 255.0 - 0.5) / 0.5
  bgr_nchw = np.ascontiguousarray(x[..., ::-1].transpose(0, 3, 1, 2))
  with torch.no_grad():
    return torch_model(net)(torch.from_numpy(bgr_nchw)).numpy()


def jax_embeddings(net, variables, images_uint8):
  return np.asarray(jax_embed(net)(variables, models.normalize_images(images_uint8)))


def _subprocess_env():
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return dict(os.environ, JAX_PLATFORMS='cpu',
              PYTHONPATH=os.pathsep.join([repo_root, os.environ.get('PYTHONPATH', '')]))


def assert_parity(net, variables, images):
  expected = torch_embeddings(net, images)
  got = jax_embeddings(net, variables, images)
  max_diff = float(np.abs(got - expected).max())
  print(f'{net}: max abs diff {max_diff:.3g}')
  assert max_diff < PARITY_TOLERANCE, f'{net}: max abs diff {max_diff}'
  # The two faces must embed differently, or the check above would be weak.
  assert np.abs(expected[0] - expected[1]).max() > 100 * PARITY_TOLERANCE
  return max_diff


def test_mobilefacenet_parity_rgb_and_bgr():
  images = face_images_uint8()
  state_dict = torch_model('mobilefacenet').state_dict()
  assert_parity('mobilefacenet', import_torch.variables_from_torch_state_dict(
      state_dict, 'mobilefacenet'), images)

  # Without the colour conversion the model expects BGR: it matches on BGR images and not on RGB
  # ones, which shows the first convolution's channel order is what the conversion changes.
  bgr_variables = import_torch.variables_from_torch_state_dict(
      state_dict, 'mobilefacenet', bgr_to_rgb=False)
  expected = torch_embeddings('mobilefacenet', images)
  on_bgr = jax_embeddings('mobilefacenet', bgr_variables, images[..., ::-1])
  on_rgb = jax_embeddings('mobilefacenet', bgr_variables, images)
  assert np.abs(on_bgr - expected).max() < PARITY_TOLERANCE
  assert np.abs(on_rgb - expected).max() > 100 * PARITY_TOLERANCE


def test_ir_se50_parity_from_data_parallel_pth(tmp_path):
  # A DataParallel checkpoint on disk: every key carries 'module.'.
  path = tmp_path / 'model_ir_se50.pth'
  torch.save(torch.nn.DataParallel(torch_model('ir_se50')).state_dict(), path)
  state_dict = import_torch.load_torch_state_dict(str(path))
  assert all(k.startswith('module.') for k in state_dict)
  variables = import_torch.variables_from_torch_state_dict(state_dict, 'ir_se50')
  assert_parity('ir_se50', variables, face_images_uint8())


@SLOW
@pytest.mark.slow
@pytest.mark.parametrize('net', ['ir_se100', 'ir50'])
def test_slow_parity(net):
  variables = import_torch.variables_from_torch_state_dict(torch_model(net).state_dict(), net)
  assert_parity(net, variables, face_images_uint8())


def test_every_tensor_is_used_once():
  state_dict = torch_model('mobilefacenet').state_dict()
  variables = import_torch.variables_from_torch_state_dict(state_dict, 'mobilefacenet')
  tensors = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  leaves = jax.tree_util.tree_leaves(variables)
  assert len(leaves) == len(tensors)
  assert sum(x.size for x in leaves) == sum(v.numel() for v in tensors.values())
  # Spot checks of the layouts against the PyTorch tensors.
  conv1 = state_dict['conv1.conv.weight'].numpy()  # (64, 3, 3, 3) OIHW, BGR input channels
  np.testing.assert_array_equal(variables['params']['conv1']['conv']['kernel'][1, 2, :, 5],
                                conv1[5, ::-1, 1, 2])
  depthwise = state_dict['conv_3.model.2.conv_dw.conv.weight'].numpy()  # (128, 1, 3, 3)
  np.testing.assert_array_equal(
      variables['params']['conv_3']['block_2']['conv_dw']['conv']['kernel'][0, 1, 0, 7],
      depthwise[7, 0, 0, 1])
  np.testing.assert_array_equal(variables['batch_stats']['conv_4']['block_5']['project']['bn']['var'],
                                state_dict['conv_4.model.5.project.bn.running_var'].numpy())
  np.testing.assert_array_equal(variables['params']['linear']['kernel'],
                                state_dict['linear.weight'].numpy().T)


def test_conversion_needs_no_torch(tmp_path):
  """A state_dict of numpy arrays converts in a process that never imports torch."""
  state_dict = torch_model('mobilefacenet').state_dict()
  arrays = {k: v.numpy() for k, v in state_dict.items()}
  np.savez(tmp_path / 'state.npz', **arrays)
  expected = import_torch.variables_from_torch_state_dict(state_dict, 'mobilefacenet')
  np.save(tmp_path / 'expected_linear.npy', expected['params']['linear']['kernel'])
  script = f"""
import sys
import numpy as np
sys.modules['torch'] = None  # any import of torch now fails
from multiface_jax import import_torch
state = dict(np.load({str(tmp_path / 'state.npz')!r}))
variables = import_torch.variables_from_torch_state_dict(state, 'mobilefacenet')
np.testing.assert_array_equal(variables['params']['linear']['kernel'],
                              np.load({str(tmp_path / 'expected_linear.npy')!r}))
print('ok')
"""
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=_subprocess_env(), check=False)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]


def test_missing_and_unexpected_keys_are_listed():
  state_dict = dict(torch_model('mobilefacenet').state_dict())
  del state_dict['conv_4.model.3.conv_dw.bn.running_var']
  state_dict['conv_4.model.3.extra.weight'] = torch.zeros(3)
  state_dict['nowhere.num_batches_tracked'] = torch.tensor(1)
  with pytest.raises(import_torch.StateDictMismatchError) as error:
    import_torch.variables_from_torch_state_dict(state_dict, 'mobilefacenet')
  message = str(error.value)
  assert '1 missing key(s)' in message and 'conv_4.model.3.conv_dw.bn.running_var' in message
  assert '2 unexpected key(s)' in message
  assert 'conv_4.model.3.extra.weight' in message and 'nowhere.num_batches_tracked' in message


def test_wrong_net_names_the_right_one():
  state_dict = torch_model('mobilefacenet').state_dict()
  with pytest.raises(import_torch.StateDictMismatchError, match='--net=mobilefacenet'):
    import_torch.variables_from_torch_state_dict(state_dict, 'ir_se50')
  # Same blocks, other depth: reported as keys (body.24 ... missing), not as a shape mismatch.
  with pytest.raises(import_torch.StateDictMismatchError,
                     match=r'(?s)missing key.*body\.24\..*--net=ir_se50'):
    import_torch.variables_from_torch_state_dict(torch_model('ir_se50').state_dict(), 'ir_se100')
  assert import_torch.guess_net(torch_model('ir_se50').state_dict()) == 'ir_se50'
  ir100_keys = [f'module.body.{i}.res_layer.0.weight' for i in range(49)]
  assert import_torch.guess_net(['module.input_layer.0.weight', *ir100_keys]) == 'ir100'


def test_wrong_shape_names_the_key():
  state_dict = dict(torch_model('mobilefacenet').state_dict())
  state_dict['conv_6_sep.conv.weight'] = torch.zeros(512, 64, 1, 1)
  with pytest.raises(import_torch.StateDictMismatchError, match=r'conv_6_sep\.conv\.weight'):
    import_torch.variables_from_torch_state_dict(state_dict, 'mobilefacenet')


def test_key_with_and_without_module_prefix_is_refused():
  state_dict = dict(torch_model('mobilefacenet').state_dict())
  state_dict['module.bn.bias'] = state_dict['bn.bias']
  with pytest.raises(import_torch.StateDictMismatchError, match="'bn.bias' both"):
    import_torch.variables_from_torch_state_dict(state_dict, 'mobilefacenet')


class _RunsCommand:
  """Pickles as a call to os.system: loading it with plain pickle would run the command."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


@pytest.mark.parametrize('writer', ['torch_zip', 'torch_legacy', 'plain_pickle'])
def test_code_carrying_pickle_is_refused(tmp_path, writer):
  marker = tmp_path / 'command_ran'
  payload = {'bn.weight': _RunsCommand(f'touch {marker}')}
  if writer != 'plain_pickle':  # a tensor pickled without torch.save is refused before the call
    payload['conv1.conv.weight'] = torch.zeros(64, 3, 3, 3)
  path = tmp_path / 'evil.pth'
  if writer == 'plain_pickle':
    with open(path, 'wb') as f:
      pickle.dump(payload, f, protocol=2)  # the protocol torch.save itself writes
  else:
    torch.save(payload, path, _use_new_zipfile_serialization=(writer == 'torch_zip'))
  with pytest.raises(import_torch.UnsafeCheckpointError, match='evil.pth') as error:
    import_torch.load_torch_state_dict(str(path))
  assert 'system' in str(error.value)  # torch's reason: the blocked global
  assert isinstance(error.value.__cause__, pickle.UnpicklingError)
  assert not marker.exists()


def test_missing_pth_and_non_state_dict_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    import_torch.load_torch_state_dict(str(tmp_path / 'nope.pth'))
  path = tmp_path / 'wrapped.pth'
  torch.save({'epoch': 3, 'state_dict': {'bn.weight': torch.ones(2)}}, path)
  with pytest.raises(import_torch.StateDictMismatchError, match='not a state_dict'):
    import_torch.load_torch_state_dict(str(path))


def test_command_line_writes_a_restorable_checkpoint(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  pth = tmp_path / 'mobilefacenet.pth'
  state_dict = torch_model('mobilefacenet').state_dict()
  torch.save(state_dict, pth)
  out = tmp_path / 'imported'
  env = _subprocess_env()
  command = [sys.executable, '-m', 'multiface_jax.import_torch', '--net=mobilefacenet',
             f'--pth={pth}', f'--out={out}']
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'mobilefacenet' in result.stdout

  expected = import_torch.variables_from_torch_state_dict(state_dict, 'mobilefacenet')
  restored = ocp.StandardCheckpointer().restore(str(out))
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, expected)

  # The path evaluation (--mode=eval --checkpoint=DIR) and fine-tuning (init_checkpoint) take.
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), expected)
  loaded = loading.load_backbone_variables(str(out), abstract)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, expected)
  assert_parity('mobilefacenet', loaded, face_images_uint8(seed=1))
  # The checkpoint records its model, so loading needs the path alone.
  backbone = loading.load_backbone(str(out))
  assert (backbone.record['model'], backbone.record['embedding_size'], backbone.step) == (
      'mobilefacenet', 512, 0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, backbone.variables, expected)

  # A second import never overwrites the first.
  again = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  assert again.returncode != 0 and 'already exists' in again.stderr
