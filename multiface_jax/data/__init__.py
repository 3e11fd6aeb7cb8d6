"""Data in: MXNet RecordIO (read and write), emore folders, verification .bin sets, conversion to
TFRecord shards, the tf.data training pipeline, synthetic batches, and folders of your own faces."""
