"""A backbone as an ONNX model in arcface_torch's convention, checked against JAX.

Input ``input``: float32 NCHW (batch, 3, 112, 112), RGB, already normalised as
(x / 255 - 0.5) / 0.5; the batch axis is dynamic. Output ``embedding``: (batch, D), exactly what
``model.apply(variables, images, train=False)`` returns (unit L2 norm). The graph is traced from
the Flax model with XLA's own kernels (``kernel_set='xla'``: plain convolutions that every ONNX
runtime has) and converted by jax2onnx; the weights are constants in the graph.
"""
import contextlib
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from multiface_jax.inference import loading

INPUT_NAME, OUTPUT_NAME = 'input', 'embedding'
# The check after writing: onnxruntime must give JAX's embeddings to this (max |difference|).
TOLERANCE = 1e-4


@contextlib.contextmanager
def _quiet_converter():
  """jax2onnx and onnx_ir log every optional plugin they cannot import, and value-type notes."""
  loggers = [logging.getLogger(name) for name in ('jax2onnx', 'onnx_ir')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def to_onnx(backbone: loading.Backbone, opset: int = 18):
  """The backbone as an ``onnx.ModelProto`` (see the module docstring)."""
  with _quiet_converter():
    from jax2onnx import to_onnx as convert  # pylint: disable=import-outside-toplevel
    model = loading.create_backbone(backbone.record, kernel_set='xla')
    variables = jax.device_get(backbone.variables)

    def embed_nchw(images_nchw):
      return model.apply(variables, jnp.transpose(images_nchw, (0, 2, 3, 1)), train=False)

    onnx_model = convert(embed_nchw, [('batch', 3, 112, 112)], opset=opset)
  graph = onnx_model.graph
  _rename(graph, graph.input[0].name, INPUT_NAME)
  _rename(graph, graph.output[0].name, OUTPUT_NAME)
  return onnx_model


def _rename(graph, old: str, new: str) -> None:
  """Renames a graph input or output and every use of it."""
  for value in list(graph.input) + list(graph.output):
    if value.name == old:
      value.name = new
  for node in graph.node:
    node.input[:] = [new if name == old else name for name in node.input]
    node.output[:] = [new if name == old else name for name in node.output]


def sidecar(backbone: loading.Backbone, threshold: Optional[Mapping[str, Any]] = None) -> dict:
  """The JSON written next to the .onnx: what the model expects and returns."""
  record = backbone.record
  return {
      'model': record['model'], 'embedding_size': record['embedding_size'],
      'input': {'name': INPUT_NAME, 'layout': 'NCHW', 'shape': ['batch', 3, 112, 112],
                'dtype': 'float32', 'colour': 'RGB',
                'normalization': '(x / 255 - 0.5) / 0.5, applied by the caller',
                'alignment': '5-point similarity onto the ArcFace 112x112 template'},
      'output': {'name': OUTPUT_NAME, 'shape': ['batch', record['embedding_size']],
                 'normalized': True},
      'source': {'checkpoint': backbone.path, 'step': backbone.step},
      'threshold': threshold,
  }


def normalized_nchw(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 NHWC RGB -> the ONNX input: float32 NCHW, (x / 255 - 0.5) / 0.5."""
  x = (np.asarray(images_uint8, np.float32) / 255.0 - 0.5) / 0.5
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def max_difference(onnx_path: str, backbone: loading.Backbone, images_uint8: np.ndarray) -> float:
  """max |onnxruntime(images) - model.apply(images)| over aligned uint8 NHWC RGB images."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
  inputs = normalized_nchw(images_uint8)
  theirs = session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
  apply = jax.jit(lambda v, x: backbone.model.apply(v, jnp.transpose(x, (0, 2, 3, 1)),
                                                    train=False))
  ours = np.asarray(apply(backbone.variables, inputs))
  return float(np.max(np.abs(theirs - ours)))


def export(backbone: loading.Backbone, out_path: str, check_images: np.ndarray, *,
           threshold: Optional[Mapping[str, Any]] = None) -> dict:
  """Writes `out_path` (.onnx) and its ``.json``, then checks them on `check_images`.

  Returns:
    The sidecar, with ``check`` = {images, max_abs_difference, tolerance}.

  Raises:
    ValueError: onnxruntime's embeddings differ from JAX's by more than TOLERANCE; the files
      are removed.
  """
  import onnx  # pylint: disable=import-outside-toplevel
  onnx.save(to_onnx(backbone), out_path)
  difference = max_difference(out_path, backbone, check_images)
  if not difference <= TOLERANCE:
    os.remove(out_path)
    raise ValueError(f'{out_path}: onnxruntime differs from JAX by {difference:.2e} on '
                     f'{len(check_images)} faces (tolerance {TOLERANCE}); nothing was kept.')
  info = sidecar(backbone, threshold)
  info['check'] = {'images': int(len(check_images)), 'max_abs_difference': difference,
                   'tolerance': TOLERANCE}
  with open(os.path.splitext(out_path)[0] + '.json', 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=2)
  return info
