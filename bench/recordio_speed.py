"""Prints how fast the pure-Python RecordIO reader and writer are (per-record overhead).

  .venv/bin/python bench/recordio_speed.py [--records=1000000] [--payload_bytes=100]

Writes a synthetic .rec/.idx under a temporary folder, then times: writing, loading the .idx,
scanning without the .idx, iterating in file order, and reading every key in a shuffled order.
emore has 5.9M records of ~6 KB; multiply the per-record times accordingly.
"""
import argparse
import os
import random
import tempfile
import time

from multiface_jax.data import recordio
from multiface_jax.data import recordio_writer


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--records', type=int, default=1_000_000)
  parser.add_argument('--payload_bytes', type=int, default=100)
  args = parser.parse_args()
  payload = bytes(range(256)) * (args.payload_bytes // 256 + 1)
  payload = payload[:args.payload_bytes]
  with tempfile.TemporaryDirectory() as tmp:
    rec, idx = os.path.join(tmp, 'x.rec'), os.path.join(tmp, 'x.idx')

    def timed(name, fn):
      start, start_cpu = time.perf_counter(), time.process_time()
      result = fn()
      seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
      print(f'{name:28s} {seconds:7.2f} s wall {1e6 * seconds / args.records:6.2f} us/record, '
            f'{1e6 * cpu / args.records:6.2f} us/record CPU')
      return result

    def write():
      with recordio_writer.RecordIOWriter(rec, idx) as writer:
        for key in range(args.records):
          writer.write_idx(key, recordio_writer.pack((0, float(key % 1000), key, 0), payload))

    timed('write (pack + frame)', write)
    print(f'file: {os.path.getsize(rec) / 1e6:.0f} MB, {args.records} records')
    reader = timed('open with .idx', lambda: recordio.RecordIOReader(rec, idx))
    timed('open without .idx (scan)', lambda: recordio.RecordIOReader(rec).close())
    timed('iterate in file order', lambda: sum(1 for _ in reader))
    keys = reader.keys()
    random.Random(0).shuffle(keys)
    timed('read(key), shuffled', lambda: [reader.read(k) for k in keys])
    timed('read + unpack, shuffled', lambda: [recordio.unpack(reader.read(k)) for k in keys])
    reader.close()


if __name__ == '__main__':
  main()
