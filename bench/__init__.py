"""Benchmarks: experiments (``bench/experiments``), their runner (``bench.run``), results and the README table."""
