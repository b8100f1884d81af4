"""Load tests and the benchmark runner (`python -m loadtest`)."""
