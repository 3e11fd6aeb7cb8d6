"""Kill anywhere: kill -9 / kill -TERM training runs at random moments, rerun them, compare bits.

  .venv/bin/python bench/faults.py --trials=60 --configs=tiny,demo --seed=0 --workdir=/tmp/faults

Each config first trains once without interruption (the reference). Every trial then starts the
same command in a fresh workdir, kills it (``SIGKILL`` or ``SIGTERM``) at a seeded random moment,
reruns the very same command in the same workdir until it finishes, and checks that

- the rerun resumed from the newest *complete* checkpoint on disk at the kill (``Resumed ... at
  step N`` with N = the largest finalized step folder; a fresh start when there was none), never
  from a half-written one (Orbax's ``N.orbax-checkpoint-tmp-*`` folders);
- the final train state (params, batch_stats, optimizer state, rng, step) is bit-identical to the
  reference's (CPU, 1 device, the same command).

Kill moments (``target``): a random time after the start; a random moment inside a chosen train
step, evaluation or checkpoint save (found through phase markers, below); and, for SIGKILL,
``commit``: the process kills itself when a chosen checkpoint is fully written but not yet renamed
into place (the last instant a half-written checkpoint exists). Where each kill landed is read
from the markers at the moment of the signal, and whether a half-written step folder was left on
disk from the folder itself.

The runs are ``main.py`` started through this file's ``child`` mode, which wraps (never changes)
the library to append phase markers to a file: ``step_begin/step_end N`` around the jitted step,
``save_begin/save_end N`` around ``checkpointing.save`` (the synchronous part),
``commit_begin/commit_end N`` around Orbax's rename of the finished step folder (the end of the
asynchronous write), ``eval_begin/eval_end N`` around the evaluator. The reference run goes
through the same wrapper. The runs share a persistent JAX compilation cache (in ``--workdir``):
the reference is run twice, from a cold cache and from the filled one, and the two must end
bit-identical, so the trials' cached executables compute what freshly compiled ones do.

Configs: ``tiny`` = configs/tiny.py on the emore fixture (tests/data/emore, converted to 2
TFRecord shards), 12 steps with gradient accumulation 2, checkpoints every 3 steps (so most land
mid accumulation cycle and mid epoch), evaluation every 5 steps on its pairs20.bin. ``demo`` =
configs/demo_orl.py (MobileFaceNet on the ORL faces: the demo's split that trains on s1-s30,
unaligned), cut to 8 steps, checkpoints every 3 steps, no evaluation during training (as the
demo).

The table has one line per config and a total: trials, signals sent, where they landed
(``startup`` = before the first step; ``write in flight`` = a checkpoint was being written in the
background, whatever else ran; ``between`` = in the loop outside a step, save or evaluation;
``after end`` = the run had finished), trials that left a half-written step folder (``tmp
left``), reruns that resumed or started fresh, reruns that resumed from the newest complete
checkpoint (``resume ok``), bit-identical final states, and failures (their logs are kept).

  python bench/faults.py child MARKERS INJECT CACHE_DIR -- MAIN_PY_FLAGS...   (internal)
"""
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMORE_FIXTURE = os.path.join(REPO, 'tests', 'data', 'emore')
TMP_MARK = '.orbax-checkpoint-tmp'
TARGETS = ('time', 'step', 'eval', 'save', 'commit')


# ----------------------------------------------------------------------------- the child run

def _child(markers_path: str, inject: str, cache_dir: str, main_flags: list[str]) -> None:
  """Runs main.py with `main_flags`, appending phase markers to `markers_path`.

  `inject` ('' = none): 'kill_at_commit:N' sends SIGKILL to this process when checkpoint N is
  written and about to be renamed; 'term_at_eval:N' sends SIGTERM when the evaluation of step N
  starts.
  """
  sys.path.insert(0, REPO)
  fd = os.open(markers_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def mark(text):  # one write(2) per line: what reached the file survives a SIGKILL
    os.write(fd, f'{time.time():.6f} {text}\n'.encode())

  kind, _, at = inject.partition(':')
  at = int(at) if at else -1

  import jax  # pylint: disable=import-outside-toplevel
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  from multiface_jax.training import checkpointing, evaluate, trainer  # pylint: disable=import-outside-toplevel

  original_init = trainer.Trainer.__init__

  def init(self, config):
    original_init(self, config)
    step_fn = self.train_step

    def train_step(state, batch):
      n = int(state.step) + 1
      mark(f'step_begin {n}')
      out = jax.block_until_ready(step_fn(state, batch))
      mark(f'step_end {n}')
      return out

    self.train_step = train_step

  trainer.Trainer.__init__ = init

  original_save = checkpointing.save

  def save(manager, step, state, meta):
    mark(f'save_begin {step}')
    original_save(manager, step, state, meta)
    mark(f'save_end {step}')

  checkpointing.save = save

  original_create = evaluate.create_evaluator

  def create_evaluator(config):
    evaluator = original_create(config)
    if evaluator is not None:
      run = evaluator.run

      def wrapped_run(*args, step, **kwargs):
        mark(f'eval_begin {step}')
        if kind == 'term_at_eval' and step == at:
          os.kill(os.getpid(), signal.SIGTERM)
        result = run(*args, step=step, **kwargs)
        mark(f'eval_end {step}')
        return result

      evaluator.run = wrapped_run
    return evaluator

  evaluate.create_evaluator = create_evaluator

  # Orbax writes a step into N.orbax-checkpoint-tmp-* and renames it to N when complete.
  original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    final = self.get_final()
    step = int(final.name) if (final.name.isdigit() and
                               final.parent.name == checkpointing.CHECKPOINT_SUBDIR) else None
    if step is not None:
      mark(f'commit_begin {step}')
      if kind == 'kill_at_commit' and step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    await original_finalize(self)
    if step is not None:
      mark(f'commit_end {step}')

  atomicity.AtomicRenameTemporaryPath.finalize = finalize

  from absl import app  # pylint: disable=import-outside-toplevel
  import main as main_module  # pylint: disable=import-outside-toplevel

  def run_main(argv):
    mark('start')
    main_module.main(argv)
    mark('exit')

  sys.argv = [os.path.join(REPO, 'main.py'), *main_flags]
  app.run(run_main)


# ----------------------------------------------------------------------------- the configs

def prepare_config(name: str, root: str) -> list[str]:
  """main.py's flags of config `name`; writes the data it needs under `root` once."""
  os.makedirs(root, exist_ok=True)
  if name == 'tiny':
    data = os.path.join(root, 'emore_tfrecords')
    if not os.path.exists(os.path.join(data, 'metadata.json')):
      from multiface_jax.data import convert  # pylint: disable=import-outside-toplevel
      convert.convert(EMORE_FIXTURE, data, num_shards=2, progress=False)
    return ['--config=configs/tiny.py', '--config.synthetic_data=False',
            f'--config.data_dir={data}', '--config.num_classes=0',
            '--config.num_train_images=0', '--config.num_train_steps=12',
            '--config.grad_accum_steps=2', '--config.checkpoint_every_steps=3',
            '--config.log_every_steps=2', '--config.eval_every_steps=5',
            '--config.keep_checkpoints=2', '--config.optimizer.lr=0.01',
            '--config.eval_batch_size=16']
  if name == 'demo':
    from multiface_jax.data import orl  # pylint: disable=import-outside-toplevel
    faces = orl.stage_faces(orl.find_faces(), os.path.join(root, 'orl_faces'))
    split = orl.identity_splits(4)[-1]  # trains on s1-s30, as `make demo`'s first published run
    data = orl.prepare_split(faces, os.path.join(root, 'orl'), split, align=False, log=None)
    # The demo evaluates after training only (its config): the tiny runs give the kills
    # during an evaluation.
    return ['--config=configs/demo_orl.py', f'--config.data_dir={data}',
            '--config.num_train_steps=8', '--config.checkpoint_every_steps=3',
            '--config.log_every_steps=2', '--config.keep_checkpoints=2']
  raise ValueError(f'unknown config {name!r}; known: tiny, demo')


def total_steps(flags: list[str]) -> int:
  return int(next(f.split('=')[1] for f in flags if f.startswith('--config.num_train_steps=')))


# ----------------------------------------------------------------------------- runs

def child_env() -> dict[str, str]:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device, whatever the caller forces
  return env


def start_run(flags: list[str], workdir: str, cache_dir: str, inject: str = '',
              log_name: str = 'run') -> subprocess.Popen:
  """Starts main.py (through the child wrapper) on `workdir`; its output goes to
  `{workdir}.{log_name}.log`, its phase markers to `{workdir}.{log_name}.markers`."""
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  log = open(f'{workdir}.{log_name}.log', 'w')  # a file: a full pipe would block the child
  markers = f'{workdir}.{log_name}.markers'
  if os.path.exists(markers):
    os.remove(markers)
  command = [sys.executable, os.path.abspath(__file__), 'child', markers, inject,
             cache_dir, '--', *flags, f'--workdir={workdir}']
  process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=log,
                             stderr=subprocess.STDOUT)
  process.log_path = log.name
  log.close()
  return process


def output(process: subprocess.Popen) -> str:
  with open(process.log_path) as f:
    return f.read()


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
  """Waits for a run that must succeed; returns its output."""
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
  text = output(process)
  if process.returncode != 0:
    raise RuntimeError(f'run failed ({process.returncode}):\n{text[-4000:]}')
  return text


def read_markers(workdir: str, log_name: str) -> list[tuple[float, str, int]]:
  """(time, event, step) lines of a run's marker file ('start'/'exit' have step -1)."""
  try:
    with open(f'{workdir}.{log_name}.markers') as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return []
  events = []
  for line in lines:
    parts = line.split()
    if len(parts) >= 2:
      events.append((float(parts[0]), parts[1], int(parts[2]) if len(parts) > 2 else -1))
  return events


def checkpoint_folders(workdir: str) -> tuple[list[int], list[str]]:
  """(finalized steps, half-written step folders) in the run's checkpoints/."""
  directory = os.path.join(workdir, 'checkpoints')
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def resumed_step(text: str) -> Optional[int]:
  """The step a run says it resumed at, or None for a fresh start."""
  found = re.search(r'Resumed \S+ at step (\d+)', text)
  return int(found.group(1)) if found else None


def final_state(workdir: str, step: int) -> dict[str, 'np.ndarray']:
  """Every leaf of the saved train state of `step`, flattened, as numpy."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  tree = ocp.StandardCheckpointer().restore(path)
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def bit_identical(got: dict, expected: dict) -> tuple[bool, str]:
  """Whether two flattened states hold the same leaves with the same bytes (and which not)."""
  if set(got) != set(expected):
    return False, f'leaves differ: {sorted(set(got) ^ set(expected))[:3]}'
  for name, value in expected.items():
    other = got[name]
    if other.dtype != value.dtype or other.shape != value.shape or (
        other.tobytes() != value.tobytes()):
      return False, f'{name} differs'
  return True, ''


@dataclasses.dataclass
class Reference:
  """The uninterrupted run of a config and how long its phases took."""
  flags: list
  steps: int
  state: dict
  duration: float
  step_time: float
  save_steps: list
  write_time: float
  eval_steps: list
  eval_time: float


def _spans(events, begin, end):
  starts = {s: t for t, e, s in events if e == begin}
  return {s: t - starts[s] for t, e, s in events if e == end and s in starts}


def run_reference(flags: list[str], root: str, cache_dir: str, warm_up: bool = True) -> Reference:
  """Trains `flags` without interruption in `root`/reference.

  With `warm_up`, a first run fills the compilation cache, so that the reference's timings are
  those of the trials' runs (which find their programs in the cache); the two runs must end
  bit-identical (an executable from the cache computes what a freshly compiled one does).
  """
  if warm_up:
    cold = os.path.join(root, 'reference_cold')
    shutil.rmtree(cold, ignore_errors=True)
    finish(start_run(flags, cold, cache_dir))
  workdir = os.path.join(root, 'reference')
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.time()
  finish(start_run(flags, workdir, cache_dir))
  duration = time.time() - start
  steps = total_steps(flags)
  state = final_state(workdir, steps)
  if warm_up:
    same, why = bit_identical(final_state(cold, steps), state)
    if not same:
      raise RuntimeError(f'the reference run from a cold compilation cache differs: {why}')
  events = read_markers(workdir, 'run')
  step_spans = _spans(events, 'step_begin', 'step_end')
  write_spans = _spans(events, 'save_begin', 'commit_end')
  eval_spans = _spans(events, 'eval_begin', 'eval_end')
  median = lambda values: sorted(values)[len(values) // 2] if values else 0.0
  return Reference(flags=flags, steps=steps, state=state, duration=duration,
                   step_time=median(list(step_spans.values())),
                   save_steps=sorted(write_spans), write_time=median(list(write_spans.values())),
                   eval_steps=sorted(eval_spans), eval_time=median(list(eval_spans.values())))


# ----------------------------------------------------------------------------- one trial

@dataclasses.dataclass
class Trial:
  """What happened in one trial."""
  config: str
  signal: str
  target: str
  landed: set = dataclasses.field(default_factory=set)  # startup/step/eval/save/write/...
  half_written: list = dataclasses.field(default_factory=list)
  finalized: list = dataclasses.field(default_factory=list)
  resumed_at: Optional[int] = None
  resume_ok: bool = False
  identical: bool = False
  problem: str = ''


def landed_in(events, exited: bool) -> set[str]:
  """Where a signal sent now lands, from the markers written so far (several places at once
  when a checkpoint is being written in the background)."""
  if exited or any(e == 'exit' for _, e, _ in events):
    return {'after end'}
  if not any(e == 'step_begin' for _, e, _ in events):
    return {'startup'}
  running = set()
  for _, event, step in events:
    name, _, edge = event.rpartition('_')
    if edge == 'begin':
      running.add((name, step))
    elif edge == 'end':
      running.discard((name, step))
  kinds = {name for name, _ in running}
  places = {place for kind, place in (('step', 'step'), ('eval', 'eval'), ('save', 'save call'))
            if kind in kinds}
  # A checkpoint is written in the background from its save_begin to its commit_end.
  saves = {s for _, e, s in events if e == 'save_begin'}
  if saves - {s for _, e, s in events if e == 'commit_end'}:
    places.add('write in flight')
  return places or {'between'}


def _wait_for(process, workdir, event, step, deadline):
  while time.time() < deadline and process.poll() is None:
    if any(e == event and s == step for _, e, s in read_markers(workdir, 'killed')):
      return True
    time.sleep(0.002)
  return False


def run_trial(name: str, ref: Reference, root: str, cache_dir: str, rng: random.Random,
              index: int, sig: Optional[str] = None, target: Optional[str] = None,
              inject: str = '') -> Trial:
  """Starts the run, kills it at a random moment, reruns it to the end and compares.

  Args:
    name, ref: the config and its reference run.
    root, cache_dir: where the trial's workdir goes; the compilation cache.
    rng: draws the signal, the target and the moment (unless given).
    index: the trial's number (names its workdir).
    sig: 'KILL' or 'TERM' (drawn when None).
    target: one of TARGETS (drawn when None).
    inject: a child-side fault instead of an external signal (see ``_child``).
  """
  sig = sig or rng.choice(['KILL', 'TERM'])
  if target is None:
    target = rng.choice([t for t in TARGETS if not (t == 'commit' and sig == 'TERM') and
                         not (t == 'eval' and not ref.eval_steps)])
  trial = Trial(config=name, signal=sig, target=target)
  workdir = os.path.join(root, f'trial{index:03d}')
  shutil.rmtree(workdir, ignore_errors=True)
  if target == 'commit' and not inject:
    inject = f'kill_at_commit:{rng.choice(ref.save_steps)}'
  process = start_run(ref.flags, workdir, cache_dir, inject=inject, log_name='killed')
  limit = max(10 * ref.duration, 300)
  deadline = time.time() + limit
  if inject:
    trial.landed = {'write in flight' if inject.startswith('kill_at_commit') else 'eval'}
  else:
    if target == 'time':
      time.sleep(rng.uniform(0, ref.duration))
    elif target == 'step':
      _wait_for(process, workdir, 'step_begin', rng.randint(1, ref.steps), deadline)
      time.sleep(rng.uniform(0, ref.step_time))
    elif target == 'eval':
      _wait_for(process, workdir, 'eval_begin', rng.choice(ref.eval_steps), deadline)
      time.sleep(rng.uniform(0, ref.eval_time))
    elif target == 'save':
      _wait_for(process, workdir, 'save_begin', rng.choice(ref.save_steps), deadline)
      time.sleep(rng.uniform(0, ref.write_time))
    trial.landed = landed_in(read_markers(workdir, 'killed'), process.poll() is not None)
    if process.poll() is None:
      process.send_signal(getattr(signal, f'SIG{sig}'))
  try:
    process.wait(timeout=limit)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
    trial.problem = 'the killed run did not exit'
  trial.finalized, trial.half_written = checkpoint_folders(workdir)
  if sig == 'TERM' and process.returncode not in (0, -signal.SIGTERM):
    trial.problem = trial.problem or f'SIGTERM run exited with {process.returncode}'
  # The rerun: the same command in the same workdir, to the end.
  try:
    text = finish(start_run(ref.flags, workdir, cache_dir, log_name='rerun'))
  except RuntimeError as e:
    trial.problem = trial.problem or f'rerun failed: {str(e)[-300:]}'
    return trial
  trial.resumed_at = resumed_step(text)
  expected = max(trial.finalized) if trial.finalized else None
  trial.resume_ok = trial.resumed_at == expected
  if not trial.resume_ok:
    trial.problem = trial.problem or (f'resumed at {trial.resumed_at}, newest complete '
                                      f'checkpoint was {expected}')
  try:
    trial.identical, why = bit_identical(final_state(workdir, ref.steps), ref.state)
  except Exception as e:  # pylint: disable=broad-except
    trial.identical, why = False, f'final checkpoint unreadable: {e}'
  if not trial.identical:
    trial.problem = trial.problem or f'final state not bit-identical: {why}'
  if not trial.problem:  # keep only what a failure needs looking into
    shutil.rmtree(workdir, ignore_errors=True)
    for run in ('killed', 'rerun'):
      for suffix in ('log', 'markers'):
        if os.path.exists(f'{workdir}.{run}.{suffix}'):
          os.remove(f'{workdir}.{run}.{suffix}')
  else:
    with open(f'{workdir}.killed.log', 'a') as f:
      f.write(f'\n[faults] {trial}\n')
  return trial


# ----------------------------------------------------------------------------- the table

PLACES = ('startup', 'step', 'eval', 'save call', 'write in flight', 'between', 'after end')


def table(trials: list[Trial]) -> str:
  """One line per config and a total: signals, where the kills landed, outcomes."""
  header = ['config', 'trials', 'KILL', 'TERM', *PLACES, 'tmp left', 'resumed', 'fresh',
            'resume ok', 'bit-identical', 'failures']
  rows = []
  for config in sorted({t.config for t in trials}) + ['all']:
    group = [t for t in trials if config in ('all', t.config)]
    rows.append([config, len(group), sum(t.signal == 'KILL' for t in group),
                 sum(t.signal == 'TERM' for t in group),
                 *[sum(place in t.landed for t in group) for place in PLACES],
                 sum(bool(t.half_written) for t in group),
                 sum(t.resumed_at is not None for t in group),
                 sum(t.resumed_at is None and not t.problem.startswith('rerun') for t in group),
                 sum(t.resume_ok for t in group), sum(t.identical for t in group),
                 sum(bool(t.problem) for t in group)])
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: '| ' + ' | '.join(str(v).rjust(w) for v, w in zip(r, widths)) + ' |'
  return '\n'.join([line(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
                    *map(line, rows)])


def main(argv):
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  del argv
  logging.set_verbosity(logging.WARNING)  # no Orbax INFO line per restored checkpoint
  f = flags.FLAGS
  root = os.path.abspath(f.workdir)
  cache_dir = os.path.join(root, 'jax_cache')
  names = [n.strip() for n in f.configs if n.strip()]
  rng = random.Random(f.seed)
  references = {}
  for name in names:
    flags_ = prepare_config(name, os.path.join(root, 'data'))
    print(f'[faults] {name}: uninterrupted reference run ...', flush=True)
    references[name] = run_reference(flags_, os.path.join(root, name), cache_dir)
    r = references[name]
    print(f'[faults] {name}: {r.steps} steps in {r.duration:.1f} s (step {r.step_time:.3f} s, '
          f'checkpoint write {r.write_time:.3f} s at steps {r.save_steps}, evaluation '
          f'{r.eval_time:.3f} s at steps {r.eval_steps})', flush=True)
  trials = []
  for i in range(f.trials):
    name = names[i % len(names)]
    trial = run_trial(name, references[name], os.path.join(root, name), cache_dir, rng, i)
    trials.append(trial)
    print(f'[faults] trial {i}: {name} SIG{trial.signal} target={trial.target} landed='
          f'{"+".join(sorted(trial.landed))} finalized={trial.finalized} tmp='
          f'{len(trial.half_written)} resumed_at={trial.resumed_at} identical={trial.identical}'
          f'{" PROBLEM: " + trial.problem if trial.problem else ""}', flush=True)
  print()
  print(table(trials))
  if any(t.problem for t in trials):
    sys.exit(1)


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == 'child':
    _markers, _inject, _cache = sys.argv[2:5]
    assert sys.argv[5] == '--', sys.argv
    _child(_markers, _inject, _cache, sys.argv[6:])
  else:
    sys.path.insert(0, REPO)
    from absl import app, flags as absl_flags  # pylint: disable=ungrouped-imports
    absl_flags.DEFINE_integer('trials', 6, 'Kill trials in all (spread over the configs).')
    absl_flags.DEFINE_list('configs', ['tiny', 'demo'], 'Configs to kill: tiny, demo.')
    absl_flags.DEFINE_integer('seed', 0, 'Seed of the signals, targets and moments.')
    absl_flags.DEFINE_string('workdir', '/tmp/multiface_faults', 'Where the runs, their data '
                             'and the compilation cache go (trials that pass are deleted).')
    app.run(main)
