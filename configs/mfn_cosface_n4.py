"""MobileFaceNet, Multi-CosFace N=4 (m = 0.3), emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/mfn_cosface_n4.py --workdir=runs/mfn_cosface_n4 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  LFW 99.60, CFP-FP 94.11, AgeDB-30 96.13, CALFW 95.18, CPLFW 89.47.
"""
from configs import published

get_config = published.row('mobilefacenet', 'cosface', num_spheres=4)
