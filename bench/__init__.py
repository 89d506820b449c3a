"""Benchmarks: step time, peak memory, CPU threads. Run from the repository root: python -m bench.step_time"""
