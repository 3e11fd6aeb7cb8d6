"""Evaluating a checkpoint: restore a backbone and run the verification evaluator on it.

``evaluate(config, workdir, checkpoint)`` is ``main.py --mode=eval``; ``create_evaluator`` and
``local_variables`` are what the training loop uses for its periodic evaluation.
"""
import functools
import os
from typing import Any, Optional

import jax
import ml_collections
from absl import logging
from clu import metric_writers

from multiface_jax.inference import loading
from multiface_jax.training import checkpointing, sharding
from multiface_jax.training.trainer import create_backbone, model_record


def create_evaluator(config: ml_collections.ConfigDict):
  """The verification evaluator for data_dir's .bin sets, or None when there are none."""
  from multiface_jax.evaluation import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  if not config.data_dir:
    return None
  if not evaluator_lib.find_verification_sets(config.data_dir, config.eval_sets or None):
    logging.warning('No verification .bin sets in %s: evaluation is skipped.', config.data_dir)
    return None
  return evaluator_lib.Evaluator(config.data_dir, batch_size=config.eval_batch_size,
                                 num_spheres=config.head.num_spheres,
                                 names=config.eval_sets or None, mesh=local_mesh())


def local_mesh() -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over this process's devices only.

  The evaluator gathers embeddings to the host, which needs arrays this process can address
  whole; with several processes each one therefore embeds the (small) verification sets on its
  own devices, and process 0 reports.
  """
  return sharding.create_mesh(1, devices=jax.local_devices())


def local_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  """Backbone variables as process-local arrays (they are replicated on the training mesh)."""
  variables = {'params': params, 'batch_stats': batch_stats}
  if jax.process_count() == 1:
    return variables
  return jax.tree.map(lambda x: x.addressable_data(0), variables)



def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: Optional[str] = None) -> dict[str, Any]:
  """Restores a checkpoint and evaluates it on config.data_dir's verification sets and, when
  ``config.ijb_root`` is set, on IJB-B / IJB-C (``config.ijb_targets``).

  Args:
    config: the run's config (model, head.num_spheres, data_dir, eval_batch_size, eval_sets,
      ijb_root, ijb_targets).
    workdir: the run folder; results go to ``{workdir}/eval``, the newest checkpoint of
      ``{workdir}/checkpoints`` is used when `checkpoint` is None.
    checkpoint: optional path: a step folder of a training checkpoint or a
      ``{params, batch_stats}`` checkpoint (imported weights).

  Returns:
    ``{set name: metrics}`` of the verification sets, and ``{target: results}`` of IJB.
  """
  path = checkpoint or checkpointing.latest_step_dir(workdir)
  if path is None:
    raise FileNotFoundError(f'{checkpointing.checkpoint_dir(workdir)} holds no checkpoint; '
                            'train first or pass --checkpoint=PATH.')
  if not config.data_dir and not config.ijb_root:
    raise ValueError('Set --config.data_dir to the folder holding the verification .bin files '
                     '(or --config.ijb_root to an IJB folder).')
  model = create_backbone(config)
  variables = loading.load_backbone_variables(
      path, loading.abstract_variables(model, sharding.replicated(local_mesh())))
  step = loading.step_of(path)
  results = {}
  if config.data_dir:
    evaluator = create_evaluator(config)
    if evaluator is None:
      raise FileNotFoundError(f'{config.data_dir} holds no verification .bin sets.')
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    try:
      results = evaluator.run(functools.partial(model.apply, train=False), variables, step=step,
                              workdir=workdir, writer=writer, label=f'{config.model.name} {path}')
    finally:
      writer.close()
  if config.ijb_root:
    results.update(_evaluate_ijb(config, loading.Backbone(
        model=model, variables=variables, record=model_record(config), path=path, step=step),
        workdir))
  return results


def _evaluate_ijb(config: ml_collections.ConfigDict, backbone: loading.Backbone,
                  workdir: str) -> dict[str, Any]:
  """IJB results per target, written into {workdir}/eval/ijb and printed (process 0)."""
  from multiface_jax.evaluation import ijb  # pylint: disable=import-outside-toplevel
  from multiface_jax.inference import embedder  # pylint: disable=import-outside-toplevel
  faces = embedder.FaceEmbedder(backbone, batch_size=config.eval_batch_size)
  results = {}
  for target in (t.strip() for t in config.ijb_targets.split(',') if t.strip()):
    result = ijb.evaluate(faces, config.ijb_root, target, os.path.join(workdir, 'eval', 'ijb'),
                          num_spheres=config.head.num_spheres,
                          progress=jax.process_index() == 0)
    if jax.process_index() == 0:
      print(f'{target} (step {backbone.step}), TAR (%) at FAR:\n{result.pop("table")}',
            flush=True)
    results[target] = result
  return results
