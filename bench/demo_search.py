"""How the demo's training settings were chosen: candidates scored on validation people only.

  .venv/bin/python bench/demo_search.py [--splits=1,2,3,4] [--candidates=base,aug,...]

Each split of the demo sets 10 of its 30 training people aside (`demo --validation_identities=10`),
trains every candidate on the other 20 and scores it on pairs of those 10; the held-out people of
the split are never read. Prints validation accuracy per candidate (mean +- std over the splits
run, and per split) and writes `{workdir}/search.json`. The winner's settings go into
configs/demo_orl.py.
"""
import argparse
import json
import os
import sys
import time

from multiface_jax import cpu_tuning

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's import-time notices
cpu_tuning.configure()

# pylint: disable=wrong-import-position
from multiface_jax import demo  # noqa: E402

AUGMENT = {'augment.shift': 0.08, 'augment.zoom': 0.1, 'augment.rotate': 10.0,
           'augment.brightness': 0.1, 'augment.contrast': 0.2}
LIGHT = {'augment.shift': 0.04, 'augment.zoom': 0.05, 'augment.rotate': 5.0,
         'augment.brightness': 0.05, 'augment.contrast': 0.1}
NO_AUGMENT = {key: 0.0 for key in AUGMENT}
# name -> overrides of configs/demo_orl.py's fields.
CANDIDATES = {
    'flip_only': {**NO_AUGMENT, 'model.options.width': 1.0, 'num_epochs': 10.0},
    'augment': {**AUGMENT, 'model.options.width': 1.0, 'num_epochs': 10.0},
    'augment_light': {**LIGHT, 'model.options.width': 1.0, 'num_epochs': 10.0},
    'augment_20ep': {**AUGMENT, 'model.options.width': 1.0, 'num_epochs': 20.0},
    'augment_w0.5': {**AUGMENT, 'model.options.width': 0.5, 'num_epochs': 10.0},
    'augment_w0.5_20ep': {**AUGMENT, 'model.options.width': 0.5, 'num_epochs': 20.0},
    'light_b25': {**LIGHT, 'model.options.width': 1.0, 'num_epochs': 10.0, 'batch_size': 25},
    'augment_b25': {**AUGMENT, 'model.options.width': 1.0, 'num_epochs': 10.0, 'batch_size': 25},
    'light_b25_lr0.2': {**LIGHT, 'model.options.width': 1.0, 'num_epochs': 10.0,
                        'batch_size': 25, 'optimizer.lr': 0.2},
    'light_b25_w0.5_20ep': {**LIGHT, 'model.options.width': 0.5, 'num_epochs': 20.0,
                            'batch_size': 25},
    # Within the demo's time (four splits in a few minutes on 2 cores): about 2,400 images of
    # training per split at width 1, 4,500 at width 0.5.
    'light_b25_8ep': {**LIGHT, 'model.options.width': 1.0, 'num_epochs': 8.0, 'batch_size': 25},
    'light_b25_w0.5_15ep': {**LIGHT, 'model.options.width': 0.5, 'num_epochs': 15.0,
                            'batch_size': 25},
    'augment_b25_w0.5_15ep': {**AUGMENT, 'model.options.width': 0.5, 'num_epochs': 15.0,
                              'batch_size': 25},
    'light_b25_lr0.2_w0.5_15ep': {**LIGHT, 'model.options.width': 0.5, 'num_epochs': 15.0,
                                  'batch_size': 25, 'optimizer.lr': 0.2},
}
# The base settings of configs/demo_orl.py, checked again around the best of the above.
BEST = CANDIDATES['light_b25_lr0.2_w0.5_15ep']
CANDIDATES.update({
    'best_s64': {**BEST, 'head.scale': 64.0},
    'best_wd4e-5': {**BEST, 'optimizer.weight_decay_backbone': 4e-5},
    'best_n1': {**BEST, 'head.num_spheres': 1},
})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='runs/demo_search')
  parser.add_argument('--splits', default='1,2')
  parser.add_argument('--candidates', default=','.join(CANDIDATES))
  parser.add_argument('--set', default='', help='numeric overrides for every candidate: a.b=1,c=2')
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
  from configs import demo_orl  # pylint: disable=import-outside-toplevel
  common = dict(item.split('=', 1) for item in args.set.split(',') if item)
  splits = [int(s) for s in args.splits.split(',')]
  path = os.path.join(args.workdir, 'search.json')
  scores = json.load(open(path)) if os.path.exists(path) else {}
  for name in args.candidates.split(','):
    config = demo_orl.get_config()
    overrides = {**CANDIDATES[name], **{k: _field(config, k)(v) for k, v in common.items()}}
    config.update_from_flattened_dict(overrides)
    start = time.perf_counter()
    results = demo.run_demo(config, os.path.join(args.workdir, name),
                            data_root=os.path.join(args.workdir + '_data'), splits=splits,
                            validation_identities=10, with_sface=False)
    over = demo.over_splits(results, demo.TRAINED)
    scores[name] = {'overrides': overrides, 'splits': splits, 'seconds': time.perf_counter() - start,
                    **{k: over[k] for k in ('accuracy_mean', 'accuracy_std', 'per_split')},
                    'raw_pixels': demo.over_splits(results, 'raw pixels')['accuracy_mean'],
                    'fisherfaces': [demo.over_splits(results, label)['accuracy_mean']
                                    for label in results[0].summaries
                                    if label.startswith('Fisher')][0]}
    os.makedirs(args.workdir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(scores, f, indent=2)
  print('\nvalidation accuracy (%; 10 validation people per split, mean +- std over splits):')
  for name, s in sorted(scores.items(), key=lambda kv: -kv[1]['accuracy_mean']):
    per_split = ' '.join(f'{100 * a:.2f}' for a in s['per_split'])
    print(f'{name:<18} {100 * s["accuracy_mean"]:6.2f} +- {100 * s["accuracy_std"]:5.2f} '
          f'[{per_split}]  (raw {100 * s["raw_pixels"]:.2f}, Fisherfaces '
          f'{100 * s["fisherfaces"]:.2f}; {s["seconds"]:.0f} s)')


def _field(config, dotted):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return type(value)


if __name__ == '__main__':
  main()
