"""The flags and the loading shared by the photo commands (``embed``, ``verify``, ``export``)."""
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_model_flags() -> None:
  """--checkpoint (required), --config, --batch_size: shared by the photo commands."""
  flags.DEFINE_string('checkpoint', None, 'A run folder, a step folder or imported weights.')
  config_flags.DEFINE_config_file('config', None, 'Optional config file whose model fields '
                                  "override the checkpoint's record (for weights that do not "
                                  'record their model).', lock_config=True)
  flags.DEFINE_integer('batch_size', 64, 'Faces per call of the network.')
  flags.mark_flag_as_required('checkpoint')


def load_embedder(detector=None):
  """The FaceEmbedder of --checkpoint (and --config); exits with the reason when it cannot."""
  from multiface_jax.inference import embedder, loading  # pylint: disable=import-outside-toplevel
  record = None
  try:
    if FLAGS.config is not None:
      record = loading.record_from_config(FLAGS.config)
    return embedder.FaceEmbedder.from_checkpoint(FLAGS.checkpoint, record,
                                                 batch_size=FLAGS.batch_size, detector=detector)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
