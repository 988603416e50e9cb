"""Turning medical image corpora into ArrayRecord shards: `python -m data_pipeline.ingest`."""
