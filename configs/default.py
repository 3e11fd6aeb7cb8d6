"""Default configuration: the original MultiFace recipe for MobileFaceNet on emore.

Every other config imports this one and overrides a few fields. Override any field from the
command line, e.g. ``--config.batch_size=512 --config.optimizer.lr=0.1``; the config is locked,
so a misspelled field is an error instead of a silently ignored new one.

Durations can be given in epochs or in steps: a ``*_steps`` field set to -1 means "derive it from
the matching ``*_epochs`` field" (``training.schedule.plan_steps`` converts them, in one place). A *step* is
one global batch of ``batch_size`` images. The original's recipe, which these defaults follow for
MobileFaceNet, is written down in docs/original.md.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config (MobileFaceNet, single-sphere ArcFace, the original recipe)."""
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  # Backbone: mobilefacenet | ir50 | ir100 | ir152 | ir_se50 | ir_se100 | ir_se152 | tiny.
  config.model.name = 'mobilefacenet'
  # Compute dtype of the backbone: 'float32' or 'bfloat16'. Params, embeddings, logits and loss
  # stay float32 either way.
  config.model.dtype = 'float32'
  # Backbone-specific options passed to create_model (IR / IR-SE: dropout_rate).
  config.model.options = ml_collections.ConfigDict()

  config.head = ml_collections.ConfigDict()
  # Margin kind of every sphere: softmax (NormFace) | arcface | cosface | combined.
  config.head.kind = 'arcface'
  # N: the 512-d embedding is cut into N slices, one classifier each, losses summed.
  config.head.num_spheres = 1
  # s: logit scale (64 in the original for every head).
  config.head.scale = 64.0
  # m: additive angular (arcface) or cosine (cosface) margin; ignored by softmax.
  config.head.margin = 0.5
  # (m1, m2, m3) of kind='combined': target logit cos(m1*theta + m2) - m3.
  config.head.combined_margins = (1.0, 0.5, 0.0)
  # 'global': slices of the unit embedding (the original); 'per_sphere': each slice renormalised.
  config.head.normalization = 'global'
  # True: margin under stop_gradient (arcface_torch); False: differentiable margin (the original).
  config.head.straight_through = False
  # PartialFC: the share of each class shard sampled per step (the batch's classes and random
  # others), in (0, 1]; 1.0 = the full softmax. See training/sharded_head.py.
  config.head.sample_rate = 1.0

  config.augment = ml_collections.ConfigDict()
  # Training-image augmentation (data/augment.py), drawn per batch from the seed and the step.
  # Random left-right flip (the original's only augmentation).
  config.augment.flip = True
  # Largest random shift, as a fraction of the image side; 0 = none ...
  config.augment.shift = 0.0
  # ... relative zoom (0.1: scale 0.9 to 1.1) ...
  config.augment.zoom = 0.0
  # ... rotation in degrees ...
  config.augment.rotate = 0.0
  # ... added brightness, as a fraction of 255 ...
  config.augment.brightness = 0.0
  # ... and relative contrast change about the image mean.
  config.augment.contrast = 0.0

  # Folder written by `python -m multiface_jax.data.convert` (TFRecords, metadata.json, *.bin).
  config.data_dir = ''
  # Train on random images instead of data_dir (throughput runs, tests).
  config.synthetic_data = False
  # Identities; 0 = from data_dir's metadata.json (with synthetic_data: emore's 85,742).
  config.num_classes = 0
  # Training images; 0 = from metadata.json (with synthetic_data: emore's 5,822,653).
  config.num_train_images = 0
  # Images per step, over all devices and hosts (the original: 200 for MobileFaceNet).
  config.batch_size = 200
  # Length of the run in epochs (used when num_train_steps = -1).
  config.num_epochs = 20.0
  # Length of the run in steps; -1 = num_epochs * steps_per_epoch.
  config.num_train_steps = -1
  # Steps whose gradients are averaged before one update (optax.MultiSteps); 1 = none.
  config.grad_accum_steps = 1

  config.optimizer = ml_collections.ConfigDict()
  # Peak learning rate (the original's command-line default 0.05, for its batch of 180-200).
  config.optimizer.lr = 0.05
  # SGD momentum (torch semantics: buf = momentum * buf + grad).
  config.optimizer.momentum = 0.9
  # Nesterov momentum (the original: off).
  config.optimizer.nesterov = False
  # Coupled L2 weight decay per group, added to the gradient before momentum (torch SGD):
  # backbone params that are neither BatchNorm nor the final Linear (convs, PReLU slopes) ...
  config.optimizer.weight_decay_backbone = 4e-5
  # ... the backbone's final Linear (512 -> embedding) ...
  config.optimizer.weight_decay_embedding = 4e-4
  # ... the head's class weights ...
  config.optimizer.weight_decay_head = 4e-4
  # ... and BatchNorm scale/bias.
  config.optimizer.weight_decay_bn = 0.0
  # Learning-rate schedule: step | cosine | poly | constant.
  config.optimizer.schedule = 'step'
  # 'step': multiply the rate by decay_factor at these epochs (the original: 12, 15, 18) ...
  config.optimizer.boundaries_epochs = (12.0, 15.0, 18.0)
  # ... or at these steps when non-empty (overrides boundaries_epochs).
  config.optimizer.boundaries_steps = ()
  # 'step': factor applied at each boundary.
  config.optimizer.decay_factor = 0.1
  # 'cosine' / 'poly': rate reached at the last step.
  config.optimizer.end_lr = 0.0
  # 'poly': exponent of (1 - progress).
  config.optimizer.poly_power = 2.0
  # Linear warmup from ~0 to lr over this many epochs (the original: none) ...
  config.optimizer.warmup_epochs = 0.0
  # ... or steps, when >= 0.
  config.optimizer.warmup_steps = -1

  # Steps between progress lines and TensorBoard scalars (also the non-finite-loss check).
  config.log_every_steps = 100
  # Steps between checkpoints (one is also written at the end and on SIGTERM).
  config.checkpoint_every_steps = 2000
  # Checkpoints kept in workdir/checkpoints (older ones are deleted).
  config.keep_checkpoints = 3
  # Evaluate on data_dir's verification .bin sets every this many epochs (the original: ten
  # times per epoch); 0 = only at the end ...
  config.eval_every_epochs = 0.1
  # ... or every this many steps, when >= 0.
  config.eval_every_steps = -1
  # False: the train loop never evaluates (use --mode=eval afterwards).
  config.eval_during_training = True
  # Global batch of the verification embedding (a multiple of the device count).
  config.eval_batch_size = 256
  # Subset of the .bin sets to evaluate, comma-separated ('' = every set in data_dir).
  config.eval_sets = ''
  # main.py --mode=eval also evaluates on IJB-B / IJB-C when this names the folder holding IJBB/
  # and IJBC/ (insightface's meta/ and loose_crop/ layout); '' = not.
  config.ijb_root = ''
  # The IJB targets evaluated with ijb_root, comma-separated.
  config.ijb_targets = 'IJBC'
  # Seed of the parameter init, the data order and the flips.
  config.seed = 0

  config.mesh = ml_collections.ConfigDict()
  # Devices over which the head's classes are split ('model' mesh axis); 1 = no class sharding.
  # The batch is always split over every device.
  config.mesh.model_axis_size = 1

  # Orbax checkpoint to start from (fine-tuning / imported weights): a {params, batch_stats}
  # checkpoint (python -m multiface_jax.import_torch) or a training checkpoint's step folder.
  # Only the backbone is loaded; ignored when workdir already holds a checkpoint (resume wins).
  config.init_checkpoint = ''
  return config
