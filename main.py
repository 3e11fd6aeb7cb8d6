"""Trains or evaluates a MultiFace model.

  python main.py --config=configs/mfn_arcface_n2.py --workdir=runs/x \
      --config.data_dir=/data/emore_tfrecords [--config.batch_size=512 ...]
  python main.py --mode=eval --config=configs/mfn_arcface_n2.py --workdir=runs/x \
      --config.data_dir=/data/emore_tfrecords [--checkpoint=runs/x/checkpoints/1000]

Several hosts: run the same command on every host with --coordinator_address=HOST0:PORT
--num_processes=P --process_id=i (under SLURM or Open MPI JAX finds these itself).
"""
import os

from absl import app, flags
from ml_collections import config_flags

from multiface_jax import startup

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
flags.mark_flags_as_required(['config', 'workdir'])

# Schedulers under which jax.distributed.initialize() finds the processes by itself.
_CLUSTER_SIZE_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def _is_multihost() -> bool:
  return bool(FLAGS.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or
              any(int(os.environ.get(v, '1')) > 1 for v in _CLUSTER_SIZE_VARIABLES))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  startup.prepare()
  import jax  # pylint: disable=import-outside-toplevel
  if _is_multihost():
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if jax.process_index() == 0:
    print(f'JAX: {jax.process_count()} process(es), {jax.device_count()} device(s) '
          f'({jax.devices()[0].platform}), {jax.local_device_count()} on this host.', flush=True)

  from multiface_jax.training import evaluate, loop  # pylint: disable=import-outside-toplevel
  if FLAGS.mode == 'train':
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    evaluate.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)


if __name__ == '__main__':
  app.run(main)
