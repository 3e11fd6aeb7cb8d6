"""multiface-jax: MultiFace (multi-sphere margin losses) face recognition in JAX/Flax."""
