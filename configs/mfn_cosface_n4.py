"""MobileFaceNet, Multi-CosFace N=4: a row of the MultiFace table (emore, 20 epochs).

Command (any number of devices and hosts; the global batch stays the same)::

  python main.py --config=configs/mfn_cosface_n4.py --workdir=runs/mfn_cosface_n4 \
      --config.data_dir=/path/to/emore_tfrecords

Expected verification accuracy (%, 10-fold, flip TTA; the published numbers, not yet
reproduced by this code)::

  LFW   | CFP-FP | AgeDB-30 | CALFW | CPLFW
  99.60 | 94.11  | 96.13    | 95.18 | 89.47

Margin m = 0.3: the multi-sphere heads of the original take --m (default 0.3) for every kind.

Recipe (REFERENCE section 4): SGD momentum 0.9, lr 0.05, batch 200 (the batch the original
suggests for MobileFaceNet), lr /10 at epochs 12, 15, 18; weight decay 4e-5 on the backbone,
4e-4 on the final Linear and the head, 0 on BatchNorm (the defaults).
"""
from configs import default


def get_config():
  """MobileFaceNet, Multi-CosFace N=4."""
  config = default.get_config()
  config.head.kind = 'cosface'
  config.head.num_spheres = 4
  config.head.margin = 0.3
  return config
