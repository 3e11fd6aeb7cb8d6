"""Embeds every face of a folder of photos: detect, align, embed.

  python -m multiface_jax.embed --checkpoint=runs/mfn_arcface_n2 --src=PHOTOS --out=faces.npz [--all_faces]

--checkpoint is any checkpoint of the project (a run folder, a step folder, imported weights); it
records its model. Every image under --src (searched recursively) is read upright as RGB, its
largest face (or, with --all_faces, every face) found by YuNet or listed in --landmarks, aligned
to 112x112 and embedded with flip TTA. --aligned takes the images as aligned 112x112 crops.

The .npz holds, one row per face: `names` (the file, relative to --src), `face_index`, `boxes`
(x, y, w, h), `landmarks` (5, 2), `scores`, `embeddings` (unit float32); `skipped` lists
"file: reason" for every image without a face or that cannot be read (also printed), and
`model_record` the checkpoint's model as JSON.
"""
import json
import os
import sys

import numpy as np
from absl import app, flags

from multiface_jax import startup
from multiface_jax.inference import command_line

FLAGS = flags.FLAGS

# Faces embedded per device call of the network, and gathered before each call.
_FACES_PER_CHUNK = 256


def _define_flags() -> None:
  command_line.define_model_flags()
  flags.DEFINE_string('src', None, 'A photo, or a folder of photos (searched recursively).')
  flags.DEFINE_string('out', None, 'The .npz to write.')
  flags.DEFINE_bool('all_faces', False, 'Keep every face of a photo, not only the largest.')
  flags.DEFINE_bool('aligned', False, 'The images are aligned 112x112 crops: no detection.')
  flags.DEFINE_string('landmarks', None, 'Landmarks per image instead of the detector: lines '
                      '"name x1 y1 ... x5 y5 [score]" (IJB 5-point lists) or a CSV.')
  flags.mark_flags_as_required(['src', 'out'])


def embed_folder(embedder, paths, root, *, aligned=False, all_faces=False, progress=True):
  """Rows of the output for `paths` (relative names to `root`) and the skipped files."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from multiface_jax.inference import images  # pylint: disable=import-outside-toplevel
  rows = {key: [] for key in ('names', 'face_index', 'boxes', 'landmarks', 'scores')}
  crops, embeddings, skipped = [], [], []

  def flush():
    if crops:
      embeddings.append(embedder.embed_aligned(np.stack(crops)))
      crops.clear()

  for path in tqdm(paths, desc='embedding', unit='img', disable=not progress):
    name = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    try:
      image = images.read_rgb(path)
    except (OSError, ValueError) as e:  # the message names the file
      skipped.append(str(e))
      continue
    if aligned:
      if image.shape != (112, 112, 3):
        skipped.append(f'{path}: --aligned needs 112x112 crops, this is {image.shape[1]}x'
                       f'{image.shape[0]}')
        continue
      faces = [(None, image)]
    else:
      faces = embedder.detect_and_align(image, name, all_faces=all_faces)
      if not faces:
        skipped.append(f'{path}: no face found')
        continue
    for index, (face, crop) in enumerate(faces):
      rows['names'].append(name)
      rows['face_index'].append(index)
      rows['boxes'].append(face.box if face else [0, 0, 112, 112])
      rows['landmarks'].append(face.landmarks if face else np.full((5, 2), np.nan))
      rows['scores'].append(face.score if face else 1.0)
      crops.append(crop)
    if len(crops) >= _FACES_PER_CHUNK:
      flush()
  flush()
  dim = embedder.embedding_size
  out = {'names': np.array(rows['names'], dtype=str),
         'face_index': np.array(rows['face_index'], np.int32),
         'boxes': np.array(rows['boxes'], np.float32).reshape(-1, 4),
         'landmarks': np.array(rows['landmarks'], np.float32).reshape(-1, 5, 2),
         'scores': np.array(rows['scores'], np.float32),
         'embeddings': np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)}
  return out, skipped


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  startup.prepare(tensorflow=False)
  from multiface_jax.inference import detect, images  # pylint: disable=import-outside-toplevel
  try:
    paths = images.list_images(FLAGS.src)
    detector = detect.LandmarkList(FLAGS.landmarks) if FLAGS.landmarks else None
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  if not paths:
    sys.exit(f'error: {FLAGS.src} holds no image files.')
  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  if not os.path.isdir(out_dir):
    sys.exit(f'error: {out_dir}: the folder of --out does not exist.')
  embedder = command_line.load_embedder(detector)
  print(f'{len(paths)} image(s) under {FLAGS.src}; {embedder.backbone.record["model"]} from '
        f'{embedder.backbone.path} (step {embedder.backbone.step})', flush=True)
  out, skipped = embed_folder(embedder, paths, FLAGS.src, aligned=FLAGS.aligned,
                              all_faces=FLAGS.all_faces)
  for line in skipped:
    print(f'skipped {line}', flush=True)
  np.savez(FLAGS.out, **out, skipped=np.array(skipped, dtype=str),
           model_record=json.dumps(embedder.backbone.record))
  print(f'{len(out["names"])} face(s) of {len(paths) - len(skipped)} image(s) -> {FLAGS.out}'
        f' ({len(skipped)} skipped)', flush=True)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
