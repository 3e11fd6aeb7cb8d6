"""Trains or evaluates a MultiFace model.

  python main.py --config=configs/mfn_arcface_n2.py --workdir=runs/x \
      --config.data_dir=/data/emore_tfrecords [--config.batch_size=512 ...]
  python main.py --mode=eval --config=configs/mfn_arcface_n2.py --workdir=runs/x \
      --config.data_dir=/data/emore_tfrecords [--checkpoint=runs/x/checkpoints/1000]

Several hosts: run the same command on every host with --coordinator_address=HOST0:PORT
--num_processes=P --process_id=i (or under SLURM / Open MPI, where JAX finds them itself).
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from multiface_jax import host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (e.g. configs/mfn_arcface_n2.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, TensorBoard events, eval results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (or resume), or evaluate.')
flags.DEFINE_string('checkpoint', None, 'eval: checkpoint to evaluate (a step folder or imported '
                    'weights); default: the newest in --workdir.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.DEFINE_bool('huge_pages', True, 'Linux (glibc >= 2.35): re-run this command once with '
                  'GLIBC_TUNABLES=glibc.malloc.hugetlb=1, transparent huge pages for the '
                  'buffers XLA:CPU allocates every step (20.5 -> 24.7 images/s training '
                  'MobileFaceNet on 2 cores). See multiface_jax/host_memory.py.')
flags.DEFINE_bool('reuse_step_memory', True, 'CPU: run each step on the main thread and keep its '
                  'freed memory (glibc mallopt), so that steps reuse their pages instead of '
                  'faulting new ones in (28.2 -> 32.2 images/s training MobileFaceNet on 2 '
                  'cores). See multiface_jax/host_memory.py.')
flags.mark_flags_as_required(['config', 'workdir'])

# Schedulers under which jax.distributed.initialize() finds the processes by itself.
_CLUSTER_SIZE_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def _is_multihost() -> bool:
  return bool(FLAGS.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or
              any(int(os.environ.get(v, '1')) > 1 for v in _CLUSTER_SIZE_VARIABLES))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.huge_pages:
    host_memory.reexec_with_huge_pages()  # returns at once where set already or without effect
  if not FLAGS['verbosity'].present:  # Orbax logs every save at INFO; --verbosity=0 shows it.
    logging.set_verbosity(logging.WARNING)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  # TensorFlow (tf.data) must not take GPU memory that JAX owns.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], 'GPU')
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.reuse_step_memory:
    host_memory.reuse_step_memory()  # before JAX starts its CPU backend
  if _is_multihost():
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if jax.process_index() == 0:
    print(f'JAX: {jax.process_count()} process(es), {jax.device_count()} device(s) '
          f'({jax.devices()[0].platform}), {jax.local_device_count()} on this host.', flush=True)

  from multiface_jax import train  # pylint: disable=import-outside-toplevel
  if FLAGS.mode == 'train':
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == '__main__':
  app.run(main)
