"""MobileFaceNet, Multi-ArcFace N=2 (m = 0.3), emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/mfn_arcface_n2.py --workdir=runs/mfn_arcface_n2 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  LFW 99.52, CFP-FP 93.41, AgeDB-30 96.35, CALFW 95.28, CPLFW 88.65.
"""
from configs import published

get_config = published.row('mobilefacenet', 'arcface', num_spheres=2)
