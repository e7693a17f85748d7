"""Benchmarks: side-by-side measurements, reports and plots (may import every layer below)."""
