"""Are two photos the same person? Their similarity, and the decision at a named threshold.

  python -m multiface_jax.verify --checkpoint=runs/mfn_arcface_n2 A.jpg B.jpg [--threshold=0.45]
  python -m multiface_jax.verify --checkpoint=runs/mfn_arcface_n2 --threshold_set=lfw A.jpg B.jpg

The largest face of each photo is detected, aligned and embedded with flip TTA (--aligned: the
photos are 112x112 crops); the similarity is the cosine of the two embeddings. "Same" when it is
above the threshold: --threshold (a cosine), or the best threshold the evaluator stored for this
checkpoint on the verification set --threshold_set (the protocol's threshold t on the squared
distance of unit embeddings is the cosine 1 - t/2); by default the first set evaluated for it.
"""
import sys

from absl import app, flags

from multiface_jax import startup
from multiface_jax.inference import command_line, loading

FLAGS = flags.FLAGS


def _define_flags() -> None:
  command_line.define_model_flags()
  flags.DEFINE_float('threshold', None, 'Cosine similarity above which the faces are the same.')
  flags.DEFINE_string('threshold_set', None, 'Use the best threshold the evaluator found for '
                      'this checkpoint on this verification set (e.g. lfw).')
  flags.DEFINE_bool('aligned', False, 'The photos are aligned 112x112 crops: no detection.')


def threshold_of(checkpoint_path: str, step: int) -> tuple[float, str]:
  """The cosine threshold to decide with, and a sentence saying where it comes from."""
  if FLAGS.threshold is not None:
    if FLAGS.threshold_set:
      raise app.UsageError('Pass --threshold or --threshold_set, not both.')
    return FLAGS.threshold, f'--threshold={FLAGS.threshold}'
  path, thresholds = loading.evaluated_thresholds(checkpoint_path, step)
  if not thresholds:
    sys.exit(f'error: no evaluation results for {checkpoint_path} (step {step}); pass '
             '--threshold=COSINE, or evaluate it first (main.py --mode=eval).')
  name = FLAGS.threshold_set or next(iter(thresholds))
  if name not in thresholds:
    sys.exit(f'error: {path} has no set {name!r}; it has {", ".join(thresholds)}.')
  distance = thresholds[name]
  return 1 - distance / 2, (f'the best threshold on {name} (squared distance {distance:.4f}), '
                            f'from {path}')


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('Give two photos: python -m multiface_jax.verify --checkpoint=DIR A B')
  startup.prepare(tensorflow=False)
  from multiface_jax.inference import embedder as embedder_lib  # pylint: disable=import-outside-toplevel
  from multiface_jax.inference import images  # pylint: disable=import-outside-toplevel
  photos = argv[1:]
  try:
    pictures = [images.read_rgb(path) for path in photos]
  except (OSError, ValueError) as e:
    sys.exit(f'error: {e}')
  embedder = command_line.load_embedder()
  threshold, source = threshold_of(embedder.backbone.path, embedder.backbone.step)
  embeddings = []
  for path, picture in zip(photos, pictures):
    if FLAGS.aligned:
      if picture.shape != (112, 112, 3):
        sys.exit(f'error: {path}: --aligned needs a 112x112 crop, this is {picture.shape[1]}x'
                 f'{picture.shape[0]}.')
      embeddings.append(embedder.embed_aligned(picture[None])[0])
      continue
    faces = embedder.embed_photo(picture, path)
    if not faces:
      sys.exit(f'error: {path}: no face found.')
    face = faces[0].face
    print(f'{path}: face at x={face.box[0]:.0f} y={face.box[1]:.0f} {face.box[2]:.0f}x'
          f'{face.box[3]:.0f} (score {face.score:.2f})')
    embeddings.append(faces[0].embedding)
  similarity = embedder_lib.cosine_similarity(*embeddings)
  same = similarity > threshold
  print(f'similarity {similarity:.4f}: {"SAME person" if same else "DIFFERENT people"} at '
        f'threshold {threshold:.4f} ({source})')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
