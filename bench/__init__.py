"""molt's benchmarks (not tests): `python -m bench.packing`, `python -m bench.throughput`."""
