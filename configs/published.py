"""The recipe of the nine published rows of the MultiFace table; each row's config is one call.

  get_config = published.row('mobilefacenet', 'arcface', num_spheres=2)  # mfn_arcface_n2.py

The original's recipe (docs/original.md): SGD momentum 0.9, lr 0.05, lr /10 at epochs 12,
15 and 18 of 20, flips only. MobileFaceNet: batch 200 (the batch the original suggests for it),
weight decay 4e-5 on the backbone and 4e-4 on the final Linear and the head (the defaults of
``default.py``). IR-SE100: batch 180 (the original script's default; the paper does not state
it), weight decay 5e-4 on everything but BatchNorm, dropout 0.6 before the final Linear.
"""
import functools
from typing import Callable

import ml_collections

from configs import default

BACKBONES = ('mobilefacenet', 'ir_se100')
# The margins of the original's heads: its single-sphere ArcFace and CosFace classes use 0.5 and
# 0.35; its multi-sphere heads take the command line's --m (default 0.3) for either kind. The
# released script routes N = 1 through the multi-sphere head as well (m = 0.3), a quirk these
# configs do not copy: the single-sphere rows are the baselines the paper compares against.
SINGLE_SPHERE_MARGINS = {'arcface': 0.5, 'cosface': 0.35}
MULTI_SPHERE_MARGIN = 0.3


def build(backbone: str, kind: str, num_spheres: int) -> ml_collections.ConfigDict:
  """The config of one row: `backbone` (see BACKBONES), head `kind` with `num_spheres` spheres."""
  if backbone not in BACKBONES:
    raise ValueError(f'No published row uses backbone {backbone!r}; rows use {BACKBONES}.')
  config = default.get_config()
  config.head.kind = kind
  config.head.num_spheres = num_spheres
  if kind != 'softmax':  # the "Softmax" rows are NormFace: no margin
    config.head.margin = (SINGLE_SPHERE_MARGINS[kind] if num_spheres == 1 else
                          MULTI_SPHERE_MARGIN)
  if backbone == 'ir_se100':
    config.model.name = 'ir_se100'
    config.model.options = {'dropout_rate': 0.6}
    config.batch_size = 180
    for group in ('backbone', 'embedding', 'head'):
      config.optimizer[f'weight_decay_{group}'] = 5e-4
  return config


def row(backbone: str, kind: str, num_spheres: int) -> Callable[[], ml_collections.ConfigDict]:
  """The ``get_config`` of one row's config file (arguments as :func:`build`)."""
  return functools.partial(build, backbone, kind, num_spheres)
