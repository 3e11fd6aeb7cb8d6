"""The demo's whole path on a few real ORL faces: data preparation, one train step, evaluation."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from multiface_jax import demo
from multiface_jax.data import emore
from multiface_jax.data import verification_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def orl_root():
  try:
    return demo.find_orl_faces()
  except FileNotFoundError as e:
    pytest.fail(f'the demo faces are part of the test set-up (make venv installs them): {e}')


def test_prepares_emore_pairs_and_tfrecords_from_real_faces(orl_root, tmp_path):
  data_dir = demo.prepare_data(orl_root, str(tmp_path), train_identities=3,
                               heldout_identities=2, num_pairs=40)
  folder = emore.EmoreFolder(str(tmp_path / 'emore'))
  assert (folder.num_classes, folder.image_size, folder.num_images) == (3, (112, 112), 30)
  labels = [folder.read_image(k)[0] for k in folder.image_keys]
  assert labels == [0] * 10 + [1] * 10 + [2] * 10
  with open(os.path.join(data_dir, 'metadata.json')) as f:
    metadata = json.load(f)
  assert metadata['num_images'] == 30 and metadata['num_classes'] == 3
  assert metadata['verification_sets'] == [f'{demo.HELDOUT_SET}.bin']
  images, issame = verification_sets.load_bin(os.path.join(data_dir, f'{demo.HELDOUT_SET}.bin'))
  assert images.shape == (80, 112, 112, 3) and issame.sum() == 20
  # Gray faces: three equal channels; fitted 92x112 -> 112x112 leaves black side bars.
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  assert images[:, :, :5].max() <= 8 and images[:, :, 20:90].mean() > 40
  # Held-out identities only: no pair image equals a training image.
  train_bytes = {folder.read_image(k)[1] for k in folder.image_keys}
  encoded, _ = verification_sets.read_bin(os.path.join(data_dir, f'{demo.HELDOUT_SET}.bin'))
  assert not train_bytes & set(encoded)
  # A second run reuses what is on disk.
  mtime = os.path.getmtime(os.path.join(data_dir, 'metadata.json'))
  demo.prepare_data(orl_root, str(tmp_path), train_identities=3, heldout_identities=2,
                    num_pairs=40)
  assert os.path.getmtime(os.path.join(data_dir, 'metadata.json')) == mtime


def test_demo_command_trains_one_step_and_prints_the_table(orl_root, tmp_path):
  del orl_root
  workdir = tmp_path / 'run'
  overrides = ['--config.model.name=tiny', '--config.batch_size=10',
               '--config.num_train_steps=1', '--config.eval_batch_size=20']
  command = [sys.executable, '-m', 'multiface_jax.demo', f'--workdir={workdir}',
             '--train_identities=3', '--heldout_identities=2', '--pairs=40',
             *overrides]
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert os.path.isdir(workdir / 'checkpoints' / '1')
  for row in ('raw pixels', 'untrained network', 'trained tiny'):
    assert row in out.stdout
  assert demo.HELDOUT_SET in out.stdout
  assert any(name.startswith('roc_') and name.endswith('.png')
             for name in os.listdir(workdir / 'eval'))
  # The console carries the demo's own lines only: no absl/Orbax INFO or WARNING lines, no
  # TensorFlow notices, no read-only checkpoint warnings.
  console = out.stdout + out.stderr
  assert not re.search(r'^[IW]\d{4} |oneDNN|read only', console, re.M), console[-3000:]
