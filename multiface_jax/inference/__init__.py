"""Using a trained model: load any checkpoint with its model record (``loading``), find faces and
their landmarks (``detect``), align them (``align``), embed them (``embedder``), export to ONNX
(``onnx_export``). The commands on top: ``multiface_jax.embed``, ``verify``, ``export``."""
