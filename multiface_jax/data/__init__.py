"""Data in: MXNet RecordIO, emore folders, verification .bin sets, TFRecord conversion."""
