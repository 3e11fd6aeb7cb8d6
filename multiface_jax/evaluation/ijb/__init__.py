"""IJB-B and IJB-C: 1:1 verification (TAR at FAR) and 1:N identification, insightface's recipe.

  python -m multiface_jax.evaluation.ijb --root=DIR --target=IJBC --checkpoint=CKPT --out=OUT

``meta`` reads the meta files, ``features`` embeds (and caches) every face, ``recipe`` pools
templates and scores them; :func:`evaluate` runs it all and writes ``OUT/<target>_results.json``
(``tar_at_far``, ``identification``, per sphere), the scores (``.npy``) and a ROC PNG.
"""
import json
import os
from typing import Any, Optional

import numpy as np

from multiface_jax.evaluation.ijb import features as features_lib
from multiface_jax.evaluation.ijb import meta as meta_lib
from multiface_jax.evaluation.ijb import recipe


def _spheres(views: np.ndarray, num_spheres: int) -> list[np.ndarray]:
  """Each sphere's slice of the raw view embeddings (as the verification table's columns)."""
  width = views.shape[-1] // num_spheres
  return [views[..., k * width:(k + 1) * width] for k in range(num_spheres)]


def score(views: np.ndarray, meta: meta_lib.IJBMeta, *, flip: bool = True,
          norm_score: bool = True, detector_score: bool = True) -> dict[str, Any]:
  """The 1:1 and 1:N figures of one set of raw view embeddings (2, n, D)."""
  features = recipe.image_features(views, meta.faceness, flip=flip, norm_score=norm_score,
                                   detector_score=detector_score)
  template_ids, template_features = recipe.pool_templates(features, meta.templates, meta.medias)
  scores = recipe.pair_scores(template_ids, template_features, meta.pairs)
  table, roc = recipe.tar_at_far(meta.labels, scores)
  result = {'tar_at_far': table, 'scores': scores, 'roc': roc}
  ident = meta.identification
  if ident is not None:
    pick = lambda wanted: template_features[recipe.template_index(template_ids, wanted)]
    result['identification'] = recipe.identification(
        pick(ident.probe_templates), ident.probe_subjects, pick(ident.gallery_templates),
        ident.gallery_subjects)
  return result


def format_table(rows: list[tuple[str, dict]]) -> str:
  """The TAR@FAR table in the layout of insightface's IJB results (percent)."""
  header = '| ' + ' | '.join(['model'] + [f'{r["far"]:.0e}' for r in rows[0][1]['tar_at_far']])
  lines = [header + ' |', '|' + '---|' * (len(rows[0][1]['tar_at_far']) + 1)]
  for name, result in rows:
    cells = [f'{100 * r["tar"]:.2f}' for r in result['tar_at_far']]
    lines.append('| ' + ' | '.join([name] + cells) + ' |')
  ident_rows = [(name, r['identification']) for name, r in rows if 'identification' in r]
  if ident_rows:
    first = ident_rows[0][1]
    lines += ['', '| model | ' + ' | '.join(
        [f'rank-{k}' for k in first['rank']] +
        [f'TPIR@FPIR={t["fpir"]:g}' for t in first['tpir_at_fpir']]) + ' |',
              '|' + '---|' * (1 + len(first['rank']) + len(first['tpir_at_fpir']))]
    for name, ident in ident_rows:
      cells = [f'{100 * v:.2f}' for v in ident['rank'].values()]
      cells += [f'{100 * t["tpir"]:.2f}' for t in ident['tpir_at_fpir']]
      lines.append('| ' + ' | '.join([name] + cells) + ' |')
  return '\n'.join(lines)


def evaluate(embedder, root: str, target: str, out_dir: str, *, num_spheres: int = 1,
             flip: bool = True, norm_score: bool = True, detector_score: bool = True,
             progress: bool = True, label: Optional[str] = None) -> dict[str, Any]:
  """Embeds (or reads from the cache) and scores `target`; writes the results into `out_dir`.

  Returns:
    The JSON written (``tar_at_far``, ``identification``, ``spheres``, switches, counts).
  """
  from multiface_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  meta = meta_lib.read(root, target)
  os.makedirs(out_dir, exist_ok=True)
  backbone = embedder.backbone
  views = features_lib.embed_faces(
      embedder, meta, features_lib.cache_dir(out_dir, target, backbone.path, backbone.step),
      progress=progress)
  switches = dict(flip=flip, norm_score=norm_score, detector_score=detector_score)
  whole = score(views, meta, **switches)
  spheres = ([score(part, meta, **switches) for part in _spheres(views, num_spheres)]
             if num_spheres > 1 else [])
  name = label or backbone.record['model']
  rows = [(name, whole)] + [(f'{name}, sphere {k + 1}/{num_spheres} alone', s)
                            for k, s in enumerate(spheres)]
  prefix = os.path.join(out_dir, target.lower())
  np.save(f'{prefix}_scores.npy', whole['scores'])
  curves = {row_name: result['roc'] for row_name, result in rows}
  plots.plot_roc(f'{prefix}_roc.png', curves, title=f'{target} 1:1 ({name})', far_range=(1e-6, 1e-1))
  public = lambda r: {k: v for k, v in r.items() if k not in ('scores', 'roc')}
  payload = {'target': target, 'checkpoint': backbone.path, 'step': backbone.step,
             'switches': switches, 'faces': int(len(meta.images)),
             'templates': int(len(np.unique(meta.templates))), 'pairs': int(len(meta.pairs)),
             **public(whole), 'spheres': [public(s) for s in spheres]}
  with open(os.path.join(out_dir, f'{target}_results.json'), 'w', encoding='utf-8') as f:
    json.dump(payload, f, indent=2)
  payload['table'] = format_table(rows)
  return payload
