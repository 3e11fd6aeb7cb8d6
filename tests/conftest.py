"""Shared test set-up: TensorFlow off any GPU, JAX on the CPU and tuned as every command tunes
it (cpu_tuning.configure(), before any test computes), quiet logs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from multiface_jax import cpu_tuning  # pylint: disable=wrong-import-position

cpu_tuning.configure()
