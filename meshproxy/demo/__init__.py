"""Demo backends for the local mesh and the benchmarks."""
