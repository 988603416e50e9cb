"""Data: readers for medical formats, the record schema, shards and grain loaders."""
