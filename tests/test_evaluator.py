"""Embedding extraction (padding, flip TTA, XNorm, sharding) and the evaluator end to end.

A toy model (one Dense layer over the flattened pixels) stands in for a backbone: it compiles in a
blink and its embeddings can be recomputed independently in numpy.
"""
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest
import sklearn.preprocessing
from PIL import Image

from multiface_jax.data import verification_sets
from multiface_jax.evaluation import embed, evaluator, protocol
from multiface_jax.models import kernels
from multiface_jax.models.kernels import chunking


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_BIN = os.path.join(REPO, 'tests', 'data', 'emore', 'pairs20.bin')


class ToyModel(nn.Module):
  features: int = 8

  @nn.compact
  def __call__(self, images):
    return nn.Dense(self.features)(images.reshape(images.shape[0], -1))


def _toy(image_shape, features=8, seed=0):
  model = ToyModel(features)
  variables = model.init(jax.random.key(seed), np.zeros((1,) + image_shape, np.float32))
  return model.apply, variables


def _numpy_embeddings(variables, images_uint8, flip=True):
  """Flip-summed, normalised embeddings and XNorm of the toy model, computed in float64."""
  kernel = np.asarray(variables['params']['Dense_0']['kernel'], np.float64)
  bias = np.asarray(variables['params']['Dense_0']['bias'], np.float64)
  pixels = (images_uint8.astype(np.float64) / 255 - 0.5) / 0.5
  views = [pixels, pixels[:, :, ::-1]] if flip else [pixels]
  raw = [v.reshape(len(v), -1) @ kernel + bias for v in views]
  xnorm = np.mean([np.linalg.norm(r, axis=1) for r in raw])
  summed = np.sum(raw, axis=0)
  return summed / np.linalg.norm(summed, axis=1, keepdims=True), xnorm


def _random_images(n, size=6, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# --- embed.extract_embeddings --------------------------------------------------------------------

@pytest.mark.parametrize('flip', [True, False])
def test_extract_embeddings_matches_numpy_with_padding(flip):
  images = _random_images(13)
  apply_fn, variables = _toy(images.shape[1:])
  embeddings, xnorm = embed.extract_embeddings(apply_fn, variables, images, batch_size=4, flip=flip)
  expected, expected_xnorm = _numpy_embeddings(variables, images, flip=flip)
  assert embeddings.shape == (13, 8) and embeddings.dtype == np.float64
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(embeddings, expected, atol=2e-5)
  assert xnorm == pytest.approx(expected_xnorm, rel=1e-5)


def test_an_image_that_occurs_several_times_is_embedded_once(monkeypatch):
  distinct = _random_images(5, seed=2)
  order = np.array([3, 0, 3, 1, 4, 0, 2, 3, 3])
  images = distinct[order]
  first, inverse = embed.distinct_images(images)
  np.testing.assert_array_equal(first, [0, 1, 3, 4, 6])  # first occurrences, in order
  np.testing.assert_array_equal(images[first][inverse], images)
  apply_fn, variables = _toy(images.shape[1:])
  batches, jitted = [], embed._raw_embeddings

  def recorded(fn, v, x, **kwargs):
    batches.append(np.asarray(x))
    return jitted(fn, v, x, **kwargs)

  monkeypatch.setattr(embed, '_raw_embeddings', recorded)
  embeddings, xnorm = embed.extract_embeddings(apply_fn, variables, images, batch_size=2)
  sent = np.concatenate(batches)  # the 5 distinct images once, in batches of 2 (one padded)
  np.testing.assert_array_equal(sent[:5], distinct[[3, 0, 1, 4, 2]])
  assert len(sent) == 6 and not sent[5].any()
  expected, expected_xnorm = _numpy_embeddings(variables, images, flip=True)
  np.testing.assert_allclose(embeddings, expected, atol=2e-5)
  assert xnorm == pytest.approx(expected_xnorm, rel=1e-5)  # over all 9 images, as before


def test_l2_normalize_rows_is_sklearns_normalize():
  x = np.random.default_rng(4).normal(size=(50, 512))
  x[3] = 0.0
  np.testing.assert_array_equal(embed.l2_normalize_rows(x), sklearn.preprocessing.normalize(x))


def test_flip_changes_the_embedding_and_a_symmetric_image_is_unchanged():
  images = _random_images(4)
  apply_fn, variables = _toy(images.shape[1:])
  with_flip, _ = embed.extract_embeddings(apply_fn, variables, images, batch_size=4)
  without, _ = embed.extract_embeddings(apply_fn, variables, images, batch_size=4, flip=False)
  assert np.abs(with_flip - without).max() > 1e-2
  symmetric = np.concatenate([images[:, :, :3], images[:, :, 2::-1]], axis=2)
  with_flip, _ = embed.extract_embeddings(apply_fn, variables, symmetric, batch_size=4)
  without, _ = embed.extract_embeddings(apply_fn, variables, symmetric, batch_size=4, flip=False)
  np.testing.assert_allclose(with_flip, without, atol=1e-6)


@pytest.mark.parametrize('batch,data_devices,chunks', [
    (24, 1, 3), (44, 1, 4),  # 44 // 8 = 5 does not divide 44: 4 chunks of 11
    (13, 1, 1), (6, 1, 1), (32, 2, 2), (24, 2, 1)])
def test_apply_in_chunks_equals_the_whole_batch_and_loops_over_chunks(batch, data_devices,
                                                                       chunks):
  images = _random_images(batch, size=5).astype(np.float32)
  apply_fn, variables = _toy(images.shape[1:])
  expected = np.asarray(images.reshape(batch, -1), np.float64) @ np.asarray(
      variables['params']['Dense_0']['kernel'], np.float64) + np.asarray(
          variables['params']['Dense_0']['bias'], np.float64)
  chunked = functools.partial(chunking.apply_in_chunks, apply_fn, data_devices=data_devices)
  np.testing.assert_allclose(chunked(variables, images), expected, rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(chunked)(variables, images))
  if chunks > 1:  # lax.map traces to a scan of `chunks` steps
    assert f'length={chunks}' in jaxpr and ' scan[' in jaxpr
  else:
    assert ' scan[' not in jaxpr
  # What the embedding calls: chunks with the CPU kernels, the whole batch with XLA's.
  for kernel_set, loops in (('xla_cpu', chunks > 1), ('xla', False)):
    with kernels.use(kernel_set):
      jaxpr = str(jax.make_jaxpr(functools.partial(kernels.apply_in_chunks, apply_fn,
                                                   data_devices=data_devices))(variables, images))
    assert (' scan[' in jaxpr) == loops, kernel_set


def test_one_compilation_for_all_batches_including_the_padded_one():
  images = _random_images(11, size=5)
  model = ToyModel(6)
  apply_fn, variables = model.apply, _toy(images.shape[1:], features=6)[1]
  before = embed._raw_embeddings._cache_size()
  embed.extract_embeddings(apply_fn, variables, images, batch_size=4)  # 4 + 4 + 3 (padded)
  embed.extract_embeddings(apply_fn, variables, images[:5], batch_size=4)
  assert embed._raw_embeddings._cache_size() == before + 1
  # A fresh but equal partial (how a training loop typically passes model.apply) reuses it too.
  for _ in range(2):
    embed.extract_embeddings(functools.partial(model.apply, mutable=False), variables, images,
                             batch_size=4)
  assert embed._raw_embeddings._cache_size() == before + 2


def test_extract_embeddings_rejects_bad_images():
  apply_fn, variables = _toy((6, 6, 3))
  with pytest.raises(ValueError, match='uint8'):
    embed.extract_embeddings(apply_fn, variables, np.zeros((2, 6, 6, 3), np.float32), batch_size=2)
  with pytest.raises(ValueError, match='no images'):
    embed.extract_embeddings(apply_fn, variables, np.zeros((0, 6, 6, 3), np.uint8), batch_size=2)


_SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from jax.sharding import AxisType
    sys.path.insert(0, {tests!r})
    from test_evaluator import _random_images, _toy
    from multiface_jax.evaluation import embed, evaluator
    from multiface_jax.models.kernels import chunking

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8, 1), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    chunking.IMAGES_PER_CHUNK = 1  # batch 16: two chunks of one image per device
    images = _random_images(13)
    apply_fn, variables = _toy(images.shape[1:])
    out = {{}}
    for batch_size in (8, 16):
      out[f'emb{{batch_size}}'], out[f'xnorm{{batch_size}}'] = embed.extract_embeddings(
          apply_fn, variables, images, batch_size=batch_size, mesh=mesh)
    try:
      embed.extract_embeddings(apply_fn, variables, images, batch_size=12, mesh=mesh)
    except ValueError as e:
      out['error'] = str(e)
    fixture_apply, fixture_variables = _toy((112, 112, 3), seed=1)
    ev = evaluator.Evaluator({data_dir!r}, batch_size=8, num_spheres=2, mesh=mesh)
    results = ev.run(fixture_apply, fixture_variables, step=3)
    out['lfw_accuracy'] = results['lfw']['accuracy_mean']
    out['lfw_sphere_accuracy'] = [s['accuracy_mean'] for s in results['lfw']['spheres']]
    np.savez({out_path!r}, **out)
""")


def test_sharded_over_eight_devices_equals_one_device(tmp_path):
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  shutil.copy(FIXTURE_BIN, data_dir / 'lfw.bin')
  out_path = str(tmp_path / 'sharded.npz')
  script = _SHARDED_SCRIPT.format(tests=os.path.join(REPO, 'tests'), data_dir=str(data_dir),
                                  out_path=out_path)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-c', script], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sharded = np.load(out_path)

  images = _random_images(13)
  apply_fn, variables = _toy(images.shape[1:])
  single, single_xnorm = embed.extract_embeddings(apply_fn, variables, images, batch_size=8)
  for batch_size in (8, 16):
    np.testing.assert_allclose(sharded[f'emb{batch_size}'], single, rtol=0, atol=1e-6)
    assert float(sharded[f'xnorm{batch_size}']) == pytest.approx(single_xnorm, rel=1e-6)
  assert 'multiple of the mesh data axis' in str(sharded['error'])

  fixture_apply, fixture_variables = _toy((112, 112, 3), seed=1)
  results = evaluator.Evaluator(str(data_dir), batch_size=8, num_spheres=2).run(
      fixture_apply, fixture_variables, step=3)
  assert float(sharded['lfw_accuracy']) == results['lfw']['accuracy_mean']
  np.testing.assert_array_equal(sharded['lfw_sphere_accuracy'],
                                [s['accuracy_mean'] for s in results['lfw']['spheres']])


# --- The evaluator -------------------------------------------------------------------------------

def _jpeg(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def _make_data_dir(tmp_path, num_pairs=23):
  """lfw.bin = the repository's tiny fixture; mini.bin = 23 pairs written by save_bin."""
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  shutil.copy(FIXTURE_BIN, data_dir / 'lfw.bin')
  rng = np.random.default_rng(5)
  faces = rng.integers(0, 256, size=(num_pairs, 112, 112, 3), dtype=np.uint8)
  issame = np.arange(num_pairs) % 3 != 0
  encoded = []
  for i, same in enumerate(issame):
    partner = faces[i] // 2 + 60 if same else faces[(i + 1) % num_pairs]
    encoded += [_jpeg(faces[i]), _jpeg(partner.astype(np.uint8))]
  verification_sets.save_bin(str(data_dir / 'mini.bin'), encoded, issame)
  (data_dir / 'notes.txt').write_text('not a set')
  return data_dir


class RecordingWriter:
  def __init__(self):
    self.calls, self.flushed = [], False

  def write_scalars(self, step, scalars):
    self.calls.append((step, dict(scalars)))

  def flush(self):
    self.flushed = True


def test_evaluator_end_to_end(tmp_path, capsys):
  data_dir = _make_data_dir(tmp_path)
  apply_fn, variables = _toy((112, 112, 3), features=8, seed=2)
  ev = evaluator.Evaluator(str(data_dir), batch_size=16, num_spheres=2)
  assert ev.names == ['lfw', 'mini']
  writer = RecordingWriter()
  workdir = tmp_path / 'work'
  results = ev.run(apply_fn, variables, step=7, workdir=str(workdir), writer=writer)

  # The numbers: the protocol on independently computed embeddings and sphere slices.
  for name in ('lfw', 'mini'):
    images, issame = verification_sets.load_bin(str(data_dir / f'{name}.bin'))
    expected, expected_xnorm = _numpy_embeddings(variables, images)
    whole = protocol.evaluate(expected, issame)
    r = results[name]
    assert r['num_pairs'] == len(issame)
    assert r['accuracy_mean'] == pytest.approx(whole['accuracy_mean'], abs=1e-12)
    assert r['accuracy_std'] == pytest.approx(whole['accuracy_std'], abs=1e-12)
    assert r['best_threshold'] == pytest.approx(whole['best_threshold'], abs=1e-12)
    assert r['val'] == pytest.approx(whole['val'], abs=1e-12)
    assert r['xnorm'] == pytest.approx(expected_xnorm, rel=1e-5)
    for k, sphere in enumerate(r['spheres']):
      part = expected[:, 4 * k:4 * (k + 1)]
      alone = protocol.evaluate(part / np.linalg.norm(part, axis=1, keepdims=True), issame)
      assert sphere['accuracy_mean'] == pytest.approx(alone['accuracy_mean'], abs=1e-12)
  # mini.bin's same pairs are brightness-shifted copies: even a random projection separates most.
  assert results['mini']['accuracy_mean'] > 0.7

  # The files.
  with open(workdir / 'eval' / 'results_step7.json') as f:
    saved = json.load(f)
  assert saved['step'] == 7 and saved['num_spheres'] == 2
  assert saved['results']['mini']['accuracy_folds'] == results['mini']['accuracy_folds']
  for name in ('lfw', 'mini'):
    with Image.open(workdir / 'eval' / f'roc_{name}_step7.png') as png:
      assert png.format == 'PNG' and png.size == (600, 450)
  assert sorted(os.listdir(workdir / 'eval')) == [
      'results_step7.json', 'roc_lfw_step7.png', 'roc_mini_step7.png']

  # The scalars and the table.
  (step, scalars), = writer.calls
  assert step == 7 and writer.flushed
  assert scalars['eval/lfw/accuracy'] == results['lfw']['accuracy_mean']
  assert scalars['eval/mini/sphere2_accuracy'] == results['mini']['spheres'][1]['accuracy_mean']
  assert {'eval/mini/val', 'eval/mini/xnorm', 'eval/mini/best_threshold'} <= set(scalars)
  printed = capsys.readouterr().out
  assert printed.strip() == evaluator.format_table(results, label='step 7')
  r = results['mini']
  assert f'{100 * r["accuracy_mean"]:.2f} ± {100 * r["accuracy_std"]:.2f}' in printed


def test_format_table_layout():
  def m(mean, std):
    return {'accuracy_mean': mean, 'accuracy_std': std}

  rows = [('MobileFaceNet ArcFace', {'cplfw': m(0.8775, 0.02), 'lfw': m(0.9945, 0.003)}),
          ('N=2', {'lfw': m(0.9952, 0.0031), 'extra': m(0.5, 0.0),
                   'cplfw': m(0.8865, 0.01) | {'spheres': [m(0.99, 0.01), m(0.98, 0.02)]}})]
  assert evaluator.format_table(rows) == '\n'.join([
      '| model                 | LFW          | CPLFW        | extra        |',
      '|-----------------------|--------------|--------------|--------------|',
      '| MobileFaceNet ArcFace | 99.45 ± 0.30 | 87.75 ± 2.00 | -            |',
      '| N=2                   | 99.52 ± 0.31 | 88.65 ± 1.00 | 50.00 ± 0.00 |',
      '| N=2, sphere 1/2 alone | -            | 99.00 ± 1.00 | -            |',
      '| N=2, sphere 2/2 alone | -            | 98.00 ± 2.00 | -            |',
  ])


def test_find_verification_sets(tmp_path):
  for name in ('zeta', 'cplfw', 'lfw', 'alpha', 'agedb_30'):
    (tmp_path / f'{name}.bin').write_bytes(b'')
  (tmp_path / '.lfw.bin.123.tmp').write_bytes(b'')
  assert list(evaluator.find_verification_sets(str(tmp_path))) == [
      'lfw', 'agedb_30', 'cplfw', 'alpha', 'zeta']
  assert list(evaluator.find_verification_sets(str(tmp_path), 'cplfw, lfw')) == ['lfw', 'cplfw']
  with pytest.raises(FileNotFoundError, match=r'no cfp_fp\.bin; sets present: lfw, agedb_30'):
    evaluator.find_verification_sets(str(tmp_path), ['lfw', 'cfp_fp'])
  with pytest.raises(FileNotFoundError, match='no such folder'):
    evaluator.find_verification_sets(str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r'no verification sets \(\*\.bin\)'):
    evaluator.find_verification_sets(str(tmp_path / 'empty'))


def test_evaluator_rejects_a_corrupt_set(tmp_path):
  (tmp_path / 'lfw.bin').write_bytes(b'not a pickle at all')
  with pytest.raises(ValueError, match='lfw.bin'):
    evaluator.Evaluator(str(tmp_path), batch_size=4)


def test_evaluator_rejects_an_indivisible_sphere_count(tmp_path):
  shutil.copy(FIXTURE_BIN, tmp_path / 'lfw.bin')
  apply_fn, variables = _toy((112, 112, 3), features=8)
  ev = evaluator.Evaluator(str(tmp_path), batch_size=8, num_spheres=3)
  with pytest.raises(ValueError, match='not divisible into 3 spheres'):
    ev.run(apply_fn, variables, step=0)
