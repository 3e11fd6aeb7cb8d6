"""IJB-B / IJB-C: the meta readers, the recipe against direct computations and hand-computed
values, and the whole command on a tiny IJB-format tree made of real faces (ORL)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from multiface_jax.data import orl
from multiface_jax.evaluation.ijb import meta as meta_lib
from multiface_jax.evaluation.ijb import recipe
from multiface_jax.inference import detect, images

import train_testlib as lib

SUBJECTS = 8  # ORL s1..s8; every subject: a gallery template and a probe template


def _orl(person, image):
  return images.read_rgb(os.path.join(orl.find_faces(), f's{person}', f'{image}.pgm'))


def write_tree(root, target='IJBC'):
  """A tiny IJB tree: per subject, template 2s+1 (gallery; media: two faces + one single face)
  and template 2s+2 (probe; two single-face media); pairs of every template with the next
  subject's and with its own other template."""
  prefix = target.lower()
  meta_dir, crops = root / target / 'meta', root / target / 'loose_crop'
  meta_dir.mkdir(parents=True)
  crops.mkdir()
  yunet = detect.YuNet()
  faces, points = [], []
  media = 0
  for subject in range(1, SUBJECTS + 1):
    for template, groups in ((2 * subject - 1, [[1, 2], [3]]), (2 * subject, [[4], [5]])):
      for group in groups:
        media += 1
        for image in group:
          name = f'{subject}_{image}.jpg'
          picture = _orl(subject, image)
          Image.fromarray(picture).save(crops / name, quality=95)
          landmarks = yunet(picture)[0]
          faces.append(f'{name} {template} {media}')
          points.append(' '.join([name, *(f'{v:.2f}' for v in landmarks.landmarks.ravel()),
                                  f'{landmarks.score:.4f}']))
  (meta_dir / f'{prefix}_face_tid_mid.txt').write_text('\n'.join(faces) + '\n')
  (meta_dir / f'{prefix}_name_5pts_score.txt').write_text('\n'.join(points) + '\n')
  pairs = []
  for subject in range(1, SUBJECTS + 1):
    other = subject % SUBJECTS + 1
    pairs += [f'{2 * subject - 1} {2 * subject} 1', f'{2 * subject - 1} {2 * other} 0',
              f'{2 * subject} {2 * other - 1} 0']
  (meta_dir / f'{prefix}_template_pair_label.txt').write_text('\n'.join(pairs) + '\n')
  galleries = meta_lib.GALLERIES[target]
  header = 'TEMPLATE_ID,SUBJECT_ID,FILENAME\n'
  halves = [range(1, SUBJECTS // 2 + 1), range(SUBJECTS // 2 + 1, SUBJECTS + 1)]
  for gallery, subjects in zip(galleries, halves):
    (meta_dir / f'{prefix}_1N_gallery_{gallery}.csv').write_text(
        header + ''.join(f'{2 * s - 1},{s},{s}_1.jpg\n' for s in subjects))
  (meta_dir / f'{prefix}_1N_probe_mixed.csv').write_text(
      header + ''.join(f'{2 * s},{s},{s}_4.jpg\n' for s in range(1, SUBJECTS + 1)))
  return root


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  return write_tree(tmp_path_factory.mktemp('ijb'))


# ------------------------------------------------------------------------------------- recipe


def test_pooling_equals_a_direct_per_template_computation():
  rng = np.random.default_rng(0)
  templates = rng.integers(0, 30, 400)
  medias = rng.integers(0, 12, 400) + 100 * templates  # several faces share a media
  features = rng.normal(size=(400, 16)).astype(np.float32)
  ids, pooled = recipe.pool_templates(features, templates, medias)
  assert list(ids) == sorted(set(templates))
  for tid, row in zip(ids, pooled):  # written the other way round: loops over the dictionary
    per_media = {}
    for f, t, m in zip(features, templates, medias):
      if t == tid:
        per_media.setdefault(m, []).append(f.astype(np.float64))
    total = sum(np.mean(v, axis=0) for v in per_media.values())
    np.testing.assert_allclose(row, total / np.linalg.norm(total), rtol=1e-5, atol=1e-6)


def test_pair_scores_are_template_cosines_over_many_chunks(monkeypatch):
  monkeypatch.setattr(recipe, 'PAIRS_PER_CHUNK', 7)  # 50 pairs: 8 chunks, the last padded
  rng = np.random.default_rng(1)
  ids = np.array([3, 8, 11, 20])
  feats = rng.normal(size=(4, 6)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  pairs = ids[rng.integers(0, 4, (50, 2))]
  expected = [feats[list(ids).index(a)] @ feats[list(ids).index(b)] for a, b in pairs]
  np.testing.assert_allclose(recipe.pair_scores(ids, feats, pairs), expected, rtol=1e-6)
  with pytest.raises(ValueError, match='template 99'):
    recipe.pair_scores(ids, feats, np.array([[3, 99]]))


def test_tar_at_far_on_crafted_scores():
  # Perfect separation: TAR 1 at every FAR.
  rows, _ = recipe.tar_at_far(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1]), (1e-6, 0.5))
  assert [r['tar'] for r in rows] == [1.0, 1.0]
  # 4 genuine, 4 impostor scores; by hand, descending: G G I G I I G I, so the ROC points are
  # (0,0) (0,.25) (0,.5) (.25,.5) (.25,.75) (.75,.75) (.75,1) (1,1) (roc_curve drops the
  # collinear (.5,.75), as in the recipe). FAR 0.25 has two points at exactly that FPR: the
  # larger TPR; 0.3 is nearest 0.25; 0.6 is nearest 0.75 (0.15 against 0.35).
  labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
  scores = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.1])
  rows, (fpr, tpr) = recipe.tar_at_far(labels, scores, (0.25, 0.3, 1e-6, 0.6))
  assert [r['tar'] for r in rows] == [0.75, 0.75, 0.5, 1.0]
  np.testing.assert_array_equal(np.stack([fpr, tpr], 1), [[0, 0], [0, .25], [0, .5], [.25, .5],
                                                          [.25, .75], [.75, .75], [.75, 1],
                                                          [1, 1]])
  # FAR below the smallest reachable (1e-6 < 0.25): the best FPR = 0 point, TPR 0.5.
  # Tied scores across classes: one ROC point for the tie.
  rows, _ = recipe.tar_at_far(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.9, 0.1]), (0.5,))
  assert rows[0]['tar'] == 1.0


def test_identification_by_hand():
  gallery = np.eye(3)  # subjects 10, 20, 30
  probes = np.array([[1.0, 0.0, 0.0],   # subject 10: mate first
                     [0.8, 0.6, 0.0],   # subject 20: mate second (0.6 < 0.8)
                     [0.0, 0.0, 1.0],   # subject 30: mate first
                     [0.0, 0.6, 0.8]])  # subject 30: mate first (0.8 > 0.6)
  result = recipe.identification(probes, np.array([10, 20, 30, 30]), gallery,
                                 np.array([10, 20, 30]), fpirs=(0.25, 0.5), ranks=(1, 2))
  assert result['rank'] == {'1': 0.75, '2': 1.0}
  # Non-mated similarities: 0, 0, 0.8, 0, 0, 0, 0, 0.6 -> the 1st and 2nd largest are 0.8, 0.6;
  # mated: 1, 0.6, 1, 0.8. FPIR 0.25 (ceil(1)): threshold 0.8 -> 1, 1 pass: 0.5; 0.5 -> 0.6:
  # 1, 1, 0.8 pass -> 0.75.
  assert [(t['threshold'], t['tpir']) for t in result['tpir_at_fpir']] == [(0.8, 0.5), (0.6, 0.75)]


# -------------------------------------------------------------------------------- meta files


def test_meta_reads_the_tree_and_names_bad_input(tree, tmp_path):
  meta = meta_lib.read(str(tree), 'IJBC')
  assert len(meta.images) == SUBJECTS * 5 and meta.landmarks.shape == (SUBJECTS * 5, 5, 2)
  assert meta.pairs.shape == (3 * SUBJECTS, 2) and meta.labels.sum() == SUBJECTS
  assert len(meta.identification.gallery_templates) == SUBJECTS
  broken = tmp_path / 'broken'
  os.system(f'cp -r {tree} {broken}')  # pylint: disable=os-system  (test set-up)
  pts = broken / 'IJBC' / 'meta' / 'ijbc_name_5pts_score.txt'
  lines = pts.read_text().splitlines()
  pts.write_text('\n'.join([lines[0].rsplit(' ', 2)[0]] + lines[1:]) + '\n')
  with pytest.raises(meta_lib.IJBError, match=r'5pts_score.txt:1: expected 12 fields'):
    meta_lib.read(str(broken), 'IJBC')
  pts.write_text('\n'.join(lines) + '\n')
  pairs = broken / 'IJBC' / 'meta' / 'ijbc_template_pair_label.txt'
  pairs.write_text(pairs.read_text() + '1 999 0\n')
  with pytest.raises(meta_lib.IJBError, match=r'pair_label.txt:25: template 999 has no face'):
    meta_lib.read(str(broken), 'IJBC')
  (broken / 'IJBC' / 'meta' / 'ijbc_face_tid_mid.txt').unlink()
  with pytest.raises(meta_lib.IJBError, match='face_tid_mid.txt is missing: it should hold one '
                     'line per face'):
    meta_lib.read(str(broken), 'IJBC')


# ------------------------------------------------------------------------------- the command


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  return lib.write_tiny_weights(str(tmp_path_factory.mktemp('weights') / 'tiny'), seed=3)


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'multiface_jax.evaluation.ijb', *args],
                        cwd=lib.REPO, env=lib.worker_env(), capture_output=True, text=True,
                        timeout=300)


def test_command_runs_end_to_end_resumes_and_names_missing_images(tree, tiny_checkpoint,
                                                                  tmp_path):
  out = tmp_path / 'out'
  done = _run(f'--root={tree}', '--target=IJBC', f'--checkpoint={tiny_checkpoint}',
              f'--out={out}', '--num_spheres=2')
  assert done.returncode == 0, done.stderr[-3000:]
  assert '| model | 1e-06 | 1e-05 | 1e-04 | 1e-03 | 1e-02 | 1e-01 |' in done.stdout
  assert 'rank-1' in done.stdout and 'sphere 2/2 alone' in done.stdout
  with open(out / 'IJBC_results.json') as f:
    results = json.load(f)
  assert [r['far'] for r in results['tar_at_far']] == list(recipe.FARS)
  assert all(0.0 <= r['tar'] <= 1.0 for r in results['tar_at_far'])
  assert set(results['identification']['rank']) == {'1', '5', '10'}
  assert len(results['spheres']) == 2 and os.path.isfile(out / 'ijbc_roc.png')
  scores = np.load(out / 'ijbc_scores.npy')
  assert scores.shape == (3 * SUBJECTS,) and np.all(np.abs(scores) <= 1 + 1e-6)
  # A second run with another switch reads the cached faces: it embeds nothing.
  cache = [p for p in (out / 'cache').rglob('*.npy')]
  stamps = [p.stat().st_mtime_ns for p in cache]
  again = _run(f'--root={tree}', '--target=IJBC', f'--checkpoint={tiny_checkpoint}',
               f'--out={out}', '--nodetector_score')
  assert again.returncode == 0, again.stderr[-3000:]
  assert [p.stat().st_mtime_ns for p in cache] == stamps
  # An image listed but missing, with a fresh cache: named, with the fix.
  (tree / 'IJBC' / 'loose_crop' / '3_5.jpg').rename(tmp_path / 'moved.jpg')
  try:
    missing = _run(f'--root={tree}', '--target=IJBC', f'--checkpoint={tiny_checkpoint}',
                   f'--out={tmp_path / "other"}')
    assert missing.returncode != 0 and '3_5.jpg is listed in the meta files but missing' in (
        missing.stderr)
  finally:
    (tmp_path / 'moved.jpg').rename(tree / 'IJBC' / 'loose_crop' / '3_5.jpg')


def test_main_eval_runs_ijb_when_the_config_names_a_root(tree, tiny_checkpoint, tmp_path):
  done = subprocess.run(
      [sys.executable, 'main.py', '--mode=eval', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', f'--checkpoint={tiny_checkpoint}', f'--config.ijb_root={tree}'],
      cwd=lib.REPO, env=lib.worker_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'IJBC (step 0), TAR (%) at FAR:' in done.stdout
  assert os.path.isfile(tmp_path / 'eval' / 'ijb' / 'IJBC_results.json')
