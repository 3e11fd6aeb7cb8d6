"""The demo's path on real ORL faces: identity splits, each split's data, and the whole command."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from multiface_jax.data import emore, make_pairs, orl, verification_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def faces_dir(tmp_path_factory):
  try:
    root = orl.find_faces()
  except FileNotFoundError as e:
    pytest.fail(f'the demo faces are part of the test set-up (make venv installs them): {e}')
  return orl.stage_faces(root, str(tmp_path_factory.mktemp('orl')))


def test_splits_hold_out_every_person_once_and_never_train_on_them():
  splits = orl.identity_splits(4)
  assert [s.heldout for s in splits] == [tuple(range(1 + 10 * k, 11 + 10 * k)) for k in range(4)]
  for split in splits:
    assert not set(split.heldout) & set(split.train) and not split.validation
    assert sorted(split.heldout + split.train) == list(range(1, 41))
  with_validation = orl.identity_splits(4, num_validation=10)
  for split in with_validation:
    assert len(split.train) == 20 and len(split.validation) == 10
    assert sorted(split.heldout + split.validation + split.train) == list(range(1, 41))
  # The validation people of the last split wrap around to the first people.
  assert with_validation[3].validation == tuple(range(1, 11))
  with pytest.raises(ValueError, match='must be >= 2 and divide the 40'):
    orl.identity_splits(3)


def test_a_split_trains_on_its_people_and_pairs_every_photo_pair_of_the_held_out(faces_dir,
                                                                                 tmp_path):
  split = orl.identity_splits(2, num_identities=8)[1]  # hold out s5-s8, train on s1-s4
  data_dir = orl.prepare_split(faces_dir, str(tmp_path), split, align=True, log=None)
  folder = emore.EmoreFolder(os.path.join(os.path.dirname(data_dir), orl.TRAIN_SET))
  assert (folder.num_classes, folder.image_size, folder.num_images) == (4, (112, 112), 40)
  with open(os.path.join(data_dir, 'metadata.json')) as f:
    assert json.load(f)['verification_sets'] == [f'{orl.HELDOUT_SET}.bin']
  bin_path = os.path.join(data_dir, f'{orl.HELDOUT_SET}.bin')
  images, issame = verification_sets.load_bin(bin_path)
  # 4 people x C(10, 2) = 180 same-person pairs, as many different-person ones, balanced folds.
  assert images.shape == (720, 112, 112, 3) and issame.sum() == 180
  np.testing.assert_array_equal(issame.reshape(10, 36), [[True] * 18 + [False] * 18] * 10)
  encoded, _ = verification_sets.read_bin(bin_path)
  assert len(set(encoded)) == 40  # every photo of the 4 held-out people, none of anyone else
  train_bytes = {folder.read_image(k)[1] for k in folder.image_keys}
  assert not train_bytes & set(encoded)
  pairs = {frozenset((encoded[2 * i], encoded[2 * i + 1])) for i in range(len(issame))}
  assert len(pairs) == 360
  # Aligned onto the ArcFace template: gray faces (equal channels), eyes where the template puts
  # them (darker than the cheeks below them), black corners outside the 92x112 photo.
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  eyes = images[:, 49:55, 36:42, 0].mean() + images[:, 49:55, 71:77, 0].mean()
  cheeks = images[:, 62:68, 36:42, 0].mean() + images[:, 62:68, 71:77, 0].mean()
  assert eyes < cheeks
  # A second call reuses what is on disk.
  mtime = os.path.getmtime(os.path.join(data_dir, 'metadata.json'))
  orl.prepare_split(faces_dir, str(tmp_path), split, align=True, log=None)
  assert os.path.getmtime(os.path.join(data_dir, 'metadata.json')) == mtime


def test_a_validation_split_writes_no_file_of_its_held_out_people(faces_dir, tmp_path):
  split = orl.identity_splits(2, num_validation=2, num_identities=8)[0]
  assert split.heldout == (1, 2, 3, 4) and split.validation == (5, 6)
  data_dir = orl.prepare_split(faces_dir, str(tmp_path), split, align=False, log=None)
  assert sorted(n for n in os.listdir(data_dir) if n.endswith('.bin')) == ['validation.bin']
  _, issame = verification_sets.load_bin(os.path.join(data_dir, 'validation.bin'))
  assert issame.sum() == 90  # 2 people x 45 pairs
  assert make_pairs.ALL_SAME == -1


def test_demo_command_cross_validates_and_ends_with_the_table(tmp_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'multiface_jax.demo', f'--workdir={workdir}',
             '--num_identities=8', '--num_splits=2', '--config.model.name=tiny',
             '--config.batch_size=10', '--config.num_train_steps=1', '--config.eval_batch_size=20']
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert '[demo] split 1/2' in out.stdout and '[demo] split 2/2' in out.stdout
  table = out.stdout[out.stdout.rindex('| model'):].strip().splitlines()
  assert table[0].split('|')[2:5] == [' 2 splits: mean ± std ', ' s1-s4        ',
                                      ' s5-s8        ']
  rows = [line.split('|')[1].strip() for line in table[2:]]
  assert rows[:4] == ['raw pixels', 'eigenfaces (whitened PCA 39)',
                      'Fisherfaces (PCA 36 + LDA)', 'SFace (pretrained, reference)']
  assert rows[4:] == [f'{which} network (tiny x0.5){part}' for which in ('untrained', 'trained')
                      for part in ('', ', sphere 1/2 alone', ', sphere 2/2 alone')]
  assert out.stdout.rstrip().endswith(table[-1])  # the table is the last thing printed
  with open(workdir / 'demo_results.json') as f:
    results = json.load(f)
  assert [s['heldout'] for s in results['splits']] == [[1, 2, 3, 4], [5, 6, 7, 8]]
  over = results['over_splits']['raw pixels']
  per_split = [s['results']['raw pixels']['accuracy_mean'] for s in results['splits']]
  assert over['per_split'] == per_split and over['accuracy_mean'] == pytest.approx(
      np.mean(per_split))
  assert f'{100 * over["accuracy_mean"]:.2f} ± {100 * over["accuracy_std"]:.2f}' in table[2]
  assert (workdir / 'demo_roc.png').stat().st_size > 10_000
  split_run = workdir / 'split1_heldout_s1-s4_train4'
  assert (split_run / 'checkpoints' / '1').is_dir()
  with open(split_run / 'eval' / 'results_step1.json') as f:  # where `verify` finds a threshold
    assert json.load(f)['results']['heldout']['accuracy_mean'] == pytest.approx(
        results['splits'][0]['results']['trained network']['accuracy_mean'])
  # The console carries the demo's own lines only: no absl/Orbax INFO or WARNING lines, no
  # TensorFlow notices, no read-only checkpoint warnings.
  console = out.stdout + out.stderr
  assert not re.search(r'^[IW]\d{4} |oneDNN|read only', console, re.M), console[-3000:]
