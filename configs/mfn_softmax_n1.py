"""MobileFaceNet, Softmax (NormFace, s=64), one sphere: a row of the MultiFace table (emore, 20 epochs).

Command (any number of devices and hosts; the global batch stays the same)::

  python main.py --config=configs/mfn_softmax_n1.py --workdir=runs/mfn_softmax_n1 \
      --config.data_dir=/path/to/emore_tfrecords

Expected verification accuracy (%, 10-fold, flip TTA; the published numbers, not yet
reproduced by this code)::

  LFW   | CFP-FP | AgeDB-30 | CALFW | CPLFW
  99.22 | 92.84  | 94.00    | 93.80 | 88.30

No margin: the "Softmax" rows are NormFace (normalised features and weights, scale 64).

Recipe (REFERENCE section 4): SGD momentum 0.9, lr 0.05, batch 200 (the batch the original
suggests for MobileFaceNet), lr /10 at epochs 12, 15, 18; weight decay 4e-5 on the backbone,
4e-4 on the final Linear and the head, 0 on BatchNorm (the defaults).
"""
from configs import default


def get_config():
  """MobileFaceNet, Softmax (NormFace, s=64), one sphere."""
  config = default.get_config()
  config.head.kind = 'softmax'
  config.head.num_spheres = 1
  return config
