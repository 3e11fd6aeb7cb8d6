"""bench/convergence.py (the paper's N > 1 claim, measured): its arithmetic and a short run."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'bench', 'convergence.py')


def _module():
  spec = importlib.util.spec_from_file_location('convergence', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_steps_to_target_uses_the_mean_of_the_last_five_steps():
  convergence = _module()
  # Means of steps 1-5, 2-6, ...: 0.5, 0.7, 0.86, 0.9 -> the 4th window ends at step 8.
  accuracy = [0.5, 0.5, 0.5, 0.5, 0.5, 1.5, 1.3, 0.7, 0.0]
  assert convergence.steps_to(accuracy, 0.9) == 8
  assert convergence.steps_to([0.95] * 4, 0.9) is None  # fewer steps than the window
  runs = {f'arcface_n{n}_seed{s}': {'kind': 'arcface', 'spheres': n, 'seed': s,
                                    'accuracy': [0.0] * (3 + n + s) + [1.0] * 6,
                                    'heldout': [0.8 + s / 10]}
          for n in (1, 2) for s in (0, 1)}  # the first all-correct window ends at 8 + n + s
  rows = convergence.summarize(runs)
  assert [(r['spheres'], r['steps_to'][0.9]) for r in rows] == [(1, [9, 10]), (2, [10, 11])]
  # 50%: the first window with 3 of 5 correct steps ends at 6 + n + s.
  assert [r['steps_to'][0.5] for r in rows] == [[7, 8], [8, 9]]
  np.testing.assert_allclose(rows[0]['final_heldout'], [0.8, 0.9])
  assert ('| arcface | 1 | 2 | 7.5 ± 0.5 | 8.5 ± 0.5 | 9.5 ± 0.5 | 85.00 ± 5.00 |'
          in convergence.format_rows(rows))


def test_a_short_run_on_synthetic_data_writes_the_runs_the_plot_and_the_table(tmp_path):
  command = [sys.executable, SCRIPT, f'--workdir={tmp_path}', '--kinds=arcface,cosface',
             '--spheres=1,2', '--seeds=0', '--set', 'model.name=tiny', '--set',
             'synthetic_data=True', '--set', 'num_train_steps=3', '--set', 'batch_size=8',
             '--set', 'num_classes=16', '--set', 'num_train_images=64']
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(tmp_path / 'convergence.json') as f:
    runs = json.load(f)
  assert sorted(runs) == ['arcface_n1_seed0', 'arcface_n2_seed0', 'cosface_n1_seed0',
                          'cosface_n2_seed0']
  for run in runs.values():
    assert len(run['loss']) == len(run['accuracy']) == 3
    assert all(np.isfinite(run['loss'])) and run['loss'][0] > 0
  assert runs['cosface_n2_seed0']['loss'] != runs['arcface_n2_seed0']['loss']
  assert (tmp_path / 'convergence.png').stat().st_size > 10_000
  assert '| cosface | 2 | 1 | not reached | not reached | not reached | not reached |' in out.stdout
