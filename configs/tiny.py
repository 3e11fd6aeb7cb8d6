"""Tiny config for tests and smoke runs: the tiny backbone, a 2-sphere ArcFace head, batch 8.

Runs on a laptop CPU in seconds, on synthetic data or on any converted folder::

  python main.py --config=configs/tiny.py --workdir=runs/tiny
  python main.py --config=configs/tiny.py --workdir=runs/tiny \
      --config.synthetic_data=False --config.data_dir=/path/to/converted

It checks the machinery (input, step, checkpoints, evaluation), not accuracy: on synthetic data
the loss falls within 20 steps because the 32 images of its four cycled batches get memorised.
"""
from configs import default


def get_config():
  """Tiny backbone, two spheres, a few steps."""
  config = default.get_config()
  config.model.name = 'tiny'
  config.head.kind = 'arcface'
  config.head.num_spheres = 2
  config.head.margin = 0.3
  config.synthetic_data = True
  config.num_classes = 16
  config.num_train_images = 64
  config.batch_size = 8
  config.num_train_steps = 20
  config.optimizer.lr = 0.1
  config.optimizer.boundaries_steps = (15,)
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  config.keep_checkpoints = 2
  config.eval_every_steps = 0
  config.eval_batch_size = 16
  return config
