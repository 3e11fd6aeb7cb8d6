"""IR-SE100, Multi-CosFace N=2: a row of the MultiFace table (emore, 20 epochs).

Command (any number of devices and hosts; the global batch stays the same)::

  python main.py --config=configs/irse100_cosface_n2.py --workdir=runs/irse100_cosface_n2 \
      --config.data_dir=/path/to/emore_tfrecords

Expected verification accuracy (%, 10-fold, flip TTA; the published numbers, not yet
reproduced by this code)::

  LFW | CFP-FP | AgeDB-30 | CALFW | CPLFW
  -   | 98.40  | 98.20    | 96.07 | 93.06

Margin m = 0.3: the original's multi-sphere heads take --m (default 0.3) for every kind.

Recipe (REFERENCE section 4): SGD momentum 0.9, lr 0.05, batch 180 (the original script's
default; the paper does not state the IR-SE100 batch), lr /10 at epochs 12, 15, 18; weight
decay 5e-4 on every non-BatchNorm parameter and the head, 0 on BatchNorm; dropout 0.6 before
the final Linear.
"""
from configs import default


def get_config():
  """IR-SE100, Multi-CosFace N=2."""
  config = default.get_config()
  config.model.name = 'ir_se100'
  config.model.options = {'dropout_rate': 0.6}
  config.batch_size = 180
  config.optimizer.weight_decay_backbone = 5e-4
  config.optimizer.weight_decay_embedding = 5e-4
  config.optimizer.weight_decay_head = 5e-4
  config.head.kind = 'cosface'
  config.head.num_spheres = 2
  config.head.margin = 0.3
  return config
