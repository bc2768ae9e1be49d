"""Benchmarks: kernel MBU/MFU microbenchmarks, the serving goodput benchmark, and the kernel demo."""
