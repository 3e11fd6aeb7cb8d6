"""IR-SE100, Multi-ArcFace N=2 (m = 0.3), emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/irse100_arcface_n2.py --workdir=runs/irse100_arcface_n2 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  CFP-FP 98.30, AgeDB-30 98.20, CALFW 96.02, CPLFW 93.17 (LFW not reported).
"""
from configs import published

get_config = published.row('ir_se100', 'arcface', num_spheres=2)
