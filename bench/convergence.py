"""The MultiFace paper's claim, measured: do N > 1 spheres converge faster than one?

  .venv/bin/python bench/convergence.py                       # the demo's data (its 4th split)
  .venv/bin/python bench/convergence.py --data_dir=DIR        # any converted folder with a .bin

Trains N = 1, 2 and 4 spheres (ArcFace and CosFace; the same 512-d embedding, margin, scale,
steps, schedule and data order) for several seeds from configs/demo_orl.py, records the training loss and
accuracy of every step and the held-out verification accuracy every --eval_every steps, and
writes one PNG (mean over seeds, shaded min to max) and a table: steps until the training
accuracy first reaches 50%, 80% and 90% (averaged over 5 steps) and the final held-out accuracy. With several
spheres the loss and accuracy are each sphere's, averaged over the spheres (the summed loss of N
spheres is N times larger by construction).

By default the data is the demo's 4th split: trained on ORL people s1-s30, held-out pairs of
s31-s40 (prepared as `python -m multiface_jax.demo` prepares it).
"""
import argparse
import functools
import json
import os
import sys
import time

from multiface_jax import cpu_tuning

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's import-time notices
cpu_tuning.configure()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from multiface_jax.evaluation import evaluator as evaluator_lib  # noqa: E402
from multiface_jax.training import sharding, trainer as trainer_lib  # noqa: E402

TARGETS = (0.5, 0.8, 0.9)
SMOOTHING = 5


def train_one(config, eval_every: int) -> dict:
  """One run: per-step loss and accuracy (means over spheres), held-out accuracy at checkpoints."""
  run = trainer_lib.Trainer(config)
  state = run.fresh_state()
  batches = run.input_iter(0)
  evaluator = None
  if not config.synthetic_data or config.data_dir:
    evaluator = evaluator_lib.Evaluator(config.data_dir, batch_size=config.eval_batch_size,
                                        num_spheres=config.head.num_spheres)
  apply_fn = functools.partial(run.model.apply, train=False)
  record = {'loss': [], 'accuracy': [], 'eval_steps': [], 'heldout': []}
  for step in range(1, run.plan.total_steps + 1):
    state, metrics = run.train_step(state, sharding.make_global_batch(run.mesh, next(batches)))
    metrics = jax.device_get(metrics)
    record['loss'].append(float(np.mean(metrics['loss_per_sphere'])))
    record['accuracy'].append(float(np.mean(metrics['accuracy_per_sphere'])))
    if evaluator is not None and (step % eval_every == 0 or step == run.plan.total_steps):
      variables = {'params': state.params['backbone'], 'batch_stats': state.batch_stats}
      results = evaluator.run(apply_fn, variables, step=step, report=False)
      record['eval_steps'].append(step)
      record['heldout'].append(float(np.mean([r['accuracy_mean'] for r in results.values()])))
  return record


def steps_to(accuracy: list[float], target: float) -> int | None:
  """The first step at which the mean accuracy of the last SMOOTHING steps reaches `target`."""
  smooth = np.convolve(accuracy, np.ones(SMOOTHING) / SMOOTHING, mode='valid')
  reached = np.flatnonzero(smooth >= target)
  return int(reached[0] + SMOOTHING) if reached.size else None


def summarize(runs: dict) -> list[dict]:
  """One row per (kind, N): steps to the target and final held-out accuracy over seeds."""
  rows = []
  for key in sorted({(r['kind'], r['spheres']) for r in runs.values()}):
    group = [r for r in runs.values() if (r['kind'], r['spheres']) == key]
    final = [r['heldout'][-1] for r in group if r['heldout']]
    rows.append({'kind': key[0], 'spheres': key[1], 'seeds': len(group), 'final_heldout': final,
                 'steps_to': {t: [steps_to(r['accuracy'], t) for r in group] for t in TARGETS}})
  return rows


def format_rows(rows: list[dict]) -> str:
  def stats(values, scale=1.0, digits=1):
    known = [v * scale for v in values if v is not None]
    if not known:
      return 'not reached'
    text = f'{np.mean(known):.{digits}f} ± {np.std(known):.{digits}f}'
    return text + (f' ({len(values) - len(known)} never)' if len(known) < len(values) else '')
  targets = ' | '.join(f'{100 * t:.0f}%' for t in TARGETS)
  lines = [f'| head | N | seeds | steps to training accuracy {targets} | final held-out accuracy '
           '(%) |', '|---|---|---|' + '---|' * len(TARGETS) + '---|']
  for r in rows:
    steps = ' | '.join(stats(r['steps_to'][t]) for t in TARGETS)
    lines.append(f'| {r["kind"]} | {r["spheres"]} | {r["seeds"]} | {steps} '
                 f'| {stats(r["final_heldout"], 100, 2)} |')
  return '\n'.join(lines)


def plot(runs: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  kinds = sorted({r['kind'] for r in runs.values()})
  fig, panels = plt.subplots(len(kinds), 3, figsize=(14, 4 * len(kinds)), dpi=90, squeeze=False)
  for row, kind in zip(panels, kinds):
    for color, n in enumerate(sorted({r['spheres'] for r in runs.values()})):
      group = [r for r in runs.values() if (r['kind'], r['spheres']) == (kind, n)]
      if not group:
        continue
      for panel, key, x_key in ((row[0], 'loss', None), (row[1], 'accuracy', None),
                                (row[2], 'heldout', 'eval_steps')):
        values = np.array([r[key] for r in group])
        if values.size == 0 or values.shape[1] == 0:
          continue
        x = np.array(group[0][x_key]) if x_key else np.arange(1, values.shape[1] + 1)
        panel.plot(x, values.mean(0), color=f'C{color}', label=f'N = {n}',
                   marker='o' if x_key else None)
        panel.fill_between(x, values.min(0), values.max(0), color=f'C{color}', alpha=0.2)
    for panel, title in zip(row, ('training loss (per sphere)', 'training accuracy (per sphere)',
                                  'held-out verification accuracy')):
      panel.set_title(f'{kind}: {title}', fontsize=10)
      panel.set_xlabel('step')
      panel.grid(True, alpha=0.3)
      if panel.lines:
        panel.legend(fontsize=8)
    for target in TARGETS:
      row[1].axhline(target, color='gray', lw=0.8, ls=':')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def default_data_dir(workdir: str) -> str:
  """The demo's 4th split (train s1-s30, held-out s31-s40), prepared if needed."""
  from multiface_jax.data import orl  # pylint: disable=import-outside-toplevel
  data_root = workdir + '_data'
  faces = orl.stage_faces(orl.find_faces(), os.path.join(data_root, 'orl_faces'))
  return orl.prepare_split(faces, data_root, orl.identity_splits(4)[3], align=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='runs/convergence')
  parser.add_argument('--data_dir', default='', help='a converted folder (default: the demo\'s)')
  parser.add_argument('--kinds', default='arcface,cosface')
  parser.add_argument('--spheres', default='1,2,4')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--eval_every', type=int, default=10)
  parser.add_argument('--set', action='append', default=[],
                      help='a config override FIELD=VALUE (Python literal), repeatable')
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
  from configs import demo_orl  # pylint: disable=import-outside-toplevel
  import ast  # pylint: disable=import-outside-toplevel
  overrides = {}
  for item in args.set:
    field, value = item.split('=', 1)
    try:
      overrides[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[field] = value
  os.makedirs(args.workdir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', os.path.join(args.workdir, 'jax_cache'))
  probe = demo_orl.get_config()
  probe.update_from_flattened_dict(overrides)
  data_dir = args.data_dir or ('' if probe.synthetic_data else default_data_dir(args.workdir))
  path = os.path.join(args.workdir, 'convergence.json')
  runs = {}
  if os.path.exists(path):
    with open(path) as f:
      runs = json.load(f)
  for kind in args.kinds.split(','):
    for n in map(int, args.spheres.split(',')):
      for seed in map(int, args.seeds.split(',')):
        name = f'{kind}_n{n}_seed{seed}'
        if name in runs:
          continue
        config = demo_orl.get_config()
        config.update_from_flattened_dict({**overrides, 'data_dir': data_dir, 'seed': seed,
                                           'head.kind': kind, 'head.num_spheres': n})
        start = time.perf_counter()
        record = train_one(config, args.eval_every)
        runs[name] = {'kind': kind, 'spheres': n, 'seed': seed, 'margin': config.head.margin,
                      'seconds': time.perf_counter() - start, **record}
        final = f', held-out {100 * record["heldout"][-1]:.2f}%' if record['heldout'] else ''
        print(f'{name}: {len(record["loss"])} steps in {runs[name]["seconds"]:.0f} s, final '
              f'training accuracy {100 * record["accuracy"][-1]:.1f}%{final}', flush=True)
        with open(path + '.tmp', 'w') as f:
          json.dump(runs, f)
        os.replace(path + '.tmp', path)
  png = os.path.join(args.workdir, 'convergence.png')
  plot(runs, png)
  print(f'\ndata: {data_dir or "synthetic"}; runs: {path}; plot: {png}')
  print(format_rows(summarize(runs)))


if __name__ == '__main__':
  main()
