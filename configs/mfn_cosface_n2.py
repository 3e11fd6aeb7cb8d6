"""MobileFaceNet, Multi-CosFace N=2 (m = 0.3), emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/mfn_cosface_n2.py --workdir=runs/mfn_cosface_n2 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  LFW 99.50, CFP-FP 93.58, AgeDB-30 96.17, CALFW 95.20, CPLFW 89.03.
"""
from configs import published

get_config = published.row('mobilefacenet', 'cosface', num_spheres=2)
