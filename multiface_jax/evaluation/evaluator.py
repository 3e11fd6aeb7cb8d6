"""Runs the verification protocol on every ``.bin`` set of a folder; reports it the published way.

Used every K training steps and by ``main.py --mode=eval``::

  evaluator = Evaluator(data_dir, batch_size=256, num_spheres=2, mesh=mesh)
  results = evaluator.run(functools.partial(model.apply, train=False), variables, step=step,
                          workdir=workdir, writer=writer)

Each run embeds every set (flip TTA), applies the 10-fold protocol to the whole embedding and to
each sphere's slice alone (renormalised: the MultiFace paper's "ensemble of low-dimensional
features" made visible), prints the accuracy table, and with a workdir writes
``eval/results_step{step}.json`` and one ROC figure ``eval/roc_{name}_step{step}.png`` per set; with
a clu metric writer it also writes TensorBoard scalars ``eval/{name}/...``.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from multiface_jax.data import verification_sets
from multiface_jax.evaluation import baselines, embed, plots, protocol

STANDARD_SETS = ('lfw', 'cfp_fp', 'cfp_ff', 'agedb_30', 'calfw', 'cplfw', 'vgg2_fp')
DISPLAY_NAMES = {'lfw': 'LFW', 'cfp_fp': 'CFP-FP', 'cfp_ff': 'CFP-FF', 'agedb_30': 'AgeDB-30',
                 'calfw': 'CALFW', 'cplfw': 'CPLFW', 'vgg2_fp': 'VGG2-FP'}


def ordered_set_names(names: Sequence[str]) -> list[str]:
  """The published tables' column order: the standard sets first, then the others sorted."""
  standard = [name for name in STANDARD_SETS if name in names]
  return standard + sorted(set(names) - set(STANDARD_SETS))


def find_verification_sets(data_dir: str,
                           names: Sequence[str] | str | None = None) -> dict[str, str]:
  """Finds the ``*.bin`` verification sets of a folder.

  Args:
    data_dir: folder holding ``lfw.bin``, ``cfp_fp.bin``, ... (an emore folder or the converted
      data folder, which copies them).
    names: optional subset to use (sequence or comma-separated string); every one must exist.

  Returns:
    name -> path, in table order.
  """
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'{data_dir}: no such folder; pass the folder that holds the '
                            'verification .bin files (the emore folder or the converted data)')
  found = {os.path.basename(path)[:-len('.bin')]: path
           for path in glob.glob(os.path.join(glob.escape(data_dir), '*.bin'))}
  if isinstance(names, str):
    names = [name.strip() for name in names.split(',') if name.strip()]
  if names:
    missing = [name for name in names if name not in found]
    if missing:
      raise FileNotFoundError(f'{data_dir}: no {", ".join(n + ".bin" for n in missing)}; '
                              f'sets present: {", ".join(ordered_set_names(found)) or "none"}')
    found = {name: found[name] for name in names}
  if not found:
    raise FileNotFoundError(f'{data_dir}: no verification sets (*.bin); copy lfw.bin etc. there '
                            'or make one with `python -m multiface_jax.data.make_pairs`')
  return {name: found[name] for name in ordered_set_names(found)}


def summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """The JSON-friendly scalars of a protocol result."""
  return {
      'accuracy_mean': metrics['accuracy_mean'],
      'accuracy_std': metrics['accuracy_std'],
      'accuracy_folds': [float(a) for a in metrics['accuracy']],
      'best_threshold': metrics['best_threshold'],
      'val': metrics['val'],
      'val_std': metrics['val_std'],
      'far': metrics['far'],
      'num_pairs': int(metrics['num_pairs']),
  }


def sphere_slices(embeddings: np.ndarray, num_spheres: int) -> list[np.ndarray]:
  """Each sphere's contiguous D/N slice of the embeddings, renormalised to unit length."""
  dim = embeddings.shape[1]
  if dim % num_spheres:
    raise ValueError(f'embedding size {dim} is not divisible into {num_spheres} spheres')
  width = dim // num_spheres
  return [embed.l2_normalize_rows(embeddings[:, k * width:(k + 1) * width])
          for k in range(num_spheres)]


def evaluate_embeddings(embeddings: np.ndarray, issame: np.ndarray, num_spheres: int = 1
                        ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """The protocol on a set's embeddings, whole and (with several spheres) each sphere alone.

  Args:
    embeddings: (2P, D) flip-summed unit embeddings, pair i in rows 2i and 2i+1.
    issame: (P,) bool.
    num_spheres: spheres of the model.

  Returns:
    ``(summary, curves)``: the JSON-friendly scalars (with ``spheres``: one summary per sphere
    when there are several), and label -> (fpr, tpr) of the fold-averaged ROC curves.
  """
  whole = protocol.evaluate(embeddings, issame)
  result = summary(whole)
  curves = {f'whole ({embeddings.shape[1]}-d)': (whole['fpr'], whole['tpr'])}
  if num_spheres > 1:
    spheres = [protocol.evaluate(part, issame) for part in sphere_slices(embeddings, num_spheres)]
    result['spheres'] = [summary(s) for s in spheres]
    for k, s in enumerate(spheres):
      curves[f'sphere {k + 1} alone'] = (s['fpr'], s['tpr'])
  return result, curves


def _cell(metrics: Mapping[str, Any] | None) -> str:
  if metrics is None:
    return '-'
  return f'{100 * metrics["accuracy_mean"]:.2f} ± {100 * metrics["accuracy_std"]:.2f}'


def _sphere(metrics: Mapping[str, Any] | None, k: int) -> Mapping[str, Any] | None:
  spheres = (metrics or {}).get('spheres', ())
  return spheres[k] if k < len(spheres) else None


def format_table(results: Mapping[str, Mapping[str, Any]] | Sequence[tuple[str, Mapping[str, Any]]],
                 *, label: str = 'model') -> str:
  """The accuracy table in the published layout: one row per model, one column per set.

  Cells read "99.52 ± 0.30" (mean ± std of the 10 fold accuracies, in %). A result with
  ``spheres`` adds one row per sphere evaluated alone below its model's row.

  Args:
    results: one run's ``{set name: metrics}`` (as :meth:`Evaluator.run` returns), or a sequence
      of ``(row label, {set name: metrics})`` for several rows.
    label: the row label when ``results`` is a single run.

  Returns:
    a Markdown table.
  """
  rows = [(label, results)] if isinstance(results, Mapping) else list(results)
  names = ordered_set_names({name for _, per_set in rows for name in per_set})
  table = [['model'] + [DISPLAY_NAMES.get(name, name) for name in names]]
  for row_label, per_set in rows:
    table.append([row_label] + [_cell(per_set.get(name)) for name in names])
    num_spheres = max((len(m.get('spheres', ())) for m in per_set.values()), default=0)
    for k in range(num_spheres):
      cells = [_cell(_sphere(per_set.get(name), k)) for name in names]
      table.append([f'{row_label}, sphere {k + 1}/{num_spheres} alone'] + cells)
  widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

  def line(cells):
    return '| ' + ' | '.join(cell.ljust(width) for cell, width in zip(cells, widths)) + ' |'

  rule = '|' + '|'.join('-' * (width + 2) for width in widths) + '|'
  return '\n'.join([line(table[0]), rule] + [line(cells) for cells in table[1:]])


def _write_json(path: str, payload: Any) -> None:
  tmp_path = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp')
  with open(tmp_path, 'w') as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp_path, path)


class Evaluator:
  """Holds the verification sets of a folder in memory and evaluates a model on all of them."""

  def __init__(self, data_dir: str, *, batch_size: int, num_spheres: int = 1,
               names: Sequence[str] | str | None = None, mesh: jax.sharding.Mesh | None = None):
    """Loads every set once.

    Args:
      data_dir: folder with the ``*.bin`` sets (see :func:`find_verification_sets`).
      batch_size: embedding batch size (global; a multiple of the mesh's data axis).
      num_spheres: spheres of the model; with more than one each slice is also evaluated alone.
      names: optional subset of sets.
      mesh: optional mesh with a ``data`` axis to shard the embedding batches over.
    """
    if num_spheres < 1:
      raise ValueError(f'num_spheres must be >= 1, got {num_spheres}')
    self.batch_size = batch_size
    self.num_spheres = num_spheres
    self.mesh = mesh
    self.paths = find_verification_sets(data_dir, names)
    self.sets = {}
    for name, path in self.paths.items():
      self.sets[name] = verification_sets.load_bin(path)
      logging.info('verification set %s: %d pairs from %s', name, len(self.sets[name][1]), path)
    self._raw_pixel_results = None

  @property
  def names(self) -> list[str]:
    return list(self.sets)

  def run(self, apply_fn: embed.ApplyFn, variables: Any, *, step: int, workdir: str | None = None,
          writer: Any = None, label: str | None = None,
          report: bool = True) -> dict[str, dict[str, Any]]:
    """Evaluates a model on every set; prints the table, writes JSON / PNGs / scalars.

    Args:
      apply_fn: ``apply_fn(variables, images_float_nhwc) -> (B, D)``; pass the same object at
        every call so the embedding function compiles once.
      variables: the model variables.
      step: training step (names the output files, x-axis of the scalars).
      workdir: if given, writes ``{workdir}/eval/results_step{step}.json`` and
        ``{workdir}/eval/roc_{name}_step{step}.png``.
      writer: optional clu ``metric_writers`` writer for TensorBoard scalars.
      label: row label of the printed table (default ``step {step}``).
      report: print the table (process 0); False for a caller that prints its own.

    Returns:
      {set name: {accuracy_mean, accuracy_std, accuracy_folds, best_threshold, val, val_std, far,
      num_pairs, xnorm, and with several spheres `spheres`: one such dict (no xnorm) per sphere}}.
    """
    results, curves = self.evaluate(apply_fn, variables)

    if jax.process_index() == 0:
      if report:
        print(format_table(results, label=label or f'step {step}'), flush=True)
      if workdir is not None:
        self.write_files(results, curves, step=step, workdir=workdir)
      if writer is not None:
        writer.write_scalars(step, _scalars(results))
        writer.flush()
    return results

  def evaluate(self, apply_fn: embed.ApplyFn, variables: Any
               ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every set's results (as :meth:`run` returns them) and ROC curves, quietly.

    Returns:
      ``(results, curves)``; curves: {set name: {label: (fpr, tpr)}}, the whole embedding's
      first, then each sphere's.
    """
    results, curves = {}, {}
    for name, (images, issame) in self.sets.items():
      embeddings, xnorm = embed.extract_embeddings(apply_fn, variables, images,
                                                   batch_size=self.batch_size, mesh=self.mesh)
      results[name], curves[name] = evaluate_embeddings(embeddings, issame, self.num_spheres)
      results[name]['xnorm'] = xnorm
    return results, curves

  def run_raw_pixels(self) -> dict[str, dict[str, Any]]:
    """The raw-pixel baseline (``baselines.RawPixels``) on every set, computed once."""
    if self._raw_pixel_results is None:
      self._raw_pixel_results = {
          name: summary(baselines.evaluate(baselines.RawPixels(), images, issame))
          for name, (images, issame) in self.sets.items()}
    return self._raw_pixel_results

  def write_files(self, results: dict[str, Any], curves: dict[str, Any], *, step: int,
                  workdir: str) -> None:
    """``{workdir}/eval/results_step{step}.json`` and one ROC PNG per set (see :meth:`run`)."""
    out_dir = os.path.join(workdir, 'eval')
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, f'results_step{step}.json'),
                {'step': step, 'num_spheres': self.num_spheres, 'results': results})
    for name, per_curve in curves.items():
      r = results[name]
      title = (f'{DISPLAY_NAMES.get(name, name)}, step {step}: accuracy {_cell(r)} %, '
               f'VAL@FAR={protocol.FAR_TARGET:g} {100 * r["val"]:.2f} %')
      plots.plot_roc(os.path.join(out_dir, f'roc_{name}_step{step}.png'), per_curve, title=title,
                     far_target=protocol.FAR_TARGET)


def _scalars(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """TensorBoard scalars: accuracy (fraction), its std, best threshold, VAL, XNorm per set."""
  scalars = {}
  for name, r in results.items():
    for key in ('accuracy_mean', 'accuracy_std', 'best_threshold', 'val', 'xnorm'):
      scalars[f'eval/{name}/{key.replace("_mean", "")}'] = float(r[key])
    for k, s in enumerate(r.get('spheres', ())):
      scalars[f'eval/{name}/sphere{k + 1}_accuracy'] = float(s['accuracy_mean'])
  return scalars
