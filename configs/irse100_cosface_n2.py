"""IR-SE100, Multi-CosFace N=2 (m = 0.3), emore, 20 epochs: a row of the MultiFace table.

  python main.py --config=configs/irse100_cosface_n2.py --workdir=runs/irse100_cosface_n2 \
      --config.data_dir=/data/emore_tfrecords

Published (not yet reproduced here):
  CFP-FP 98.40, AgeDB-30 98.20, CALFW 96.07, CPLFW 93.06 (LFW not reported).
"""
from configs import published

get_config = published.row('ir_se100', 'cosface', num_spheres=2)
