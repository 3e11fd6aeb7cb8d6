"""IJB-B / IJB-C evaluation of a checkpoint.

  python -m multiface_jax.evaluation.ijb --root=/data/IJB --target=IJBC --checkpoint=runs/x \
      --out=runs/x/ijb [--num_spheres=2] [--nonorm_score] [--nodetector_score] [--noflip]

--root holds IJBC/ (or IJBB/) with meta/ and loose_crop/ as insightface distributes them. The
checkpoint records its model. Every face is embedded once and cached under --out, so a killed run
continues and another run with other switches does not embed again.
"""
import sys

from absl import app, flags

from multiface_jax import startup
from multiface_jax.inference import command_line

FLAGS = flags.FLAGS


def _define_flags() -> None:
  command_line.define_model_flags()
  flags.DEFINE_string('root', None, 'Folder holding IJBB/ and/or IJBC/ (meta/, loose_crop/).')
  flags.DEFINE_enum('target', 'IJBC', ['IJBB', 'IJBC'], 'Which benchmark.')
  flags.DEFINE_string('out', None, 'Folder for the results, the scores, the ROC and the cache.')
  flags.DEFINE_integer('num_spheres', 1, 'Also score each sphere\'s slice alone (N > 1).')
  flags.DEFINE_bool('flip', True, 'Add the mirror image\'s embedding to each face\'s.')
  flags.DEFINE_bool('norm_score', True, 'Keep each face feature\'s norm (insightface\'s "norm '
                    'score"); false L2-normalises them before pooling.')
  flags.DEFINE_bool('detector_score', True, 'Weight each face by its faceness score.')
  flags.mark_flags_as_required(['root', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  startup.prepare(tensorflow=False)
  from multiface_jax.evaluation import ijb  # pylint: disable=import-outside-toplevel
  from multiface_jax.evaluation.ijb import meta  # pylint: disable=import-outside-toplevel
  embedder = command_line.load_embedder()
  try:
    result = ijb.evaluate(embedder, FLAGS.root, FLAGS.target, FLAGS.out,
                          num_spheres=FLAGS.num_spheres, flip=FLAGS.flip,
                          norm_score=FLAGS.norm_score, detector_score=FLAGS.detector_score)
  except (meta.IJBError, OSError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(f'\n{FLAGS.target}: {result["faces"]} faces, {result["templates"]} templates, '
        f'{result["pairs"]} pairs; TAR (%) at FAR:')
  print(result['table'])
  print(f'\nresults: {FLAGS.out}/{FLAGS.target}_results.json, scores and ROC beside it')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
