"""Metrics, tracing and access logging. Counters are plain attributes bumped on the hot path; exporters read them
(stats -> inventory -> admin /stats, prometheus); the access log and tracing are exchange observers."""
