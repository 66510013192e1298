"""Benchmarks that print what they measure and save it as JSON and markdown (``compress bench ...``)."""
