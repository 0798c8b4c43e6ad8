"""Benchmarks: `bms-ai bench` sections, each measured next to its baseline in one run."""
