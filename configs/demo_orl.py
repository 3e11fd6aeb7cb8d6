"""The embedded demo: MobileFaceNet, Multi-ArcFace N=2, on 30 ORL / AT&T identities (300 images).

Run through `make demo` (which prepares the data and evaluates on 10 held-out identities), or::

  python -m multiface_jax.demo --workdir=runs/demo

Same model, head, optimiser and pipeline as the published rows; only the data is small: 30
identities x 10 gray 92x112 faces padded to 112x112. A short cosine schedule with warmup replaces
the 20-epoch step schedule, and the batch is smaller so an epoch has several steps.
"""
from configs import default


def get_config():
  """MobileFaceNet + 2-sphere ArcFace (m = 0.3, the original's multi-sphere default) on ORL."""
  config = default.get_config()
  config.head.kind = 'arcface'
  config.head.num_spheres = 2
  config.head.margin = 0.3
  config.batch_size = 50
  config.num_epochs = 20.0
  config.optimizer.lr = 0.1
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_epochs = 2.0
  config.log_every_steps = 12
  config.checkpoint_every_steps = 60
  config.keep_checkpoints = 2
  # The demo evaluates once, after training, next to its baselines.
  config.eval_during_training = False
  config.eval_batch_size = 100
  return config
