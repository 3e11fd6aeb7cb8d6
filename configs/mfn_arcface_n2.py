"""MobileFaceNet, Multi-ArcFace N=2: a row of the MultiFace table (emore, 20 epochs).

Command (any number of devices and hosts; the global batch stays the same)::

  python main.py --config=configs/mfn_arcface_n2.py --workdir=runs/mfn_arcface_n2 \
      --config.data_dir=/path/to/emore_tfrecords

Expected verification accuracy (%, 10-fold, flip TTA; the published numbers, not yet
reproduced by this code)::

  LFW   | CFP-FP | AgeDB-30 | CALFW | CPLFW
  99.52 | 93.41  | 96.35    | 95.28 | 88.65

Margin m = 0.3: the original's multi-sphere heads take their margin from the command line
(--m, default 0.3), the value a published multi-sphere run used unless it overrode --m.

Recipe (REFERENCE section 4): SGD momentum 0.9, lr 0.05, batch 200 (the batch the original
suggests for MobileFaceNet), lr /10 at epochs 12, 15, 18; weight decay 4e-5 on the backbone,
4e-4 on the final Linear and the head, 0 on BatchNorm (the defaults).
"""
from configs import default


def get_config():
  """MobileFaceNet, Multi-ArcFace N=2."""
  config = default.get_config()
  config.head.kind = 'arcface'
  config.head.num_spheres = 2
  config.head.margin = 0.3
  return config
