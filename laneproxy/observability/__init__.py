"""Metrics, tracing and access logging. Counters are plain attributes bumped on the hot path; exporters read them."""
