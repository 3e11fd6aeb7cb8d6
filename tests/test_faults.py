"""Kill a training run, rerun the same command: it resumes from the newest complete checkpoint
and ends bit-identical to an uninterrupted run. The short, deterministic version of
bench/faults.py (whose campaign kills at random moments): the tiny config on the converted emore
fixture, 12 steps accumulating gradients over 2, checkpoints every 3 steps, evaluation every 5,
through main.py; each kill is sent by the run to itself at a chosen point: SIGKILL while a
checkpoint is committed, SIGTERM during an evaluation.
"""
import importlib.util
import os
import random

import pytest

import train_testlib as lib

_spec = importlib.util.spec_from_file_location('faults', os.path.join(lib.REPO, 'bench',
                                                                      'faults.py'))
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(folder, compilation cache, the uninterrupted reference run)."""
  root = tmp_path_factory.mktemp('faults')
  flags = faults.prepare_config('tiny', str(root / 'data'))
  cache = str(root / 'jax_cache')
  # No warm-up run: the trials' runs take the reference's programs from the cache, so a cached
  # executable that computed otherwise would fail them.
  return str(root), cache, faults.run_reference(flags, os.path.join(root, 'tiny'), cache,
                                                warm_up=False)


def _trial(tiny, index, sig, inject):
  root, cache, reference = tiny
  return faults.run_trial('tiny', reference, os.path.join(root, 'tiny'), cache,
                          random.Random(index), index, sig=sig, target='injected', inject=inject)


def test_reference_run_checkpoints_evaluates_and_commits_as_the_trials_assume(tiny):
  _, _, reference = tiny
  assert reference.steps == 12 and reference.save_steps == [3, 6, 9, 12]
  assert reference.eval_steps == [5, 10, 12]
  assert int(reference.state["['step']"]) == 12


def test_sigkill_while_a_checkpoint_is_committed_leaves_it_unused(tiny):
  """SIGKILL when checkpoint 6 is completely written but not yet renamed into place: its
  temporary folder stays on disk, the rerun resumes from step 3 and ends bit-identical."""
  trial = _trial(tiny, 0, 'KILL', 'kill_at_commit:6')
  assert trial.problem == '', trial
  assert trial.finalized == [3] and len(trial.half_written) == 1
  assert trial.half_written[0].startswith('6.orbax-checkpoint-tmp'), trial.half_written
  assert trial.resumed_at == 3 and trial.resume_ok and trial.identical


def test_sigterm_during_an_evaluation_saves_the_step_and_resumes_bit_identical(tiny):
  """SIGTERM as the evaluation of step 5 starts (mid accumulation cycle, mid epoch): the run
  finishes the evaluation, saves step 5, exits cleanly; the rerun resumes there."""
  trial = _trial(tiny, 1, 'TERM', 'term_at_eval:5')
  assert trial.problem == '', trial
  assert trial.finalized == [3, 5] and not trial.half_written
  assert trial.resumed_at == 5 and trial.identical
