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

cpu_tuning.configure()

# pylint: disable=wrong-import-position
from multiface_jax import demo  # noqa: E402

AUGMENT = {'augment.shift': 0.08, 'augment.zoom': 0.1, 'augment.rotate': 10.0,
           'augment.brightness': 0.1, 'augment.contrast': 0.2}
# name -> overrides of configs/demo_orl.py's fields.
CANDIDATES = {
    'flip_only': {'augment.shift': 0.0, 'augment.zoom': 0.0, 'augment.rotate': 0.0,
                  'augment.brightness': 0.0, 'augment.contrast': 0.0},
    'augment': AUGMENT,
    'augment_strong': {'augment.shift': 0.12, 'augment.zoom': 0.15, 'augment.rotate': 15.0,
                       'augment.brightness': 0.2, 'augment.contrast': 0.3},
    'augment_s64': {**AUGMENT, 'head.scale': 64.0},
    'augment_wd5e-3': {**AUGMENT, 'optimizer.weight_decay_backbone': 5e-3},
    'augment_lr0.05': {**AUGMENT, 'optimizer.lr': 0.05},
    'augment_m0.5': {**AUGMENT, 'head.margin': 0.5},
    'augment_cosface': {**AUGMENT, 'head.kind': 'cosface', 'head.margin': 0.35},
}


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
    over = demo._over_splits(results, demo.TRAINED)  # pylint: disable=protected-access
    scores[name] = {'overrides': overrides, 'splits': splits, 'seconds': time.perf_counter() - start,
                    **{k: over[k] for k in ('accuracy_mean', 'accuracy_std', 'per_split')},
                    'raw_pixels': demo._over_splits(results, 'raw pixels')['accuracy_mean'],
                    'fisherfaces': [demo._over_splits(results, label)['accuracy_mean']
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
