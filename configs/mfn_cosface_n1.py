"""MobileFaceNet, CosFace, one sphere: a row of the MultiFace table (emore, 20 epochs).

Command (any number of devices and hosts; the global batch stays the same)::

  python main.py --config=configs/mfn_cosface_n1.py --workdir=runs/mfn_cosface_n1 \
      --config.data_dir=/path/to/emore_tfrecords

Expected verification accuracy (%, 10-fold, flip TTA; the published numbers, not yet
reproduced by this code)::

  LFW   | CFP-FP | AgeDB-30 | CALFW | CPLFW
  99.43 | 92.83  | 95.77    | 94.97 | 88.88

Margin m = 0.35: the original's single-sphere CosFace (AM-softmax) class uses 0.35. The released
script would route N = 1 through the multi-sphere head with m = --m (default 0.3), a quirk we do
not copy: the table's CosFace row is the single-sphere baseline.

Recipe (REFERENCE section 4): SGD momentum 0.9, lr 0.05, batch 200 (the batch the original
suggests for MobileFaceNet), lr /10 at epochs 12, 15, 18; weight decay 4e-5 on the backbone,
4e-4 on the final Linear and the head, 0 on BatchNorm (the defaults).
"""
from configs import default


def get_config():
  """MobileFaceNet, CosFace, one sphere."""
  config = default.get_config()
  config.head.kind = 'cosface'
  config.head.num_spheres = 1
  config.head.margin = 0.35
  return config
