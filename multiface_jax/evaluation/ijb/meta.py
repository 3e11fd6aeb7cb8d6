"""The IJB-B / IJB-C meta files, in the layout insightface distributes them, read and checked.

  ROOT/IJBC/meta/ijbc_face_tid_mid.txt          image template media          (one face a line)
  ROOT/IJBC/meta/ijbc_name_5pts_score.txt       image x1 y1 ... x5 y5 faceness
  ROOT/IJBC/meta/ijbc_template_pair_label.txt   template1 template2 label      (1:1 pairs)
  ROOT/IJBC/meta/ijbc_1N_gallery_G1.csv, _G2.csv, ijbc_1N_probe_mixed.csv      (1:N, optional)
  ROOT/IJBC/loose_crop/<image>

IJB-B is the same with ``IJBB`` / ``ijbb_`` and galleries ``_S1`` / ``_S2``. The 1:N CSVs have a
header and rows ``TEMPLATE_ID,SUBJECT_ID,...`` (one per image); their templates are pooled from
the faces of ``face_tid_mid`` like the 1:1 ones.
"""
import dataclasses
import os
from typing import Optional

import numpy as np

TARGETS = ('IJBB', 'IJBC')
GALLERIES = {'IJBB': ('S1', 'S2'), 'IJBC': ('G1', 'G2')}
_CONTENTS = {
    'face_tid_mid.txt': 'one line per face: image name, template id, media id',
    'name_5pts_score.txt': 'one line per face: image name, 10 landmark coordinates, faceness',
    'template_pair_label.txt': 'one line per pair: template 1, template 2, label (1 = same)',
}


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class IJBError(ValueError):
  """A meta file that is missing or malformed; the message names the file, the line and the fix."""


@dataclasses.dataclass(frozen=True)
class Identification:
  """The 1:N protocol: gallery and probe templates with their subjects."""
  gallery_templates: np.ndarray
  gallery_subjects: np.ndarray
  probe_templates: np.ndarray
  probe_subjects: np.ndarray


@dataclasses.dataclass(frozen=True)
class IJBMeta:
  """Everything of one target. Per face: ``images`` (names), ``templates``, ``medias``,
  ``landmarks`` (n, 5, 2), ``faceness`` (n,); per pair: ``pairs`` (p, 2) template ids and
  ``labels`` (p,) int; ``identification`` when the 1:N files are there."""
  target: str
  image_dir: str
  images: np.ndarray
  templates: np.ndarray
  medias: np.ndarray
  landmarks: np.ndarray
  faceness: np.ndarray
  pairs: np.ndarray
  labels: np.ndarray
  identification: Optional[Identification]


def meta_path(root: str, target: str, name: str) -> str:
  return os.path.join(root, target, 'meta', f'{target.lower()}_{name}')


def _read_text(path: str) -> list[str]:
  """The lines of a meta file; IJBError naming the file when it is not UTF-8 text."""
  try:
    with open(path, encoding='utf-8') as f:
      return f.readlines()
  except UnicodeDecodeError as e:
    raise IJBError(f'{path}: not UTF-8 text ({e}); is it a damaged copy of the meta file?') \
        from None


def _lines(path: str, what: str) -> list[list[str]]:
  if not os.path.isfile(path):
    raise IJBError(f'{path} is missing: it should hold {what} (insightface\'s IJB meta files, '
                   'as distributed with its IJB evaluation).')
  return [line.split() for line in _read_text(path) if line.strip()]


def _table(path: str, what: str, columns: int, kinds: str) -> list[np.ndarray]:
  """The columns of a whitespace-separated file: 's' string, 'i' int, 'f' float per column."""
  rows = _lines(path, what)
  for number, row in enumerate(rows, 1):
    if len(row) != columns:
      raise IJBError(f'{path}:{number}: expected {columns} fields ({what}), got {len(row)}.')
  out = []
  for index, kind in enumerate(kinds):
    values = [row[index] for row in rows]
    if kind == 's':
      out.append(np.array(values, dtype=str))
      continue
    try:
      out.append(np.array(values, dtype=np.int64 if kind == 'i' else np.float64))
    except (ValueError, OverflowError):  # OverflowError: an integer past int64
      number = next(n for n, v in enumerate(values, 1) if not _is_number(v, kind))
      raise IJBError(f'{path}:{number}: field {index + 1} is {values[number - 1]!r}, not '
                     f'{"a 64-bit integer" if kind == "i" else "a number"} ({what}).') from None
  return out


def _is_number(text: str, kind: str) -> bool:
  """Whether numpy reads `text` as an int64 ('i') or a float64 (the same parse as the column's)."""
  try:
    np.array([text], dtype=np.int64 if kind == 'i' else np.float64)
    return True
  except (ValueError, OverflowError):
    return False


def _subjects_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(templates, subjects), one per template, of a 1:N CSV (header, TEMPLATE_ID,SUBJECT_ID,...)."""
  rows = [line.strip().split(',') for line in _read_text(path) if line.strip()]
  pairs = {}
  for number, row in enumerate(rows[1:], 2):
    try:
      template, subject = int(row[0]), int(row[1])
      if not all(_INT64_MIN <= v <= _INT64_MAX for v in (template, subject)):
        raise ValueError
    except (ValueError, IndexError):
      raise IJBError(f'{path}:{number}: expected TEMPLATE_ID,SUBJECT_ID,... 64-bit integers, got '
                     f'{",".join(row[:2])!r}.') from None
    if pairs.setdefault(template, subject) != subject:
      raise IJBError(f'{path}:{number}: template {template} has two subjects.')
  templates = np.array(sorted(pairs), np.int64)
  return templates, np.array([pairs[t] for t in templates], np.int64)


def _identification(root: str, target: str, known: np.ndarray) -> Optional[Identification]:
  names = [f'1N_gallery_{g}.csv' for g in GALLERIES[target]] + ['1N_probe_mixed.csv']
  paths = [meta_path(root, target, name) for name in names]
  present = [os.path.isfile(p) for p in paths]
  if not any(present):
    return None
  if not all(present):
    missing = [p for p, there in zip(paths, present) if not there]
    raise IJBError(f'{missing[0]} is missing: the 1:N protocol needs {", ".join(names)} (rows '
                   'TEMPLATE_ID,SUBJECT_ID,... after a header).')
  tables = [_subjects_csv(p) for p in paths]
  for path, (templates, _) in zip(paths, tables):
    unknown = np.setdiff1d(templates, known)
    if unknown.size:
      raise IJBError(f'{path}: template {unknown[0]} has no face in '
                     f'{meta_path(root, target, "face_tid_mid.txt")}.')
  gallery_templates = np.concatenate([t for t, _ in tables[:2]])
  gallery_subjects = np.concatenate([s for _, s in tables[:2]])
  return Identification(gallery_templates, gallery_subjects, tables[2][0], tables[2][1])


def read(root: str, target: str) -> IJBMeta:
  """Reads and checks the meta files of `target` ('IJBB' or 'IJBC') under `root`.

  Raises:
    IJBError: a file is missing (named, with what it should hold), a line has the wrong number
      of fields or a field that is not a number, the face and landmark lists disagree, or a
      pair names a template that has no face.
  """
  if target not in TARGETS:
    raise IJBError(f'--target={target!r}: use one of {", ".join(TARGETS)}.')
  tid_path = meta_path(root, target, 'face_tid_mid.txt')
  images, templates, medias = _table(tid_path, _CONTENTS['face_tid_mid.txt'], 3, 'sii')
  pts_path = meta_path(root, target, 'name_5pts_score.txt')
  columns = _table(pts_path, _CONTENTS['name_5pts_score.txt'], 12, 's' + 'f' * 11)
  if len(columns[0]) != len(images) or np.any(columns[0] != images):
    mismatch = next((i for i, (a, b) in enumerate(zip(columns[0], images)) if a != b),
                    min(len(columns[0]), len(images)))
    raise IJBError(f'{pts_path}:{mismatch + 1}: the landmark list and {tid_path} list different '
                   'faces (they must list the same images in the same order).')
  landmarks = np.stack(columns[1:11], axis=1).reshape(-1, 5, 2)
  pair_path = meta_path(root, target, 'template_pair_label.txt')
  first, second, labels = _table(pair_path, _CONTENTS['template_pair_label.txt'], 3, 'iii')
  known = np.unique(templates)
  for column in (first, second):
    unknown = ~np.isin(column, known)
    if unknown.any():
      line = int(np.argmax(unknown))
      raise IJBError(f'{pair_path}:{line + 1}: template {column[line]} has no face in '
                     f'{tid_path}.')
  return IJBMeta(target=target, image_dir=os.path.join(root, target, 'loose_crop'),
                 images=images, templates=templates, medias=medias, landmarks=landmarks,
                 faceness=columns[11], pairs=np.stack([first, second], axis=1), labels=labels,
                 identification=_identification(root, target, known))
