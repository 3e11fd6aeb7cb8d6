"""MobileFaceNet, ArcFace (m = 0.5), one sphere, emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/mfn_arcface_n1.py --workdir=runs/mfn_arcface_n1 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  LFW 99.45, CFP-FP 92.27, AgeDB-30 96.03, CALFW 95.12, CPLFW 87.75.
"""
from configs import published

get_config = published.row('mobilefacenet', 'arcface', num_spheres=1)
