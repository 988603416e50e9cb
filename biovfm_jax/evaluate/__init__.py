"""Scoring encoders on benchmarks: features, probes, kNN, fine-tuning, metrics, reports."""
