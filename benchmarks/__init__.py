"""edgeloop benchmarks."""
