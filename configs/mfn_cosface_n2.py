"""MobileFaceNet, Multi-CosFace N=2: a row of the MultiFace table (emore, 20 epochs).

Command (any number of devices and hosts; the global batch stays the same)::

  python main.py --config=configs/mfn_cosface_n2.py --workdir=runs/mfn_cosface_n2 \
      --config.data_dir=/path/to/emore_tfrecords

Expected verification accuracy (%, 10-fold, flip TTA; the published numbers, not yet
reproduced by this code)::

  LFW   | CFP-FP | AgeDB-30 | CALFW | CPLFW
  99.50 | 93.58  | 96.17    | 95.20 | 89.03

Margin m = 0.3: the multi-sphere heads of the original take --m (default 0.3) for every kind.

Recipe (REFERENCE section 4): SGD momentum 0.9, lr 0.05, batch 200 (the batch the original
suggests for MobileFaceNet), lr /10 at epochs 12, 15, 18; weight decay 4e-5 on the backbone,
4e-4 on the final Linear and the head, 0 on BatchNorm (the defaults).
"""
from configs import default


def get_config():
  """MobileFaceNet, Multi-CosFace N=2."""
  config = default.get_config()
  config.head.kind = 'cosface'
  config.head.num_spheres = 2
  config.head.margin = 0.3
  return config
