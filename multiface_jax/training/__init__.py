"""Training: the state and its step, the trainer built from a config, the loop, schedules, the
optimiser, the mesh, checkpoints and the loop's hooks.

  from multiface_jax.training import loop, evaluate
  loop.train_and_evaluate(config, workdir)          # what `main.py` runs
  evaluate.evaluate(config, workdir, checkpoint)    # `main.py --mode=eval`

Kept free of imports, so that ``training.step`` can be used without clu (TensorFlow).
"""
