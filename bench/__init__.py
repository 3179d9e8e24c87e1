"""In-process benchmarks against the baselines in DESIGN.md."""
