"""ROC curve figures of the verification sets (matplotlib, headless)."""
from __future__ import annotations

import os
from typing import Mapping

import matplotlib

matplotlib.use('Agg')  # Training hosts have no display; set before pyplot is imported.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_roc(path: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, title: str,
             far_target: float | None = None,
             far_range: tuple[float, float] = (1e-4, 1.0)) -> None:
  """Writes a ROC figure (TPR against FPR on a log axis) with one line per curve.

  Args:
    path: the PNG to write (its folder must exist); replaced atomically.
    curves: label -> (fpr, tpr), the fold-averaged curves of ``protocol.evaluate``; the first
      is drawn solid, the others (e.g. each sphere alone) dashed.
    title: figure title.
    far_target: if given, a vertical line at this FAR (the VAL@FAR operating point).
    far_range: the FAR axis's limits.
  """
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
  for i, (label, (fpr, tpr)) in enumerate(curves.items()):
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    shown = fpr > 0  # a log axis cannot place FPR = 0
    ax.plot(fpr[shown], tpr[shown], '-' if i == 0 else '--', lw=2 if i == 0 else 1, label=label)
  if far_target is not None:
    ax.axvline(far_target, color='gray', lw=0.8, ls=':', label=f'FAR = {far_target:g}')
  ax.set_xscale('log')
  ax.set_xlim(*far_range)
  ax.set_ylim(0.0, 1.01)
  ax.set_xlabel('false accept rate (FPR)')
  ax.set_ylabel('true accept rate (TPR)')
  ax.set_title(title, fontsize=10)
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  tmp_path = os.path.join(os.path.dirname(path) or '.', f'.{os.path.basename(path)}.tmp')
  try:
    fig.savefig(tmp_path, format='png')
    os.replace(tmp_path, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
