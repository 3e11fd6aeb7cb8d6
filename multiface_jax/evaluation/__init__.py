"""Verification evaluation: `protocol` (numpy, the published 10-fold accuracy), `embed` (jitted
flip-TTA embeddings), `evaluator` (every .bin set: table, JSON, ROC PNGs, TensorBoard), `plots`.

Kept empty of imports so that `evaluation.protocol` stays plain numpy for whoever imports it.
"""
