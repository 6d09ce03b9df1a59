"""Local storage emulators for tests, the demo and the benchmarks (not needed in production)."""
