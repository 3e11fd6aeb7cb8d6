"""from_folder (image folders -> emore layout) and make_pairs (balanced .bin), round trips."""
import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from multiface_jax.data import emore
from multiface_jax.data import from_folder
from multiface_jax.data import make_pairs
from multiface_jax.data import verification_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLACK, RED, BLUE = (0, 0, 0), (220, 30, 30), (30, 30, 220)


def decode(encoded):
  return np.asarray(Image.open(io.BytesIO(encoded)).convert('RGB')).astype(int)


def textured(rng, height, width, mode='RGB'):
  """A unique smooth image (JPEG-friendly, so solid checks stay meaningful)."""
  yy, xx = np.mgrid[0:height, 0:width]
  phase = rng.uniform(0, 6, size=3)
  rgb = np.stack([127 + 100 * np.sin(xx / 7.0 + p + yy / 11.0) for p in phase], -1)
  image = Image.fromarray(rgb.astype(np.uint8))
  return image.convert(mode) if mode != 'RGB' else image


def make_root(root, identities=4, per_identity=4, seed=0):
  """identity folders of colour and gray images of odd sizes and several formats."""
  rng = np.random.default_rng(seed)
  shapes = [(50, 80), (112, 112), (130, 61), (33, 47), (20, 200)]
  for i in range(identities):
    folder = root / f'person_{i:02d}'
    folder.mkdir(parents=True)
    for j in range(per_identity):
      h, w = shapes[(i + j) % len(shapes)]
      image = textured(rng, h, w, mode='L' if (i + j) % 2 else 'RGB')
      image.save(folder / f'{j}.{("jpg", "png", "bmp")[j % 3]}')
  return root


@pytest.fixture
def photo_root(tmp_path):
  """Three identities with the awkward cases: gray, RGBA, palette, EXIF rotation, junk files."""
  root = tmp_path / 'photos'
  alice, bob, carol = (root / n for n in ('alice', 'bob', 'carol'))
  for folder in (alice, bob, carol, root / '.cache'):
    folder.mkdir(parents=True)
  wide = np.zeros((50, 80, 3), np.uint8)
  wide[:] = RED
  Image.fromarray(wide).save(alice / 'a_wide.jpg', quality=98)
  rgba = np.zeros((130, 61, 4), np.uint8)
  rgba[..., :3], rgba[..., 3] = BLUE, 255
  Image.fromarray(rgba, 'RGBA').save(alice / 'b_tall.png')
  (alice / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 cut short')
  (alice / 'notes.txt').write_text('not an image')
  Image.fromarray(np.full((112, 112), 90, np.uint8), 'L').save(bob / 'gray.png')
  Image.fromarray(np.full((33, 47), 160, np.uint8), 'L').convert('P').save(bob / 'pal.gif')
  # 80 wide x 40 high, left red, right blue; EXIF orientation 6 says "rotate 90 clockwise".
  sideways = np.zeros((40, 80, 3), np.uint8)
  sideways[:, :40], sideways[:, 40:] = RED, BLUE
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(sideways).save(carol / 'rotated.jpg', exif=exif, quality=98)
  Image.fromarray(np.full((60, 60, 3), 200, np.uint8)).save(carol / 'plain.jpg')
  return root


def test_write_emore_folder(photo_root, tmp_path):
  dst = tmp_path / 'emore'
  summary = from_folder.write_emore_folder(from_folder.list_identity_dirs(photo_root), dst)
  assert summary['names'] == ['alice', 'bob', 'carol']  # sorted, hidden folders left out
  assert summary['skipped'] == [str(photo_root / 'alice' / 'broken.jpg')]
  assert (summary['num_images'], summary['num_classes']) == (6, 3)
  assert sorted(os.listdir(dst)) == ['labels.txt', 'property', 'train.idx', 'train.rec']
  assert (dst / 'property').read_text() == '3,112,112\n'
  assert (dst / 'labels.txt').read_text() == '0\talice\n1\tbob\n2\tcarol\n'

  folder = emore.EmoreFolder(dst)
  assert folder.image_keys == range(1, 7) and folder.identity_keys == range(7, 10)
  assert [folder.identity_range(k) for k in folder.identity_keys] == [(1, 3), (3, 5), (5, 7)]
  labels, images = zip(*(folder.read_image(k) for k in folder.image_keys))
  assert labels == (0, 0, 1, 1, 2, 2)
  assert all(e.startswith(b'\xff\xd8\xff') for e in images)
  wide, tall, gray, pal, plain, rotated = (decode(e) for e in images)
  assert all(im.shape == (112, 112, 3) for im in (wide, tall, gray, pal, plain, rotated))
  # JPEG blurs colour edges, so the exact geometry is checked on load_face below.
  np.testing.assert_allclose(wide[[5, 56, 106], 56], [BLACK, RED, BLACK], atol=8)
  np.testing.assert_allclose(tall[56, [5, 56, 106]], [BLACK, BLUE, BLACK], atol=8)
  np.testing.assert_allclose(gray[56, 56], [90] * 3, atol=2)  # gray gets three equal channels
  np.testing.assert_allclose(pal[56, 56], [160] * 3, atol=3)
  np.testing.assert_allclose(plain[[0, 56, 111], [0, 56, 111]], [[200] * 3] * 3, atol=3)
  np.testing.assert_allclose(rotated[[10, 100], 56], [RED, BLUE], atol=12)


def _runs(mask):
  """(first, last) index where a boolean profile is True."""
  where = np.flatnonzero(mask)
  return int(where[0]), int(where[-1])


def test_load_face_fit_and_pad_rule(photo_root):
  load = lambda name: np.asarray(from_folder.load_face(photo_root / name)).astype(int)
  wide = load('alice/a_wide.jpg')
  assert wide.shape == (112, 112, 3)
  # 80 wide x 50 high -> 112 x 70 (longer side fills), centred: 21 black rows above and below.
  is_red = (np.abs(wide - RED) <= 3).all(-1)
  assert _runs(is_red[:, 56]) == (21, 90) and is_red[21:91].all()
  assert (wide[:21] == 0).all() and (wide[91:] == 0).all()
  # 61 x 130 RGBA -> 53 x 112, centred at column round(59 / 2) = 30; the alpha is dropped.
  tall = load('alice/b_tall.png')
  is_blue = (np.abs(tall - BLUE) <= 1).all(-1)
  assert _runs(is_blue[56]) == (30, 82) and is_blue[:, 30:83].all()
  assert (tall[:, :30] == 0).all() and (tall[:, 83:] == 0).all()
  # Smaller images are enlarged: 47 x 33 -> 112 x 79 (rows 16..94), gray -> 3 equal channels.
  pal = load('bob/pal.gif')
  assert _runs(pal[:, 56, 0] > 0) == (16, 94)
  assert (pal[16:95] == 160).all()
  # EXIF orientation 6 turns 80x40 (red | blue) upright: 40 wide x 80 high, red on top, then
  # 56 x 112 centred at column 28.
  rotated = load('carol/rotated.jpg')
  assert _runs(rotated[56].sum(-1) > 30) == (28, 83)
  np.testing.assert_allclose(rotated[[5, 50], 56], [RED, RED], atol=6)
  np.testing.assert_allclose(rotated[[62, 106], 56], [BLUE, BLUE], atol=6)
  # Already the right size: unchanged.
  assert (load('bob/gray.png') == 90).all()


def test_explicit_subset_keeps_the_given_order(photo_root, tmp_path):
  summary = from_folder.write_emore_folder(
      [photo_root / 'carol', photo_root / 'bob'], tmp_path / 'subset', image_size=64)
  assert summary['names'] == ['carol', 'bob']
  folder = emore.EmoreFolder(tmp_path / 'subset')
  assert folder.num_classes == 2 and folder.image_size == (64, 64)
  assert [folder.read_image(k)[0] for k in folder.image_keys] == [0, 0, 1, 1]
  assert decode(folder.read_image(1)[1]).shape == (64, 64, 3)


def test_refuses_to_overwrite_and_leaves_no_partial_folder(photo_root, tmp_path):
  dst = tmp_path / 'emore'
  from_folder.write_emore_folder([photo_root / 'bob'], dst)
  before = (dst / 'train.rec').read_bytes()
  with pytest.raises(FileExistsError, match='already holds train.idx, train.rec.*overwrite'):
    from_folder.write_emore_folder([photo_root / 'alice'], dst)
  # A failure half-way (an identity with no readable image) keeps the old folder intact.
  empty = photo_root / 'zed'
  empty.mkdir()
  (empty / 'junk.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(ValueError, match=r'zed \(label 1\) has no usable image'):
    from_folder.write_emore_folder([photo_root / 'bob', empty], dst, overwrite=True)
  assert (dst / 'train.rec').read_bytes() == before
  assert sorted(os.listdir(dst)) == ['labels.txt', 'property', 'train.idx', 'train.rec']
  from_folder.write_emore_folder([photo_root / 'alice'], dst, overwrite=True)
  assert emore.EmoreFolder(dst).num_images == 2


def test_list_identity_dirs_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a folder'):
    from_folder.list_identity_dirs(tmp_path / 'absent')
  with pytest.raises(ValueError, match='no sub-folders'):
    from_folder.list_identity_dirs(tmp_path)


# --- make_pairs ---------------------------------------------------------------------------------

def _identity_of_each_encoding(identity_dirs):
  """Maps the JPEG bytes make_pairs would produce for each file to its identity."""
  owner = {}
  for identity, folder in enumerate(sorted(map(str, identity_dirs))):
    for path in from_folder.list_images(folder):
      owner[from_folder.encode_jpeg(from_folder.load_face(path))] = identity
  return owner


def test_make_pairs_balanced_folds_and_true_labels(tmp_path):
  dirs = from_folder.list_identity_dirs(make_root(tmp_path / 'held_out'))
  encoded, issame = make_pairs.make_pairs(dirs, 40, seed=3)
  assert len(encoded) == 80 and len(issame) == 40
  # 10 contiguous folds of 4 pairs: 2 same then 2 different.
  np.testing.assert_array_equal(np.reshape(issame, (10, 4)), [[True, True, False, False]] * 10)
  owner = _identity_of_each_encoding(dirs)
  assert len(owner) == 16  # every source image encodes to distinct bytes
  pairs = [(encoded[2 * i], encoded[2 * i + 1]) for i in range(40)]
  for (a, b), same in zip(pairs, issame):
    assert a != b
    assert (owner[a] == owner[b]) == same
  assert len({frozenset(p) for p in pairs}) == 40  # no pair drawn twice
  # Deterministic for a seed; another seed draws other pairs.
  assert make_pairs.make_pairs(list(reversed(dirs)), 40, seed=3) == (encoded, issame)
  assert make_pairs.make_pairs(dirs, 40, seed=4)[0] != encoded


def test_make_pairs_round_trip_through_bin(tmp_path):
  dirs = from_folder.list_identity_dirs(make_root(tmp_path / 'ids', identities=3))
  encoded, issame = make_pairs.make_pairs(dirs, 20, seed=0)
  path = tmp_path / 'held_out.bin'
  verification_sets.save_bin(path, encoded, issame)
  images, loaded = verification_sets.load_bin(path)
  assert images.shape == (40, 112, 112, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(loaded, issame)
  np.testing.assert_array_equal(images[0], decode(encoded[0]))


def test_sample_pairs_exhausts_small_pools_exactly():
  # Two identities of 5 images: exactly C(5,2) * 2 = 20 same pairs exist; all must be used.
  pairs, issame = make_pairs.sample_pairs([5, 5], 40, seed=1)
  same = [p for p, s in zip(pairs, issame) if s]
  different = [p for p, s in zip(pairs, issame) if not s]
  assert len(set(same)) == 20 and len(set(different)) == 20
  assert all(a[0] == b[0] and a[1] < b[1] for a, b in same)
  assert all(a[0] != b[0] for a, b in different)


def test_all_same_takes_every_same_pair_once_and_as_many_different_ones_in_balanced_folds():
  counts = [5, 5, 4, 2]  # 10 + 10 + 6 + 1 = 27 same pairs: not a multiple of 10
  with pytest.raises(ValueError, match='allow 27 same-identity pairs'):
    make_pairs.sample_pairs(counts, make_pairs.ALL_SAME, seed=0)
  counts = [5, 5, 5, 5]  # 4 x C(5, 2) = 40 same pairs: 4 per fold
  pairs, issame = make_pairs.sample_pairs(counts, make_pairs.ALL_SAME, seed=2)
  assert len(pairs) == 80 and sum(issame) == 40
  same = [p for p, s in zip(pairs, issame) if s]
  expected = {((i, a), (i, b)) for i in range(4) for a in range(5) for b in range(a + 1, 5)}
  assert set(same) == expected and len(same) == 40  # every same pair, once
  different = [p for p, s in zip(pairs, issame) if not s]
  assert len(set(different)) == 40 and all(a[0] != b[0] for a, b in different)
  np.testing.assert_array_equal(np.reshape(issame, (10, 8)), [[True] * 4 + [False] * 4] * 10)
  assert make_pairs.sample_pairs(counts, make_pairs.ALL_SAME, seed=2) == (pairs, issame)


@pytest.mark.parametrize('counts, num_pairs, message', [
    ([3, 3], 30, 'positive multiple of 20'),
    ([3, 3], 0, 'positive multiple of 20'),
    ([9], 20, 'at least 2 identities'),
    ([2, 2, 1], 20, 'asked for 10 same-identity pairs but the identities allow only 2'),
    ([6, 1], 20, 'asked for 10 different-identity pairs but .* only 6'),
])
def test_sample_pairs_errors(counts, num_pairs, message):
  with pytest.raises(ValueError, match=message):
    make_pairs.sample_pairs(counts, num_pairs, seed=0)


def test_command_lines(tmp_path):
  root = make_root(tmp_path / 'src', identities=3, per_identity=4)
  env = dict(os.environ, PYTHONPATH=REPO)
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=120)
  done = run('multiface_jax.data.from_folder', f'--src={root}', f'--dst={tmp_path / "out"}')
  assert done.returncode == 0, done.stderr
  assert '12 images, 3 identities' in done.stdout
  assert emore.EmoreFolder(tmp_path / 'out').num_images == 12
  done = run('multiface_jax.data.make_pairs', f'--src={root}', f'--dst={tmp_path / "out/x.bin"}',
             '--pairs=20', '--seed=5')
  assert done.returncode == 0, done.stderr
  assert '20 pairs (10 same)' in done.stdout
  encoded, issame = verification_sets.read_bin(tmp_path / 'out' / 'x.bin')
  assert (encoded, issame.tolist()) == make_pairs.make_pairs(
      from_folder.list_identity_dirs(root), 20, seed=5)
  assert emore.EmoreFolder(tmp_path / 'out').verification_bins() == [str(tmp_path / 'out/x.bin')]
