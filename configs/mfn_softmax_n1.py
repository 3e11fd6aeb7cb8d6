"""MobileFaceNet, Softmax (NormFace), one sphere, emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/mfn_softmax_n1.py --workdir=runs/mfn_softmax_n1 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  LFW 99.22, CFP-FP 92.84, AgeDB-30 94.00, CALFW 93.80, CPLFW 88.30.
"""
from configs import published

get_config = published.row('mobilefacenet', 'softmax', num_spheres=1)
