"""MobileFaceNet, CosFace (m = 0.35), one sphere, emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/mfn_cosface_n1.py --workdir=runs/mfn_cosface_n1 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  LFW 99.43, CFP-FP 92.83, AgeDB-30 95.77, CALFW 94.97, CPLFW 88.88.
"""
from configs import published

get_config = published.row('mobilefacenet', 'cosface', num_spheres=1)
