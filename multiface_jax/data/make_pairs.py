"""Builds a balanced verification set (`.bin`) from folders of face images.

  python -m multiface_jax.data.make_pairs --src=ROOT --dst=x.bin --pairs=N --seed=S

ROOT holds one sub-folder per identity (use identities the model never trained on). N/2 pairs
show the same identity, N/2 two different ones, laid out like LFW's pairs: 10 contiguous folds
of N/10 pairs, each fold its N/20 same pairs followed by its N/20 different pairs, so the
10-fold protocol sees balanced folds. Pairs are distinct (no pair drawn twice). Images are
prepared like `from_folder` (RGB, fit and centred on a black square, or with --align detected
and aligned; JPEG quality 95). The output depends only on the files, N and the seed. With
--pairs=-1 the set holds every same-identity pair and as many different-identity pairs.
"""
import itertools

from absl import app
from absl import flags
import numpy as np

from multiface_jax.data import from_folder
from multiface_jax.data import verification_sets

NUM_FOLDS = 10
# num_pairs meaning "every same-identity pair, and as many different-identity pairs".
ALL_SAME = -1
_ENUMERATE_LIMIT = 2_000_000  # the most candidate pairs listed when random draws stall


def _sample_unique(draw, enumerate_all, num_possible, count, rng, kind):
  """Draws `count` distinct pairs: random draws first, then the unused ones if draws stall."""
  if count > num_possible:
    raise ValueError(f'asked for {count} {kind} pairs but the identities allow only '
                     f'{num_possible}; add identities/images or ask for fewer pairs')
  chosen, seen = [], set()
  attempts = 0
  while len(chosen) < count and attempts < 50 * count:
    attempts += 1
    pair = draw()
    if pair not in seen:
      seen.add(pair)
      chosen.append(pair)
  if len(chosen) < count:
    if num_possible > _ENUMERATE_LIMIT:
      raise ValueError(f'could not draw {count} distinct {kind} pairs; ask for fewer pairs')
    rest = [p for p in enumerate_all() if p not in seen]
    picked = rng.choice(len(rest), size=count - len(chosen), replace=False)
    chosen.extend(rest[i] for i in sorted(picked))
  return chosen


def sample_pairs(images_per_identity, num_pairs, seed):
  """Chooses balanced pairs of (identity, image index) references.

  Args:
    images_per_identity: the number of images of each identity.
    num_pairs: a positive multiple of 20 (10 folds x {same, different}), or ``ALL_SAME``: every
      same-identity pair (their count a multiple of 10) and as many different ones.
    seed: integer seed.

  Returns:
    (pairs, issame): pairs is a list of ((identity, image), (identity, image)), in fold order.
  """
  if num_pairs != ALL_SAME and (num_pairs <= 0 or num_pairs % (2 * NUM_FOLDS)):
    raise ValueError(f'num_pairs must be a positive multiple of {2 * NUM_FOLDS} (10 folds, each '
                     f'half same and half different pairs), got {num_pairs}')
  counts = np.asarray(images_per_identity, np.int64)
  if len(counts) < 2:
    raise ValueError(f'need at least 2 identities for different-identity pairs, got {len(counts)}')
  rng = np.random.default_rng(seed)
  half = num_pairs // 2
  multi = np.flatnonzero(counts >= 2)

  def draw_same():
    identity = int(multi[rng.integers(len(multi))]) if len(multi) else 0
    a, b = sorted(rng.choice(int(counts[identity]), size=2, replace=False).tolist())
    return (identity, a), (identity, b)

  def all_same():
    return [((i, a), (i, b)) for i in multi.tolist()
            for a, b in itertools.combinations(range(int(counts[i])), 2)]

  def draw_different():
    i, j = sorted(rng.choice(len(counts), size=2, replace=False).tolist())
    return (i, int(rng.integers(counts[i]))), (j, int(rng.integers(counts[j])))

  def all_different():
    return [((i, a), (j, b)) for i, j in itertools.combinations(range(len(counts)), 2)
            for a in range(int(counts[i])) for b in range(int(counts[j]))]

  num_same_possible = int((counts * (counts - 1) // 2).sum())
  num_different_possible = int((counts.sum() ** 2 - (counts ** 2).sum()) // 2)
  if num_pairs == ALL_SAME:
    half = num_same_possible
    if not half or half % NUM_FOLDS:
      raise ValueError(f'the identities allow {num_same_possible} same-identity pairs; every '
                       f'pair needs a multiple of {NUM_FOLDS} (balanced folds)')
    same = all_same()
    rng.shuffle(same)
  else:
    same = _sample_unique(draw_same, all_same, num_same_possible, half, rng, 'same-identity')
  different = _sample_unique(draw_different, all_different, num_different_possible, half, rng,
                             'different-identity')
  per_fold = half // NUM_FOLDS
  pairs, issame = [], []
  for fold in range(NUM_FOLDS):
    fold_slice = slice(fold * per_fold, (fold + 1) * per_fold)
    pairs += same[fold_slice] + different[fold_slice]
    issame += [True] * per_fold + [False] * per_fold
  return pairs, issame


def make_pairs(identity_dirs, num_pairs, seed, *, image_size=from_folder.IMAGE_SIZE,
               quality=from_folder.JPEG_QUALITY, load=from_folder.load_face):
  """Builds a balanced verification set from identity folders.

  Args:
    identity_dirs: one folder of images per identity (order does not matter: they are sorted).
    num_pairs: a positive multiple of 20, or ``ALL_SAME`` (see :func:`sample_pairs`).
    seed: integer seed; the same files, num_pairs and seed give the same set.
    image_size: side of the square images.
    quality: JPEG quality.
    load: ``load(path, image_size) -> PIL image``: ``from_folder.load_face`` (aligned faces) or
      ``from_folder.AlignedFace()`` (raw photos: detect and align).

  Returns:
    (encoded_images, issame): 2 * num_pairs JPEG byte strings (pair i = images 2i, 2i+1) and
    num_pairs booleans; pass them to `verification_sets.save_bin`.

  Raises:
    ValueError: too few identities/images for the pairs asked, or an unreadable image.
  """
  identity_dirs = sorted(str(d) for d in identity_dirs)
  files = [from_folder.list_images(d) for d in identity_dirs]
  for directory, paths in zip(identity_dirs, files):
    if not paths:
      raise ValueError(f'identity folder {directory} holds no image; add images or leave it out')
  pairs, issame = sample_pairs([len(paths) for paths in files], num_pairs, seed)
  encoded_by_ref = {}
  encoded_images = []
  for pair in pairs:
    for identity, image in pair:
      if (identity, image) not in encoded_by_ref:
        path = files[identity][image]
        try:
          face = load(path, image_size)
        except (OSError, ValueError) as e:
          raise ValueError(f'cannot read image {path} ({e}); remove it and run again') from None
        encoded_by_ref[(identity, image)] = from_folder.encode_jpeg(face, quality)
      encoded_images.append(encoded_by_ref[(identity, image)])
  return encoded_images, issame


def _define_flags():
  # Defined only when run as a program, so importing make_pairs (the demo does) cannot collide
  # with the importer's own flags.
  flags.DEFINE_string('src', None, 'Folder with one sub-folder of images per identity.')
  flags.DEFINE_string('dst', None, 'Output .bin file.')
  flags.DEFINE_integer('pairs', 6000, 'Number of pairs, a multiple of 20; -1: every '
                       'same-identity pair and as many different-identity pairs.')
  flags.DEFINE_integer('seed', 0, 'Random seed.')
  flags.DEFINE_integer('image_size', from_folder.IMAGE_SIZE, 'Side of the square images.')
  flags.DEFINE_bool('align', False, 'Raw photos: detect the largest face and align it (as '
                    '`from_folder --align`); default: the images are aligned faces already.')
  flags.mark_flags_as_required(['src', 'dst'])


def main(argv):
  del argv
  flags_ = flags.FLAGS
  load = from_folder.AlignedFace() if flags_.align else from_folder.load_face
  encoded, issame = make_pairs(from_folder.list_identity_dirs(flags_.src), flags_.pairs,
                               flags_.seed, image_size=flags_.image_size, load=load)
  verification_sets.save_bin(flags_.dst, encoded, issame)
  print(f'{len(issame)} pairs ({sum(issame)} same) -> {flags_.dst}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
