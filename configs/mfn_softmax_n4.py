"""MobileFaceNet, Multi-Softmax N=4, emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/mfn_softmax_n4.py --workdir=runs/mfn_softmax_n4 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  LFW 99.40, CFP-FP 95.46, AgeDB-30 95.25, CALFW 95.15, CPLFW 90.22.
"""
from configs import published

get_config = published.row('mobilefacenet', 'softmax', num_spheres=4)
